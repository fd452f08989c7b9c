"""The known-answer benchmark's generator: deterministic, exact masks, the label is the texture."""

from __future__ import annotations

import numpy as np

from lnstd.data.toy import TOY_CLASSES, toy_batch


def _same(img: np.ndarray, mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """For pixel pairs (p, p + (dy, dx)) both inside the mask: is the colour equal?"""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    keep = (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
    ys, xs = ys[keep], xs[keep]
    keep = mask[ys + dy, xs + dx]
    ys, xs = ys[keep], xs[keep]
    return (img[ys, xs] == img[ys + dy, xs + dx]).all(axis=1)


def test_deterministic_by_seed():
    a, b = toy_batch(6, 3), toy_batch(6, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], toy_batch(6, 4)[0])


def test_the_object_carries_its_class_texture_in_exactly_its_mask():
    images, masks, labels = toy_batch(80, 11)
    assert set(labels[:, 0]) == set(range(len(TOY_CLASSES)))
    for img, mask, label in zip(images, masks[:, 0], labels[:, 0]):
        assert mask.sum() > 150
        assert len(np.unique(img[mask], axis=0)) == 2  # two texture colours, nothing else
        along_x, along_y = _same(img, mask, 0, 1).all(), _same(img, mask, 1, 0).all()
        diagonal = _same(img, mask, 1, -1).all() or _same(img, mask, 1, 1).all()
        expected = {0: (True, False, False), 1: (False, True, False), 2: (False, False, False),
                    3: (False, False, True)}[int(label)]  # fmt: skip
        assert (along_x, along_y, diagonal) == expected, TOY_CLASSES[label]


def test_positions_are_spread_so_a_centre_prior_is_weak():
    _, masks, _ = toy_batch(300, 12)
    m = masks[:, 0]
    touching = m[:, 0].any(1) | m[:, -1].any(1) | m[:, :, 0].any(1) | m[:, :, -1].any(1)
    assert 0.3 < touching.mean() < 0.95
    centre = m[:, 24:40, 24:40].any((1, 2))
    assert centre.mean() < 0.8  # many objects miss the central quarter entirely


def test_two_object_images_have_distinct_classes_and_disjoint_masks():
    _, masks, labels = toy_batch(40, 13, n_objects=2)
    assert masks.shape == (40, 2, 64, 64) and (labels[:, 0] != labels[:, 1]).all()
    assert not (masks[:, 0] & masks[:, 1]).any()
    assert (masks.sum((2, 3)) > 100).all()
