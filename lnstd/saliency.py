"""Reading a saliency dataset back: token grids as arrays, maps over the original pixels, and a
``torch.utils.data.Dataset`` of (image, heatmap) pairs.

The rows are those ``lnstd run`` writes (``lnstd/output.py: row_fields``). A row's map goes back
onto its image through ``crop_box`` with :meth:`lnstd.data.preprocess.Preprocess.heat_to_image`,
the same function ``--save-png`` draws with, so :func:`to_pixels` and the PNG always agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from . import storage
from .data.preprocess import Geometry, Preprocess

__all__ = ["Heatmaps", "SaliencyDataset", "read_heatmaps", "to_pixels"]


@dataclass
class Heatmaps:
    """Heatmap rows read back.

    Attributes:
        maps: (N, grid_h, grid_w) float32 token grids (a torch tensor with ``tensor=True``).
        rows: the rows' other columns, in the same order (a pyarrow Table).
    """

    maps: np.ndarray | torch.Tensor
    rows: pa.Table

    def __len__(self) -> int:
        return self.rows.num_rows

    def row(self, i: int) -> dict[str, Any]:
        """Row ``i`` as a dict, its token grid under ``heatmap`` (what :func:`to_pixels` takes)."""
        out = self.rows.slice(i, 1).to_pylist()[0]
        out["heatmap"] = np.asarray(self.maps[i])
        return out


def read_heatmaps(
    path_or_table: str | pa.Table,
    filters: Sequence[tuple[str, str, Any]] | None = None,
    columns: Sequence[str] | None = None,
    *,
    tensor: bool = False,
    s3_endpoint: str | None = None,
) -> Heatmaps:
    """The ``status == "ok"`` rows of a saliency dataset as token-grid arrays.

    Args:
        path_or_table: a run's output folder, its ``heatmaps`` folder or one part file (local or
            ``s3://``), or a table already read.
        filters: pyarrow filters, pushed down to the Parquet reader (e.g. ``[("method", "=", "gae")]``).
        columns: the other columns to keep (default: all but ``heatmap_png``).
        tensor: return the maps as a torch tensor instead of a NumPy array.
        s3_endpoint: the S3 endpoint (default: ``AWS_ENDPOINT_URL``).

    Raises:
        ValueError: the selected rows have more than one grid size (filter by method).
    """
    expr = pq.filters_to_expression([("status", "=", "ok"), *(filters or [])])
    if isinstance(path_or_table, pa.Table):
        table = pads.dataset(path_or_table).to_table(filter=expr)
    else:
        fs, path = storage.resolve(str(path_or_table), storage.StorageOptions.from_env(s3_endpoint))
        table = pq.read_table(path, filesystem=fs, filters=expr)
    keep = [c for c in (columns or table.schema.names) if c not in ("heatmap", "heatmap_png")]
    for c in ("grid_h", "grid_w"):
        if c not in keep:
            keep.append(c)
    grids = set(zip(table["grid_h"].to_pylist(), table["grid_w"].to_pylist(), strict=True))
    if len(grids) > 1:
        raise ValueError(f"the rows have grids {sorted(grids)}: filter by method to read one grid size")
    gh, gw = grids.pop() if grids else (0, 0)
    heat = table["heatmap"].combine_chunks()
    values = heat.flatten().to_numpy(zero_copy_only=False) if len(heat) else np.zeros(0, np.float32)
    maps = values.astype(np.float32).reshape(len(heat), gh, gw)
    return Heatmaps(torch.from_numpy(maps) if tensor else maps, table.select(keep))


def to_pixels(row: Mapping[str, Any], size: tuple[int, int] | None = None) -> np.ndarray:
    """A row's heatmap over its original image: float32 (height, width) (or ``size`` = (width,
    height)), bilinear inside ``crop_box``, min-max scaled to [0, 1] there, NaN outside it. The
    same values ``--save-png`` stores (as ``round(255 * map)``, alpha 0 where NaN)."""
    heat = np.asarray(row["heatmap"], dtype=np.float32).reshape(row["grid_h"], row["grid_w"])
    geom = Geometry(int(row["width"]), int(row["height"]), tuple(float(v) for v in row["crop_box"]))
    return Preprocess.heat_to_image(torch.from_numpy(heat), geom, size)


class SaliencyDataset(torch.utils.data.Dataset):
    """A saliency dataset joined with its images (read from each row's ``source``).

    Item ``i`` is a dict: ``image`` (the RGB picture, or ``transform(picture)``), ``heatmap`` (the
    token grid, a float32 tensor), ``pixels`` (with ``pixels=True``: :func:`to_pixels` of the row,
    a tensor over the original picture) and ``target`` and ``index`` (into ``self.heatmaps.rows``).

    Args:
        path_or_table, filters: as :func:`read_heatmaps`.
        transform: applied to each PIL picture (e.g. ``lnstd.transform_for(model)``).
        pixels: also return the map over the original pixels.
    """

    def __init__(
        self,
        path_or_table: str | pa.Table,
        filters: Sequence[tuple[str, str, Any]] | None = None,
        transform: Callable[[Any], Any] | None = None,
        pixels: bool = False,
        s3_endpoint: str | None = None,
    ) -> None:
        self.heatmaps = read_heatmaps(path_or_table, filters, tensor=True, s3_endpoint=s3_endpoint)
        self.transform = transform
        self.pixels = pixels
        self.opts = storage.StorageOptions.from_env(s3_endpoint)
        self._sources = self.heatmaps.rows["source"].to_pylist()
        self._targets = self.heatmaps.rows["target"].to_pylist()

    def __len__(self) -> int:
        return len(self.heatmaps)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = Preprocess.decode_full(storage.read_bytes(self._sources[i], self.opts))
        item = {
            "image": self.transform(image) if self.transform else image,
            "heatmap": self.heatmaps.maps[i],
            "target": self._targets[i],
            "index": i,
        }
        if self.pixels:
            item["pixels"] = torch.from_numpy(to_pixels(self.heatmaps.row(i)))
        return item
