"""Where a model's weights come from: the one place that decides whether they are random, says so,
and names their source and digest for the recorded configuration.

Sources: ``checkpoint`` (a ``--checkpoint`` file), ``hf-folder`` (``--model hf:<save_pretrained
folder>``, or ``hf:<name> --checkpoint <folder>``), ``hf-hub`` (``--model hf:<hub id>``),
``timm-pretrained`` (``--pretrained``) and ``random`` (none of these: timm's initialisation).
Imports no torch; the digests of downloaded weights read the local cache (downloading them first
where they are not cached, once, before any replica asks).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from .errors import LnstdWarning, ModelError, one_line

__all__ = [
    "RANDOM_WEIGHTS",
    "RandomWeightsWarning",
    "Weights",
    "pretrained_file",
    "say_if_random",
    "sha256_of",
    "weights_of",
]

RANDOM_WEIGHTS = (
    "random weights: the model had no --checkpoint and no --pretrained weights, so its predictions are "
    "chance and the maps explain an untrained network"
)
SOURCES = ("checkpoint", "hf-folder", "hf-hub", "timm-pretrained", "random")
# What timm and transformers look for; a sharded checkpoint's index names its shards (with the
# revision's commit, the index pins them).
_HUB_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


class RandomWeightsWarning(LnstdWarning):
    """The model has random weights: its predictions are chance and its maps explain nothing learned."""


@dataclass(frozen=True)
class Weights:
    """A model's weights: ``source`` (one of :data:`SOURCES`), ``location`` (the file or folder, hub
    id with its revision, or timm's pretrained tag) and ``sha256`` of the weight file(s) (None where
    not computed)."""

    source: str
    location: str | None = None
    sha256: str | None = None

    @property
    def random(self) -> bool:
        return self.source == "random"

    def describe(self) -> str:
        """One line for people: ``checkpoint /w/vit.safetensors (sha256 a0cc80...)``."""
        if self.random:
            return "random (none loaded)"
        what = {"checkpoint": "checkpoint", "hf-folder": "Hugging Face folder", "hf-hub": "Hugging Face hub",
                "timm-pretrained": "timm's pretrained weights"}[self.source]  # fmt: skip
        digest = f" (sha256 {self.sha256[:12]})" if self.sha256 else ""
        return f"{what} {self.location}{digest}" if self.location else what + digest

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Weights | None:
        """The weights a recorded run used: its ``weights`` entry, else (outputs written before it,
        or ``run.json``'s identity) derived from ``model``, ``checkpoint`` / ``checkpoint_sha256`` and
        ``pretrained``. None when the record says too little to tell."""
        if isinstance(config.get("weights"), dict):
            return cls(**config["weights"])
        if "pretrained" not in config or not ("checkpoint" in config or "checkpoint_sha256" in config):
            return None
        digest = config.get("checkpoint_sha256")
        w = weights_of(config.get("model"), config.get("checkpoint"), bool(config["pretrained"]),
                       digest=False, warn=False, known_sha256=digest)  # fmt: skip
        if digest and w.source in ("random", "timm-pretrained", "hf-hub"):  # run.json: a digest, no path
            return cls("hf-folder" if w.source == "hf-hub" else "checkpoint", None, digest)
        return w


def weights_of(
    model: str | None,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    *,
    digest: bool = True,
    warn: bool = True,
    known_sha256: str | None = None,
) -> Weights:
    """Where the weights of ``lnstd.load_model(model, checkpoint, pretrained)`` come from; with
    ``warn``, random weights are said once, as a :class:`RandomWeightsWarning` (the command line shows
    it as ``lnstd: warning: ...``), and never when weights are loaded from any source.

    Args:
        digest: compute the weights' sha256 (reads them; downloads hub or timm weights that are not
            in the local cache, as loading them would).
        known_sha256: a digest already computed for ``checkpoint`` (not read again).

    Raises:
        ModelError: ``digest`` and the pretrained or hub weights can neither be found nor fetched.
    """
    name = str(model or "")
    if name.startswith("hf:"):
        folder = checkpoint if checkpoint is not None else name[3:]
        if checkpoint is not None or os.path.isdir(folder):
            w = Weights("hf-folder", os.path.abspath(folder), known_sha256)
        else:
            w = Weights("hf-hub", name[3:])
    elif checkpoint is not None:
        w = Weights("checkpoint", os.path.abspath(checkpoint), known_sha256)
    elif pretrained:
        w = Weights("timm-pretrained", name)
    else:
        w = Weights("random")
        if warn:
            say_if_random(w)
        return w
    if not digest or w.sha256:
        return w
    if w.source in ("checkpoint", "hf-folder"):
        return Weights(w.source, w.location, sha256_of(str(w.location)))
    path, tag = _hub_weights(w.location or "") if w.source == "hf-hub" else pretrained_file(name, fetch=True)
    return Weights(w.source, tag, sha256_of(path))


def say_if_random(weights: Weights | dict[str, Any] | None) -> None:
    """Warn (:class:`RandomWeightsWarning`) when ``weights`` (a :class:`Weights` or its
    ``to_dict()``, as a run's configuration records it) are random; nothing otherwise."""
    if isinstance(weights, dict):
        weights = Weights(**weights)
    if weights is not None and weights.random:
        warnings.warn(RANDOM_WEIGHTS, RandomWeightsWarning, stacklevel=2)


_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_of(path: str) -> str:
    """Digest of a weights file, or of a folder's files (a Hugging Face ``save_pretrained`` folder:
    their relative names and contents, in name order). Remembered per file size and time in this
    process, so a checkpoint is read once."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key in _DIGESTS and os.path.isfile(path):
        return _DIGESTS[key]
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, names in os.walk(path) for f in names
    )  # fmt: skip
    for name in files:
        if name != path:
            h.update(os.path.relpath(name, path).encode() + b"\0")
        with open(name, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(chunk)
    _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _hub_weights(repo_rev: str, files: tuple[str, ...] = _HUB_FILES, fetch: bool = True) -> tuple[str, str]:
    """(local file, ``repo@commit``) of a hub model's weights: cached, else (``fetch``) downloaded now.

    Raises:
        ModelError: not cached, and not fetched or not fetchable (offline, no such file).
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    repo, _, revision = repo_rev.partition("@")
    for f in files:
        found = try_to_load_from_cache(repo, f, revision=revision or None)
        if isinstance(found, str):
            return found, _tagged(repo, found)
    last: Exception | None = None
    if fetch and not constants.HF_HUB_OFFLINE:
        for f in files:
            try:
                found = hf_hub_download(repo, f, revision=revision or None)
                return found, _tagged(repo, found)
            except Exception as exc:  # this file is not there: the next one may be
                last = exc
    why = one_line(last) if last else ("HF_HUB_OFFLINE is set" if fetch else "not fetched")
    raise ModelError(f"the weights of {repo_rev} on the Hugging Face hub are not in the local cache ({why})")


def _tagged(repo: str, cached: str) -> str:
    """``repo@<commit>`` from a hub cache path (``.../snapshots/<commit>/file``)."""
    parts = cached.replace(os.sep, "/").split("/")
    return f"{repo}@{parts[parts.index('snapshots') + 1]}" if "snapshots" in parts else repo


def pretrained_file(name: str, fetch: bool = False) -> tuple[str, str]:
    """(local file, tag) of timm's pretrained weights for ``name``: the tag is the hub id with its
    commit, or the URL. With ``fetch``, weights not in the cache are downloaded into it.

    Raises:
        ModelError: timm has no pretrained weights for ``name``, or they are neither cached nor
            (``fetch``) fetched.
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ModelError(f"--pretrained: timm has no pretrained weights for {name}")
    if cfg.hf_hub_id:
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HUB_FILES
        return _hub_weights(cfg.hf_hub_id, files, fetch)
    from urllib.parse import urlparse

    import torch

    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
    if not os.path.exists(cached):
        if not fetch:
            raise ModelError(f"--pretrained: the weights of {name} ({cfg.url}) are not in the local cache")
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(cfg.url, cached, progress=False)
    return cached, cfg.url
