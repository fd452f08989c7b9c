"""``lnstd`` as a Ray Data building block: :class:`Attributor`, a callable class for ``map_batches``,
and :func:`sized_pool`, its replicas sized to the cluster.

    ds = ray.data.read_binary_files("s3://bucket/images", include_paths=True)
    rows = ds.map_batches(Attributor, fn_constructor_kwargs={"model": "vit_base_patch16_224",
                          "methods": ["lnstd", "gae"], "column": "bytes"}, batch_size=64,
                          **sized_pool(cpus_per_replica=4, gpus_per_replica=1))

Each replica loads the model once (on its GPU when Ray gave it one); each call returns the batch's
heatmap rows, the columns of ``lnstd run``'s output (``lnstd/output.py: row_fields``), one row per
image and method, error rows included. The rows are made by :class:`lnstd.rows.RowBuilder`, the
class the job's actors are, so they equal the job's for the same image bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from .data import Item
from .rows import Loaded, RowBuilder

__all__ = ["Attributor", "sized_pool"]

_NOWHERE = "ray-data://"  # a pipeline's input and output are Ray Data's, not the Attributor's


class Attributor:
    """A callable class for ``Dataset.map_batches``: a batch of images in, their heatmap rows out.

    Args:
        model: timm model name, or ``hf:<name>`` (as ``lnstd run --model``).
        methods: the methods to run (``lnstd methods``).
        column: the batch's column with the pictures: decoded arrays (``read_images``' ``image``), encoded
            bytes (``read_binary_files``' ``bytes``, a Parquet binary column) or URIs (local or
            ``s3://``) to read. Bytes and URIs are decoded as the job decodes them.
        id_column: the column that names each picture (``path`` with ``include_paths=True``); it becomes
            ``image_id`` and ``source``.
        label_column: optional integer labels (``target="label"``, ``correct``).
        checkpoint, pretrained, model_args, options, precision, capture, target, fit, save_png,
        s3_endpoint, max_image_pixels: as the flags of ``lnstd run``.
        faithfulness: the tests of ``lnstd run --faithfulness`` (``deletion``, ``insertion``, ``road``):
            their figures and curves as columns of every row; none by default (each costs forwards).

    ``__call__`` never raises for one bad picture: it becomes that picture's error rows
    (``status="error"``, the job's reasons). Rows have ``shard`` -1 (no shard plan).
    """

    def __init__(
        self,
        model: str,
        methods: Sequence[str],
        column: str = "image",
        id_column: str = "path",
        label_column: str | None = None,
        checkpoint: str | None = None,
        pretrained: bool = False,
        model_args: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        precision: str = "fp32",
        capture: str | None = None,
        target: str = "predicted",
        fit: str = "resize",
        save_png: bool = False,
        s3_endpoint: str | None = None,
        max_image_pixels: int | None = None,
        faithfulness: Sequence[str] = (),
    ) -> None:
        from .config import RunConfig
        from .weights import weights_of

        weights_of(model, checkpoint, pretrained, digest=False)  # random weights: a RandomWeightsWarning
        self.column, self.id_column, self.label_column = column, id_column, label_column
        cfg = RunConfig(
            input=_NOWHERE, output=_NOWHERE + "rows", model=model, methods=list(methods),
            checkpoint=checkpoint, pretrained=pretrained, model_args=dict(model_args or {}),
            options=dict(options or {}), precision=precision, capture=capture, target=target, fit=fit,
            save_png=save_png, s3_endpoint=s3_endpoint, max_image_pixels=max_image_pixels,
            faithfulness=list(faithfulness), gpus_per_actor=float(torch.cuda.is_available()),
            cpus_per_actor=_assigned_cpus(),
        )  # fmt: skip
        self.rows = RowBuilder(cfg, run_id="")

    def __call__(self, batch: Mapping[str, Any]) -> pa.Table:
        """The rows of one batch (a dict of columns, Ray Data's default batch format), as a table."""
        for name in (self.column, self.id_column, self.label_column):
            if name is not None and name not in batch:
                raise KeyError(f"Attributor: the batch has no column {name!r} (columns: {list(batch)})")
        values, ids = batch[self.column], batch[self.id_column]
        labels = batch[self.label_column] if self.label_column else None
        loaded = []
        for i in range(len(values)):
            uri = str(ids[i])
            label = None if labels is None or labels[i] is None else int(labels[i])
            loaded.append(self._load(Item(image_id=uri, uri=uri, label=label), values[i]))
        tables = self.rows._explain(loaded, shard=-1)
        return pa.concat_tables(tables) if tables else self.rows.schema.empty_table()

    def _load(self, item: Item, value: Any) -> Loaded:
        if isinstance(value, str):  # a URI to read
            return self.rows._load(Item(item.image_id, value, item.label))
        if isinstance(value, (bytes, bytearray, memoryview)):
            return self.rows._load(item, bytes(value))
        return self.rows._load(item, np.asarray(value))


def sized_pool(
    cpus_per_replica: float = 2.0, gpus_per_replica: float = 0.0, reserve_cpus: float = 1.0
) -> dict[str, Any]:
    """``map_batches`` arguments that size the :class:`Attributor` replicas to the Ray cluster
    (``ray.cluster_resources()``; Ray is started here if it is not yet): ``compute`` (an actor pool),
    ``num_cpus`` and ``num_gpus`` per replica.

    ``reserve_cpus`` stay free for the pipeline's own tasks (``read_images``, ``write_parquet``): if
    the replicas hold every CPU those tasks wait for ever ("backpressured", no error). The rule:
    ``free = CPUs - reserve_cpus``; each replica takes ``min(cpus_per_replica, free)`` CPUs (its
    decoding and torch threads), and there are ``free // that`` replicas, at least one, and no more
    than ``GPUs // gpus_per_replica``. On 2 CPUs: one replica of 1 CPU, one CPU for reading.

    Raises:
        ResourceError: fewer CPUs than ``reserve_cpus`` plus a fraction, or no GPU where one is asked for.
    """
    import ray
    from ray.data import ActorPoolStrategy

    from .errors import ResourceError

    if not ray.is_initialized():
        ray.init()
    have = ray.cluster_resources()
    free = float(have.get("CPU", 0.0)) - reserve_cpus
    if free < 0.25:
        raise ResourceError(
            f"the cluster has {have.get('CPU', 0):g} CPUs: a pipeline needs {reserve_cpus:g} for its "
            "own tasks and some for the model replicas (lower reserve_cpus, or add CPUs)"
        )
    per = min(float(cpus_per_replica), free)
    size = max(1, int(free // per))
    if gpus_per_replica > 0:
        size = min(size, int(float(have.get("GPU", 0.0)) // gpus_per_replica))
        if size < 1:
            raise ResourceError(f"no replica fits: {gpus_per_replica:g} GPUs each, the cluster has "
                                f"{have.get('GPU', 0):g}")  # fmt: skip
    return {"compute": ActorPoolStrategy(size=size), "num_cpus": per, "num_gpus": gpus_per_replica}


def _assigned_cpus() -> float:
    """The CPUs Ray gave this replica (the decoder and torch threads are sized to them), else 1."""
    try:
        import ray

        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    except Exception:  # not inside Ray
        return 1.0
