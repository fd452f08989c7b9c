"""lnstd: explain Vision Transformers (timm ViT, DeiT, Swin, Swin V2, EVA, BEiT) at dataset scale."""

from . import viz
from .arch import UnsupportedModelError
from .explain import Explainer, Explanation, explain
from .methods import list_methods, register
from .models import load_model, transform_for
from .ops import minmax, upsample
from .saliency import SaliencyDataset, read_heatmaps, to_pixels

__version__ = "0.1.0"

__all__ = [
    "Explainer",
    "Explanation",
    "SaliencyDataset",
    "UnsupportedModelError",
    "__version__",
    "explain",
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
