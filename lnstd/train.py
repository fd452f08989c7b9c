"""Train the known-answer benchmark's small ViT and Swin on the toy shapes (CPU is enough).

``lnstd train-toy --arch vit`` writes ``toy-checkpoints/toy_vit.safetensors`` and ``toy_vit.json``
(timm name and arguments, accuracy on a fresh split, steps, wall time, the command); it refuses to
replace models already there (the committed ones included) unless ``--force``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .data.toy import TOY_CLASSES, toy_batch
from .errors import UsageError
from .models import load_model

__all__ = [
    "TOY_MODELS",
    "check_destination",
    "evaluate_accuracy",
    "toy_checkpoint",
    "toy_tensors",
    "train_toy",
]

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)

TOY_MODELS: dict[str, dict[str, Any]] = {
    "vit": {
        "model": "vit_tiny_patch16_224",
        "model_args": {
            "img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 6, "num_heads": 3,
            "num_classes": len(TOY_CLASSES), "drop_path_rate": 0.0, "mean": MEAN, "std": STD,
        },
    },
    "swin": {
        "model": "swin_tiny_patch4_window7_224",
        "model_args": {
            "img_size": 64, "patch_size": 4, "window_size": 4, "embed_dim": 48, "depths": [2, 2, 2],
            "num_heads": [2, 4, 8], "num_classes": len(TOY_CLASSES), "drop_path_rate": 0.0,
            "mean": MEAN, "std": STD,
        },
    },
}  # fmt: skip

CHECKPOINTS = Path(__file__).parent / "checkpoints"  # the committed, trained toy models
TEST_SEED = 10_000  # splits: training seeds < 10_000; the stated accuracy uses this seed


def toy_checkpoint(arch: str) -> Path:
    """Path of the committed trained toy model ``arch`` (``vit`` or ``swin``); its JSON lies beside it."""
    if arch not in TOY_MODELS:
        raise ValueError(f"unknown toy model {arch!r}; expected one of {sorted(TOY_MODELS)}")
    return CHECKPOINTS / f"toy_{arch}.safetensors"


def check_destination(out: str, archs: list[str], force: bool = False) -> None:
    """Refuse (before any training) to replace toy models already in ``out`` unless ``force``."""
    for arch in archs:
        if arch not in TOY_MODELS:
            raise UsageError(f"--arch: unknown toy model {arch!r}; expected one of {sorted(TOY_MODELS)}")
    there = [p for a in archs if (p := Path(out) / f"toy_{a}.safetensors").exists()]
    if there and not force:
        committed = any(p.resolve().parent == CHECKPOINTS.resolve() for p in there)
        raise UsageError(
            f"--out {out}: {', '.join(p.name for p in there)} already there"
            + (" (the committed, trained models)" if committed else "")
            + "; give another --out, or --force to replace"
        )


def toy_tensors(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W) with the toy models' mean and std."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def make_model(arch: str) -> torch.nn.Module:
    spec = TOY_MODELS[arch]
    args = {k: v for k, v in spec["model_args"].items() if k not in ("mean", "std")}
    return load_model(spec["model"], **args)


@torch.no_grad()
def evaluate_accuracy(
    model: torch.nn.Module, n: int = 1000, seed: int = TEST_SEED, batch: int = 250
) -> float:
    """Top-1 accuracy on a freshly generated split."""
    images, _, labels = toy_batch(n, seed)
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for k in range(0, n, batch):
        logits = model(toy_tensors(images[k : k + batch]).to(device)).cpu()
        correct += int((logits.argmax(1).numpy() == labels[k : k + batch, 0]).sum())
    return correct / n


def train_toy(
    arch: str,
    out: str,
    steps: int = 2000,
    batch: int = 64,
    lr: float = 1e-3,
    warmup: int = 200,
    train_images: int = 20_000,
    target_accuracy: float = 0.99,
    seed: int = 0,
    device: str = "cpu",
    min_steps: int = 1000,
    max_minutes: float | None = None,
    threads: int | None = None,
    log=print,
    force: bool = False,
) -> dict[str, Any]:
    """Train one toy model (AdamW, warm-up then cosine decay over ``steps``, horizontal flips).

    Stops early once the validation split (seed ``TEST_SEED + 1``) reaches ``target_accuracy``
    after ``min_steps``, or after ``max_minutes``; the stated accuracy is measured afterwards on
    the test split (1000 images, seed ``TEST_SEED``), which training never sees. Models already in
    ``out`` are replaced only with ``force`` (checked before training).
    """
    check_destination(out, [arch], force)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.time()
    model = make_model(arch).to(device)
    images, _, labels = toy_batch(train_images, seed)
    x_all, y_all = toy_tensors(images).to(device), torch.from_numpy(labels[:, 0]).long().to(device)
    del images
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    g = torch.Generator(device=device).manual_seed(seed)
    step, acc = 0, 0.0
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(0, len(x_all), (batch,), generator=g, device=device)
        x, y = x_all[idx], y_all[idx]
        # label-preserving: a mirrored texture keeps its class (diagonal covers both directions)
        flip = torch.rand(batch, generator=g, device=device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps:
            acc = evaluate_accuracy(model, n=500, seed=TEST_SEED + 1)  # validation split
            log(f"{arch} step {step}: loss {loss.item():.3f}, val acc {acc:.3f}, {time.time() - t0:.0f}s")
            if acc >= target_accuracy and step >= min_steps:
                break
        if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
            log(f"{arch}: time limit of {max_minutes} min reached at step {step}")
            break
    model.eval()
    test_acc = evaluate_accuracy(model)
    facts = {
        "test_accuracy": test_acc,
        "test_split": {"n": 1000, "seed": TEST_SEED},
        "steps": step,
        "batch": batch,
        "train_seconds": round(time.time() - t0),
        "device": _device_name(device),
        "command": f"lnstd train-toy --arch {arch} --out {out} --steps {steps} --seed {seed} "
        f"--train-images {train_images} --batch {batch} --lr {lr} --warmup {warmup} "
        f"--target-accuracy {target_accuracy} --device {device}"
        + (f" --threads {threads}" if threads else "")
        + (f" --max-minutes {max_minutes}" if max_minutes else ""),
        "torch": torch.__version__,
    }
    meta, weights = _save_toy(model.cpu(), arch, out, facts)
    log(f"{arch}: test accuracy {test_acc:.3f} after {step} steps, {meta['train_seconds']}s -> {weights}")
    return meta


def _device_name(device: str) -> str:
    return (
        torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"cpu, {torch.get_num_threads()} threads"
    )


def _save_toy(
    model: torch.nn.Module, arch: str, out: str, facts: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """Write ``OUT/toy_<arch>.safetensors`` and the JSON beside it (the model's name and arguments,
    normalisation, class names, then ``facts`` of its training); returns (that JSON, weights' path)."""
    os.makedirs(out, exist_ok=True)
    weights = os.path.join(out, f"toy_{arch}.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    spec = TOY_MODELS[arch]
    meta = {
        "model": spec["model"],
        "model_args": {k: v for k, v in spec["model_args"].items() if k not in ("mean", "std")},
        "normalize": {"mean": MEAN, "std": STD},
        "classes": list(TOY_CLASSES),
        **facts,
    }
    with open(os.path.join(out, f"toy_{arch}.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta, weights
