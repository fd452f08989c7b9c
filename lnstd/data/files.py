"""Local image files named for the pictures drawn of them (``lnstd explain``): each file once, under
an output stem no other file shares. Standard library and storage only (no torch), so a wrong path
is answered before a model loads."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..errors import UsageError
from ..storage import list_files
from .sources import IMAGE_EXTENSIONS

__all__ = ["image_files", "output_stems"]


def image_files(paths: Sequence[str]) -> list[tuple[str, str]]:
    """Image files and folders -> (path, distinct output stem) of each image once (folders: their
    image files, recursively); a UsageError naming a path that does not exist."""
    files: list[tuple[str, str]] = []  # (path, name relative to its argument)
    for arg in paths:
        if os.path.isdir(arg):
            files += [(f, os.path.relpath(f, arg)) for f in list_files(arg, IMAGE_EXTENSIONS)]
        elif os.path.isfile(arg):
            files.append((arg, os.path.basename(arg)))
        else:
            raise UsageError(f"no such image or folder: {arg}")
    return output_stems(files)


def output_stems(files: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(path, name relative to its argument) -> (path, distinct output stem), each file once.

    A stem is the relative name without its extension; stems that two files share (``a/img.jpg``
    and ``b/img.jpg``, or ``img.jpg`` and ``img.png``) become the path below the files' common
    folder, then keep the extension (``img_jpg``), so no file's pictures overwrite another's.
    """
    seen: dict[str, str] = {}
    for path, rel in files:
        seen.setdefault(os.path.realpath(path), rel)
    stems = {p: os.path.splitext(rel)[0] for p, rel in seen.items()}

    def clashes() -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for p, stem in stems.items():
            groups.setdefault(stem, []).append(p)
        return {k: v for k, v in groups.items() if len(v) > 1}

    for group in clashes().values():
        root = os.path.commonpath([os.path.dirname(p) for p in group])
        for p in group:
            stems[p] = os.path.splitext(os.path.relpath(p, root))[0]
    for group in clashes().values():
        for p in group:
            stems[p] += os.path.splitext(p)[1].replace(".", "_")
    return [(p, stems[p]) for p in seen]
