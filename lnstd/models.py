"""Load a timm model by name, with weights from a local checkpoint loaded safely."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelError, one_line

__all__ = ["check_model", "check_pretrained", "class_names", "load_checkpoint", "load_model"]

_NESTED_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


@contextlib.contextmanager
def _safetensors(path: Path) -> Iterator[None]:
    """A safetensors file that cannot be read is the user's one-line error."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path}: not a readable safetensors file ({one_line(exc, 10_000)})") from None


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file, without unpickling code.

    Torch files are read with ``weights_only=True``; checkpoints that nest the weights under
    ``state_dict``/``model``/``state_dict_ema`` are unwrapped and a ``module.`` prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        with _safetensors(path):
            state: Any = load_file(str(path))
    else:
        import pickle

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # the weights-only unpickler names the offending global
            raise ModelError(
                f"{path}: refused, it is not a weights-only torch checkpoint ({one_line(exc)})"
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise ModelError(f"{path}: cannot be read as a torch checkpoint ({one_line(exc)})") from None
    for key in _NESTED_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: no state dict of tensors found")
    return {k.removeprefix("module."): v for k, v in state.items()}


def checkpoint_config(checkpoint: str | Path) -> dict[str, Any]:
    """The JSON written beside a checkpoint (``w.safetensors`` -> ``w.json``), or {} if none."""
    import json

    side = Path(checkpoint).with_suffix(".json")
    return json.loads(side.read_text()) if side.is_file() else {}


def class_names(model: str | None, checkpoint: str | Path | None = None) -> list[str] | None:
    """The names of a model's classes, by index, where its files give them: the ``classes`` of a
    checkpoint's JSON (as ``lnstd train-toy`` writes), or the ``id2label`` of a Hugging Face folder's
    ``config.json`` (not its ``LABEL_k`` placeholders). None otherwise, or when unreadable."""
    import json
    import re

    name = str(model or "")
    try:
        if name.startswith("hf:"):
            folder = Path(checkpoint) if checkpoint else Path(name[3:])
            labels = json.loads((folder / "config.json").read_text()).get("id2label") or {}
            names = [str(labels[k]) for k in sorted(labels, key=int)]
            generic = all(re.fullmatch(r"LABEL_\d+", n) for n in names)
            return names if names and not generic and len(names) == len(labels) else None
        if checkpoint is not None and Path(checkpoint).is_file():
            classes = checkpoint_config(checkpoint).get("classes")
            return [str(c) for c in classes] if isinstance(classes, list) and classes else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return None


def load_model(
    name: str | None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    device: str | torch.device | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm model by name, in eval mode; ``hf:<name>`` converts a Hugging Face ViT, DeiT or Swin
    classifier (``checkpoint``: its ``save_pretrained`` folder; without one, ``name`` is a hub id).

    A checkpoint may have a JSON file of the same stem beside it (as ``lnstd train-toy`` writes):
    its ``model``, ``model_args`` and ``normalize`` (mean, std) are used unless given here.

    Args:
        name: timm model name, e.g. ``vit_base_patch16_224`` or ``swin_tiny_patch4_window7_224``;
            may be None when the checkpoint's JSON names it.
        checkpoint: local ``.safetensors`` / ``.pt`` / ``.pth`` file with the weights (strict load).
        pretrained: let timm download its pretrained weights (needs network access).
        device: where to put the model.
        **timm_kwargs: passed to ``timm.create_model`` (``num_classes``, ``img_size``, ...).
    """
    import timm

    if _is_hf_name(name, timm_kwargs):
        from .hf import load

        return load(str(name), checkpoint, device)
    name, timm_kwargs, side = _resolve(name, checkpoint, timm_kwargs)
    if pretrained and checkpoint is None:
        check_pretrained(name)
    model = _create(timm, name, pretrained and checkpoint is None, timm_kwargs)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        _check_fit(model, {k: tuple(v.shape) for k, v in state.items()}, checkpoint, name)
        model.load_state_dict(state, strict=True)
    if side.get("normalize"):
        model.pretrained_cfg = {**model.pretrained_cfg, **side["normalize"]}
    if device is not None:
        model = model.to(device)
    return model.eval()


def _is_hf_name(name: str | None, timm_kwargs: dict[str, Any]) -> bool:
    """Whether ``name`` is ``hf:<name>`` (a Hugging Face classifier, converted by lnstd/hf.py)."""
    if name is None or not name.startswith("hf:"):
        return False
    if timm_kwargs:
        raise ModelError(f"--model-arg does not apply to {name}: its config.json decides the architecture")
    return True


def _resolve(
    name: str | None, checkpoint: str | Path | None, timm_kwargs: dict[str, Any]
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The timm name and arguments, completed from the checkpoint's JSON; clear errors otherwise."""
    import timm

    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ModelError(f"checkpoint not found: {checkpoint}")
    side = checkpoint_config(checkpoint) if checkpoint is not None else {}
    name = name or side.get("model")
    if name is None:
        raise ModelError("no model name: pass --model (or a checkpoint with a JSON file naming it)")
    if side.get("model") == name:
        timm_kwargs = {**side.get("model_args", {}), **timm_kwargs}
    if not timm.is_model(name):
        from .timm_names import unknown_model

        raise unknown_model(name, timm.list_models())
    return name, timm_kwargs, side


def _create(timm: Any, name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:  # an argument the model does not take
        raise ModelError(f"{name}: {one_line(exc)} (check --model-arg)") from None


def _check_fit(
    model: nn.Module, shapes: dict[str, tuple[int, ...]], checkpoint: str | Path, name: str
) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(shapes))
    unexpected = sorted(set(shapes) - set(want))
    wrong = sorted(k for k in set(want) & set(shapes) if want[k] != shapes[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if wrong:
            parts.append(f"shape of {wrong[0]} is {shapes[wrong[0]]}, the model's is {want[wrong[0]]}")
        raise ModelError(f"{checkpoint} does not fit {name}: {'; '.join(parts)} (check --model-arg)")


def check_model(
    name: str | None, checkpoint: str | Path | None = None, **timm_kwargs: Any
) -> tuple[str, nn.Module]:
    """Build the model without weights (on torch's meta device: no memory, no download) and check
    that a checkpoint fits it, reading only tensor shapes. For validating a job before it starts.

    Returns:
        (the resolved timm name, the weightless model).

    Raises:
        ModelError: unknown name, bad arguments, missing or mismatched checkpoint.
    """
    import timm

    if _is_hf_name(name, timm_kwargs):
        from .hf import load

        return str(name), load(str(name), checkpoint, meta=True)
    name, timm_kwargs, side = _resolve(name, checkpoint, timm_kwargs)
    with torch.device("meta"):
        model = _create(timm, name, False, timm_kwargs)
    if side.get("normalize"):
        model.pretrained_cfg = {**model.pretrained_cfg, **side["normalize"]}
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with _safetensors(path), safe_open(str(path), "pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        else:
            shapes = {k: tuple(v.shape) for k, v in load_checkpoint(path).items()}
        _check_fit(model, {k.removeprefix("module."): v for k, v in shapes.items()}, checkpoint, name)
    return name, model.eval()


def check_pretrained(name: str) -> None:
    """Make sure timm's pretrained weights for ``name`` can be had: in the local cache, or from a
    host that answers (then they are downloaded into the cache now, once, before any replica asks).
    Fails in seconds instead of after the hub client's minute of retries.

    Raises:
        ModelError: neither cached nor reachable, saying what to do (network, or ``--checkpoint``).
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    from .weights import pretrained_file

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ModelError(f"--pretrained: timm has no pretrained weights for {name}")
    with contextlib.suppress(ModelError):
        pretrained_file(name)  # in the local cache
        return
    if cfg.hf_hub_id:
        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        what = f"{cfg.hf_hub_id.partition('@')[0]} on the Hugging Face hub"
    else:
        host, what = urlparse(cfg.url).hostname or "", cfg.url
    why = "HF_HUB_OFFLINE is set" if cfg.hf_hub_id and constants.HF_HUB_OFFLINE else ""
    if not why:
        try:
            socket.setdefaulttimeout(5)
            socket.getaddrinfo(host, 443)
        except OSError as exc:
            why = f"{host} cannot be reached ({exc.strerror or exc})"
        finally:
            socket.setdefaulttimeout(None)
    if why:
        raise ModelError(
            f"--pretrained: the weights of {name} ({what}) are not in the local cache and {why}; "
            "run once with network access to cache them, or pass --checkpoint FILE"
        )
    if cfg.hf_hub_id:  # reachable: fetch now, so that a failure is one line here, not in every actor
        try:
            pretrained_file(name, fetch=True)
        except ModelError as exc:
            raise ModelError(f"--pretrained: could not download the weights of {name}: {exc}") from None
