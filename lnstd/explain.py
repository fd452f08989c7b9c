"""``explain`` and ``Explainer``: every requested method from one forward and one backward pass."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .arch import get_adapter
from .capture import capture
from .methods import Context, get_method

__all__ = ["Explainer", "Explanation", "explain"]

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_METHOD_OPTIONS = {"blocks", "std", "normalize"}


@dataclass
class Explanation:
    """The result of explaining one batch.

    Attributes:
        heatmaps: method name -> (B, h, w) float32 token-grid maps (not upsampled, not normalised).
        logits: (B, num_classes) float32.
        targets: (B,) class explained per image.
        predicted: (B,) argmax class.
        probabilities: (B,) softmax probability of the explained target.
    """

    heatmaps: dict[str, torch.Tensor]
    logits: torch.Tensor
    targets: torch.Tensor
    predicted: torch.Tensor
    probabilities: torch.Tensor


def _targets(target: int | torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    batch, classes = logits.shape
    if target is None:
        t = logits.argmax(dim=1)
    elif isinstance(target, int) and not isinstance(target, bool):
        t = torch.full((batch,), target, dtype=torch.long, device=logits.device)
    elif isinstance(target, torch.Tensor) and target.dtype == torch.long and target.shape == (batch,):
        t = target.to(logits.device)
    else:
        raise ValueError(f"target must be None, an int or a LongTensor of shape ({batch},), got {target!r}")
    if bool(((t < 0) | (t >= classes)).any()):
        raise ValueError(f"target out of range: the model has {classes} classes")
    return t


class Explainer:
    """Computes several methods on a batch from one shared forward/backward pass.

    Args:
        model: a timm VisionTransformer or SwinTransformer (v1).
        methods: names from :func:`lnstd.list_methods`.
        precision: "fp32", or "bf16"/"fp16" to run the model under autocast; the relevance
            arithmetic is float32 either way.
        **options: ``blocks`` ("all" or the last k; default per METHODS.md), and for ``lnstd``
            ``std`` ("inverse" | "multiply" | "none") and ``normalize`` ("matrix" | "row" | "none").
            Options a method does not take are ignored by it (``attention`` and ``gradcam`` are
            defined on the last block only).

    Example:
        >>> ex = Explainer(model, methods=["gae", "lnstd"])
        >>> out = ex(images)               # out.heatmaps["lnstd"]: (B, h, w)
    """

    def __init__(
        self,
        model: nn.Module,
        methods: Sequence[str] = ("lnstd",),
        precision: str = "fp32",
        **options: Any,
    ) -> None:
        unknown = set(options) - _METHOD_OPTIONS
        if unknown:
            raise TypeError(
                f"unknown option {sorted(unknown)[0]!r}; options are: "
                f"{', '.join(sorted(_METHOD_OPTIONS | {'precision'}))}"
            )
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(_PRECISIONS)}, got {precision!r}")
        if isinstance(methods, str):
            methods = [methods]
        if not methods:
            raise ValueError("methods must name at least one method")
        self.model = model
        self.adapter = get_adapter(model)
        self.precision = precision
        self.methods = {}
        for name in methods:
            cls = get_method(name)
            accepted = {"blocks"} | ({"std", "normalize"} if cls.uses_token_std else set())
            self.methods[name] = cls(self.adapter, **{k: v for k, v in options.items() if k in accepted})
        ms = list(self.methods.values())
        self._attention = {i for m in ms for i in m.attention_blocks()}
        self._attention_grad = sorted({i for m in ms for i in m.gradient_blocks()})
        self._features = sorted({i for m in ms for i in m.feature_blocks()})
        self._token_std = {i for m in ms if m.uses_token_std for i in m.attention_blocks()}
        grad_blocks = self._attention_grad + [i for m in ms if m.needs_gradient for i in m.feature_blocks()]
        self._grad_from = min(grad_blocks) if grad_blocks else None

    def __call__(self, images: torch.Tensor, target: int | torch.Tensor | None = None) -> Explanation:
        """Explain a batch of normalised images (B, 3, H, W); ``target`` as in :func:`explain`."""
        if images.ndim != 4:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if torch.is_inference_mode_enabled() and self._grad_from is not None:
            raise RuntimeError("gradient methods cannot run inside torch.inference_mode()")
        if hasattr(self.adapter, "set_input_size"):
            self.adapter.set_input_size(tuple(images.shape[-2:]))
        dtype = _PRECISIONS[self.precision]
        autocast = torch.autocast(images.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        need_grad = self._grad_from is not None
        with capture(
            self.model,
            self.adapter,
            attention=self._attention,
            token_stds=self._token_std,
            features=set(self._features),
            grad_from=self._grad_from,
        ) as cap:
            with torch.set_grad_enabled(need_grad), autocast:
                logits = self.model(images)
            logits = logits.float()
            targets = _targets(target, logits.detach())
            attention_grads: dict[int, torch.Tensor] = {}
            feature_grads: dict[int, torch.Tensor] = {}
            if need_grad:
                score = logits.gather(1, targets[:, None]).sum()
                inputs = [cap.blocks[i].attention for i in self._attention_grad]
                inputs += [cap.blocks[i].features for i in self._features]
                grads = torch.autograd.grad(score, inputs)
                n = len(self._attention_grad)
                attention_grads = dict(zip(self._attention_grad, grads[:n], strict=True))
                feature_grads = dict(zip(self._features, grads[n:], strict=True))
            with torch.no_grad():
                for c in cap.blocks.values():
                    for name in ("attention", "features"):
                        t = getattr(c, name)
                        if t is not None:
                            setattr(c, name, t.detach())
                ctx = Context(self.adapter, cap, images.shape[0], attention_grads, feature_grads)
                heatmaps = {name: m.compute(ctx).float() for name, m in self.methods.items()}
        logits = logits.detach()
        probs = logits.softmax(dim=1)
        return Explanation(
            heatmaps=heatmaps,
            logits=logits,
            targets=targets,
            predicted=logits.argmax(dim=1),
            probabilities=probs.gather(1, targets[:, None]).squeeze(1),
        )


def explain(
    model: nn.Module,
    images: torch.Tensor,
    method: str = "lnstd",
    target: int | torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """Token-grid heatmaps of one method for a batch.

    Args:
        model: a timm VisionTransformer or SwinTransformer (v1).
        images: normalised float tensor (B, 3, H, W).
        method: a name from :func:`lnstd.list_methods`.
        target: None (the predicted class), an int (same class for all), or a LongTensor (B,).
        **options: ``blocks``, ``std``, ``normalize``, ``precision`` (see :class:`Explainer`).

    Returns:
        (B, h, w) float32 on the images' device: not upsampled, not normalised.
    """
    return Explainer(model, [method], **options)(images, target).heatmaps[method]
