"""Reading one input image's bytes, after checking that the decode limit would accept it.

A file whose size or header already shows it is too large (:func:`lnstd.data.decode.check_limits`)
is refused after reading its first 64 KiB only, so one oversized file (a 100 GB sparse PNG) never
claims the memory its whole content would.
"""

from __future__ import annotations

import os
import stat

import pyarrow.fs as pafs

from .. import storage
from .decode import HEAD_BYTES, check_limits

__all__ = ["read_image"]


def read_image(uri: str, opts: storage.StorageOptions, max_pixels: int | None = None) -> bytes:
    """The bytes of the image at ``uri`` (as :func:`lnstd.storage.read_bytes` reads them).

    Raises:
        DecodeError: the file is larger, or its header declares more pixels, than the decode limit
            ``max_pixels`` allows (Pillow's ``Image.MAX_IMAGE_PIXELS`` by default); nothing more
            than its first :data:`~lnstd.data.decode.HEAD_BYTES` was read.
        OSError: as :func:`lnstd.storage.read_bytes`; a link loop as it is (``ELOOP``).
    """
    fs, path = storage.resolve(uri, opts)
    if isinstance(fs, pafs.LocalFileSystem):
        st = os.stat(path)  # a missing file, a link loop: this file's own fault, never retried
        if stat.S_ISREG(st.st_mode):  # anything else is for read_bytes to name, never opened here
            with open(path, "rb") as f:
                check_limits(f.read(HEAD_BYTES), st.st_size, max_pixels)
        return storage.read_bytes(uri, opts)

    def read() -> bytes:  # S3: one object, its head then the rest (no second request for the size)
        with fs.open_input_file(path) as f:
            head = f.read(HEAD_BYTES)
            check_limits(head, f.size(), max_pixels)
            return head + f.read()

    return storage.retry(read, f"reading {uri}")
