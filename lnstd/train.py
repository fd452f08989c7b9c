"""Train the known-answer benchmarks' small ViT and Swin on the toy shapes or the planted-evidence
images (CPU is enough).

``lnstd train-toy --arch vit`` writes ``toy-checkpoints/toy_vit.safetensors`` and ``toy_vit.json``
(timm name and arguments, accuracy on a fresh split, steps, wall time, the command); with
``--dataset planted`` (or ``planted-shortcut``) ``planted_vit.*`` (``planted_shortcut_vit.*``),
whose JSON also holds the evidence check (lnstd.evidence). It refuses to replace models already
there (the committed ones included) unless ``--force``.
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

from .data.planted import PLANTED_CLASSES, PLANTED_DATASETS, planted_batch
from .data.toy import TOY_CLASSES, toy_batch
from .errors import UsageError
from .models import load_model

__all__ = [
    "TOY_MODELS",
    "TRAIN_DATASETS",
    "check_destination",
    "checkpoint_name",
    "evaluate_accuracy",
    "labelled_split",
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
TRAIN_DATASETS = ("toy", *PLANTED_DATASETS)  # the generated sets the small models train on
assert len(PLANTED_CLASSES) == len(TOY_CLASSES)  # one model configuration serves every set


def checkpoint_name(arch: str, dataset: str = "toy") -> str:
    """``toy_vit``, ``planted_vit``, ``planted_shortcut_swin``...: the file stem of a trained model."""
    return f"{dataset.replace('-', '_')}_{arch}"


def toy_checkpoint(arch: str, dataset: str = "toy") -> Path:
    """Path of the committed model ``arch`` (``vit`` or ``swin``) trained on ``dataset`` (one of
    ``TRAIN_DATASETS``); its JSON lies beside it."""
    if arch not in TOY_MODELS:
        raise ValueError(f"unknown toy model {arch!r}; expected one of {sorted(TOY_MODELS)}")
    if dataset not in TRAIN_DATASETS:
        raise ValueError(f"unknown training set {dataset!r}; expected one of {TRAIN_DATASETS}")
    return CHECKPOINTS / f"{checkpoint_name(arch, dataset)}.safetensors"


def labelled_split(dataset: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, H, W, 3) uint8 and labels (n,) of a generated split of ``dataset``."""
    if dataset == "toy":
        images, _, labels = toy_batch(n, seed)
    else:
        images, _, labels, _ = planted_batch(n, seed, shortcut=dataset == "planted-shortcut")
    return images, labels[:, 0]


def check_destination(out: str, archs: list[str], force: bool = False, dataset: str = "toy") -> None:
    """Refuse (before any training) to replace models already in ``out`` unless ``force``."""
    if dataset not in TRAIN_DATASETS:
        raise UsageError(f"--dataset: expected one of {', '.join(TRAIN_DATASETS)}, got {dataset!r}")
    for arch in archs:
        if arch not in TOY_MODELS:
            raise UsageError(f"--arch: unknown toy model {arch!r}; expected one of {sorted(TOY_MODELS)}")
    there = [p for a in archs if (p := Path(out) / f"{checkpoint_name(a, dataset)}.safetensors").exists()]
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
    model: torch.nn.Module, n: int = 1000, seed: int = TEST_SEED, batch: int = 250, dataset: str = "toy"
) -> float:
    """Top-1 accuracy on a freshly generated split of ``dataset``."""
    images, labels = labelled_split(dataset, n, seed)
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for k in range(0, n, batch):
        logits = model(toy_tensors(images[k : k + batch]).to(device)).cpu()
        correct += int((logits.argmax(1).numpy() == labels[k : k + batch]).sum())
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
    dataset: str = "toy",
) -> dict[str, Any]:
    """Train one small model on ``dataset`` (AdamW, warm-up then cosine decay over ``steps``;
    horizontal flips on ``toy`` only, since they would move the shortcut's corner watermark).

    Stops early once the validation split (seed ``TEST_SEED + 1``) reaches ``target_accuracy``
    after ``min_steps``, or after ``max_minutes``; the stated accuracy is measured afterwards on
    the test split (1000 images, seed ``TEST_SEED``), which training never sees, and on the
    planted sets the evidence check too. Models already in ``out`` are replaced only with
    ``force`` (checked before training).
    """
    check_destination(out, [arch], force, dataset)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.time()
    model = make_model(arch).to(device)
    images, labels = labelled_split(dataset, train_images, seed)
    x_all, y_all = toy_tensors(images).to(device), torch.from_numpy(labels).long().to(device)
    del images
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    g = torch.Generator(device=device).manual_seed(seed)
    step = 0
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(0, len(x_all), (batch,), generator=g, device=device)
        x, y = x_all[idx], y_all[idx]
        if dataset == "toy":  # label-preserving: a mirrored texture keeps its class
            flip = torch.rand(batch, generator=g, device=device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps:
            acc = evaluate_accuracy(model, n=500, seed=TEST_SEED + 1, dataset=dataset)  # validation
            log(f"{arch} step {step}: loss {loss.item():.3f}, val acc {acc:.3f}, {time.time() - t0:.0f}s")
            if acc >= target_accuracy and step >= min_steps:
                break
        if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
            log(f"{arch}: time limit of {max_minutes} min reached at step {step}")
            break
    command = (
        f"lnstd train-toy --arch {arch} --out {out} --steps {steps} --seed {seed} "
        f"--train-images {train_images} --batch {batch} --lr {lr} --warmup {warmup} "
        f"--target-accuracy {target_accuracy} --device {device}"
        + (f" --threads {threads}" if threads else "")
        + (f" --max-minutes {max_minutes}" if max_minutes else "")
        + (f" --dataset {dataset}" if dataset != "toy" else "")
    )
    run = {"steps": step, "batch": batch, "seed": seed, "command": command}
    return _save(model.eval(), arch, dataset, out, run, t0, device, log)


def _save(
    model: torch.nn.Module, arch: str, dataset: str, out: str, run: dict, t0: float, device: str, log
) -> dict[str, Any]:
    """Measure the trained model (test accuracy; the evidence check on planted sets) and write
    ``<name>.safetensors`` and ``<name>.json`` into ``out``."""
    test_acc = evaluate_accuracy(model, dataset=dataset)
    meta_evidence = {}
    if dataset != "toy":
        from .evidence import evidence_check

        meta_evidence = {"evidence": evidence_check(model, dataset)}
    model = model.cpu()
    os.makedirs(out, exist_ok=True)
    from safetensors.torch import save_file

    name = checkpoint_name(arch, dataset)
    weights = os.path.join(out, f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    spec = TOY_MODELS[arch]
    meta = {
        "model": spec["model"],
        "model_args": {k: v for k, v in spec["model_args"].items() if k not in ("mean", "std")},
        "normalize": {"mean": MEAN, "std": STD},
        "dataset": dataset,
        "classes": list(TOY_CLASSES if dataset == "toy" else PLANTED_CLASSES),
        "test_accuracy": test_acc,
        "test_split": {"n": 1000, "seed": TEST_SEED},
        **meta_evidence,
        "steps": run["steps"],
        "batch": run["batch"],
        "seed": run["seed"],
        "train_seconds": round(time.time() - t0),
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"cpu, {torch.get_num_threads()} threads",
        "command": run["command"],
        "torch": torch.__version__,
    }
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(meta, f, indent=1)
    took = f"{run['steps']} steps, {meta['train_seconds']}s"
    log(f"{name}: test accuracy {test_acc:.3f} after {took} -> {weights}")
    return meta
