"""Hugging Face ``transformers`` image classifiers explained as the timm models they are.

``ViTForImageClassification``, ``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher``
and ``SwinForImageClassification`` compute exactly what timm's ``VisionTransformer``, its register-token
variant, ``VisionTransformerDistilled`` and ``SwinTransformer`` compute, with the weights laid out
differently (separate q, k, v projections; Swin's merging at the end of a stage instead of the start
of the next). :func:`to_timm` builds that timm model from the Hugging Face config and copies the weights
into it; every method then runs through the timm adapters (lnstd/arch/), the one place that knows how
to explain each family. The Hugging Face model itself is never run, hooked or changed: whatever its
attention implementation (eager, SDPA), the maps are the timm model's.

``transformers`` is imported only when :func:`load` reads a checkpoint; :func:`view` recognises a
model by its class's module, so explaining a timm model never imports it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch.base import UnsupportedModelError
from .errors import ModelError, one_line

__all__ = [
    "HF_CLASSES",
    "HFView",
    "convert_state_dict",
    "is_hf",
    "load",
    "timm_for_config",
    "to_timm",
    "view",
]

PREFIX = "hf:"  # --model hf:<name>

# Hugging Face class -> (family of the conversion rules, attribute of the backbone).
HF_CLASSES = {
    "ViTForImageClassification": ("vit", "vit"),
    "DeiTForImageClassification": ("deit", "deit"),
    "DeiTForImageClassificationWithTeacher": ("deit_distilled", "deit"),
    "SwinForImageClassification": ("swin", "swin"),
}
_ACT = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
# Hugging Face processors' ``resample`` (PIL's numbering) -> the interpolation names of timm's data config.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def is_hf(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` model (by its class's module; nothing is imported)."""
    return type(model).__module__.startswith("transformers.")


def _kind(model: nn.Module) -> tuple[str, str]:
    name = type(model).__name__
    if name not in HF_CLASSES:
        raise UnsupportedModelError(
            f"cannot explain a transformers {name}: lnstd supports {', '.join(HF_CLASSES)}"
        )
    return HF_CLASSES[name]


# --- the timm model of a config ------------------------------------------------------------------------
def timm_for_config(config: Any, kind: str, device: torch.device | str | None = None) -> nn.Module:
    """The timm model that computes what the Hugging Face model of ``config`` computes (weights not
    initialised: :func:`to_timm` fills them).

    Args:
        config: a ``ViTConfig``, ``DeiTConfig`` or ``SwinConfig`` (attributes only are read).
        kind: ``vit``, ``deit``, ``deit_distilled`` or ``swin`` (:data:`HF_CLASSES`).
        device: where to build it (``"meta"`` for a weightless check).
    """
    act = _ACT.get(config.hidden_act)
    if act is None:
        raise UnsupportedModelError(f"hidden_act={config.hidden_act!r}: lnstd converts {', '.join(_ACT)}")
    common = {
        "img_size": config.image_size,
        "patch_size": config.patch_size,
        "in_chans": config.num_channels,
        "num_classes": config.num_labels,
        "qkv_bias": config.qkv_bias,
        "weight_init": "skip",
        "device": device,
    }
    if kind == "swin":
        from timm.models.swin_transformer import SwinTransformer

        if config.use_absolute_embeddings or act != "gelu":
            raise UnsupportedModelError(
                "Swin with use_absolute_embeddings=True or an activation other than gelu has no timm "
                "counterpart"
            )
        return SwinTransformer(
            embed_dim=config.embed_dim, depths=tuple(config.depths), num_heads=tuple(config.num_heads),
            window_size=config.window_size, mlp_ratio=config.mlp_ratio, drop_path_rate=0.0, **common,
        )  # fmt: skip
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    dim, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or dim // heads
    if head_dim * heads != dim or int(dim * (config.intermediate_size / dim)) != config.intermediate_size:
        raise UnsupportedModelError(
            f"{type(config).__name__}: head_dim {head_dim} x {heads} heads or intermediate_size "
            f"{config.intermediate_size} has no timm counterpart for hidden_size {dim}"
        )
    kw = {"embed_dim": dim, "depth": config.num_hidden_layers, "num_heads": heads,
          "mlp_ratio": config.intermediate_size / dim, "act_layer": act, **common}  # fmt: skip
    if kind == "deit_distilled":
        return VisionTransformerDistilled(**kw)
    # DeiT without its teacher's head: the distillation token is a prefix token the head does not read,
    # which is what a timm register token is ([class, register, patches], one position embedding each).
    return VisionTransformer(reg_tokens=1 if kind == "deit" else 0, **kw)


