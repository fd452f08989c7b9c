"""Decoding the image zoo: converted correctly, or refused with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
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


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like picture (JPEG handles it as it handles photos)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in (0.0, 1.0, 2.0)], -1)
    arr = (base * 90 + 128 + rng.normal(0, 6, (h, w, 3))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def test_preprocess_resize_and_crop_geometry_and_draft_decoding():
    from lnstd.data.preprocess import Preprocess

    img = _photo(500, 375)
    data = _bytes(img, "JPEG", quality=90)
    full = Preprocess((224, 224), fit="resize", draft=False)
    drafted = Preprocess((224, 224), fit="resize", draft=True)
    x_full, g = full.load(data)
    x_draft, g2 = drafted.load(data)
    assert g == g2 and g.box == (0.0, 0.0, 500.0, 375.0) and (g.width, g.height) == (500, 375)
    assert x_full.shape == (3, 224, 224)
    # at 224 px no DCT reduction keeps 224 rows (a half-scale decode has 188): the same pixels;
    # at 96 px a half-scale decode (250 x 188) is taken, and stays close to a full decode
    small_full, _ = Preprocess((96, 96), draft=False).load(data)
    small_draft, _ = Preprocess((96, 96), draft=True).load(data)
    assert (small_full - small_draft).abs().mean() < 0.05  # normalised units (std ~0.23 of [0, 1])
    torch_close = torch.testing.assert_close
    torch_close(x_full, x_draft)  # no reduction possible at 224: identical
    crop = Preprocess((224, 224), fit="center-crop", crop_pct=0.875)
    _, gc = crop.load(data)
    side = 375 * 0.875
    assert gc.box == pytest.approx(((500 - side) / 2, (375 - side) / 2, (500 + side) / 2, (375 + side) / 2))


def test_tensor_decode_path_matches_pil_and_falls_back_per_image():
    """The GPU decoder's code path, run on the CPU: JPEGs are decoded by torchvision and resized as
    tensors (close to PIL's resize), and anything else takes the PIL path or becomes an error."""
    from types import SimpleNamespace

    from lnstd.data.decode import jpeg_header
    from lnstd.data.gpu import decode_on_gpu
    from lnstd.data.preprocess import Preprocess

    prep = Preprocess((64, 64), fit="center-crop", crop_pct=0.9, draft=False)
    jpeg = _bytes(_photo(120, 80), "JPEG", quality=95)
    png = _bytes(_photo(90, 60, 1), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _bytes(_photo(40, 70, 2), "JPEG", quality=95, exif=exif)
    broken = jpeg[: len(jpeg) // 2]
    header = jpeg_header(jpeg)
    assert header == (120, 80, True) and jpeg_header(rotated) == (70, 40, False) and jpeg_header(png) is None
    batch = [
        SimpleNamespace(raw=jpeg, geometry=prep.geometry(120, 80), tensor=None, error=None, detail=None),
        SimpleNamespace(raw=rotated, geometry=prep.geometry(70, 40), tensor=None, error=None, detail=None),
        SimpleNamespace(raw=broken, geometry=prep.geometry(120, 80), tensor=None, error=None, detail=None),
        SimpleNamespace(raw=None, geometry=None, tensor=torch.zeros(3, 64, 64), error=None, detail=None),
    ]
    decode_on_gpu(batch, prep, torch.device("cpu"))
    pil, _ = prep.load(jpeg)
    assert batch[0].tensor.shape == (3, 64, 64)
    assert (batch[0].tensor - pil).abs().mean() < 0.03  # torchvision's antialiased resize vs PIL's
    torch.testing.assert_close(batch[1].tensor, prep.load(rotated)[0])  # rotated: the PIL path
    assert batch[2].error == "corrupt or truncated image" and batch[2].tensor is None
    assert batch[3].tensor.abs().sum() == 0  # entries without raw bytes are left alone
    assert all(b.raw is None for b in batch)
