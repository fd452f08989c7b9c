"""The configuration of one attribution run, and which of its fields decide the output."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RESULT_FIELDS", "RunConfig"]

# Fields that change what is written: a rerun must match these to resume into the same output.
RESULT_FIELDS = (
    "input",
    "model",
    "checkpoint_sha256",
    "model_args",
    "methods",
    "options",
    "shard_size",
    "precision",
    "target",
    "fit",
    "save_png",
)


@dataclass
class RunConfig:
    """Everything ``lnstd run`` was asked to do (no credentials: those stay in the environment)."""

    input: str
    output: str
    model: str
    methods: list[str]
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    pretrained: bool = False
    model_args: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # blocks / std / normalize
    batch_size: int = 32
    shard_size: int = 256
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    address: str | None = None
    precision: str = "fp32"
    target: str = "predicted"
    fit: str = "resize"
    save_png: bool = False
    overwrite: bool = False
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.checkpoint and not self.checkpoint_sha256:
            h = hashlib.sha256()
            with open(self.checkpoint, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self.checkpoint_sha256 = h.hexdigest()
        if self.target != "predicted" and self.target != "label" and not self.target.startswith("topk:"):
            raise ValueError(f"--target must be predicted, label or topk:K, got {self.target!r}")
        if self.target.startswith("topk:") and not self.target[5:].isdigit():
            raise ValueError(f"--target topk:K needs an integer K, got {self.target!r}")
        for name in ("batch_size", "shard_size", "actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")

    @property
    def topk(self) -> int | None:
        return int(self.target[5:]) if self.target.startswith("topk:") else None

    def identity(self) -> dict[str, Any]:
        """The result-deciding fields (what resume compares)."""
        d = asdict(self)
        ident = {k: d[k] for k in RESULT_FIELDS}
        if ident["input"] and "://" not in ident["input"]:
            ident["input"] = os.path.abspath(ident["input"])
        return ident

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
