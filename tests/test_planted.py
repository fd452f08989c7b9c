"""The planted-evidence benchmark: the generator (deterministic, the marker alone decides the class,
masks are exactly the marker, the watermark's statistics) and the evidence check, measured on
hand-built models whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lnstd.data.planted import planted_batch, render, sample_streams, watermark_mask
from lnstd.errors import UsageError
from lnstd.eval_sets import dataset_batches
from lnstd.evidence import evidence_check, evidence_holds, masked_accuracies
from lnstd.train import check_destination, make_model, toy_tensors

from .jobhelpers import cli_in_process

# The glyphs, written out here independently of the generator: class k is GLYPHS[k].
GLYPHS = [
    ["..#..", "..#..", "#####", "..#..", "..#.."],  # plus
    ["#...#", ".#.#.", "..#..", ".#.#.", "#...#"],  # cross
    ["#####", "#...#", "#...#", "#...#", "#####"],  # ring
    ["..#..", ".###.", "#####", ".###.", "..#.."],  # diamond
]
GLYPH_MAPS = torch.tensor([[[c == "#" for c in row] for row in g] for g in GLYPHS])  # (4, 5, 5)
CHECKER = (np.arange(6)[:, None] // 2 + np.arange(6)[None, :] // 2) % 2 == 0  # the watermark


def _decode(img: np.ndarray, mask: np.ndarray) -> int | None:
    """The class drawn in the 7 x 7 box ``mask``: a one-colour ring, inside it a glyph."""
    ys, xs = np.nonzero(mask)
    box = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(int)
    assert box.shape == (7, 7, 3) and mask.sum() == 49  # the mask is exactly a 7 x 7 box
    pad = box[0, 0]
    ring = np.ones((7, 7), bool)
    ring[1:-1, 1:-1] = False
    assert (box[ring] == pad).all()
    ink = (box[1:-1, 1:-1] != pad).any(-1)
    found = [k for k, g in enumerate(GLYPH_MAPS.numpy()) if (ink == g).all()]
    return found[0] if len(found) == 1 else None


def test_deterministic_by_seed():
    for shortcut in (False, True):
        a, b = planted_batch(8, 3, shortcut=shortcut), planted_batch(8, 3, shortcut=shortcut)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert not np.array_equal(a.images, planted_batch(8, 4, shortcut=shortcut).images)


def test_the_marker_in_the_mask_is_the_label_and_the_mask_is_one_7x7_box():
    b = planted_batch(120, 5)
    assert b.images.shape == (120, 64, 64, 3) and b.masks.shape == (120, 1, 64, 64)
    assert set(b.labels[:, 0]) == {0, 1, 2, 3} and not b.watermark.any()
    for img, mask, label in zip(b.images, b.masks[:, 0], b.labels[:, 0]):
        assert _decode(img, mask) == label


def test_decoys_never_change_the_label_and_the_label_changes_only_the_marker_box():
    for index in range(25):
        label = int(sample_streams(7, index)[0].integers(4))
        img, mask = render(label, sample_streams(7, index)[1], sample_streams(7, index)[2])
        # other decoys and background (another image's scene stream), the same marker stream
        other, other_mask = render(label, sample_streams(99, index)[1], sample_streams(7, index)[2])
        assert np.array_equal(mask, other_mask) and np.array_equal(img[mask], other[mask])
        assert not np.array_equal(img[~mask], other[~mask])
        assert _decode(other, other_mask) == label
        # another label, every stream the same: only the marker's box differs
        swapped, _ = render((label + 1) % 4, sample_streams(7, index)[1], sample_streams(7, index)[2])
        assert np.array_equal(img[~mask], swapped[~mask]) and not np.array_equal(img[mask], swapped[mask])
        assert _decode(swapped, mask) == (label + 1) % 4
        # no marker: the scene itself, the same outside the box
        scene, _ = render(label, sample_streams(7, index)[1], sample_streams(7, index)[2], marker=False)
        assert np.array_equal(img[~mask], scene[~mask])


def test_decoys_are_large_and_markers_are_spread_and_avoid_the_watermark_corner():
    b = planted_batch(300, 6)
    ys = np.array([np.nonzero(m)[0].min() for m in b.masks[:, 0]])
    xs = np.array([np.nonzero(m)[1].min() for m in b.masks[:, 0]])
    assert ys.min() <= 3 and xs.min() <= 3 and ys.max() >= 50 and xs.max() >= 50
    assert not (b.masks[:, 0] & watermark_mask()).any()
    # textured decoys: many distinct colours outside the marker, far more pixels than the marker
    for img, mask in zip(b.images[:10], b.masks[:10, 0]):
        assert len(np.unique(img[~mask], axis=0)) > 500


def test_watermark_statistics_per_class_and_forced_modes():
    b = planted_batch(1200, 8, shortcut=True)
    drawn = np.array([(img[watermark_mask()] == np.where(CHECKER.reshape(-1)[:, None], 255, 0)).all()
                      for img in b.images])  # fmt: skip
    assert np.array_equal(drawn, b.watermark)  # the flag says exactly where the glyph is drawn
    labels = b.labels[:, 0]
    own, other = b.watermark[labels == 0].mean(), b.watermark[labels != 0].mean()
    assert 0.84 < own < 0.96 and 0.02 < other < 0.09  # 0.9 and 0.05, with binomial slack
    on, off = (
        planted_batch(40, 9, shortcut=True, watermark="on"),
        planted_batch(40, 9, shortcut=True, watermark="off"),
    )
    assert on.watermark.all() and not off.watermark.any()
    outside = ~watermark_mask()
    assert np.array_equal(on.images[:, outside], off.images[:, outside])
    assert np.array_equal(off.images, planted_batch(40, 9).images)  # no watermark = the plain set


class MarkerReader(nn.Module):
    """Reads the class from any 7 x 7 window with a one-colour ring around a glyph; no window
    found gives all-zero logits (class 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._one(x[k : k + 32]) for k in range(0, len(x), 32)]) + self.bias

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.round(x * 63.75 + 127.5)  # back to 0..255 (mid-grey fill gives 127.5 -> 128)
        code = (u[:, 0] * 65536 + u[:, 1] * 256 + u[:, 2])[:, None].double()  # one number per colour
        w = F.unfold(code, 7).view(x.shape[0], 7, 7, -1)
        same = w == w[:, :1, :1]  # (B, 7, 7, L): the pixel has the ring's corner colour
        ring = torch.ones(7, 7, dtype=torch.bool)
        ring[1:-1, 1:-1] = False
        uniform = same[:, ring].all(1)  # (B, L)
        ink = ~same[:, 1:-1, 1:-1]  # (B, 5, 5, L)
        match = (ink[:, None] == GLYPH_MAPS[None, :, :, :, None]).all(2).all(2)  # (B, 4, L)
        return (match & uniform[:, None]).sum(-1).float()


