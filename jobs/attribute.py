"""The attribution job behind ``lnstd run``: shards -> Ray actors -> one Parquet file per shard.

Why plain Ray actors rather than Ray Data: the unit of work, of commit and of resume is the shard.
Each shard is a deterministic slice of a deterministic listing, handed to an actor that holds one
model replica, decodes the shard's images on CPU threads while its model computes the previous
batch, and commits ``heatmaps/part-NNNNN.parquet`` in one atomic write. A rerun skips committed
shards, so no row is ever written twice; Ray Data's ``write_parquet`` names and commits files per
block on its own schedule, which leaves no stable unit to resume from. A killed actor is restarted
by Ray and its shard retried (the commit is idempotent). The driver streams the listing and keeps
only in-flight shards in memory, so its footprint does not grow with the dataset.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from lnstd import storage
from lnstd.data import Item, open_source
from lnstd.sysinfo import peak_rss_mb

from .config import RunConfig

__all__ = ["ConfigMismatchError", "ReplicaStartError", "run"]


class ConfigMismatchError(ValueError):
    """The output already holds a run with a different configuration."""


class ReplicaStartError(RuntimeError):
    """An actor failed while loading the model (bad name, checkpoint, arguments)."""


def _last_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _log(msg: str) -> None:
    print(f"lnstd: {msg}", file=sys.stderr, flush=True)


def _shards(items: Iterator[Item], size: int) -> Iterator[tuple[int, list[Item]]]:
    it = iter(items)
    for k in itertools.count():
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield k, chunk


def prepare_output(cfg: RunConfig, opts: storage.StorageOptions) -> str:
    """Claim the output for this configuration; returns the run id (kept when resuming)."""
    run_uri = storage.join(cfg.output, "_run.json")
    ident = cfg.identity()
    if storage.exists(run_uri, opts):
        previous = json.loads(storage.read_bytes(run_uri, opts))
        if previous["identity"] == ident and not cfg.overwrite:
            return previous["run_id"]
        if not cfg.overwrite:
            diff = sorted(k for k in ident if previous["identity"].get(k) != ident[k])
            raise ConfigMismatchError(
                f"{cfg.output} holds a run with a different {', '.join(diff)}; "
                "pass --overwrite to replace it, or choose another --output"
            )
        for sub in ("heatmaps", "aggregate"):
            storage.delete_tree(storage.join(cfg.output, sub), opts)
        for name in ("manifest.json", "_SUCCESS", "report.html"):
            uri = storage.join(cfg.output, name)
            if storage.exists(uri, opts):
                fs, path = storage.resolve(uri, opts)
                fs.delete_file(path)
    elif storage.list_names(storage.join(cfg.output, "heatmaps"), opts):
        raise ConfigMismatchError(f"{cfg.output} holds heatmaps of an unknown run; pass --overwrite")
    run_id = uuid.uuid4().hex[:12]
    storage.write_bytes(run_uri, json.dumps({"run_id": run_id, "identity": ident}, indent=1).encode(), opts)
    return run_id


def _ray_init(cfg: RunConfig) -> None:
    import ray

    address = cfg.address or os.environ.get("RAY_ADDRESS")
    env = {
        k: os.environ[k]
        for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
        if k in os.environ
    }
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
    if address:
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = False
    # The package itself must be importable on the workers: installed there (cluster images) or,
    # for a local run from a checkout, found through the driver's sys.path.
    kwargs["runtime_env"] = {"env_vars": env} if env else None
    ray.init(**kwargs)


def run(cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Run the job to completion (or resume it); returns the manifest written next to the output.

    Raises:
        ConfigMismatchError: the output holds a different run and ``overwrite`` is False.
    """
    import ray
    from tqdm import tqdm

    from .worker import ShardWorker

    t_start = time.time()
    opts = storage.StorageOptions.from_env(cfg.s3_endpoint)
    if storage.is_s3(cfg.output) or storage.is_s3(cfg.input):
        storage.check_credentials()
    source = open_source(cfg.input, opts)
    total = source.count()
    run_id = prepare_output(cfg, opts)
    heatmaps = storage.join(cfg.output, "heatmaps")
    storage.remove_temporaries(heatmaps, opts)  # left by writers of an earlier, killed run
    committed = {
        int(n[len("part-") : -len(".parquet")])
        for n in storage.list_names(storage.join(cfg.output, "heatmaps"), opts)
        if n.startswith("part-") and n.endswith(".parquet")
    }
    _ray_init(cfg)
    Worker = ray.remote(ShardWorker).options(
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor,
        max_restarts=3,
        max_task_retries=3,
    )
    actors = [Worker.remote(cfg.to_dict(), run_id) for _ in range(cfg.actors)]
    try:
        infos = ray.get([a.info.remote() for a in actors])
    except ray.exceptions.RayActorError as exc:
        raise ReplicaStartError(f"the model replica could not start: {_last_line(exc)}") from None
    for i, info in enumerate(infos):
        _log(f"actor {i} ready (pid {info['pid']}, {info['device']})")
    t_ready = time.time()
    actor_rss = 0.0

    bar = tqdm(total=total, unit="img", disable=not progress, mininterval=1.0, file=sys.stderr)
    counts = {"images": 0, "ok": 0, "errors": 0, "shards_done": 0, "shards_skipped": 0, "images_skipped": 0}
    failed: list[dict[str, Any]] = []
    in_flight: dict[Any, tuple[int, list[Item], int, int]] = {}  # ref -> shard, items, actor, tries
    load = [0] * len(actors)
    shards = _shards(source.items(), cfg.shard_size)

    def submit(shard: int, items: list[Item], tries: int = 0) -> None:
        a = min(range(len(actors)), key=load.__getitem__)
        load[a] += 1
        in_flight[actors[a].process.remote(shard, items)] = (shard, items, a, tries)

    def refill() -> None:
        while len(in_flight) < 2 * len(actors):
            nxt = next(shards, None)
            if nxt is None:
                return
            shard, items = nxt
            if shard in committed:
                counts["shards_skipped"] += 1
                counts["images"] += len(items)
                counts["images_skipped"] += len(items)
                prior = _shard_counts(cfg.output, shard, opts)
                counts["ok"] += prior.get("ok", 0)
                counts["errors"] += prior.get("errors", 0)
                bar.update(len(items))
                continue
            submit(shard, items)

    refill()
    while in_flight:
        done, _ = ray.wait(list(in_flight), num_returns=1)
        ref = done[0]
        shard, items, a, tries = in_flight.pop(ref)
        load[a] -= 1
        try:
            res = ray.get(ref)
            counts["shards_done"] += 1
            counts["images"] += res["images"]
            counts["ok"] += res["ok"]
            counts["errors"] += res["errors"]
            actor_rss = max(actor_rss, res.get("peak_rss_mb", 0.0))
        except ray.exceptions.RayActorError as exc:
            if tries < 2:  # the replica is gone for good: start a fresh one and try again
                _log(f"actor {a} lost on shard {shard} ({type(exc).__name__}); replacing it")
                actors[a] = Worker.remote(cfg.to_dict(), run_id)
                submit(shard, items, tries + 1)
                continue
            failed.append({"shard": shard, "error": _last_line(exc)})
        except Exception as exc:
            msg = _last_line(exc)
            failed.append({"shard": shard, "error": msg})
            _log(f"shard {shard} failed: {msg}")
        bar.update(len(items))
        refill()
    bar.close()
    storage.remove_temporaries(heatmaps, opts)  # left by actors killed mid-write in this run

    elapsed = time.time() - t_start
    manifest = {
        "run_id": run_id,
        "config": {k: v for k, v in asdict(cfg).items() if k != "overwrite"},
        "identity": cfg.identity(),
        "versions": _versions(),
        "counts": {**counts, "shards_failed": len(failed), "input_images": total},
        "failed_shards": failed,
        "timings": {"started": t_start, "elapsed_s": elapsed, "attribution_s": time.time() - t_ready},
        "driver_peak_rss_mb": peak_rss_mb(),
        "actor_peak_rss_mb": actor_rss,
    }
    storage.write_bytes(
        storage.join(cfg.output, "manifest.json"), json.dumps(manifest, indent=1).encode(), opts
    )
    if not failed:
        storage.write_bytes(storage.join(cfg.output, "_SUCCESS"), b"", opts)
    rate = counts["images"] / elapsed if elapsed > 0 else 0.0
    _log(
        f"{'done' if not failed else 'FAILED'}: {counts['images']} images ({counts['ok']} ok, "
        f"{counts['errors']} errors); this run wrote {counts['shards_done']} shards, "
        f"{counts['shards_skipped']} shards ({counts['images_skipped']} images) were already committed, "
        f"{len(failed)} failed; {elapsed:.1f}s ({rate:.1f} img/s) -> {cfg.output}"
    )
    return manifest


def _shard_counts(output: str, shard: int, opts: storage.StorageOptions) -> dict[str, int]:
    """The counts a committed shard recorded in its Parquet footer (empty if unreadable)."""
    import pyarrow.parquet as pq

    from .worker import part_uri

    fs, path = storage.resolve(part_uri(output, shard), opts)
    try:
        with fs.open_input_file(path) as f:
            meta = pq.read_metadata(f).metadata or {}
        return json.loads(meta.get(b"lnstd.shard_counts", b"{}"))
    except (OSError, ValueError):
        return {}


def _versions() -> dict[str, str]:
    import pyarrow
    import ray
    import timm
    import torch

    import lnstd

    return {
        "lnstd": lnstd.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
        "python": platform.python_version(),
    }
