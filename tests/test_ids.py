"""Ids are unique by construction: a local name's id is its UTF-8 text with ``%`` escapes that
``urllib.parse.unquote_to_bytes`` reverses, so two names never share an id (issue 26, item 4)."""

from __future__ import annotations

import os
import urllib.parse

from hypothesis import example, given, settings
from hypothesis import strategies as st

from lnstd.data import open_source
from lnstd.data.sources import local_id

from .jobhelpers import good_image

# Bytes that make escapes interesting (%, hex digits, bytes that are not UTF-8, a UTF-8 pair),
# mixed with any byte a name may hold.
_TRICKY = [
    b"%",
    b"%FF",
    b"%25",
    b"%4",
    b"F",
    b"f",
    b"2",
    b"5",
    b"\xff",
    b"\xc3",
    b"\xa9",
    b"\x80",
    b" ",
    b".",
]
_BYTE = st.sampled_from(_TRICKY) | st.binary(min_size=1, max_size=1).filter(
    lambda b: b not in (b"/", b"\x00")
)
_PART = st.lists(_BYTE, min_size=1, max_size=10).map(b"".join).filter(lambda p: p not in (b".", b".."))
_NAME = st.lists(_PART, min_size=1, max_size=3).map(b"/".join)


def _id(raw: bytes) -> str:
    return local_id(os.fsdecode(raw))


@settings(max_examples=300, deadline=None)
@given(_NAME)
@example(b"bad%FFname.png")
def test_an_id_is_utf8_and_gives_the_names_bytes_back(raw):
    image_id = _id(raw)
    image_id.encode("utf-8")  # Parquet strings are UTF-8
    assert urllib.parse.unquote_to_bytes(image_id) == raw


@settings(max_examples=300, deadline=None)
@given(_NAME)
def test_a_name_and_a_real_file_named_after_its_id_have_two_ids(raw):
    twin = _id(raw).encode("utf-8")  # the attack: a real file whose name is another's id
    if twin != raw:
        assert _id(twin) != _id(raw)


@settings(max_examples=100, deadline=None)
@given(st.lists(_NAME, min_size=2, max_size=8, unique=True))
def test_distinct_names_have_distinct_ids(names):
    assert len({_id(raw) for raw in names}) == len(names)


@settings(max_examples=500, deadline=None)
@given(st.text(min_size=1, max_size=20).filter(lambda t: "%" not in t and "\x00" not in t))
def test_a_utf8_name_without_percent_is_its_own_id(text):
    assert local_id(text) == text  # the ids of existing outputs stay as they were


def test_ids_by_example():
    assert _id(b"bad\xffname.png") == "bad%FFname.png"  # as before
    assert _id(b"bad%FFname.png") == "bad%25FFname.png"  # what looks like an escape is escaped
    for kept in (
        "a.png",
        "caf\u00e9.png",
        "100%.png",
        "50% off.png",
        "%zz.png",
        "x%4.png",
        "sub/d\u00e9j\u00e0.jpg",
    ):
        assert local_id(kept) == kept


def test_a_name_and_its_escaped_twin_in_one_folder_get_two_ids(tmp_path):
    """The real folder source over two real files: ``bad\\xffname.png`` and ``bad%FFname.png``."""
    folder = os.path.join(bytes(tmp_path), b"in")
    os.mkdir(folder)
    for raw in (b"bad\xffname.png", b"bad%FFname.png", b"ok.png"):
        with open(os.path.join(folder, raw), "wb") as f:
            f.write(good_image(1))
    items = list(open_source(os.fsdecode(folder)).items())
    ids = [it.image_id for it in items]
    assert len(ids) == 3 and len(set(ids)) == 3, ids
    got = sorted(urllib.parse.unquote_to_bytes(i) for i in ids)
    assert got == sorted([b"bad\xffname.png", b"bad%FFname.png", b"ok.png"])
