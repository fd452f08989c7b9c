"""Input sources: image folders / S3 prefixes, Parquet or CSV manifests, ImageNet-segmentation .mat.

Every source streams :class:`Item` records in a deterministic order, so fixed-size shards get the
same ids on every run (what resume relies on), and a listing of millions never sits in memory.

Names are data: any name a file system allows is an input. A local name that is not UTF-8 keeps
its bytes in a ``file://`` URI with percent-escapes (:func:`lnstd.storage.local_uri`), which every
reader turns back into the same bytes; its id is its relative path escaped so that no two names share
one (:func:`local_id`). An S3 key is UTF-8 and its own id. A file that
is not a regular file (a FIFO, socket or device) is an input with the error "not a regular file",
never opened. ``path#index`` references exist only for ``.mat`` inputs (:func:`mat_ref`).
"""

from __future__ import annotations

import os
import posixpath
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .. import storage
from ..errors import InputError, one_line
from .decode import DecodeError

__all__ = ["IMAGE_EXTENSIONS", "Item", "Source", "mat_ref", "open_source"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Item:
    """One input image: a stable id, where to read it (absolute path or URI), and what is known
    about it. ``problem`` is set when the listing itself already shows a fault of this one input
    (e.g. a label that is not an integer); the image then gets an error row with that reason."""

    image_id: str
    uri: str
    label: int | None = None
    mask_uri: str | None = None
    problem: str | None = None


class Source:
    """A dataset of images; ``count()`` and ``items()`` may both be called (each streams)."""

    def __init__(self, uri: str, opts: storage.StorageOptions) -> None:
        self.uri = uri
        self.opts = opts

    #: True when ids are unique by construction (one file, one key), so no duplicate check is needed.
    unique_ids: bool = False

    def items(self) -> Iterator[Item]:
        raise NotImplementedError

    def count(self) -> int:
        return sum(1 for _ in self.items())

    def check(self) -> None:
        """Fail early, in one line, if the input cannot be read at all (missing, wrong format)."""
        next(iter(self.items()), None)

    def notice(self) -> str:
        """What the last listing left out and why (empty when nothing), for the plan's line."""
        return ""


class FolderSource(Source):
    """Every image file under a folder or S3 prefix, recursively; id = path relative to the root."""

    unique_ids = True

    def __init__(self, uri: str, opts: storage.StorageOptions) -> None:
        super().__init__(uri, opts)
        self.unreadable: list[str] = []  # subfolders the last listing could not read

    def items(self) -> Iterator[Item]:
        root = self.uri.rstrip("/")
        if storage.is_s3(root):
            for uri in storage.list_files(self.uri, IMAGE_EXTENSIONS, self.opts):
                yield Item(image_id=uri[len(root) + 1 :], uri=uri)
            return
        root = storage.resolve(root, self.opts)[1]
        if os.path.isfile(root):
            raise InputError(
                f"--input {self.uri} is one file: `lnstd run` takes a folder, an s3:// prefix or a "
                "manifest (.parquet/.csv with a uri column); for single images use `lnstd explain IMAGE`"
            )
        self.unreadable = []
        for path, regular in storage.walk_local(root, IMAGE_EXTENSIONS, self.unreadable):
            rel = path[len(root) + 1 :]
            yield Item(local_id(rel), storage.local_uri(path),
                       problem=None if regular else storage.NotRegularFileError.reason)  # fmt: skip

    def notice(self) -> str:
        if not self.unreadable:
            return ""
        first = os.path.relpath(self.unreadable[0], storage.resolve(self.uri, self.opts)[1])
        n = len(self.unreadable)
        return (
            f"{n} subfolder{'s' if n > 1 else ''} could not be read, their images are not in the plan "
            f"(first: {storage.local_uri(first)!r}; once readable, a rerun with --refresh-input adds them)"
        )


_LOOKS_ESCAPED = re.compile(r"%(?=[0-9A-Fa-f]{2})")


def local_id(rel: str) -> str:
    """A local relative path as its image id, one id per name: ``urllib.parse.unquote_to_bytes(id)``
    gives the name's bytes back, so two names never share an id.

    A UTF-8 name is its own id, except that a ``%`` followed by two hex digits (``%41``, ``%FF``)
    is written ``%25``, so that it cannot be taken for an escape; a name that is not UTF-8 has its
    bytes percent-escaped (``bad\\xffname.png`` -> ``bad%FFname.png``, and a real file named
    ``bad%FFname.png`` -> ``bad%25FFname.png``).
    """
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return urllib.parse.quote(os.fsencode(rel), safe="/")
    return _LOOKS_ESCAPED.sub("%25", rel)


class ManifestSource(Source):
    """A Parquet or CSV table with a ``uri`` column and optional ``label``, ``mask_uri``, ``image_id``.

    Relative URIs are resolved against the manifest's folder; an empty or missing ``image_id``
    falls back to the ``uri`` as written.
    """

    def _batches(self) -> Iterator:
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        fs, path = storage.resolve(self.uri, self.opts)
        try:
            if self.uri.lower().endswith(".csv"):
                with fs.open_input_stream(path) as f:
                    # everything as text: a label column with one bad value must not fail the table
                    reader = pacsv.open_csv(f, convert_options=pacsv.ConvertOptions(
                        column_types={c: pa.string() for c in ("uri", "label", "mask_uri", "image_id")}
                    ))  # fmt: skip
                    yield from reader
            else:
                with fs.open_input_file(path) as f:
                    yield from pq.ParquetFile(f).iter_batches(batch_size=8192)
        except FileNotFoundError:
            raise InputError(f"manifest not found: {self.uri}") from None
        except (pa.ArrowInvalid, OSError) as exc:
            if isinstance(exc, storage.StorageError):
                raise
            raise InputError(f"manifest {self.uri} cannot be read: {one_line(exc)}") from None

    def items(self) -> Iterator[Item]:
        base = self.uri.rsplit("/", 1)[0] if "/" in self.uri else "."
        if not storage.is_s3(base):
            base = storage.resolve(base, self.opts)[1]
        row = 0
        for batch in self._batches():
            cols = batch.schema.names
            if "uri" not in cols:
                raise InputError(f"manifest {self.uri} has no 'uri' column (columns: {', '.join(cols)})")
            data = batch.to_pydict()
            n = batch.num_rows
            labels = data.get("label", [None] * n)
            masks = data.get("mask_uri", [None] * n)
            ids = data.get("image_id", [None] * n)
            for i in range(n):
                row += 1
                written = data["uri"][i]
                if written is None or str(written).strip() == "":
                    raise InputError(f"manifest {self.uri}: row {row} has an empty uri")
                written = str(written)
                mask = masks[i] if masks[i] not in (None, "") else None
                image_id = str(ids[i]) if ids[i] not in (None, "") else written
                label, problem = _label(labels[i])
                mask_uri = _absolute(base, str(mask)) if mask else None
                yield Item(image_id, _absolute(base, written), label, mask_uri, problem)


def _absolute(base: str, uri: str) -> str:
    """A manifest's URI as a normalised absolute path or URI (relative ones are relative to the
    manifest): ``./a.png``, ``a.png`` and ``x/../a.png`` name one input, and so one uri."""
    if uri.startswith("file://"):
        uri = storage.resolve(uri)[1]
    elif "://" in uri:
        return uri
    if storage.is_s3(base) and not os.path.isabs(uri):
        return storage.join(base, posixpath.normpath(uri))
    return storage.local_uri(os.path.normpath(os.path.join(base, uri)))


def _label(value: object) -> tuple[int | None, str | None]:
    """A manifest label -> (int label, None) or (None, the reason it is unusable)."""
    if value is None or value == "":
        return None, None
    if isinstance(value, bool):
        return None, f"label {value!r} is not an integer"
    if isinstance(value, int):
        return value, None
    if isinstance(value, float) and value.is_integer():
        return int(value), None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip()), None
    return None, f"label {str(value)[:40]!r} is not an integer"


