"""Decoding the image zoo: converted correctly, or refused with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lnstd.data import DecodeError, decode_image

from .jobhelpers import bad_files


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_modes_become_rgb_with_the_right_colours():
    red = Image.new("RGB", (8, 6), (255, 0, 0))
    out, w, h = decode_image(_bytes(red.convert("CMYK"), "JPEG", quality=100))
    assert (w, h) == (8, 6) and out.mode == "RGB"
    assert np.asarray(out)[..., 0].mean() > 200 and np.asarray(out)[..., 2].mean() < 60

    gray16 = Image.fromarray(np.full((5, 7), 65535, dtype=np.uint16))
    out, w, h = decode_image(_bytes(gray16, "PNG"))
    assert (w, h) == (7, 5) and np.asarray(out).min() == 255

    out, _, _ = decode_image(_bytes(Image.new("L", (4, 4), 30), "PNG"))
    assert np.asarray(out).tolist()[0][0] == [30, 30, 30]

    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))  # fully transparent -> white page
    out, _, _ = decode_image(_bytes(rgba, "PNG"))
    assert np.asarray(out)[0, 0].tolist() == [255, 255, 255]

    pal = Image.new("RGB", (4, 4), (0, 200, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    out, _, _ = decode_image(_bytes(pal, "PNG"))
    assert np.asarray(out)[0, 0, 1] > 150

    out, w, h = decode_image(_bytes(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"))
    assert (w, h) == (1, 1) and out.size == (1, 1)


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out, w, h = decode_image(_bytes(img, "JPEG", exif=exif, quality=95))
    assert (w, h) == (20, 40) and out.size == (20, 40)
    arr = np.asarray(out).mean(-1)
    assert arr[:10].mean() > 200 and arr[-10:].mean() < 50  # left band now on top


@pytest.mark.parametrize(("name", "data"), list(bad_files().items()), ids=list(bad_files()))
def test_bad_files_are_refused_with_a_reason(name, data):
    with pytest.raises(DecodeError) as info:
        decode_image(data)
    assert str(info.value)
    assert "\n" not in str(info.value)
