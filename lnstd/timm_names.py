"""timm's model names, read from its source without importing it (importing timm imports torch and
torchvision: 6 to 10 s), so that a mistyped ``--model`` is answered in a fraction of a second.

timm registers each architecture with ``@register_model`` above its ``def``, and old names with
``register_model_deprecations(__name__, {...})``; both are read from ``timm/models/*.py`` as text.
:func:`lnstd.models.load_model` still asks timm itself (``timm.is_model``), the authority: this is an
early answer for the command line, tested equal to ``timm.list_models()``. Standard library only.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import re
from collections.abc import Iterable

from .errors import ModelError

__all__ = ["check_timm_name", "timm_names", "unknown_model"]

_REGISTERED = re.compile(r"@register_model\s*\n\s*def\s+(\w+)\s*\(")
_DEPRECATIONS = re.compile(r"register_model_deprecations\(\s*__name__\s*,\s*\{(.*?)\}\s*\)", re.S)
_KEY = re.compile(r"['\"]([\w.\-]+)['\"]\s*:")
_FEW = 100  # fewer names than this: timm's layout has changed, so no early answer is given


@functools.cache
def timm_names() -> frozenset[str]:
    """Every architecture name timm registers (and its deprecated aliases); empty if timm is not
    installed or its source does not read as expected."""
    spec = importlib.util.find_spec("timm")  # finds the package without importing it
    if spec is None or spec.origin is None:
        return frozenset()
    folder = os.path.join(os.path.dirname(spec.origin), "models")
    names: set[str] = set()
    try:
        files = [f for f in os.listdir(folder) if f.endswith(".py")]
        for f in files:
            with open(os.path.join(folder, f), encoding="utf-8") as fh:
                text = fh.read()
            names.update(_REGISTERED.findall(text))
            for block in _DEPRECATIONS.findall(text):
                names.update(_KEY.findall(block))
    except OSError:
        return frozenset()
    return frozenset(names) if len(names) >= _FEW else frozenset()


def check_timm_name(name: str) -> None:
    """Raise :class:`~lnstd.errors.ModelError` (with close names) if ``name`` (``arch`` or
    ``arch.pretrained_tag``) is surely not a timm model; ``hf:`` names and an unreadable timm pass."""
    if name.startswith("hf:"):
        return
    known = timm_names()
    arch = name.split(".", 1)[0]
    if not known or arch in known:
        return
    raise unknown_model(name, known)


def unknown_model(name: str, known: Iterable[str]) -> ModelError:
    """The error for a name timm does not know, with up to three close names from ``known``."""
    close = difflib.get_close_matches(name.split(".", 1)[0], sorted(known), n=3, cutoff=0.8)
    hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
    return ModelError(f"unknown timm model {name!r}{hint}")
