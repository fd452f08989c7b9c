"""Data sources, decoding and preprocessing."""

from .decode import DecodeError, decode_image, decode_mask
from .sources import IMAGE_EXTENSIONS, Item, Source, mat_ref, open_source, read_mat_sample

__all__ = [
    "IMAGE_EXTENSIONS",
    "DecodeError",
    "Item",
    "Source",
    "decode_image",
    "decode_mask",
    "mat_ref",
    "open_source",
    "read_mat_sample",
]
