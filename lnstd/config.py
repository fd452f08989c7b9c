"""The configuration of one attribution run, and which of its fields decide the output."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from lnstd.data.decode import MAX_IMAGE_PIXELS
from lnstd.errors import UsageError
from lnstd.metrics.registry import FAITHFULNESS
from lnstd.weights import sha256_of, weights_of

__all__ = ["DECODERS", "RESULT_FIELDS", "RunConfig"]

# Fields that change what is written: a rerun must match these to resume into the same output.
RESULT_FIELDS = (
    "input",
    "model",
    "checkpoint_sha256",
    "pretrained",
    "model_args",
    "methods",
    "options",
    "shard_size",
    "precision",
    "target",
    "fit",
    "decode",
    "save_png",
)
DECODERS = ("cpu", "gpu")
# Result fields added after outputs were first written: recorded only when not at their default, so
# those outputs still resume (their identity has no such key).
_LATER_FIELDS = {"max_image_pixels": MAX_IMAGE_PIXELS}


def _absolute(uri: str) -> str:
    """Local paths become absolute (a resume from another folder must name the same data)."""
    if "://" in uri:
        return uri[len("file://") :] if uri.startswith("file://") else uri
    return os.path.abspath(uri)


@dataclass
class RunConfig:
    """Everything ``lnstd run`` was asked to do (no credentials: those stay in the environment)."""

    input: str
    output: str
    model: str
    methods: list[str]  # empty: every method that applies to the model (resolved before the run)
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    pretrained: bool = False
    model_args: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # method options: name or method.name
    batch_size: int = 32
    shard_size: int = 256
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    address: str | None = None
    precision: str = "fp32"
    capture: str | None = None
    target: str = "predicted"
    fit: str = "resize"
    decode: str = "cpu"
    save_png: bool = False
    max_image_pixels: int = MAX_IMAGE_PIXELS  # None given: this default
    overwrite: bool = False
    refresh_input: bool = False
    dedupe: bool = False
    s3_endpoint: str | None = None
    lease_ttl: float = 60.0
    startup_timeout: float = 600.0
    verbose: bool = False
    fail_on_errors: bool = False
    # Where the weights came from and their digest (lnstd.weights.Weights.to_dict()), set by the job's
    # validation; recorded, not compared (checkpoint_sha256 is).
    weights: dict[str, Any] | None = None
    faithfulness: list[str] = field(default_factory=list)  # tests per row (metrics/faithfulness.py)

    def __post_init__(self) -> None:
        self.input = _absolute(self.input)
        self.output = _absolute(self.output)
        if self.checkpoint:
            self.checkpoint = os.path.abspath(self.checkpoint)
        if self.checkpoint and not self.checkpoint_sha256 and os.path.exists(self.checkpoint):
            self.checkpoint_sha256 = sha256_of(self.checkpoint)
        if self.target != "predicted" and self.target != "label" and not self.target.startswith("topk:"):
            raise UsageError(f"--target must be predicted, label or topk:K, got {self.target!r}")
        if self.target.startswith("topk:") and not (self.target[5:].isdigit() and int(self.target[5:]) > 0):
            raise UsageError(f"--target topk:K needs a positive integer K, got {self.target!r}")
        if self.max_image_pixels is None:
            self.max_image_pixels = MAX_IMAGE_PIXELS
        for name in ("batch_size", "shard_size", "actors", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("gpus_per_actor", "cpus_per_actor"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must not be negative")
        if self.decode not in DECODERS:
            raise UsageError(f"--decode must be one of {', '.join(DECODERS)}, got {self.decode!r}")
        if self.decode == "gpu" and self.gpus_per_actor <= 0:
            raise UsageError("--decode gpu needs --gpus-per-actor > 0 (the actors decode on their GPU)")
        wrong = [m for m in self.faithfulness if m not in FAITHFULNESS]
        if wrong:
            raise UsageError(f"--faithfulness takes {', '.join(FAITHFULNESS)}, got {', '.join(wrong)}")
        if os.path.normpath(self.output) == os.path.normpath(self.input):
            raise UsageError("--output must not be the --input folder")

    @property
    def topk(self) -> int | None:
        return int(self.target[5:]) if self.target.startswith("topk:") else None

    def identity(self) -> dict[str, Any]:
        """The result-deciding fields (what resume compares); ``faithfulness`` only when asked for,
        so the identities of runs without it are those written before it existed."""
        d = asdict(self)
        ident = {k: d[k] for k in RESULT_FIELDS}
        if self.faithfulness:
            ident["faithfulness"] = sorted(self.faithfulness)
        ident.update({k: d[k] for k, default in _LATER_FIELDS.items() if d[k] != default})
        return ident

    def with_weights(self) -> RunConfig:
        """This configuration with ``weights``: their source and digest (downloading hub or timm weights
        into the local cache if they are not there). Random weights are not said here: the job says
        them once its refusals are behind it (:func:`lnstd.weights.say_if_random`), so that a refusal
        stays one line."""
        w = weights_of(
            self.model, self.checkpoint, self.pretrained, warn=False, known_sha256=self.checkpoint_sha256
        )
        return dataclasses.replace(self, weights=w.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
