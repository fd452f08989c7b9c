"""``lnstd eval``: measure the explanation methods of one model on one evaluation set, and write
``results.json`` and ``results.md``."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from .arch import get_adapter
from .choices import Capture, Precision
from .data.toy import toy_batch
from .errors import UsageError
from .eval_sets import dataset_batches
from .evaluate import ablation, class_sensitivity, evaluate, write_results
from .explainer import Explainer
from .methods import applicable_methods
from .models import load_model
from .train import TRAIN_DATASETS, toy_checkpoint, toy_tensors

__all__ = ["Evaluated", "default_checkpoints", "evaluate_model"]


@dataclass
class Evaluated:
    """Where :func:`evaluate_model` wrote its results, and how long it took."""

    json_path: str
    markdown_path: str
    seconds: float


def default_checkpoints(dataset: str) -> list[str]:
    """The models evaluated when none is named: the committed ViT and Swin trained on a generated
    set (``TRAIN_DATASETS``); a UsageError for any other set, or when none is committed yet."""
    if dataset not in TRAIN_DATASETS:
        sets = ", ".join(TRAIN_DATASETS)
        raise UsageError(f"--model or --checkpoint is required (only --dataset {sets} have default models)")
    committed = [str(p) for a in ("vit", "swin") if (p := toy_checkpoint(a, dataset)).exists()]
    if not committed:
        raise UsageError(f"--dataset {dataset}: no committed model yet; give --checkpoint")
    return committed


def evaluate_model(
    dataset: str,
    model_name: str | None,
    checkpoint: str | None = None,
    *,
    pretrained: bool = False,
    model_args: Mapping[str, Any] | None = None,
    methods: Sequence[str] | None = None,
    precision: Precision = "fp32",
    capture: Capture | None = None,
    options: Mapping[str, Any] | None = None,
    batch_size: int = 50,
    n: int | None = None,
    perturbation: bool = True,
    two_object_n: int = 200,
    with_ablation: bool = False,
    out: str = "lnstd-eval",
    progress: bool = True,
) -> Evaluated:
    """Evaluate one model's methods on ``dataset`` (``toy``, ``imagenet-seg:PATH``, ``folder:PATH``;
    :func:`lnstd.eval_sets.dataset_batches`) and write ``OUT/<dataset>-<model>/results.{json,md}``.

    ``methods`` None: every method that applies to the model. On the toy set, ``two_object_n``
    two-object images measure class sensitivity; ``with_ablation`` adds lnstd's std x normalize x
    blocks table. A wrong method or option fails before any image is read.
    """
    t0 = time.time()
    torch.manual_seed(0)
    model = load_model(model_name, checkpoint, pretrained, **dict(model_args or {}))
    methods = list(methods or applicable_methods(get_adapter(model)))
    settings = {"precision": precision, "capture": capture, **dict(options or {})}
    Explainer(model, methods, **settings)  # a wrong method or option: one line, before any work
    batches, count = dataset_batches(dataset, model, batch_size, n)
    name = model_name or os.path.splitext(os.path.basename(checkpoint or "model"))[0]
    with tqdm(total=count, unit="img", desc=f"eval {name}", file=sys.stderr, disable=not progress) as bar:
        results = evaluate(
            model, batches, methods, perturbation=perturbation, progress=bar.update, **settings
        )
    results["dataset"], results["model"] = dataset, name
    if dataset == "toy" and two_object_n > 0:
        images, masks, labels = toy_batch(two_object_n, 30_000, n_objects=2)
        results["class_sensitivity"] = class_sensitivity(
            model, toy_tensors(images), torch.from_numpy(masks), torch.from_numpy(labels), methods, **settings
        )
    if with_ablation:
        results["ablation"] = ablation(
            model, batches, ["all", 2] if len(get_adapter(model).blocks) > 2 else ["all"]
        )
    results["seconds"] = round(time.time() - t0, 1)
    folder = os.path.join(out, f"{dataset.split(':')[0]}-{name}")
    json_path, md_path = write_results(results, folder, f"{name} on {dataset}")
    return Evaluated(json_path, md_path, results["seconds"])