# --- the weights -----------------------------------------------------------------------------------
def _rules(kind: str) -> list[tuple[str, str | Callable[[re.Match], str]]]:
    """timm state-dict key (regex) -> Hugging Face key; a ``{q,k,v}`` in the result stands for the
    three projections that timm's ``qkv`` concatenates."""
    layer = {  # inside one block
        r"norm1\.(?P<p>\w+)": r"layernorm_before.\g<p>",
        r"attn\.qkv\.(?P<p>\w+)": r"attention.{q,k,v}_proj.\g<p>",
        r"attn\.proj\.(?P<p>\w+)": r"attention.o_proj.\g<p>",
        r"attn\.(?P<t>relative_position_bias_table)": r"attention.relative_position_bias.\g<t>",
        r"norm2\.(?P<p>\w+)": r"layernorm_after.\g<p>",
        r"mlp\.(?P<fc>fc[12])\.(?P<p>\w+)": r"mlp.\g<fc>.\g<p>",
    }
    if kind == "swin":
        b = "swin."
        rules: list[tuple[str, Any]] = [
            (r"patch_embed\.proj\.(\w+)$", b + r"embeddings.patch_embeddings.projection.\1"),
            (r"patch_embed\.norm\.(\w+)$", b + r"embeddings.norm.\1"),
            (r"layers\.(\d+)\.downsample\.(norm|reduction)\.(\w+)$",
             lambda m: f"{b}encoder.layers.{int(m[1]) - 1}.downsample.{m[2]}.{m[3]}"),
            (r"norm\.(\w+)$", b + r"layernorm.\1"),
            (r"head\.fc\.(\w+)$", r"classifier.\1"),
        ]  # fmt: skip
        blocks = r"layers\.(?P<s>\d+)\.blocks\.(?P<i>\d+)\.", b + r"encoder.layers.\g<s>.blocks.\g<i>."
    else:
        b = "vit." if kind == "vit" else "deit."
        rules = [
            (r"cls_token$", b + "embeddings.cls_token"),
            (r"(reg|dist)_token$", b + "embeddings.distillation_token"),
            (r"pos_embed$", b + "embeddings.position_embeddings"),
            (r"patch_embed\.proj\.(\w+)$", b + r"embeddings.patch_embeddings.projection.\1"),
            (r"norm\.(\w+)$", b + r"layernorm.\1"),
            (r"head\.(\w+)$", ("cls_classifier." if kind == "deit_distilled" else "classifier.") + r"\1"),
            (r"head_dist\.(\w+)$", r"distillation_classifier.\1"),
        ]
        blocks = r"blocks\.(?P<i>\d+)\.", b + r"layers.\g<i>."
    rules += [(blocks[0] + ours + "$", blocks[1] + theirs) for ours, theirs in layer.items()]
    return rules


def _hf_keys(key: str, kind: str) -> list[str] | None:
    for pattern, template in _rules(kind):
        m = re.match(pattern, key)
        if m:
            name = template(m) if callable(template) else m.expand(template)
            return [name.replace("{q,k,v}", p) for p in "qkv"] if "{q,k,v}" in name else [name]
    return None


def convert_state_dict(
    hf_state: dict[str, torch.Tensor], timm_keys: list[str], kind: str
) -> dict[str, torch.Tensor]:
    """The Hugging Face model's weights under the timm model's names (q, k, v concatenated into qkv).

    Raises:
        UnsupportedModelError: a timm weight has no Hugging Face source, or a Hugging Face weight is
            left over (a layer the conversion does not know would otherwise be silently dropped).
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key in timm_keys:
        src = _hf_keys(key, kind)
        if src is None or not all(s in hf_state for s in src):
            raise UnsupportedModelError(f"no Hugging Face weight for timm's {key} ({kind}: looked for {src})")
        out[key] = torch.cat([hf_state[s] for s in src]) if len(src) > 1 else hf_state[src[0]]
        used.update(src)
    left = sorted(set(hf_state) - used)
    if left:
        raise UnsupportedModelError(f"Hugging Face weights lnstd does not know how to convert: {left[:3]}")
    return out


def _weights(model: nn.Module) -> list[str]:
    """The timm model's learned weights and persistent buffers that a checkpoint carries."""
    return [k for k in model.state_dict() if not k.endswith("relative_position_index")]


