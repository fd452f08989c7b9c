"""Before Ray and before any write: everything about a run that can be checked, in one line each."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

from lnstd import storage
from lnstd.config import RunConfig
from lnstd.data import Source, open_source
from lnstd.errors import ConfigMismatchError, ModelError, OptionError, OutputError, UsageError
from lnstd.output import HEATMAPS, RUN, Output

__all__ = ["check_output", "previous_run", "validate"]


def validate(cfg: RunConfig, out: Output) -> tuple[RunConfig, Source]:
    """Check model, checkpoint, methods and options, credentials, input and output, writing nothing.

    Returns the configuration with its methods resolved (the default, empty, becomes every method that
    applies to the model; ``cfg`` itself is not changed) and the opened input source.

    Raises:
        ModelError, UsageError, InputError, OutputError, StorageError: in one line, naming the flag.
    """
    from lnstd import Explainer
    from lnstd.models import check_model, check_pretrained

    if cfg.checkpoint_sha256 is None and cfg.checkpoint:
        raise ModelError(f"checkpoint not found: {cfg.checkpoint}")
    name, model = check_model(cfg.model, cfg.checkpoint, **cfg.model_args)
    if cfg.pretrained and not cfg.checkpoint and not str(cfg.model).startswith("hf:"):
        check_pretrained(name)  # cached or reachable, in seconds (the hub client retries a minute)
    if not cfg.methods:  # the default: every method that applies to this model
        from lnstd.arch import get_adapter
        from lnstd.methods import applicable_methods

        cfg = dataclasses.replace(cfg, methods=applicable_methods(get_adapter(model)))
    try:  # an OptionError names its flag (--capture, --precision, --option) as it is
        Explainer(model, cfg.methods, precision=cfg.precision, capture=cfg.capture, **cfg.options)
    except OptionError:
        raise
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if storage.is_s3(cfg.output) or storage.is_s3(cfg.input):
        storage.check_credentials()
    check_output(out)
    source = open_source(cfg.input, out.opts)
    source.check()
    return cfg.with_weights(), source


def check_output(out: Output) -> None:
    """The output can be created and written (checked without writing anything)."""
    if out.s3:
        bucket = out.uri[len("s3://") :].split("/", 1)[0]
        client = storage.s3_client(out.opts)
        try:
            client.head_bucket(Bucket=bucket)
        except client.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            what = "does not exist" if code in ("404", "NoSuchBucket") else f"cannot be used ({code})"
            raise OutputError(f"--output: bucket {bucket!r} {what}") from None
        return
    path = out.local_path()
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"--output {out.uri} is a file; give a folder (it is created if missing)")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise OutputError(f"--output {out.uri}: {probe} is a file, so the folder cannot be created")
    try:  # os.access says yes to root everywhere: try it (an empty folder, removed at once)
        os.rmdir(tempfile.mkdtemp(prefix=".lnstd-probe-", dir=probe))
    except OSError as exc:
        raise OutputError(f"--output {out.uri}: cannot write in {probe} ({exc.strerror})") from None


def previous_run(cfg: RunConfig, out: Output) -> dict[str, Any] | None:
    """The run recorded in the output (None: none, or ``--overwrite`` replaces a damaged record).

    Raises:
        ConfigMismatchError: the output holds a run with another configuration, or heatmaps of an
            unknown run, and ``--overwrite`` was not given.
    """
    try:
        previous = out.read_run()
    except OutputError:
        if not cfg.overwrite:
            raise
        previous = None  # --overwrite replaces a damaged record
    if previous is not None:
        ident = cfg.identity()
        if previous["identity"] != ident and not cfg.overwrite:
            diff = sorted(k for k in ident if previous["identity"].get(k) != ident[k])
            raise ConfigMismatchError(
                f"{out.uri} holds a run with a different {', '.join(diff)}; "
                "pass --overwrite to replace it, or choose another --output"
            )
        return previous
    if not cfg.overwrite and storage.list_names(out.path(HEATMAPS), out.opts):
        raise ConfigMismatchError(
            f"{out.uri} holds heatmaps but no record of their run ({RUN} is missing); pass --overwrite"
        )
    return None
