"""The README's known-answer pictures, from the committed toy checkpoints (run from the repository root).

docs/img/toy_methods.png: every method on single-object toy images (trained ViT and Swin).
docs/img/toy_two_object.png: two objects per image; gae and lnstd asked for each class in turn.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import lnstd
from lnstd.data.toy import TOY_CLASSES, toy_batch
from lnstd.train import toy_checkpoint, toy_tensors
from lnstd.viz import strip


def stack(rows: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 6 for r in rows)), "white")
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height + 6
    return out


def main() -> None:
    torch.manual_seed(0)
    models = {a: lnstd.load_model(None, checkpoint=toy_checkpoint(a)) for a in ("vit", "swin")}
    images, masks, _ = toy_batch(3, 40_000)
    rows = []
    for arch, model in models.items():
        out = lnstd.Explainer(model, lnstd.list_methods())(toy_tensors(images))
        for i in range(len(images)):
            name = TOY_CLASSES[int(out.predicted[i])]
            heat = {f"{arch} {m} ({name})": out.heatmaps[m][i] for m in out.heatmaps}
            rows.append(strip(Image.fromarray(images[i]), heat, height=128, mask=masks[i, 0]))
    stack(rows).save("docs/img/toy_methods.png", optimize=True)

    images, masks, labels = toy_batch(4, 30_000, n_objects=2)
    x = toy_tensors(images)
    rows = []
    for arch, model in models.items():
        ex = lnstd.Explainer(model, ["gae", "lnstd"])
        outs = [ex(x, torch.from_numpy(labels[:, k])) for k in range(2)]
        for i in range(len(images)):
            heat = {
                f"{arch} {m}: {TOY_CLASSES[int(labels[i, k])]}": outs[k].heatmaps[m][i]
                for m in ("gae", "lnstd")
                for k in range(2)
            }
            both = np.asarray(masks[i, 0] | masks[i, 1])
            rows.append(strip(Image.fromarray(images[i]), heat, height=128, mask=both))
    stack(rows).save("docs/img/toy_two_object.png", optimize=True)
    print("docs/img/toy_methods.png docs/img/toy_two_object.png written")


if __name__ == "__main__":
    main()
