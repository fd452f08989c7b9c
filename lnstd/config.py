"""The configuration of one attribution run, and which of its fields decide the output."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from lnstd.choices import DECODERS, Capture, Decode, Fit, Precision
from lnstd.data.decode import MAX_IMAGE_PIXELS
from lnstd.errors import UsageError
from lnstd.metrics.registry import FAITHFULNESS
from lnstd.weights import sha256_of, weights_of

__all__ = ["RESULT_FIELDS", "RunConfig", "Target"]

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


@dataclass(frozen=True)
class Target:
    """Which class a heatmap explains: the ``predicted`` one, the input's ``label``, each of the
    ``topk`` (``k``) highest-scoring ones, or one ``class`` index (``k``) for every image.

    Written as text (``--target``, the recorded configuration): ``predicted``, ``label``,
    ``topk:K``, or an integer.
    """

    kind: Literal["predicted", "label", "topk", "class"]
    k: int | None = None

    @classmethod
    def parse(cls, text: str, allowed: tuple[str, ...] = ("predicted", "label", "topk")) -> Target:
        """``text`` -> Target; a UsageError naming ``--target`` unless it is one of the ``allowed``
        kinds."""
        kinds = {"predicted": "predicted", "label": "label", "topk": "topk:K", "class": "a class index"}
        expected = ", ".join(kinds[a] for a in allowed)
        if text in ("predicted", "label"):
            target = cls(text)
        elif text.startswith("topk:"):
            if not (text[5:].isdigit() and int(text[5:]) > 0):
                raise UsageError(f"--target topk:K needs a positive integer K, got {text!r}")
            target = cls("topk", int(text[5:]))
        elif text.isdigit():
            target = cls("class", int(text))
        else:
            raise UsageError(f"--target must be {expected}, got {text!r}")
        if target.kind not in allowed:
            raise UsageError(f"--target must be {expected}, got {text!r}")
        return target

    def __str__(self) -> str:
        return {"topk": f"topk:{self.k}", "class": str(self.k)}.get(self.kind, self.kind)


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
    precision: Precision = "fp32"
    capture: Capture | None = None
    target: str = "predicted"  # as written (Target's text form); parsed: :attr:`targets`
    fit: Fit = "resize"
    decode: Decode = "cpu"
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
        Target.parse(self.target)
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

    @classmethod
    def from_args(cls, args: argparse.Namespace, **given: Any) -> RunConfig:
        """The configuration from ``lnstd run``'s parsed flags (each flag sets the field of its name;
        ``--model-arg`` and ``--option`` pairs become the ``model_args`` and ``options`` mappings);
        ``given`` fields win over the flags (the demo's input, a model named by its checkpoint)."""
        renamed = {"model_args": "model_arg", "options": "option"}
        values: dict[str, Any] = {}
        for f in fields(cls):
            flag = renamed.get(f.name, f.name)
            if f.name in given or not hasattr(args, flag):
                continue
            value = getattr(args, flag)
            values[f.name] = dict(value) if f.name in renamed else value
        values["methods"] = list(values.get("methods") or [])  # empty: every method that applies
        values["output"] = values.get("output") or "lnstd-out"
        return cls(**{**values, **given})

    @property
    def targets(self) -> Target:
        """:attr:`target`, parsed."""
        return Target.parse(self.target)

    @property
    def topk(self) -> int | None:
        """K of ``--target topk:K`` (None for the other targets)."""
        return self.targets.k if self.targets.kind == "topk" else None

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
