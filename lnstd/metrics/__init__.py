"""Explanation-quality metrics, batched on tensors; each knows whether higher is better.

The registry (:mod:`lnstd.metrics.registry`) needs no torch; the tensor metrics load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .registry import MASK_METRICS, METRICS, Metric, higher_is_better

_LAZY = {
    "mask_metrics": ".mask",
    "impute": ".faithfulness",
    "FRACTIONS": ".perturbation",
    "PERTURBATION_METRICS": ".perturbation",
    "auc": ".perturbation",
    "perturbation_curves": ".perturbation",
    "SegmentationMeter": ".segmentation",
    "average_precision": ".segmentation",
}

__all__ = [
    "FRACTIONS",
    "MASK_METRICS",
    "METRICS",
    "PERTURBATION_METRICS",
    "Metric",
    "SegmentationMeter",
    "auc",
    "average_precision",
    "higher_is_better",
    "impute",
    "mask_metrics",
    "perturbation_curves",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    try:  # a submodule (lnstd.metrics.mask, ...)
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
