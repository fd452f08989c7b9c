"""The known-answer benchmark: training command, the committed trained checkpoints, evaluation,
baselines and the eval command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lnstd
from lnstd.eval_sets import dataset_batches
from lnstd.evaluate import bootstrap, evaluate, gaussian_heatmap, paired_difference, randomized_copy
from lnstd.train import TEST_SEED, evaluate_accuracy, toy_checkpoint

from .jobhelpers import TINY_MODEL, model_flags, run_cli, tiny_checkpoint
from .test_datasets import _samples, write_gtsegs

TRAIN_WALL: dict[str, float] = {}


@pytest.fixture(scope="module")
def toy_vit(tmp_path_factory) -> Path:
    """A briefly trained toy ViT with its JSON, written by the real training command."""
    import time

    out = tmp_path_factory.mktemp("toy")
    t0 = time.time()
    r = run_cli("train-toy", "--arch", "vit", "--out", str(out), "--steps", "30", "--train-images", "600")
    TRAIN_WALL["s"] = time.time() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "toy_vit.safetensors"


@pytest.mark.integration
def test_train_toy_writes_weights_and_an_honest_config(toy_vit):
    meta = json.loads(toy_vit.with_suffix(".json").read_text())
    assert meta["steps"] == 30 and meta["model"] == "vit_tiny_patch16_224"
    assert "lnstd train-toy --arch vit" in meta["command"]
    # the recorded training time is the process's own: within the wall time the test measured
    assert 0 <= meta["train_seconds"] <= TRAIN_WALL["s"] + 1
    model = lnstd.load_model(None, checkpoint=toy_vit)  # name, arguments and normalisation from the JSON
    assert (
        model.pretrained_cfg["mean"] == tuple(meta["normalize"]["mean"])
        or list(model.pretrained_cfg["mean"]) == meta["normalize"]["mean"]
    )
    assert evaluate_accuracy(model, n=200, seed=10_000) == pytest.approx(meta["test_accuracy"], abs=0.06)


@pytest.mark.integration
def test_evaluate_reports_methods_baselines_and_sanity(toy_vit):
    """The table's figures are the protocol's, recomputed here from the same maps with NumPy and
    SciPy; the sanity figure is SciPy's Spearman correlation of the trained and re-initialised maps."""
    import torch.nn.functional as F
    from scipy.stats import spearmanr

    model = lnstd.load_model(None, checkpoint=toy_vit)
    batches, n = dataset_batches("toy", model, batch=10, n=20, seed=77_777)
    res = evaluate(model, batches, ["gae", "lnstd"], perturbation=True)
    assert res["n"] == n == 20
    assert set(res["methods"]) == {"gae", "lnstd", "gaussian (baseline)", "gae (randomised model)",
                                   "lnstd (randomised model)"}  # fmt: skip
    images = torch.cat([b.images for b in batches()])
    masks = torch.cat([b.masks for b in batches()]).numpy()
    heat = lnstd.explain(model, images, method="lnstd")
    up = F.interpolate(heat[:, None], size=masks.shape[1:], mode="bilinear", align_corners=False)[:, 0]
    up = up.flatten(1).numpy().astype(np.float64)
    up = (up - up.min(1, keepdims=True)) / (up.max(1, keepdims=True) - up.min(1, keepdims=True))
    pred, truth = up > up.mean(1, keepdims=True), masks.reshape(len(masks), -1)
    inter = [(~pred & ~truth).sum(), (pred & truth).sum()]
    union = [(~pred | ~truth).sum(), (pred | truth).sum()]
    assert res["methods"]["lnstd"]["miou"] == pytest.approx(np.mean(np.divide(inter, union)), rel=1e-9)
    assert res["methods"]["lnstd"]["pixel_accuracy"] == pytest.approx((pred == truth).mean(), rel=1e-9)
    rnd = lnstd.explain(
        randomized_copy(model), images, method="lnstd", target=lnstd.Explainer(model)(images).targets
    )
    rho = np.mean(
        [spearmanr(a, b).statistic for a, b in zip(heat.flatten(1).numpy(), rnd.flatten(1).numpy())]
    )
    assert res["sanity_rank_correlation"]["lnstd"] == pytest.approx(rho, abs=1e-9)
    assert 0 < res["methods"]["lnstd"]["deletion_auc"] < res["methods"]["lnstd"]["insertion_auc"]
    # deletion / insertion are the job's figures (lnstd run --faithfulness: fraction 0..1, 11 steps,
    # the mean colour), here from the per-image reference loop (SciPy's average ranks, one forward
    # per step image): was a separate curve over 0..0.9
    from .reference_faithfulness import deletion_insertion, trapezoid

    cams = F.interpolate(heat[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    targets = lnstd.Explainer(model)(images).targets
    ref = [
        deletion_insertion(model, img.double().numpy(), cam.double().numpy(), int(t), 10, 0.0)
        for img, cam, t in zip(images, cams, targets)
    ]
    for k, name in enumerate(("deletion_auc", "insertion_auc")):
        want = np.mean([trapezoid(curves[k]) for curves in ref])
        assert res["methods"]["lnstd"][name] == pytest.approx(want, abs=1e-4), name


def test_randomised_copy_changes_every_weight_and_keeps_the_original():
    torch.manual_seed(0)
    model = lnstd.load_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rnd = randomized_copy(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    changed = [
        k
        for k, v in rnd.state_dict().items()
        if v.numel() > 1 and v.float().std() > 0 and not torch.equal(v, before[k])
    ]
    assert len(changed) >= 0.8 * sum(1 for v in before.values() if v.numel() > 1 and v.float().std() > 0)


def test_gaussian_baseline_is_centred():
    g = gaussian_heatmap(2, (5, 7))
    assert g.shape == (2, 5, 7) and g[0].argmax() == 2 * 7 + 3


def _per_image(rng: np.random.Generator, n: int, ap_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Random per-image counts in the layout evaluate() collects (n images of 100 pixels)."""
    return {
        "correct": rng.integers(50, 100, n).astype(float), "labelled": np.full(n, 100.0),
        "inter_bg": rng.integers(10, 50, n).astype(float), "union_bg": np.full(n, 60.0),
        "inter_fg": rng.integers(10, 40, n).astype(float), "union_fg": np.full(n, 50.0),
        "ap": rng.random(n) * ap_scale, "pointing_game": rng.integers(0, 2, n).astype(float),
        "mass_in_mask": rng.random(n),
    }  # fmt: skip


def test_bootstrap_interval_matches_the_normal_theory_interval():
    """For a mean of n iid values the 95% percentile interval is close to mean +- 1.96 sd / sqrt(n)."""
    rng = np.random.default_rng(0)
    n = 2000
    arrays = _per_image(rng, n)
    arrays["pointing_game"] = (rng.random(n) < 0.3).astype(float)
    ci = bootstrap(arrays, n=1000)
    p = arrays["pointing_game"].mean()
    half = 1.96 * np.sqrt(p * (1 - p) / n)
    assert ci["pointing_game"][0] == pytest.approx(p - half, abs=0.004)
    assert ci["pointing_game"][1] == pytest.approx(p + half, abs=0.004)


def test_paired_difference_of_a_method_with_itself_is_zero_and_a_shift_is_found():
    rng = np.random.default_rng(1)
    n = 100
    a = _per_image(rng, n, ap_scale=0.9)
    same = paired_difference(a, a, n=200)
    assert all(v == (0.0, 0.0, 0.0) for v in same.values())
    b = {**a, "ap": a["ap"] + 0.05 + rng.normal(0, 0.01, n)}  # b better by 0.05 on every image
    d, lo, hi = paired_difference(b, a, n=200)["map"]
    assert d == pytest.approx(0.05, abs=0.005) and 0.04 < lo < d < hi < 0.06
    # unpaired intervals of the two would overlap heavily; the paired one is tight
    assert bootstrap(b, n=200)["map"][0] < bootstrap(a, n=200)["map"][1]


@pytest.mark.integration
def test_eval_command_on_toy_mat_and_folder(tmp_path, toy_vit):
    r = run_cli("eval", "--dataset", "toy", "--checkpoint", str(toy_vit), "--n", "20", "--batch-size", "10",
                "--methods", "gae,lnstd", "--two-object-n", "10", "--ablation",
                "--out", str(tmp_path / "toy"), "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "toy" / "toy-toy_vit" / "results.json").read_text())
    assert res["n"] == 20 and set(res["class_sensitivity"]) == {"gae", "lnstd"}
    assert {"miou", "map", "pixel_accuracy", "pointing_game", "deletion_auc", "insertion_auc"} <= set(
        res["methods"]["lnstd"]
    )
    assert len(res["ablation"]) == 18
    assert "| lnstd |" in (tmp_path / "toy" / "toy-toy_vit" / "results.md").read_text()

    ckpt = tiny_checkpoint(tmp_path)
    images, masks = _samples()
    write_gtsegs(tmp_path / "gtsegs_ijcv.mat", images, masks)
    (tmp_path / "folder" / "images").mkdir(parents=True)
    (tmp_path / "folder" / "masks").mkdir()
    for i, (img, mask) in enumerate(zip(images, masks)):
        Image.fromarray(img).save(tmp_path / "folder" / "images" / f"s{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "folder" / "masks" / f"s{i}.png")
    for spec in (f"imagenet-seg:{tmp_path / 'gtsegs_ijcv.mat'}", f"folder:{tmp_path / 'folder'}"):
        r = run_cli("eval", "--dataset", spec, *model_flags(ckpt), "--methods", "gae,lnstd",
                    "--batch-size", "3", "--out", str(tmp_path / "o"), "--no-progress")  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        folder = tmp_path / "o" / f"{spec.split(':')[0]}-{TINY_MODEL}"
        assert json.loads((folder / "results.json").read_text())["n"] == 4


FRESH_SEED = 424_242  # a split neither training (seeds < TEST_SEED), validation nor the README used


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_committed_checkpoint_reaches_its_stated_accuracy_on_a_fresh_split(arch):
    ckpt = toy_checkpoint(arch)
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    assert meta["test_split"] == {"n": 1000, "seed": TEST_SEED} and meta["test_accuracy"] >= 0.9
    assert "lnstd train-toy --arch " + arch in meta["command"] and meta["train_seconds"] > 0
    model = lnstd.load_model(None, checkpoint=ckpt)
    acc = evaluate_accuracy(model, n=1000, seed=FRESH_SEED)
    # 1000 fresh images: the binomial standard error near 0.95 is < 0.01, so 3 of them
    assert acc >= meta["test_accuracy"] - 0.03 and acc >= 0.9, acc


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_gae_and_lnstd_beat_the_gaussian_and_randomised_model_heatmaps(arch):
    model = lnstd.load_model(None, checkpoint=toy_checkpoint(arch))
    batches, _ = dataset_batches("toy", model, batch=50, n=150, seed=FRESH_SEED + 1)
    res = evaluate(model, batches, ["gae", "lnstd"], perturbation=False)
    miou = {name: figures["miou"] for name, figures in res["methods"].items()}
    baselines = ["gaussian (baseline)", "gae (randomised model)", "lnstd (randomised model)"]
    for method in ("gae", "lnstd"):
        for baseline in baselines:
            assert miou[method] > miou[baseline], (method, baseline, miou)


@pytest.mark.integration
def test_eval_toy_without_a_model_evaluates_both_committed_checkpoints(tmp_path):
    r = run_cli("eval", "--dataset", "toy", "--n", "10", "--batch-size", "10", "--two-object-n", "4",
                "--methods", "gae,lnstd", "--no-perturbation", "--out", str(tmp_path),
                "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    for arch in ("vit", "swin"):
        res = json.loads((tmp_path / f"toy-toy_{arch}" / "results.json").read_text())
        assert (
            res["n"] == 10
            and res["model"] == f"toy_{arch}"
            and set(res["class_sensitivity"])
            == {
                "gae",
                "lnstd",
            }
        )
    r = run_cli("eval", "--dataset", f"folder:{tmp_path}", "--no-progress")
    assert r.returncode == 2 and "--model" in r.stderr