def to_timm(model: nn.Module, kind: str | None = None) -> nn.Module:
    """The timm model with ``model``'s weights (copied), on its device and dtype, LayerNorm epsilons
    included, in eval mode (dropout off, as the methods are defined)."""
    kind = kind or _kind(model)[0]
    param = next(model.parameters())
    out = timm_for_config(model.config, kind, device=param.device)
    _copy(model, out, kind)
    return out.to(param.dtype).eval()


def _copy(model: nn.Module, out: nn.Module, kind: str) -> None:
    with torch.no_grad():
        state = convert_state_dict(model.state_dict(), _weights(out), kind)
        out.load_state_dict(state, strict=False)
        for name, m in out.named_modules():
            if isinstance(m, nn.LayerNorm):
                (src,) = _hf_keys(f"{name}.weight", kind) or [None]
                m.eps = model.get_submodule(src.rsplit(".", 1)[0]).eps  # HF's own eps per norm


class HFView:
    """A Hugging Face model and the timm copy that is explained in its place; :meth:`sync` copies the
    weights again when the Hugging Face model's changed (trained in place, or replaced) since. The
    copy runs in eval mode whatever the Hugging Face model's mode."""

    def __init__(self, source: nn.Module) -> None:
        self.source = source
        self.kind = _kind(source)[0]
        self.model = to_timm(source, self.kind)
        self._stamp = self._current()

    def _current(self) -> tuple:
        return tuple((id(p), p._version) for p in self.source.parameters())

    def sync(self) -> None:
        """Bring the timm copy's weights up to date with the Hugging Face model's."""
        now = self._current()
        if now != self._stamp:
            _copy(self.source, self.model, self.kind)
            self._stamp = now


def view(model: nn.Module) -> HFView | None:
    """The timm view of a supported ``transformers`` model; None for any other model."""
    return HFView(model) if is_hf(model) else None


# --- loading for the job and the command line ----------------------------------------------------------
def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelError("--model hf:... needs transformers: pip install 'lnstd[hf]'") from None
    return transformers


def load(
    name: str,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    meta: bool = False,
) -> nn.Module:
    """``hf:<name>`` as a timm model: the Hugging Face classifier from ``checkpoint`` (a local
    ``save_pretrained`` folder) or the hub id ``name``, converted by :func:`to_timm`. The folder's
    ``preprocessor_config.json``, if any, gives the input's mean, std and interpolation.

    Args:
        meta: build the timm model from the config only, without weights (to check a job up front).
    """
    tf = _transformers()
    source = str(checkpoint) if checkpoint is not None else name.removeprefix(PREFIX)
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise ModelError(f"--checkpoint {checkpoint}: hf: models take a save_pretrained folder")
    try:
        config = tf.AutoConfig.from_pretrained(source)
        arch = (config.architectures or [""])[0]
        if arch not in HF_CLASSES:
            raise UnsupportedModelError(
                f"{source}: a {arch or config.model_type} checkpoint; lnstd supports {', '.join(HF_CLASSES)}"
            )
        if meta:
            model = timm_for_config(config, HF_CLASSES[arch][0], device="meta")
        else:
            hf = getattr(tf, arch).from_pretrained(source).eval()
            model = to_timm(hf)
    except (OSError, ValueError) as exc:
        raise ModelError(f"--model {name}: {one_line(exc)}") from None
    model.pretrained_cfg = _data_config(Path(source), model)
    if device is not None:
        model = model.to(device)
    return model.eval()


def _data_config(folder: Path, model: nn.Module) -> dict[str, Any]:
    """timm's data config from a Hugging Face ``preprocessor_config.json`` (mean, std, resampling,
    centre-crop fraction); timm's defaults where there is none."""
    size = tuple(model.patch_embed.img_size)
    cfg: dict[str, Any] = {"input_size": (3, *size)}
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return cfg
    proc = json.loads(path.read_text())
    if proc.get("do_normalize", True) and "image_mean" in proc:
        cfg["mean"], cfg["std"] = tuple(proc["image_mean"]), tuple(proc["image_std"])
    if proc.get("resample") in _RESAMPLE:
        cfg["interpolation"] = _RESAMPLE[proc["resample"]]
    crop = (proc.get("crop_size") or {}).get("height")
    side = (proc.get("size") or {}).get("height") or (proc.get("size") or {}).get("shortest_edge")
    cfg["crop_pct"] = crop / side if proc.get("do_center_crop") and crop and side else 1.0
    return cfg