class MatSource(Source):
    """ImageNet-segmentation ``gtsegs_ijcv.mat`` (MATLAB v7.3 / HDF5): images with masks.

    Items point into the file (``path#index``); :func:`read_mat_sample` reads one. A file that is
    not HDF5, or lacks the ``/value/img`` and ``/value/gt`` reference arrays, is refused in one
    line (:class:`InputError`); a bad reference inside it is that one image's error row.
    """

    unique_ids = True

    def count(self) -> int:
        import h5py

        path = self._local()
        try:
            with h5py.File(path, "r") as f:
                return _mat_layout(f)
        except OSError as exc:
            raise InputError(f"{self.uri} is not a MATLAB v7.3 (HDF5) file: {one_line(exc)}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"{self.uri} is not ImageNet-segmentation's .mat layout: {one_line(exc, 160)}"
            ) from None

    def _local(self) -> str:
        if storage.is_s3(self.uri):
            raise InputError("read the .mat file from a local path (copy it next to the job)")
        path = storage.resolve(self.uri, self.opts)[1]
        if not os.path.isfile(path):
            raise InputError(f"input file not found: {self.uri}")
        return path

    def items(self) -> Iterator[Item]:
        n = self.count()
        path = self._local()
        for i in range(n):
            ref = f"{path}#{i}"
            yield Item(image_id=f"{os.path.basename(self.uri)}#{i:05d}", uri=ref, mask_uri=ref)


