"""Input sources: image folders / S3 prefixes, Parquet or CSV manifests, ImageNet-segmentation .mat.

Every source streams :class:`Item` records in a deterministic order, so fixed-size shards get the
same ids on every run (what resume relies on), and a listing of millions never sits in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .. import storage

__all__ = ["IMAGE_EXTENSIONS", "Item", "Source", "open_source"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Item:
    """One input image: a stable id, where to read it, and what is known about it."""

    image_id: str
    uri: str
    label: int | None = None
    mask_uri: str | None = None


class Source:
    """A dataset of images; ``count()`` and ``items()`` may both be called (each streams)."""

    def __init__(self, uri: str, opts: storage.StorageOptions) -> None:
        self.uri = uri
        self.opts = opts

    def items(self) -> Iterator[Item]:
        raise NotImplementedError

    def count(self) -> int:
        return sum(1 for _ in self.items())


class FolderSource(Source):
    """Every image file under a folder or S3 prefix, recursively; id = path relative to the root."""

    def items(self) -> Iterator[Item]:
        root = self.uri.rstrip("/")
        if not storage.is_s3(root):
            root = storage.resolve(root, self.opts)[1]
        for uri in storage.list_files(self.uri, IMAGE_EXTENSIONS, self.opts):
            yield Item(image_id=uri[len(root) + 1 :], uri=uri)


class ManifestSource(Source):
    """A Parquet or CSV table with a ``uri`` column and optional ``label``, ``mask_uri``, ``image_id``.

    Relative URIs are resolved against the manifest's folder.
    """

    def _batches(self):
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        fs, path = storage.resolve(self.uri, self.opts)
        if self.uri.lower().endswith(".csv"):
            with fs.open_input_stream(path) as f:
                reader = pacsv.open_csv(f)
                yield from reader
        else:
            with fs.open_input_file(path) as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=8192)

    def items(self) -> Iterator[Item]:
        base = self.uri.rsplit("/", 1)[0] if "/" in self.uri else "."
        for batch in self._batches():
            cols = batch.schema.names
            if "uri" not in cols:
                raise ValueError(f"manifest {self.uri} has no 'uri' column (columns: {', '.join(cols)})")
            data = batch.to_pydict()
            n = batch.num_rows
            labels = data.get("label", [None] * n)
            masks = data.get("mask_uri", [None] * n)
            for i in range(n):
                uri = str(data["uri"][i])
                if "://" not in uri and not os.path.isabs(uri):
                    uri = storage.join(base, uri)
                label = labels[i]
                mask = masks[i]
                if mask and "://" not in mask and not os.path.isabs(mask):
                    mask = storage.join(base, mask)
                image_id = str(data["image_id"][i]) if "image_id" in data else data["uri"][i]
                yield Item(image_id, uri, None if label is None else int(label), mask or None)


class MatSource(Source):
    """ImageNet-segmentation ``gtsegs_ijcv.mat`` (MATLAB v7.3 / HDF5): images with masks.

    Items point into the file (``path#index``); :func:`read_mat_sample` reads one.
    """

    def count(self) -> int:
        import h5py

        with h5py.File(self._local(), "r") as f:
            return int(f["/value/img"].shape[0])

    def _local(self) -> str:
        if storage.is_s3(self.uri):
            raise ValueError("read the .mat file from a local path (copy it next to the job)")
        return storage.resolve(self.uri, self.opts)[1]

    def items(self) -> Iterator[Item]:
        n = self.count()
        for i in range(n):
            ref = f"{self._local()}#{i}"
            yield Item(image_id=f"{os.path.basename(self.uri)}#{i:05d}", uri=ref, mask_uri=ref)


def read_mat_sample(ref: str) -> tuple[np.ndarray, np.ndarray]:
    """``path#i`` -> (image uint8 (H, W, 3), mask bool (H, W)), transposed as METHODS.md states."""
    import h5py

    path, _, idx = ref.rpartition("#")
    i = int(idx)
    with h5py.File(path, "r") as f:
        img = np.array(f[f["/value/img"][i, 0]]).transpose(2, 1, 0)
        mask = np.array(f[f[f["/value/gt"][i, 0]][0, 0]]).transpose(1, 0)
    return img.astype(np.uint8), mask > 0


def open_source(uri: str, opts: storage.StorageOptions | None = None) -> Source:
    """The source for an input URI: a manifest (.parquet/.csv), a .mat file, else a folder/prefix."""
    opts = opts or storage.StorageOptions.from_env()
    low = uri.lower()
    if low.endswith((".parquet", ".csv")):
        return ManifestSource(uri, opts)
    if low.endswith(".mat"):
        return MatSource(uri, opts)
    return FolderSource(uri, opts)
