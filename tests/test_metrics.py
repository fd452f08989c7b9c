"""Metrics against scikit-learn / NumPy references on random data and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from lnstd.metrics.segmentation import SegmentationMeter, average_precision, scaled


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_average_precision_matches_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(5, 300, generator=g)
    scores[1] = (scores[1] * 4).round() / 4  # many ties
    labels = torch.rand(5, 300, generator=g) > 0.7
    ours = average_precision(scores, labels)
    for i in range(5):
        ref = average_precision_score(labels[i].numpy(), scores[i].numpy())
        assert ours[i].item() == pytest.approx(ref, abs=1e-12)


def test_average_precision_by_hand():
    # ranked: 0.9 (+), 0.8 (-), 0.7 (+): AP = 1/2 * 1 + 1/2 * 2/3
    ap = average_precision(torch.tensor([[0.9, 0.8, 0.7]]), torch.tensor([[1, 0, 1]]))
    assert ap.item() == pytest.approx(0.5 + 1 / 3)
    assert average_precision(torch.tensor([[0.5, 0.2]]), torch.tensor([[0, 0]])).item() == 0.0


def _numpy_reference(heats, masks):
    correct = labelled = 0
    inter, union, aps = np.zeros(2), np.zeros(2), []
    for heat, mask in zip(heats, masks):
        h = scaled(torch.tensor(heat)[None], mask.shape)[0].numpy()
        pred = h > h.mean()
        correct += (pred == mask).sum()
        labelled += mask.size
        for c, (p, t) in enumerate(((~pred, ~mask), (pred, mask))):
            inter[c] += (p & t).sum()
            union[c] += (p | t).sum()
        y = np.concatenate([~mask.ravel(), mask.ravel()])
        s = np.concatenate([1 - h.ravel(), h.ravel()])
        aps.append(average_precision_score(y, s))
    return correct / labelled, (inter / union).mean(), np.mean(aps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segmentation_meter_matches_numpy_and_is_batch_invariant(seed):
    rng = np.random.default_rng(seed)
    heats = rng.random((6, 4, 5)).astype(np.float32)
    masks = rng.random((6, 20, 25)) > 0.6
    masks[:, 5:15, 5:15] = True
    acc, miou, mAP = _numpy_reference(heats, masks)
    whole = SegmentationMeter()
    whole.update(torch.tensor(heats), torch.tensor(masks))
    split = SegmentationMeter()
    for k in range(0, 6, 4):
        split.update(torch.tensor(heats[k : k + 4]), torch.tensor(masks[k : k + 4]))
    for meter in (whole, split):
        out = meter.compute()
        assert out["pixel_accuracy"] == pytest.approx(acc)
        assert out["miou"] == pytest.approx(miou)
        assert out["map"] == pytest.approx(mAP)


def test_segmentation_by_hand():
    heat = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # hot top-left
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True  # object in the top-left quarter
    meter = SegmentationMeter()
    per = meter.update(heat, mask)
    out = meter.compute()
    # bilinear upsampling of the 2x2 map gives [1, .75, .25, 0] along the edges: 4 pixels above the mean
    up = scaled(heat, (4, 4))[0]
    pred = up > up.mean()
    assert out["pixel_accuracy"] == pytest.approx(float((pred == mask[0]).float().mean()))
    assert per["ap"][0].item() == pytest.approx(
        average_precision_score(
            np.concatenate([~mask[0].numpy().ravel(), mask[0].numpy().ravel()]),
            np.concatenate([1 - up.numpy().ravel(), up.numpy().ravel()]),
        )
    )


class QuadrantModel(torch.nn.Module):
    """Class 0 if the top-left quadrant is bright, class 1 otherwise: a model with a known answer."""

    def forward(self, x):
        tl = x[:, :, : x.shape[2] // 2, : x.shape[3] // 2].mean(dim=(1, 2, 3))
        return torch.stack([8 * (tl - 0.5), torch.zeros_like(tl)], dim=1)


def test_perturbation_curves_known_answer_and_batching():
    from lnstd.metrics.perturbation import FRACTIONS, auc, perturbation_curves

    model = QuadrantModel()
    x = torch.zeros(2, 3, 8, 8)
    x[:, :, :4, :4] = 1.0  # bright top-left: class 0 with probability sigmoid(4)
    good = torch.zeros(2, 4, 4)
    good[:, :2, :2] = 1.0  # the right explanation: top-left
    bad = torch.zeros(2, 4, 4)
    bad[:, 2:, 2:] = 1.0  # a wrong one: bottom-right
    t = torch.zeros(2, dtype=torch.long)
    right = perturbation_curves(model, x, good, t)
    wrong = perturbation_curves(model, x, bad, t)
    for curves in (right, wrong):
        assert set(curves) == {"positive", "negative"}
        assert curves["positive"].shape == curves["negative"].shape == (2, len(FRACTIONS))
    # The right map, upsampled, ranks the quadrant's pixels first: nine at 1.0 (average rank 4),
    # six at 0.75 (11.5), one at 0.5625 (15); outside: 0.25 x6 (18.5), 0.1875 x2, 0.0625, 0.0 x39
    # (44). Ties share their average rank. Positive: 10% (k = 6) removes the nine 1.0 pixels
    # (rank 4 < 6), leaving the quadrant's mean at 7/16 (class 1). Negative removes pixels of rank
    # > 63 - k: 80% (k = 51) the 0.5625 one (15/16 left), 90% (k = 58) the 0.75 ones too (9/16 left,
    # still class 0).
    torch.testing.assert_close(right["positive"], torch.tensor([[1.0] + [0.0] * 9] * 2))
    torch.testing.assert_close(right["negative"], torch.tensor([[1.0] * 10] * 2))
    torch.testing.assert_close(auc(right["positive"]), torch.tensor([0.05, 0.05]))
    assert (auc(wrong["positive"]) > auc(right["positive"])).all()
    # a batch equals its images one by one
    hm = torch.rand(2, 4, 4)
    batched = perturbation_curves(model, x, hm, t)
    for i in range(2):
        one = perturbation_curves(model, x[i : i + 1], hm[i : i + 1], t[i : i + 1])
        for k in batched:
            assert torch.allclose(batched[k][i], one[k][0])


def test_auc_is_the_trapezoid_rule():
    from lnstd.metrics.perturbation import auc

    curve = torch.tensor([[1.0] * 10, [1 - 0.1 * k for k in range(10)]])
    np.testing.assert_allclose(
        auc(curve).numpy(), [0.9, np.trapezoid([1 - 0.1 * k for k in range(10)], dx=0.1)], rtol=1e-6
    )


def test_spearman_with_ties_equals_scipy():
    """Grad-CAM-like maps (ReLU zeros) and coarse values tie; ties share their average rank, as in
    scipy.stats.spearmanr, instead of being ordered by position."""
    from scipy.stats import rankdata, spearmanr

    from lnstd.metrics.rank import average_ranks, spearman

    g = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(6, 7, 7, generator=g))  # about half the cells tie at 0
    b = torch.relu(torch.randn(6, 7, 7, generator=g) + 0.3 * a)
    b[3] = torch.round(b[3] * 2) / 2  # ties at several values
    b[4] = a[4] * 3  # the same ranking: 1
    assert (a == 0).float().mean() > 0.3
    expected = [spearmanr(x, y).statistic for x, y in zip(a.flatten(1).numpy(), b.flatten(1).numpy())]
    torch.testing.assert_close(
        spearman(a, b), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12
    )
    assert spearman(a, b)[4] == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(average_ranks(b.flatten(1)), torch.tensor(rankdata(b.flatten(1), axis=1)))
    assert spearman(torch.zeros(1, 9), torch.randn(1, 9, generator=g)).item() == 0  # no ranking at all