def _mat_layout(f) -> int:  # f: h5py.File
    """The number of samples of an open gtsegs file; ValueError saying what is wrong if its
    layout is not ``/value/img`` and ``/value/gt``, two (n, 1) arrays of object references."""
    import h5py

    shapes = []
    for name in ("/value/img", "/value/gt"):
        obj = f.get(name)
        if not isinstance(obj, h5py.Dataset):
            raise ValueError(f"no dataset {name}")
        if obj.dtype != h5py.ref_dtype or len(obj.shape) != 2 or obj.shape[1] < 1:
            raise ValueError(f"{name} is not an (n, 1) array of object references ({obj.dtype}, {obj.shape})")
        shapes.append(obj.shape[0])
    if shapes[0] != shapes[1]:
        raise ValueError(f"/value/img has {shapes[0]} entries and /value/gt {shapes[1]}")
    return int(shapes[0])


_MAT_REF = re.compile(r"\.mat#(\d+)$", re.IGNORECASE)


def mat_ref(uri: str) -> tuple[str, int] | None:
    """``path.mat#i`` -> (path, i), or None for any other uri (``x.mat#1.png`` is a PNG)."""
    m = _MAT_REF.search(uri)
    return (uri[: m.start() + 4], int(m.group(1))) if m else None


def read_mat_sample(ref: str) -> tuple[np.ndarray, np.ndarray]:
    """``path#i`` -> (image uint8 (H, W, 3), mask bool (H, W)), transposed as docs/methods.md states.

    Raises:
        DecodeError: entry ``i``'s references do not lead to an (H, W, 3) image and a 2-D mask.
        OSError: the file cannot be opened.
    """
    import h5py

    parsed = mat_ref(ref)
    if parsed is None:
        raise ValueError(f"not a .mat reference: {ref!r}")
    path, i = parsed
    with h5py.File(path, "r") as f:
        try:
            img = np.array(f[f["/value/img"][i, 0]]).transpose(2, 1, 0)
            mask = np.array(f[f[f["/value/gt"][i, 0]][0, 0]]).transpose(1, 0)
        except (TypeError, ValueError, KeyError, IndexError, OSError) as exc:
            raise DecodeError("bad .mat entry", f"{type(exc).__name__}: {one_line(exc, 160)}") from None
    if img.shape[2] != 3:
        raise DecodeError("bad .mat entry", f"image of shape {img.shape}, not (H, W, 3)")
    return img.astype(np.uint8), mask > 0


def open_source(uri: str, opts: storage.StorageOptions | None = None) -> Source:
    """The source for an input URI: a manifest (.parquet/.csv), a .mat file, else a folder/prefix."""
    opts = opts or storage.StorageOptions.from_env()
    low = uri.lower()
    if low.endswith((".parquet", ".csv")):
        return ManifestSource(uri, opts)
    if low.endswith(".mat"):
        return MatSource(uri, opts)
    return FolderSource(uri, opts)
