"""``explain`` and ``Explainer``: every requested method from one forward and one backward pass."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .arch import get_adapter
from .arch.base import CaptureUnavailableError
from .capture import Needs, Session, restored
from .choices import CAPTURE_MODES, PRECISIONS, Capture, Precision
from .errors import OptionError, UnknownOptionError
from .methods import ChainMethod, Method, PassMethod, PassResult, get_method
from .relevance import ChainRunner

__all__ = ["DTYPES", "Explainer", "Explanation", "explain", "split_options"]

DTYPES: dict[Precision, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Explanation:
    """The result of explaining one batch.

    Attributes:
        heatmaps: method name -> (B, h, w) float32 token-grid maps (not upsampled, not normalised).
        logits: (B, num_classes) float32.
        targets: (B,) class explained per image.
        predicted: (B,) argmax class.
        probabilities: (B,) softmax probability of the explained target.
        elapsed_ms: method name -> milliseconds the batch cost that method: its own computation
            plus an equal share of the forward/backward pass it shares with the other methods (so
            the values add up to the whole call).
        completeness: method name -> (B,) float32, for the methods that define it (``attnlrp``: the
            map's sum over the explained logit; ``transformer_attribution``: the share of the LRP
            walk's relevance that reaches the patch tokens; docs/lrp.md, "Completeness").
    """

    heatmaps: dict[str, torch.Tensor]
    logits: torch.Tensor
    targets: torch.Tensor
    predicted: torch.Tensor
    probabilities: torch.Tensor
    elapsed_ms: dict[str, float] = field(default_factory=dict)
    completeness: dict[str, torch.Tensor] = field(default_factory=dict)


class _Clock:
    """Wall time per method, and the time no single method owns (the shared pass)."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"
        self.own: dict[str, float] = {}
        self.start = self.mark = self._now()

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def charge(self, method: str | Sequence[str] | None) -> None:
        """Charge the time since the last mark to ``method`` (several: in equal parts; None: the
        shared pass)."""
        now = self._now()
        names = [method] if isinstance(method, str) else list(method or [])
        for name in names:
            self.own[name] = self.own.get(name, 0.0) + (now - self.mark) * 1000 / len(names)
        self.mark = now

    def timed(self, fn: Callable[..., Any], methods: Sequence[str]) -> Callable[..., Any]:
        """``fn``, its time charged to ``methods``."""

        def call(*args: Any, **kwargs: Any) -> Any:
            self.charge(None)
            try:
                return fn(*args, **kwargs)
            finally:
                self.charge(methods)

        return call

    def split(self, methods: Sequence[str], sharers: Sequence[str]) -> dict[str, float]:
        """Every method's own time plus an equal share of the rest among ``sharers``."""
        self.charge(None)
        shared = (self.mark - self.start) * 1000 - sum(self.own.values())
        return {m: self.own.get(m, 0.0) + (shared / len(sharers) if m in sharers else 0.0) for m in methods}


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


def _chain_feeder(clock: _Clock, runners: dict[str, ChainRunner], attention: Any) -> Callable[[Any], None]:
    """The backward pass's per-block callback: each chain method's step, timed as its own; what a
    block view computes once for several methods (its attention, shared matrices) is the shared
    pass's time."""

    def feed(view: Any) -> None:
        if view.index in attention:
            view.attention  # noqa: B018 (computed and cached here)
        clock.charge(None)
        make_shared, current = view.shared, [None]

        def shared(key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
            if key in view.cache:
                return view.cache[key]
            clock.charge(current[0])
            value = make_shared(key, make)
            clock.charge(None)
            return value

        view.shared = shared
        try:
            for name, runner in runners.items():
                current[0] = name
                runner.feed(view)
                clock.charge(name)
        finally:
            del view.shared  # no reference cycle: the block's matrices go with it

    return feed


def split_options(methods: Sequence[str], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Route options to methods: ``name=value`` goes to every listed method that declares ``name``,
    ``method.name=value`` to that method only. Raises UnknownOptionError (a TypeError) naming an
    option nobody takes."""
    per: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for key, value in options.items():
        method, dot, name = key.rpartition(".")
        if dot:
            if method not in per:
                raise UnknownOptionError(
                    key, f"option {key!r} is for method {method!r}, which is not among {list(methods)}"
                )
            per[method][name] = value
            continue
        takers = [m for m in methods if any(o.name == key for o in get_method(m).options)]
        if not takers:
            offered = sorted({o.name for m in methods for o in get_method(m).options})
            raise UnknownOptionError(
                key,
                f"unknown option {key!r} for {', '.join(methods)}; their options are: "
                f"{', '.join(offered) or 'none'} (and precision, capture)",
            )
        for m in takers:
            per[m][key] = value
    return per


class Explainer:
    """Computes several methods on a batch from one shared forward/backward pass.

    Args:
        model: a timm model of a supported family (ViT, DeiT distilled, Swin, Swin V2, EVA, BEiT;
            docs/families.md), or a Hugging Face ``ViTForImageClassification``,
            ``DeiTForImageClassification[WithTeacher]`` or ``SwinForImageClassification`` (lnstd/hf.py).
        methods: names from :func:`lnstd.list_methods`.
        precision: "fp32", or "bf16"/"fp16" to run the model under autocast; the relevance
            arithmetic is float32 either way. The methods with an LRP walk in the shared pass
            (``transformer_attribution``, ``lnstd`` on its base) read float32 activations: under
            bf16/fp16 they get a float32 pass of their own (docs/lrp.md, "Numerics").
        capture: "fused" keeps the model's fused attention kernel and rebuilds each block's
            attention and its gradient from q, k, v (memory of one block at a time); "unfused"
            reads them off timm's unfused attention path. Default (None): per device, the faster
            of the two where both are exact: fused on CUDA, unfused on CPU
            (benchmarks/README.md, "The capture default"); unfused where the architecture has no
            exact fused capture. Both give the same maps.
        **options: method options (``lnstd methods`` lists them): ``name=value`` goes to every
            method that declares ``name`` (e.g. ``blocks=2``), ``**{"lnstd.std": "multiply"}`` to
            one method.

    Example:
        >>> ex = Explainer(model, methods=["gae", "lnstd"])
        >>> out = ex(images)               # out.heatmaps["lnstd"]: (B, h, w)
    """

    def __init__(
        self,
        model: nn.Module,
        methods: Sequence[str] = ("lnstd",),
        precision: Precision = "fp32",
        capture: Capture | None = None,
        **options: Any,
    ) -> None:
        if precision not in PRECISIONS:
            raise OptionError("precision", f"precision must be one of {PRECISIONS}, got {precision!r}")
        if isinstance(methods, str):
            methods = [methods]
        if not methods:
            raise ValueError("methods must name at least one method")
        methods = list(dict.fromkeys(methods))
        for name in methods:
            get_method(name)  # unknown names fail before anything else
        from .hf import view

        # A Hugging Face classifier is explained as its timm copy (lnstd/hf.py); it is never changed.
        self._hf = view(model)
        self.model = model = self._hf.model if self._hf is not None else model
        self.adapter = get_adapter(model)
        if capture is not None and capture not in CAPTURE_MODES:
            raise OptionError("capture", f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
        elif capture == "fused" and not self.adapter.supports_fused_capture():
            raise CaptureUnavailableError(
                "capture",
                f"capture='fused' is not available for {type(model).__name__} (its attention cannot be "
                "rebuilt exactly from q and k); use capture='unfused'",
            )
        self.capture_request = capture
        self.precision = precision
        per = split_options(methods, options)
        self.methods: dict[str, Method] = {
            name: get_method(name)(self.adapter, **per[name]) for name in methods
        }
        shared = {n: m for n, m in self.methods.items() if not isinstance(m, PassMethod)}
        # The LRP walk's divisions amplify the rounding of the activations it reads (docs/lrp.md):
        # under bf16/fp16 the methods that read it run in a float32 pass of their own.
        walk = [n for n, m in shared.items() if m.needs().relevance] if precision != "fp32" else []
        self._exact = (
            Explainer(
                model, walk, capture=capture, **{f"{n}.{k}": v for n in walk for k, v in per[n].items()}
            )
            if walk
            else None
        )
        self._shared = {n: m for n, m in shared.items() if n not in walk}
        self._chains = {n: m for n, m in self._shared.items() if isinstance(m, ChainMethod)}
        self._needs = Needs()
        for m in self._shared.values():
            self._needs.add(m.needs())

    @property
    def capture(self) -> str:
        """The capture used for the model where it is now (see ``capture`` above)."""
        return self.capture_for(next(self.model.parameters()).device)

    def capture_for(self, device: torch.device) -> str:
        """The capture used for inputs on ``device``: the one asked for, else the device's default."""
        if self.capture_request is not None:
            return self.capture_request
        if not self.adapter.supports_fused_capture():
            return "unfused"
        return "fused" if device.type == "cuda" else "unfused"

    @property
    def options(self) -> dict[str, dict[str, Any]]:
        """Every method's resolved options (defaults included), for manifests and metadata."""
        return {name: dict(m.config) for name, m in self.methods.items()}

    def _autocast(self, device: torch.device) -> Callable[[], Any]:
        dtype = DTYPES[self.precision]
        return lambda: torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def _shared_pass(
        self,
        images: torch.Tensor,
        target: int | torch.Tensor | None,
        clock: _Clock,
        autocast: Callable[[], Any],
        heatmaps: dict[str, torch.Tensor],
        complete: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared forward and backward pass: the maps (and completeness) of every method that is
        not a PassMethod go into ``heatmaps`` and ``complete``; returns (logits, targets)."""
        capture = self.capture_for(images.device)
        with Session(self.model, self.adapter, self._needs, capture) as session:
            session.batch = images.shape[0]
            if session.walk is not None:  # the LRP relevance walk serves only the methods that need it
                users = [n for n, m in self._shared.items() if m.needs().relevance]
                session.walk.step = clock.timed(session.walk.step, users)  # type: ignore[method-assign]
            with torch.set_grad_enabled(self._needs.grad_from is not None), autocast():
                logits = self.model(images)
            logits = logits.float()
            targets = _targets(target, logits.detach())
            # one runner per chain, so that each chain's per-block steps are timed as its own
            runners = {n: ChainRunner(self.adapter, {n: m}) for n, m in self._chains.items()}

            feed = _chain_feeder(clock, runners, self._needs.attention)

            score = logits.gather(1, targets[:, None]).sum() if self._needs.grad_from is not None else None
            with torch.no_grad():
                feature_grads = session.backward(score, feed, targets)
                result = PassResult(self.adapter, images.shape[0], session.features, feature_grads)
                if session.walk is not None:
                    result.relevance_totals = session.walk.patch_totals
                explained = logits.detach().gather(1, targets[:, None])[:, 0]
                clock.charge(None)
                for name, m in self._shared.items():
                    heat = runners[name].heatmap(name) if name in runners else m.compute(result)
                    heatmaps[name] = heat.float()
                    c = m.completeness(heatmaps[name], explained, result)
                    if c is not None:
                        complete[name] = c.float()
                    clock.charge(name)
        return logits, targets

    def __call__(self, images: torch.Tensor, target: int | torch.Tensor | None = None) -> Explanation:
        """Explain a batch of normalised images (B, 3, H, W); ``target`` as in :func:`explain`."""
        if images.ndim != 4:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if self._hf is not None:
            self._hf.sync()  # the Hugging Face model's weights as they are now
        needs_grad = self._needs.grad_from is not None or len(self._shared) < len(self.methods)
        if torch.is_inference_mode_enabled() and needs_grad:
            raise RuntimeError("gradient methods cannot run inside torch.inference_mode()")
        self.adapter.set_input_size(tuple(images.shape[-2:]))
        autocast = self._autocast(images.device)
        clock = _Clock(images.device)
        heatmaps: dict[str, torch.Tensor] = {}
        complete: dict[str, torch.Tensor] = {}
        if self._shared:
            logits, targets = self._shared_pass(images, target, clock, autocast, heatmaps, complete)
        else:
            with restored(self.model, self.adapter, unfused=False), torch.no_grad(), autocast():
                logits = self.model(images).float()
            targets = _targets(target, logits)
        logits = logits.detach()
        explained = logits.gather(1, targets[:, None])[:, 0]
        for name, m in self.methods.items():
            if isinstance(m, PassMethod):
                clock.charge(None)
                heatmaps[name] = m.explain(images, targets, autocast).float()
                c = m.completeness(heatmaps[name], explained, None)
                if c is not None:
                    complete[name] = c.float()
                clock.charge(name)
        if self._exact is not None:  # the LRP walk's methods under bf16/fp16: their float32 pass
            clock.charge(None)
            exact = self._exact(images, targets)
            heatmaps.update(exact.heatmaps)
            complete.update(exact.completeness)
            clock.charge(list(exact.heatmaps))
        heatmaps = {name: heatmaps[name] for name in self.methods}
        elapsed = clock.split(list(self.methods), list(self._shared) or list(self.methods))
        logits = logits.detach()
        probs = logits.softmax(dim=1)
        return Explanation(
            heatmaps=heatmaps,
            logits=logits,
            targets=targets,
            predicted=logits.argmax(dim=1),
            probabilities=probs.gather(1, targets[:, None]).squeeze(1),
            elapsed_ms=elapsed,
            completeness={name: complete[name] for name in self.methods if name in complete},
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
        model: a timm model of a supported family (ViT, DeiT distilled, Swin, Swin V2, EVA, BEiT;
            docs/families.md).
        images: normalised float tensor (B, 3, H, W).
        method: a name from :func:`lnstd.list_methods`.
        target: None (the predicted class), an int (same class for all), or a LongTensor (B,).
        **options: the method's options, ``precision`` and ``capture`` (see :class:`Explainer`).

    Returns:
        (B, h, w) float32 on the images' device: not upsampled, not normalised.
    """
    return Explainer(model, [method], **options)(images, target).heatmaps[method]
