"""Shared base of the attribution methods, their declared options, and the registry."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch

from ..arch.base import Adapter
from ..capture import BlockView, Needs
from ..errors import OptionError, UnknownOptionError
from ..relevance import head_mean, mask_padding

__all__ = [
    "BLOCKS",
    "ChainMethod",
    "Method",
    "Option",
    "PassMethod",
    "PassResult",
    "applicable_methods",
    "describe_methods",
    "get_method",
    "list_methods",
    "register",
    "resolve_blocks",
]

_REGISTRY: dict[str, type[Method]] = {}
M = TypeVar("M", bound="type[Method]")


def register(name: str) -> Callable[[M], M]:
    """Class decorator: make a method available by ``name`` (``explain(method=name)``, CLI, jobs)."""

    def deco(cls: M) -> M:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)


def describe_methods() -> str:
    """What ``lnstd methods`` prints: each method's first docstring line, then its options (default,
    per-family defaults, choices, help), as plain text."""
    names = list_methods()
    width = max(len(n) for n in names)
    lines = []
    for name in names:
        cls = get_method(name)
        lines.append(f"{name:{width}s} {_plain((cls.__doc__ or '').strip().splitlines()[0])}")
        for o in cls.options:
            fam = ", ".join(f"{k}: {v!r}" for k, v in o.family_defaults.items())
            fam = f" ({fam})" if fam else ""
            choices = f" [{' | '.join(map(str, o.choices))}]" if o.choices else ""
            lines.append(f"{'':4s}{o.name}={o.default!r}{fam}{choices}: {_plain(o.help)}")
    return "\n".join(lines)


def _plain(text: str) -> str:
    """Docstring markup (reStructuredText roles and literals) as the plain text a terminal shows."""
    return re.sub(r":\w+:`~?([^`]*)`", r"\1", text).replace("``", "").replace("`", "")


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; a clear error listing the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(list_methods())}") from None


def applicable_methods(adapter: Adapter) -> list[str]:
    """The registered methods that can explain the adapter's model (the others raise
    :class:`~lnstd.arch.UnsupportedModelError` saying why)."""
    from ..arch.base import UnsupportedModelError

    names = []
    for name in list_methods():
        try:
            _REGISTRY[name](adapter)
        except UnsupportedModelError:
            continue
        names.append(name)
    return names


def resolve_blocks(blocks: str | int, num_blocks: int) -> list[int]:
    """``"all"`` or k (the last k blocks) -> ascending block indices."""
    if isinstance(blocks, str) and blocks.isdigit():
        blocks = int(blocks)
    if blocks == "all":
        return list(range(num_blocks))
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= num_blocks:
        raise OptionError("blocks", f"blocks must be 'all' or an int in 1..{num_blocks}, got {blocks!r}")
    return list(range(num_blocks - blocks, num_blocks))


@dataclass(frozen=True)
class Option:
    """One option a method declares: its default (per architecture family) and what it accepts.

    Attributes:
        name: the keyword (``Explainer(..., name=value)``, ``--option name=value``).
        default: the value when none is given.
        choices: the accepted values, or None for a free value checked by the method.
        help: one line for ``lnstd methods``.
        family_defaults: adapter family -> default, where it differs (e.g. Swin ``lnstd`` blocks).
    """

    name: str
    default: Any
    choices: tuple[Any, ...] | None = None
    help: str = ""
    family_defaults: Mapping[str, Any] = field(default_factory=dict)

    def default_for(self, family: str) -> Any:
        return self.family_defaults.get(family, self.default)

    def check(self, value: Any) -> Any:
        if self.choices is not None and value not in self.choices:
            raise OptionError(self.name, f"{self.name} must be one of {self.choices}, got {value!r}")
        return value


BLOCKS = Option("blocks", "all", help="'all' or k: the chain runs over the last k blocks only")


class Method:
    """One attribution method: declares its options and what it needs from the pass, then computes
    a heatmap. Subclasses set the class attributes and override :meth:`needs` and :meth:`compute`
    (or, for chains, :meth:`ChainMethod.block_matrix`).
    """

    name: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    needs_gradient: ClassVar[bool] = False

    def __init__(self, adapter: Adapter, **options: Any) -> None:
        self.adapter = adapter
        declared = {o.name: o for o in self.options}
        unknown = set(options) - set(declared)
        if unknown:
            raise UnknownOptionError(
                sorted(unknown)[0],
                f"{self.name}: unknown option {sorted(unknown)[0]!r}; its options are: "
                f"{', '.join(declared) or 'none'}",
            )
        self.config: dict[str, Any] = {}
        for name, opt in declared.items():
            value = options[name] if name in options else opt.default_for(adapter.family)
            self.config[name] = opt.check(value)
        self.blocks = self._blocks()

    def _blocks(self) -> list[int]:
        """Blocks this method reads (ascending); the last block only unless it has ``blocks``."""
        n = len(self.adapter.blocks)
        if "blocks" in self.config:
            return resolve_blocks(self.config["blocks"], n)
        return [n - 1]

    def needs(self) -> Needs:
        """What the shared pass must capture for this method."""
        return Needs()

    def compute(self, ctx: PassResult) -> torch.Tensor:
        """Heatmap (B, h, w), float32, after the shared pass."""
        raise NotImplementedError

    def completeness(
        self, heat: torch.Tensor, score: torch.Tensor, ctx: PassResult | None
    ) -> torch.Tensor | None:
        """(B,) share of the explained relevance the map accounts for (docs/lrp.md, "Completeness"),
        or None where the method defines none. ``heat``: its maps; ``score``: (B,) the explained logits;
        ``ctx``: the shared pass (None for a method with a pass of its own)."""
        return None


@dataclass
class PassResult:
    """What a method may read after the shared forward/backward pass (besides streamed blocks)."""

    adapter: Adapter
    batch: int
    features: dict[int, torch.Tensor]  # attention input per block (norm1 output; post-norm: block input)
    feature_grads: dict[int, torch.Tensor]  # dy/d(features) per block
    # LRP walk: block -> (B,) relevance on the patch tokens of the block's input (lnstd.lrp)
    relevance_totals: dict[int, torch.Tensor] = field(default_factory=dict)


class ChainMethod(Method):
    """A method defined by a per-block matrix and a chain (docs/methods.md, the methods table)."""

    residual: ClassVar[bool] = True

    def needs(self) -> Needs:
        blocks = set(self.blocks)
        return Needs(attention=blocks, gradient=blocks if self.needs_gradient else set())

    def block_matrix(self, view: BlockView) -> torch.Tensor:
        """Per-block operator of block ``view.index`` in window layout, (B, nW, T, T) float32."""
        raise NotImplementedError

    @staticmethod
    def mean_attention(view: BlockView) -> torch.Tensor:
        """``mean_h A_b`` (padding masked), float32."""
        return view.shared(
            "mean_attention", lambda: mask_padding(head_mean(view.attention, view.batch), view.wm)
        )

    @staticmethod
    def gradient_attention(view: BlockView) -> torch.Tensor:
        """``Ā_b = mean_h (G_b ⊙ A_b)^+`` (padding masked), float32 (Chefer et al. 2021b)."""

        def make() -> torch.Tensor:
            return mask_padding(head_mean((view.gradient * view.attention).clamp(min=0), view.batch), view.wm)

        return view.shared("gradient_attention", make)

    @staticmethod
    def relevance_attention(view: BlockView) -> torch.Tensor:
        """``mean_h (G_b ⊙ R_A_b)^+`` (padding masked), float32, with ``R_A_b`` the LRP relevance of
        ``A_b`` (Chefer et al. 2021a; docs/lrp.md)."""

        def make() -> torch.Tensor:
            m = (view.gradient * view.attention_relevance).clamp(min=0)
            return mask_padding(head_mean(m, view.batch), view.wm)

        return view.shared("relevance_attention", make)


class PassMethod(Method):
    """A method that needs a pass of its own (its rules change the backward pass itself).

    :meth:`explain` runs that pass for a batch and the given targets.
    """

    def explain(
        self, images: torch.Tensor, targets: torch.Tensor, autocast: Callable[[], Any]
    ) -> torch.Tensor:
        """Heatmaps (B, h, w) float32 for ``images`` explained for ``targets``."""
        raise NotImplementedError
