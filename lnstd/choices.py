"""The named choices of the library's settings, as ``Literal`` types and the tuples of their values.

Standard library only: the command line offers these choices before it imports torch or a model.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "BASES",
    "CAPTURE_MODES",
    "DECODERS",
    "FITS",
    "METHODS",
    "NORMALIZE_MODES",
    "PRECISIONS",
    "STD_MODES",
    "Base",
    "Capture",
    "Decode",
    "Fit",
    "MethodName",
    "Normalize",
    "Precision",
    "Std",
]

# the built-in attribution methods (lnstd/methods/, one module each), sorted
MethodName = Literal["attention", "attnlrp", "gae", "gradcam", "lnstd", "rollout", "transformer_attribution"]
Precision = Literal["fp32", "bf16", "fp16"]  # the model's forward: float32, or autocast to bf16/fp16
Capture = Literal["fused", "unfused"]  # how attention is read (lnstd/capture.py)
Fit = Literal["resize", "center-crop"]  # how an image becomes the model's input (data/preprocess.py)
Decode = Literal["cpu", "gpu"]  # where the job decodes JPEGs
Std = Literal["inverse", "multiply", "none"]  # lnstd's weighting by the LayerNorm token std
Normalize = Literal["matrix", "row", "none"]  # lnstd's rescaling of each block's matrix
Base = Literal["gae", "transformer_attribution"]  # the per-block matrix lnstd weights

METHODS: tuple[MethodName, ...] = get_args(MethodName)
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
CAPTURE_MODES: tuple[Capture, ...] = get_args(Capture)
FITS: tuple[Fit, ...] = get_args(Fit)
DECODERS: tuple[Decode, ...] = get_args(Decode)
STD_MODES: tuple[Std, ...] = get_args(Std)
NORMALIZE_MODES: tuple[Normalize, ...] = get_args(Normalize)
BASES: tuple[Base, ...] = get_args(Base)
