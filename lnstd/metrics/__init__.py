"""Explanation-quality metrics, batched on tensors."""

from .mask import mask_metrics

__all__ = ["mask_metrics"]
