"""ImageNet-segmentation's gtsegs_ijcv.mat in its real MATLAB v7.3 layout, and a job over it."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from lnstd.data import open_source, read_mat_sample

from .jobhelpers import mask_scores_by_hand, model_flags, read_rows, run_cli, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("shared_ray")  # runs join one Ray head (conftest)


def write_gtsegs(path: Path, images: list[np.ndarray], masks: list[np.ndarray]) -> None:
    """As MATLAB writes it: cell arrays of object references, arrays stored column-major (transposed)."""
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img_refs = f.create_dataset("/value/img", (len(images), 1), dtype=h5py.ref_dtype)
        gt_refs = f.create_dataset("/value/gt", (len(images), 1), dtype=h5py.ref_dtype)
        for i, (img, mask) in enumerate(zip(images, masks)):
            img_refs[i, 0] = refs.create_dataset(f"img{i}", data=img.transpose(2, 1, 0)).ref
            gt = refs.create_dataset(f"gt{i}", data=mask.astype(np.uint8).T)
            cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=h5py.ref_dtype)
            cell[0, 0] = gt.ref
            gt_refs[i, 0] = cell.ref


def _samples(n: int = 4):
    rng = np.random.default_rng(0)
    images, masks = [], []
    for i in range(n):
        h, w = 30 + 3 * i, 40 + 5 * i  # non-square, different sizes: transposes must be right
        images.append(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        m = np.zeros((h, w), bool)
        m[2 : h // 2, 3 : w // 3] = True
        masks.append(m)
    return images, masks


def test_mat_v73_layout_reads_back_the_originals(tmp_path):
    images, masks = _samples()
    path = tmp_path / "gtsegs_ijcv.mat"
    write_gtsegs(path, images, masks)
    src = open_source(str(path))
    assert src.count() == 4
    items = list(src.items())
    assert [it.image_id for it in items] == [f"gtsegs_ijcv.mat#{i:05d}" for i in range(4)]
    for it, img, mask in zip(items, images, masks):
        got_img, got_mask = read_mat_sample(it.uri)
        assert got_img.shape == img.shape and (got_img == img).all()
        assert got_mask.shape == mask.shape and (got_mask == mask).all()


@pytest.mark.integration
def test_run_over_the_mat_file_fills_mask_metrics(tmp_path):
    images, masks = _samples()
    write_gtsegs(tmp_path / "gtsegs_ijcv.mat", images, masks)
    ckpt = tiny_checkpoint(tmp_path)
    r = run_cli("run", "--input", str(tmp_path / "gtsegs_ijcv.mat"), "--output", str(tmp_path / "out"),
                *model_flags(ckpt), "--methods", "lnstd", "--no-progress", "--no-report",
                "--cpus-per-actor", "0.5")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert [(r["width"], r["height"]) for r in sorted(rows, key=lambda r: r["image_id"])] == [
        (img.shape[1], img.shape[0]) for img in images
    ]
    # the mask columns, recomputed from each row's heatmap and the original mask resized to the
    # model's 32x32 input (nearest neighbour, the protocol's choice)
    by_id = {f"gtsegs_ijcv.mat#{i:05d}": m for i, m in enumerate(masks)}
    for r in rows:
        small = (
            np.asarray(
                Image.fromarray(by_id[r["image_id"]].astype(np.uint8) * 255).resize((32, 32), Image.NEAREST)
            )
            > 0
        )
        want = mask_scores_by_hand(np.asarray(r["heatmap"]).reshape(r["grid_h"], r["grid_w"]), small)
        for k, v in want.items():
            assert r[k] == pytest.approx(v, abs=1e-5), (k, r["image_id"])
