"""Print the README's known-answer tables from ``lnstd eval --dataset toy --ablation``'s results.

Usage: python docs/toy_tables.py [EVAL_OUT]   (default lnstd-eval, the command's default --out)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ARCHS = ("vit", "swin")
NAMES = {"vit": "ViT", "swin": "Swin"}


def main(root: Path) -> None:
    res = {a: json.loads((root / f"toy-toy_{a}" / "results.json").read_text()) for a in ARCHS}
    for a in ARCHS:
        md = (root / f"toy-toy_{a}" / "results.md").read_text().split("\n\n")
        print(f"**Toy {NAMES[a]}** ({res[a]['n']} images, {res[a]['seconds']:.0f} s):\n")
        print(md[2] + "\n")
    methods = list(res["vit"]["sanity_rank_correlation"])
    print("| | " + " | ".join(methods) + " |")
    print("|---" * (len(methods) + 1) + "|")
    for key, label in (("class_sensitivity", "two-object class sensitivity ↑"),
                       ("sanity_rank_correlation", "rank corr. with randomised model ↓")):  # fmt: skip
        for a in ARCHS:
            print(f"| {a} {label} | " + " | ".join(f"{res[a][key][m]:.3f}" for m in methods) + " |")
    print("\n| std | normalize | blocks | ViT mIoU | ViT mAP | Swin mIoU | Swin mAP |")
    print("|---|---|---|---|---|---|---|")
    for rv, rs in zip(res["vit"]["ablation"], res["swin"]["ablation"], strict=True):
        assert (rv["std"], rv["normalize"], rv["blocks"]) == (rs["std"], rs["normalize"], rs["blocks"])
        print(f"| {rv['std']} | {rv['normalize']} | {rv['blocks']} | {rv['miou']:.3f} | {rv['map']:.3f} "
              f"| {rs['miou']:.3f} | {rs['map']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "lnstd-eval"))