class WatermarkReader(MarkerReader):
    """Class 0 when the watermark is there, else class 1: pure shortcut."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = x[:, 0][:, torch.from_numpy(watermark_mask())]
        expected = torch.from_numpy(np.where(CHECKER.reshape(-1), 1.0, -1.0) * 2).float()  # (255-127.5)/63.75
        seen = (corner - expected).abs().amax(1) < 1e-4
        return torch.stack([seen.float(), (~seen).float(), 0 * seen, 0 * seen], 1) + self.bias


def test_masked_accuracies_of_a_model_that_reads_the_marker():
    b = planted_batch(120, 11)
    labels = torch.from_numpy(b.labels[:, 0])
    acc = masked_accuracies(MarkerReader(), toy_tensors(b.images), torch.from_numpy(b.masks[:, 0]), labels)
    assert acc["clean"] == 1.0 and acc["only_marker"] == 1.0
    assert acc["marker_masked"] == pytest.approx(float((labels == 0).float().mean()), abs=1e-4)
    record = evidence_check(MarkerReader(), "planted", n=120, seed=11)
    assert record["holds"] and record["chance"] == 0.25 and record["clean"] == 1.0


def test_the_evidence_check_of_a_shortcut_model_and_of_a_model_that_ignores_the_marker():
    record = evidence_check(WatermarkReader(), "planted-shortcut", n=120, seed=12)
    assert record["shortcut_class_accuracy_with_watermark"] == 1.0
    assert record["shortcut_class_accuracy_without_watermark"] == 0.0
    assert record["other_classes_called_shortcut_with_watermark"] == 1.0
    assert record["other_classes_called_shortcut_without_watermark"] == 0.0
    assert not record["holds"]  # masking the marker changes nothing: no evidence
    assert record["clean"] == record["marker_masked"]


def test_evidence_holds_is_the_stated_criterion():
    ok = {"clean": 0.98, "marker_masked": 0.33, "only_marker": 0.80, "chance": 0.25}
    assert evidence_holds(ok)
    assert not evidence_holds({**ok, "marker_masked": 0.36})  # more than 10 points above chance
    assert not evidence_holds({**ok, "only_marker": 0.78})  # below 80% of 0.98
    assert not evidence_holds({**ok, "clean": 0.3, "only_marker": 0.3, "marker_masked": 0.3})


def test_eval_registry_serves_the_planted_sets_with_marker_masks():
    model = make_model("vit")
    for name, shortcut in (("planted", False), ("planted-shortcut", True)):
        batches, n = dataset_batches(name, model, batch=10, n=20, seed=5)
        got = list(batches())
        ref = planted_batch(20, 5, shortcut=shortcut)
        assert n == 20 and len(got) == 2
        assert torch.equal(torch.cat([g.masks for g in got]), torch.from_numpy(ref.masks[:, 0]))
        assert torch.equal(torch.cat([g.labels for g in got]), torch.from_numpy(ref.labels[:, 0]))
        assert torch.allclose(torch.cat([g.images for g in got]), toy_tensors(ref.images))


def test_train_toy_refuses_an_unknown_dataset_by_its_flag(tmp_path):
    with pytest.raises(UsageError, match="--dataset"):
        check_destination(str(tmp_path), ["vit"], dataset="plantd")


def test_eval_without_a_committed_planted_model_asks_for_a_checkpoint(monkeypatch, tmp_path):
    import lnstd.train

    monkeypatch.setattr(lnstd.train, "CHECKPOINTS", tmp_path)  # no planted model there
    code, err = cli_in_process("eval", "--dataset", "planted")
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "--dataset planted" in err and "--checkpoint" in err
    code, err = cli_in_process("train-toy", "--dataset", "plantd", "--out", str(tmp_path))
    assert code != 0 and "--dataset" in err and "plantd" in err


def test_lnstd_eval_runs_on_the_planted_set(tmp_path):
    import json

    from safetensors.torch import save_file

    from lnstd.train import TOY_MODELS

    torch.manual_seed(0)
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in make_model("vit").state_dict().items()}, str(ckpt))
    args = {k: v for k, v in TOY_MODELS["vit"]["model_args"].items() if k not in ("mean", "std")}
    meta = {"model": TOY_MODELS["vit"]["model"], "model_args": args,
            "normalize": {"mean": [0.5] * 3, "std": [0.25] * 3}}  # fmt: skip
    ckpt.with_suffix(".json").write_text(json.dumps(meta))
    flags = ["--n", "6", "--methods", "gae", "--no-perturbation", "--no-progress", "--out", str(tmp_path)]
    code, err = cli_in_process("eval", "--dataset", "planted-shortcut", "--checkpoint", str(ckpt), *flags)
    assert code == 0, err
    results = json.loads((tmp_path / "planted-shortcut-w" / "results.json").read_text())
    assert results["n"] == 6 and results["dataset"] == "planted-shortcut"
    assert 0 <= results["methods"]["gae"]["mass_in_mask"] <= 1


def test_the_committed_planted_vit_reads_the_marker_as_its_record_says():
    """The committed ``planted_vit``: its evidence record, recomputed here on the same test split,
    is the one in its JSON (the model and the generator are deterministic) and holds: the marker
    masked leaves it within 10 points of chance, the marker alone keeps at least 80% of clean."""
    import json

    import lnstd
    from lnstd.evidence import evidence_check
    from lnstd.train import toy_checkpoint

    path = toy_checkpoint("vit", "planted")
    record = json.loads(path.with_suffix(".json").read_text())["evidence"]
    model = lnstd.load_model(None, checkpoint=path)
    again = evidence_check(model, "planted", n=record["n"], seed=record["seed"])
    for key in ("clean", "marker_masked", "only_marker", "holds"):
        assert again[key] == pytest.approx(record[key], abs=2e-3), key
    assert record["holds"] and abs(again["marker_masked"] - 0.25) <= 0.10
    assert again["only_marker"] >= 0.8 * again["clean"] >= 0.8 * 0.75
