"""Load a timm model by name, with weights from a local checkpoint loaded safely."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["input_size", "load_checkpoint", "load_model", "transform_for"]

_NESTED_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file, without unpickling code.

    Torch files are read with ``weights_only=True``; checkpoints that nest the weights under
    ``state_dict``/``model``/``state_dict_ema`` are unwrapped and a ``module.`` prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # the unpickler's message names the offending global
            raise ValueError(f"{path}: not a weights-only torch checkpoint ({exc})") from None
    for key in _NESTED_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: no state dict of tensors found")
    return {k.removeprefix("module."): v for k, v in state.items()}


def checkpoint_config(checkpoint: str | Path) -> dict[str, Any]:
    """The JSON written beside a checkpoint (``w.safetensors`` -> ``w.json``), or {} if none."""
    import json

    side = Path(checkpoint).with_suffix(".json")
    return json.loads(side.read_text()) if side.is_file() else {}


def load_model(
    name: str | None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    device: str | torch.device | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm model by name, in eval mode.

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

    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    side = checkpoint_config(checkpoint) if checkpoint is not None else {}
    name = name or side.get("model")
    if name is None:
        raise ValueError("no model name: pass one (or a checkpoint with a JSON file naming it)")
    if side.get("model") == name:
        timm_kwargs = {**side.get("model_args", {}), **timm_kwargs}
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r} (see timm.list_models())")
    model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **timm_kwargs)
    if checkpoint is not None:
        missing, unexpected = model.load_state_dict(load_checkpoint(checkpoint), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint} does not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
    if side.get("normalize"):
        model.pretrained_cfg = {**model.pretrained_cfg, **side["normalize"]}
    if device is not None:
        model = model.to(device)
    return model.eval()


def input_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) the model takes: its patch embedding's image size, else its pretrained config."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        return int(size[0]), int(size[1])
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224))[1:])  # type: ignore[return-value]


def transform_for(model: nn.Module, fit: str = "resize"):
    """PIL image -> normalised (3, H, W) tensor with the model's own timm data config.

    Args:
        model: a timm model (its ``pretrained_cfg`` gives input size, mean, std, interpolation).
        fit: "resize" stretches the whole image to the input size, so a heatmap maps back onto
            all of it; "center-crop" resizes the short side and crops the centre (timm's eval).
    """
    import timm.data
    from torchvision import transforms as T

    cfg = timm.data.resolve_data_config({}, model=model)
    size = input_size(model)
    interp = T.InterpolationMode(cfg.get("interpolation", "bilinear"))
    if fit == "resize":
        resize = [T.Resize(size, interpolation=interp, antialias=True)]
    elif fit == "center-crop":
        resize = [T.Resize(min(size), interpolation=interp, antialias=True), T.CenterCrop(size)]
    else:
        raise ValueError(f"fit must be 'resize' or 'center-crop', got {fit!r}")
    return T.Compose([*resize, T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])
