"""Evaluation datasets, one sample structure for all: normalised images, boolean masks, labels."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .data.decode import decode_mask
from .data.planted import PLANTED_DATASETS, planted_batch
from .data.preprocess import Preprocess, input_size
from .data.sources import IMAGE_EXTENSIONS, open_source, read_mat_sample
from .data.toy import toy_batch
from .errors import InputError, UsageError
from .evaluate import Batch
from .train import toy_tensors

__all__ = ["TOY_EVAL_SEED", "dataset_batches"]

TOY_EVAL_SEED = 20_000


def _chunks(pairs: Iterator[tuple[torch.Tensor, torch.Tensor, int | None]], batch: int) -> Iterator[Batch]:
    buf: list = []
    for p in pairs:
        buf.append(p)
        if len(buf) == batch:
            yield _batch(buf)
            buf = []
    if buf:
        yield _batch(buf)


def _batch(buf: list) -> Batch:
    labels = [p[2] for p in buf]
    return Batch(
        torch.stack([p[0] for p in buf]),
        torch.stack([p[1] for p in buf]),
        None if any(lb is None for lb in labels) else torch.tensor(labels),
    )


def dataset_batches(
    spec: str, model: nn.Module, batch: int, n: int | None = None, seed: int = TOY_EVAL_SEED
) -> tuple[Callable[[], Iterator[Batch]], int]:
    """``toy`` | ``planted`` | ``planted-shortcut`` | ``imagenet-seg:PATH`` | ``folder:PATH`` ->
    (a function yielding batches, size).

    Images are resized to the model's input size without cropping (the protocol's choice), masks
    with nearest neighbour; ``folder:PATH`` holds ``images/<stem>.<ext>``, ``masks/<stem>.png`` and
    optionally ``labels.csv`` (``stem,label``). ``seed`` picks the generated split (default: the
    one the README's figures use); on the planted sets the mask is the marker's box (the
    shortcut variant's watermark, where drawn, lies outside it).
    """
    kind, _, path = spec.partition(":")
    size = input_size(model)
    if kind == "toy" or kind in PLANTED_DATASETS:
        count = n or 500
        if kind == "toy":
            images, masks, labels = toy_batch(count, seed, size=size[0])
        else:
            images, masks, labels, _ = planted_batch(count, seed, size[0], kind == "planted-shortcut")

        def toy() -> Iterator[Batch]:
            for k in range(0, count, batch):
                yield Batch(
                    toy_tensors(images[k : k + batch]),
                    torch.from_numpy(masks[k : k + batch, 0]),
                    torch.from_numpy(labels[k : k + batch, 0]),
                )

        return toy, count
    # The protocol resizes without cropping; the same preprocessing as the job (one path).
    prep = Preprocess.for_model(model, "resize")
    if kind == "imagenet-seg":
        items = list(open_source(path).items())[:n]

        def mat() -> Iterator[Batch]:
            def pairs():
                for it in items:
                    img, mask = read_mat_sample(it.uri)
                    tensor, geom = prep.from_array(img)
                    yield tensor, prep.mask(mask, geom), None

            yield from _chunks(pairs(), batch)

        return mat, len(items)
    if kind == "folder":
        img_dir = os.path.join(path, "images")
        stems = _folder_images(path)[:n]
        labels = _folder_labels(path)

        def folder() -> Iterator[Batch]:
            def pairs():
                for name in stems:
                    stem = os.path.splitext(name)[0]
                    with open(os.path.join(img_dir, name), "rb") as f:
                        tensor, geom = prep.load(f.read())
                    with open(os.path.join(path, "masks", stem + ".png"), "rb") as f:
                        mask = prep.mask(decode_mask(f.read()), geom)
                    yield tensor, mask, labels.get(stem)

            yield from _chunks(pairs(), batch)

        return folder, len(stems)
    raise UsageError(
        f"--dataset must be toy, planted, planted-shortcut, imagenet-seg:PATH or folder:PATH, got {spec!r}"
    )


_FOLDER_LAYOUT = "folder:PATH holds images/<stem>.<ext>, masks/<stem>.png and optionally labels.csv"


def _folder_images(path: str) -> list[str]:
    """The image names of a ``folder:PATH`` data set, each with its mask (checked before any work)."""
    img_dir = os.path.join(path, "images")
    if not os.path.isdir(img_dir):
        what = "does not exist" if not os.path.exists(path) else "has no images/ folder"
        raise InputError(f"--dataset folder:{path}: {what} ({_FOLDER_LAYOUT})")
    names = sorted(f for f in os.listdir(img_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise InputError(f"--dataset folder:{path}: no images in {img_dir} ({_FOLDER_LAYOUT})")
    masks = os.path.join(path, "masks")
    missing = [f for f in names if not os.path.isfile(os.path.join(masks, os.path.splitext(f)[0] + ".png"))]
    if missing:
        raise InputError(
            f"--dataset folder:{path}: {len(missing)} of {len(names)} images have no mask "
            f"(first: masks/{os.path.splitext(missing[0])[0]}.png; {_FOLDER_LAYOUT})"
        )
    return names


def _folder_labels(path: str) -> dict[str, int]:
    """``labels.csv`` (``stem,label`` rows, an optional ``stem`` header) of a ``folder:PATH`` data set."""
    import csv

    file = os.path.join(path, "labels.csv")
    if not os.path.isfile(file):
        return {}
    labels: dict[str, int] = {}
    with open(file, newline="") as f:
        for k, row in enumerate(csv.reader(f), 1):
            if not row or row[0] == "stem":
                continue
            try:
                labels[row[0]] = int(row[1])
            except (IndexError, ValueError):
                raise InputError(f"{file}, line {k}: expected stem,label with an integer label") from None
    return labels
