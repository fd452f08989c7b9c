"""Explanation-quality metrics, batched on tensors; each knows whether higher is better."""

from .mask import MASK_METRICS, mask_metrics
from .perturbation import FRACTIONS, PERTURBATION_METRICS, auc, perturbation_curves
from .segmentation import SegmentationMeter, average_precision

__all__ = [
    "FRACTIONS",
    "MASK_METRICS",
    "PERTURBATION_METRICS",
    "SegmentationMeter",
    "auc",
    "average_precision",
    "mask_metrics",
    "perturbation_curves",
]
