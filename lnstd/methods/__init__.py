"""Attribution methods: one small module each over a shared base, and the registry."""

from . import attention, gae, gradcam, lnstd, rollout  # noqa: F401  (registers the methods)
from .base import (
    BLOCKS,
    ChainMethod,
    Method,
    Option,
    PassMethod,
    PassResult,
    get_method,
    list_methods,
    register,
    resolve_blocks,
)

__all__ = [
    "BLOCKS",
    "ChainMethod",
    "Method",
    "Option",
    "PassMethod",
    "PassResult",
    "get_method",
    "list_methods",
    "register",
    "resolve_blocks",
]
