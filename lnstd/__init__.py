"""lnstd: explain Vision Transformers (timm ViT, DeiT, Swin, Swin V2, EVA, BEiT) at dataset scale.

The names below load on first use (PEP 562), so the parts that need no model (``lnstd aggregate``,
``lnstd report``'s tables, the output layout) never import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Explainer": ".explain",
    "Explanation": ".explain",
    "UnsupportedModelError": ".arch",
    "faithfulness": ".metrics.faithfulness",
    "list_methods": ".methods",
    "register": ".methods",
    "load_model": ".models",
    "transform_for": ".models",
    "minmax": ".ops",
    "upsample": ".ops",
    "SaliencyDataset": ".saliency",
    "read_heatmaps": ".saliency",
    "to_pixels": ".saliency",
}

__all__ = [
    "Explainer",
    "Explanation",
    "SaliencyDataset",
    "UnsupportedModelError",
    "__version__",
    "explain",
    "faithfulness",
    "list_methods",
    "load_model",
    "minmax",
    "read_heatmaps",
    "register",
    "to_pixels",
    "transform_for",
    "upsample",
    "viz",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    try:  # a submodule (lnstd.viz, lnstd.arch, ...), as an eager __init__ would have bound it
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    """``lnstd.explain`` is the function, as it was when this package imported eagerly, although a
    submodule has the same name (the import system binds a loaded submodule on its package; here
    that binding is kept aside instead of hiding the function)."""

    @property
    def explain(self) -> Any:
        from .explain import explain

        return explain

    @explain.setter
    def explain(self, module: Any) -> None:  # the import system binding the submodule
        self.__dict__["_explain_module"] = module


sys.modules[__name__].__class__ = _Package
