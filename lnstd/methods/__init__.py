"""Attribution methods: one small module each over a shared base, and the registry."""

from . import (  # noqa: F401  (registers the methods)
    attention,
    attnlrp,
    gae,
    gradcam,
    lnstd,
    rollout,
    transformer_attribution,
)
from .base import (
    BLOCKS,
    ChainMethod,
    Method,
    Option,
    PassMethod,
    PassResult,
    applicable_methods,
    describe_methods,
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
    "applicable_methods",
    "describe_methods",
    "get_method",
    "list_methods",
    "register",
    "resolve_blocks",
]
