"""lnstd.metrics.faithfulness against independent references (tests/reference_faithfulness.py:
per image, float64, SciPy's direct sparse solve and rankdata) and known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lnstd.metrics.faithfulness import ROAD_PERCENTILES, faithfulness, forwards_per_image, impute
from tests import reference_faithfulness as ref


class SmallNet(nn.Module):
    """A small seeded convolutional classifier (5 classes) whose probabilities move with the pixels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 2).flatten(1)
        return 3 * self.head(h)


class Counting(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.images, self.calls = model, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        self.calls += 1
        return self.model(x)


def _maps(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Smooth random maps at image size, distinct values (a blob structure like an upsampled map)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 1, 4, 4, generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[:, 0]
    return smooth + 1e-4 * torch.rand(b, h, w, generator=g)  # no ties


@pytest.mark.parametrize("solver", ["cg", "direct"])
def test_impute_equals_direct_sparse_solve(solver):
    torch.manual_seed(0)
    images = torch.randn(3, 3, 20, 26, dtype=torch.float64)
    heat = _maps(3, 20, 26, seed=1)
    for share in (0.1, 0.5, 0.9):
        known = heat < heat.flatten(1).quantile(share, dim=1)[:, None, None]  # impute 1 - share
        got = impute(images, known, solver=solver)
        for i in range(3):
            want = ref.road_impute(images[i].numpy(), known[i].numpy())
            assert np.abs(got[i].numpy() - want).max() < 1e-5
            # known pixels stay exactly as they were
            assert torch.equal(got[i][:, known[i]], images[i][:, known[i]])
    # float32 input: the same solution, rounded to float32
    got32 = impute(images.float(), known, solver=solver)
    want = ref.road_impute(images[0].numpy(), known[0].numpy())
    assert got32.dtype == torch.float32 and np.abs(got32[0].double().numpy() - want).max() < 1e-5


def test_impute_noise_only_on_imputed_pixels():
    images = torch.randn(2, 3, 16, 16)
    known = torch.rand(2, 16, 16) < 0.5
    clean = impute(images, known)
    noisy = impute(images, known, noise=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(clean, impute(images, known, solver="cg"), atol=1e-5)  # auto = direct here
    diff = noisy - clean
    assert torch.equal(diff[:, :, known[0] & known[1]], torch.zeros_like(diff[:, :, known[0] & known[1]]))
    spread = diff.permute(1, 0, 2, 3)[:, ~known].std()
    assert 0.4 < float(spread) < 0.6  # N(0, 0.5^2) on the imputed pixels


@pytest.mark.parametrize("solver", ["cg", "direct"])
def test_road_equals_reference_protocol(solver):
    model = SmallNet().eval()
    torch.manual_seed(1)
    images = torch.randn(3, 3, 14, 18)
    heat = _maps(3, 14, 18, seed=2)
    targets = torch.tensor([0, 3, 4])
    got = faithfulness(
        model, images, heat, targets, metrics=["road"], road_noise=0.0, solver=solver, curves=True
    )
    for i in range(3):
        morf, lerf = ref.road_curves(
            model, images[i].double().numpy(), heat[i].double().numpy(), int(targets[i]), ROAD_PERCENTILES
        )
        np.testing.assert_allclose(got["road_morf_curve"][i].numpy(), morf, atol=1e-4)
        np.testing.assert_allclose(got["road_lerf_curve"][i].numpy(), lerf, atol=1e-4)
        assert abs(float(got["road_gap"][i]) - (np.mean(lerf) - np.mean(morf))) < 1e-4
    # the curves must move (a protocol that imputed nothing would also agree at these values)
    assert float((got["road_morf_curve"][:, 0] - got["road_morf_curve"][:, -1]).abs().max()) > 1e-2


@pytest.mark.parametrize("baseline", [0.0, 0.7])
def test_deletion_insertion_equal_per_image_loop_with_ties(baseline):
    model = SmallNet().eval()
    torch.manual_seed(2)
    images = torch.randn(3, 3, 12, 12)
    g = torch.Generator().manual_seed(5)
    heat = torch.randint(0, 4, (3, 12, 12), generator=g).float()  # 4 values: large ties
    heat[2] = 1.0  # a constant map: every pixel ties
    targets = torch.tensor([1, 2, 0])
    got = faithfulness(model, images, heat, targets, metrics=["deletion", "insertion"], steps=7,
                       baseline=baseline, chunk=5, curves=True)  # fmt: skip
    for i in range(3):
        dele, ins = ref.deletion_insertion(
            model, images[i].double().numpy(), heat[i].double().numpy(), int(targets[i]), 7, baseline
        )
        np.testing.assert_allclose(got["deletion_curve"][i].numpy(), dele, atol=1e-5)
        np.testing.assert_allclose(got["insertion_curve"][i].numpy(), ins, atol=1e-5)
        assert abs(float(got["deletion_auc"][i]) - ref.trapezoid(dele)) < 1e-5
        assert abs(float(got["insertion_auc"][i]) - ref.trapezoid(ins)) < 1e-5
    # ties by average rank, not position: the constant map removes nothing until half the image
    # is due, then everything (by position it would remove pixels row by row)
    full = _prob(model, images[2], 0)
    base = _prob(model, torch.full_like(images[2], baseline), 0)
    want = [full] * 4 + [base] * 4  # k = round(j/7 * 144) < 71.5 for j <= 3
    np.testing.assert_allclose(got["deletion_curve"][2].numpy(), want, atol=1e-5)


def _prob(model: nn.Module, image: torch.Tensor, target: int) -> float:
    with torch.no_grad():
        return float(model(image[None]).softmax(1)[0, target])


def test_step_images_share_forwards_and_the_stated_count():
    model = Counting(SmallNet().eval())
    images = torch.randn(4, 3, 10, 10)
    heat = _maps(4, 10, 10, seed=3)
    t = torch.zeros(4, dtype=torch.long)
    for metrics in (["deletion"], ["deletion", "insertion"], ["road"], ["deletion", "insertion", "road"]):
        model.images = model.calls = 0
        faithfulness(model, images, heat, t, metrics=metrics, steps=6, chunk=32)
        per = forwards_per_image(metrics, steps=6)
        assert model.images == 4 * per
        assert model.calls == -(-per // 8)  # 8 steps of the 4 images per forward of 32


def test_linear_model_true_evidence_beats_its_reversal():
    """logit_0 = sum(w * x), logit_1 = 0: the true evidence is w * x (each pixel's contribution).
    Removing it first must lower the probability fastest, on every figure and image."""

    class Linear(nn.Module):
        def __init__(self, w: torch.Tensor) -> None:
            super().__init__()
            self.w = w

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = (x * self.w).sum(dim=(1, 2, 3))
            return torch.stack([z, torch.zeros_like(z)], 1)

    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 3, 16, 16, generator=g) * 0.05
    images = torch.randn(4, 3, 16, 16, generator=g) + 1.0
    evidence = (w * images).sum(1)
    t = torch.zeros(4, dtype=torch.long)
    good = faithfulness(Linear(w), images, evidence, t, road_noise=0.0)
    bad = faithfulness(Linear(w), images, -evidence, t, road_noise=0.0)
    assert (good["deletion_auc"] < bad["deletion_auc"]).all()
    assert (good["insertion_auc"] > bad["insertion_auc"]).all()
    assert (good["road_morf"] < bad["road_morf"]).all()
    assert (good["road_lerf"] > bad["road_lerf"]).all()
    assert (good["road_gap"] > bad["road_gap"]).all()


def test_toy_vit_object_mask_is_more_faithful_than_its_inverse_and_a_random_map():
    """The toy ViT's class evidence lies inside the object's mask (lnstd/data/toy.py)."""
    import lnstd
    from lnstd.data.toy import toy_batch

    model = lnstd.load_model(
        None, checkpoint=Path(lnstd.__file__).parent / "checkpoints" / "toy_vit.safetensors"
    )
    imgs, masks, labels = toy_batch(6, 21)
    x = (torch.tensor(imgs).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    mask = torch.tensor(masks[:, 0]).float()
    t = torch.tensor(labels[:, 0])
    rand = torch.rand(mask.shape, generator=torch.Generator().manual_seed(0))
    fig = {name: faithfulness(model, x, m, t, road_noise=0.0, road_percentiles=(30, 60, 90))
           for name, m in (("mask", mask), ("inverse", 1 - mask), ("random", rand))}  # fmt: skip
    for other in ("inverse", "random"):
        a, b = fig["mask"], fig[other]
        assert float(a["deletion_auc"].mean()) < float(b["deletion_auc"].mean()), other
        assert float(a["insertion_auc"].mean()) > float(b["insertion_auc"].mean()), other
        assert float(a["road_morf"].mean()) < float(b["road_morf"].mean()), other
        assert float(a["road_gap"].mean()) > float(b["road_gap"].mean()), other
    # per image, against the inverse, on most images
    assert int((fig["mask"]["deletion_auc"] < fig["inverse"]["deletion_auc"]).sum()) >= 5


def test_an_image_scores_the_same_in_any_batch_noise_included():
    model = SmallNet().eval()
    images = torch.randn(3, 3, 12, 12)
    heat = _maps(3, 12, 12, seed=6)
    t = torch.tensor([0, 1, 2])
    batch = faithfulness(model, images, heat, t, chunk=7)  # default ROAD noise
    for i in range(3):
        one = faithfulness(model, images[i : i + 1], heat[i : i + 1], t[i : i + 1])
        for k in batch:
            assert abs(float(batch[k][i]) - float(one[k][0])) < 1e-5, k
    quiet = faithfulness(model, images, heat, t, metrics=["road"], road_noise=0.0)
    assert (quiet["road_morf"] - batch["road_morf"]).abs().max() > 1e-6  # the noise is there


def test_bf16_forwards_agree_with_fp32():
    model = SmallNet().eval()
    images = torch.randn(2, 3, 12, 12)
    heat = _maps(2, 12, 12, seed=4)
    t = torch.tensor([0, 1])
    f32 = faithfulness(model, images, heat, t, road_noise=0.0)
    b16 = faithfulness(model, images, heat, t, road_noise=0.0, dtype=torch.bfloat16)
    for k in f32:
        assert torch.isfinite(b16[k]).all()
        assert (f32[k] - b16[k]).abs().max() < 0.05, k


def test_bad_arguments_say_which():
    model = SmallNet().eval()
    x, h, t = torch.randn(1, 3, 8, 8), torch.rand(1, 8, 8), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="metrics must be among"):
        faithfulness(model, x, h, t, metrics=["pixel_flipping"])
    with pytest.raises(ValueError, match="baseline"):
        faithfulness(model, x, h, t, metrics=["deletion"], baseline="grey")
    with pytest.raises(ValueError, match="solver must be one of"):
        faithfulness(model, x, h, t, metrics=["road"], solver="lu")


def test_road_equals_pytorch_grad_cam():
    """pytorch-grad-cam's own ROAD (a dev dependency: the reference implementation), noise 0, same
    percentiles."""
    import pytorch_grad_cam.metrics.road as road
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = SmallNet().eval()
    torch.manual_seed(1)
    images = torch.randn(3, 3, 14, 18)
    heat = _maps(3, 14, 18, seed=2)
    targets = [0, 3, 4]
    got = faithfulness(
        model, images, heat, torch.tensor(targets), metrics=["road"], road_noise=0.0, curves=True
    )
    cams = heat.numpy().astype(np.float32)
    outs = [ClassifierOutputSoftmaxTarget(c) for c in targets]
    for j, q in enumerate(ROAD_PERCENTILES):
        for kind, remove in (("morf", RemoveMostRelevantFirst), ("lerf", RemoveLeastRelevantFirst)):
            metric = PerturbationConfidenceMetric(remove(q, road.NoisyLinearImputer(noise=0.0)))
            theirs = metric(images, cams, outs, model, return_diff=False)
            np.testing.assert_allclose(got[f"road_{kind}_curve"][:, j].numpy(), theirs, atol=1e-4)


def test_deletion_equals_quantus_pixel_flipping():
    """Quantus' PixelFlipping (a dev dependency: the reference implementation of Quantus issue #96 and
    PR #351) configured to deletion's protocol: a map at image size with distinct values, baseline 0,
    the softmax probability of the target. Its curve has no point for the untouched image, so ours
    from its second point on is compared, per image."""
    import quantus

    model = SmallNet().eval()
    torch.manual_seed(4)
    images = torch.randn(4, 3, 16, 20)
    heat = _maps(4, 16, 20, seed=5)
    targets = np.array([1, 0, 4, 2])
    got = faithfulness(model, images, heat, torch.tensor(targets), metrics=["deletion"], steps=8, curves=True)
    metric = quantus.PixelFlipping(
        features_in_step=40,
        perturb_baseline=0.0,
        disable_warnings=True,
        display_progressbar=False,
    )
    theirs = metric(
        model=model, x_batch=images.numpy(), y_batch=targets, a_batch=heat[:, None].numpy(),
        device="cpu", softmax=True, channel_first=True,
    )  # fmt: skip
    # Quantus removes ``features_in_step`` values of the map broadcast over the channels, a pixel's
    # three adjacent in its order: every third of its steps ends on whole pixels, 40 more each time
    np.testing.assert_allclose(got["deletion_curve"][:, 1:].numpy(), np.asarray(theirs)[:, 2::3], atol=1e-5)
    whole = torch.softmax(model(images), dim=1)[torch.arange(4), torch.tensor(targets)]
    np.testing.assert_allclose(
        got["deletion_curve"][:, 0].detach().numpy(), whole.detach().numpy(), atol=1e-6
    )


def test_deletion_hits_are_the_positive_perturbation_curve():
    """``lnstd eval`` takes its ``positive`` accuracy curve from deletion's argmax hits instead of
    forwarding the same step images again: they must be perturbation_curves' own, which forwards them."""
    from lnstd.metrics.perturbation import FRACTIONS, perturbation_curves

    model = SmallNet().eval()
    torch.manual_seed(6)
    images = 10 * torch.randn(6, 3, 14, 18) + 0.5  # strong enough pixels that deleting them flips some
    heat = _maps(6, 7, 9, seed=7)  # a coarser map, upsampled as a token grid is
    targets = model(images).argmax(1)
    got = faithfulness(model, images, heat, targets, metrics=["deletion"], hits=True)
    want = perturbation_curves(model, images, heat, targets)["positive"]
    assert want.shape == (6, len(FRACTIONS)) and 0 < want.mean() < 1  # the curve moves
    torch.testing.assert_close(got["deletion_hits"][:, : len(FRACTIONS)], want)
    assert set(got) == {"deletion_auc", "deletion_hits"}
