"""Explanation-quality metrics, batched on tensors; each knows whether higher is better."""

from .mask import MASK_METRICS, mask_metrics
from .perturbation import FRACTIONS, PERTURBATION_METRICS, auc, perturbation_curves
from .registry import METRICS, Metric, higher_is_better
from .segmentation import SegmentationMeter, average_precision

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
    "mask_metrics",
    "perturbation_curves",
]
