"""The ``lnstd`` command: run, aggregate, report, explain, eval, train-toy, methods.

Errors a user can act on are printed as one line (``lnstd: error: ...``) with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main"]

DEMO_MODEL = "vit_tiny_patch16_224"
DEMO_MODEL_ARGS = {"img_size": 96, "patch_size": 16, "num_classes": 3}


class UsageError(ValueError):
    """A wrong or missing flag (the message names it)."""


def _model_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _methods(text: str) -> list[str]:
    from .methods import get_method, list_methods

    names = list_methods() if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    for n in names:
        try:
            get_method(n)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def _blocks(text: str) -> str | int:
    return text if text == "all" else int(text)


def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="attribute a dataset on Ray, writing Parquet heatmaps (no --input/--model: the demo)",
        description="Attribute every image of a folder, s3:// prefix, manifest or .mat file.",
    )
    p.add_argument("--input", help="folder, s3:// prefix, .parquet/.csv manifest (uri column) or .mat")
    p.add_argument("--output", default=None, help="local folder or s3:// prefix (default ./lnstd-out)")
    _add_model_flags(p, required=False)
    p.add_argument("--methods", type=_methods, default=None, help="comma list or 'all' (default all)")
    p.add_argument("--blocks", type=_blocks, default=None, help="'all' or the last k blocks")
    p.add_argument("--std", choices=["inverse", "multiply", "none"], default=None)
    p.add_argument("--normalize", choices=["matrix", "row", "none"], default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--actors", type=int, default=1, help="model replicas")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--target", default="predicted", help="predicted | label | topk:K")
    p.add_argument("--fit", choices=["resize", "center-crop"], default="resize")
    p.add_argument("--save-png", action="store_true", help="add pixel-size PNG heatmaps")
    p.add_argument("--overwrite", action="store_true", help="replace an output of another configuration")
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default AWS_ENDPOINT_URL)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--spec", metavar="FILE", help="YAML job spec of flags (see jobs/specs/)")
    p.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from jobs.attribute import run
    from jobs.config import RunConfig

    from . import list_methods
    from .storage import StorageOptions

    model_args = dict(args.model_arg)
    if args.input is None and args.model is None:
        from .data.synthetic import write_dataset

        output = args.output or "lnstd-out"
        if "://" in output:
            raise UsageError("the demo (no --input/--model) writes to a local --output")
        print(f"lnstd: demo: 48 generated images, random-weight {DEMO_MODEL} -> {output}", file=sys.stderr)
        args.input = write_dataset(os.path.join(output, "demo-input"))
        args.model = DEMO_MODEL
        model_args = {**DEMO_MODEL_ARGS, **model_args}
    elif args.input is None:
        raise UsageError("--input is required with --model")
    elif args.model is None:
        raise UsageError("--model is required with --input")
    options = {k: getattr(args, k) for k in ("blocks", "std", "normalize") if getattr(args, k) is not None}
    cfg = RunConfig(
        input=args.input,
        output=args.output or "lnstd-out",
        model=args.model,
        methods=args.methods or list_methods(),
        checkpoint=args.checkpoint,
        pretrained=args.pretrained,
        model_args=model_args,
        options=options,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        address=args.address,
        precision=args.precision,
        target=args.target,
        fit=args.fit,
        save_png=args.save_png,
        overwrite=args.overwrite,
        s3_endpoint=args.s3_endpoint,
    )
    manifest = run(cfg, progress=not args.no_progress)
    if not args.no_report:
        from .report import write_report

        try:
            uri = write_report(cfg.output, opts=StorageOptions.from_env(cfg.s3_endpoint))
            print(f"lnstd: report -> {uri}", file=sys.stderr)
        except Exception as exc:  # the heatmaps are written: a report failure must not hide that
            print(f"lnstd: warning: no report ({type(exc).__name__}: {exc})", file=sys.stderr)
    return 1 if manifest["counts"]["shards_failed"] else 0


def _add_model_flags(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=required, help="timm model name")
    p.add_argument(
        "--checkpoint", help="local .safetensors/.pt weights (a JSON beside it may name the model)"
    )
    p.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights")
    p.add_argument(
        "--model-arg", type=_model_arg, action="append", default=[], metavar="KEY=VALUE",
        help="timm.create_model argument, e.g. num_classes=10 (repeatable)",
    )  # fmt: skip


def _cmd_explain(args: argparse.Namespace) -> int:
    import torch

    from . import Explainer, list_methods, load_model, transform_for
    from .data import IMAGE_EXTENSIONS, DecodeError, decode_image
    from .models import input_size
    from .storage import list_files
    from .viz import overlay, strip

    files: list[tuple[str, str]] = []  # (path, name relative to its argument)
    for arg in args.images:
        if os.path.isdir(arg):
            files += [(f, os.path.relpath(f, arg)) for f in list_files(arg, IMAGE_EXTENSIONS)]
        elif os.path.isfile(arg):
            files.append((arg, os.path.basename(arg)))
        else:
            raise UsageError(f"no such image or folder: {arg}")
    torch.manual_seed(0)
    model = load_model(args.model, args.checkpoint, args.pretrained, **dict(args.model_arg))
    methods = args.methods or list_methods()
    explainer = Explainer(model, methods)
    tf = transform_for(model, args.fit)
    h, w = input_size(model)
    target = None if args.target == "predicted" else int(args.target)
    failed = 0
    for k in range(0, len(files), args.batch_size):
        chunk, images = [], []
        for path, rel in files[k : k + args.batch_size]:
            try:
                with open(path, "rb") as f:
                    images.append(decode_image(f.read(), min_size=(w, h))[0])
                chunk.append(rel)
            except (DecodeError, OSError) as exc:
                failed += 1
                print(f"lnstd: skipped {path}: {exc}", file=sys.stderr)
        if not chunk:
            continue
        out = explainer(torch.stack([tf(im) for im in images]), target)
        for i, (rel, img) in enumerate(zip(chunk, images, strict=True)):
            stem = os.path.join(args.out, os.path.splitext(rel)[0])
            os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
            maps = {m: out.heatmaps[m][i] for m in methods}
            for m, heat in maps.items():
                overlay(img, heat).save(f"{stem}_{m}.png")
            strip(img, maps).save(f"{stem}_strip.png")
    print(f"lnstd: {len(files) - failed} images explained with {', '.join(methods)} -> {args.out}"
          + (f"; {failed} skipped" if failed else ""), file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .storage import StorageOptions

    uri = write_report(
        args.output, samples=args.samples, metric=args.metric, out=args.out,
        opts=StorageOptions.from_env(args.s3_endpoint),
    )  # fmt: skip
    print(f"lnstd: report -> {uri}", file=sys.stderr)
    return 0


def _cmd_train_toy(args: argparse.Namespace) -> int:
    from .train import train_toy

    for arch in args.arch.split(","):
        train_toy(
            arch, args.out, steps=args.steps, seed=args.seed, train_images=args.train_images,
            batch=args.batch, lr=args.lr, warmup=args.warmup, target_accuracy=args.target_accuracy,
            device=args.device, max_minutes=args.max_minutes, threads=args.threads,
            log=lambda m: print(m, flush=True),
        )  # fmt: skip
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .train import toy_checkpoint

    if args.model is None and args.checkpoint is None:
        if args.dataset != "toy":
            raise UsageError("--model or --checkpoint is required (only --dataset toy has default models)")
        for arch in ("vit", "swin"):  # the committed known-answer models
            _eval_one(args, str(toy_checkpoint(arch)))
        return 0
    _eval_one(args, args.checkpoint)
    return 0


def _eval_one(args: argparse.Namespace, checkpoint: str | None) -> None:
    import time

    import torch
    from tqdm import tqdm

    from . import list_methods, load_model
    from .arch import get_adapter
    from .data.eval_sets import dataset_batches
    from .data.toy import toy_batch
    from .evaluate import ablation, class_sensitivity, evaluate, write_results
    from .train import toy_tensors

    t0 = time.time()
    torch.manual_seed(0)
    model = load_model(args.model, checkpoint, args.pretrained, **dict(args.model_arg))
    methods = args.methods or list_methods()
    batches, n = dataset_batches(args.dataset, model, args.batch_size, args.n)
    name = args.model or os.path.splitext(os.path.basename(checkpoint or "model"))[0]
    with tqdm(total=n, unit="img", desc=f"eval {name}", file=sys.stderr, disable=args.no_progress) as bar:
        results = evaluate(
            model, batches, methods, perturbation=not args.no_perturbation, progress=bar.update
        )
    results["dataset"], results["model"] = args.dataset, name
    if args.dataset == "toy" and args.two_object_n > 0:
        images, masks, labels = toy_batch(args.two_object_n, 30_000, n_objects=2)
        results["class_sensitivity"] = class_sensitivity(
            model, toy_tensors(images), torch.from_numpy(masks), torch.from_numpy(labels), methods
        )
    if args.ablation:
        results["ablation"] = ablation(
            model, batches, ["all", 2] if len(get_adapter(model).blocks) > 2 else ["all"]
        )
    results["seconds"] = round(time.time() - t0, 1)
    out = os.path.join(args.out or "lnstd-eval", f"{args.dataset.split(':')[0]}-{name}")
    jpath, mpath = write_results(results, out, f"{name} on {args.dataset}")
    with open(mpath) as f:
        print(f.read())
    print(f"lnstd: results -> {jpath}, {mpath} ({results['seconds']:.0f} s)", file=sys.stderr)


def _cmd_aggregate(args: argparse.Namespace) -> int:
    from jobs.aggregate import aggregate, format_table

    from .storage import StorageOptions

    out = aggregate(args.output, StorageOptions.from_env(args.s3_endpoint))
    c = out["counts"]
    print(
        f"{c['images']} images ({c['ok_images']} ok, {c['error_images']} errors), "
        f"{c['rows']} rows, {c['shards']} shards, methods: {', '.join(c['methods'])}"
    )
    for e in c["errors"][:5]:
        print(f"  error x{e['images']}: {e['error']}")
    print(format_table(out["per_method"]))
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from .methods import get_method, list_methods

    names = list_methods()
    width = max(len(n) for n in names)
    for name in names:
        doc = (get_method(name).__doc__ or "").strip().splitlines()[0]
        print(f"{name:{width}s} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands), also used by tests to check job entrypoints."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="lnstd", description="Explain Vision Transformers (timm ViT and Swin) at dataset scale."
    )
    parser.add_argument("--version", action="version", version=f"lnstd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    p = sub.add_parser("aggregate", help="summarise a run's output (counts, per-method, per-class)")
    p.add_argument("output", help="the run's --output (local or s3://)")
    p.add_argument("--s3-endpoint", default=None)
    p.set_defaults(func=_cmd_aggregate)
    p = sub.add_parser("explain", help="overlay PNGs for a few local images (one per method, plus a strip)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    _add_model_flags(p, required=True)
    p.add_argument("--methods", type=_methods, default=None, help="comma list or 'all' (default all)")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--fit", choices=["resize", "center-crop"], default="resize")
    p.add_argument("--target", default="predicted", help="'predicted' or a class index")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=_cmd_explain)
    p = sub.add_parser("report", help="one self-contained HTML page for a run's output")
    p.add_argument("output", help="the run's --output (local or s3://)")
    p.add_argument("--samples", type=int, default=12, help="gallery images (best, worst, random)")
    p.add_argument(
        "--metric", default=None, help="metric that ranks the gallery (default iou, else probability)"
    )
    p.add_argument("--out", default=None, help="where to write the HTML (default OUTPUT/report.html)")
    p.add_argument("--s3-endpoint", default=None)
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("eval", help="measure explanation quality (segmentation, perturbation, sanity)")
    p.add_argument("--dataset", required=True, help="toy | imagenet-seg:PATH | folder:PATH")
    _add_model_flags(p, required=False)
    p.add_argument("--methods", type=_methods, default=None, help="comma list or 'all' (default all)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--n", type=int, default=None, help="images to use (toy default 500)")
    p.add_argument("--ablation", action="store_true", help="also lnstd's std x normalize x blocks table")
    p.add_argument("--no-perturbation", action="store_true", help="skip the perturbation curves")
    p.add_argument(
        "--two-object-n", type=int, default=200, help="toy: two-object images for class sensitivity"
    )
    p.add_argument(
        "--out", default=None, help="results: OUT/<dataset>-<model>/results.{json,md} (default lnstd-eval)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("train-toy", help="train the known-answer benchmark's small ViT / Swin (CPU)")
    p.add_argument("--arch", default="vit,swin", help="vit, swin or both (comma list)")
    p.add_argument("--out", default="checkpoints")
    p.add_argument("--steps", type=int, default=2000, help="length of the cosine schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=20_000, help="size of the generated training set")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    p.add_argument(
        "--target-accuracy", type=float, default=0.99, help="stop once validation accuracy reaches this"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this long")
    p.set_defaults(func=_cmd_train_toy)
    p = sub.add_parser("methods", help="list the attribution methods")
    p.set_defaults(func=_cmd_methods)
    return parser


def spec_to_argv(path: str) -> list[str]:
    """A job spec (YAML mapping of ``run`` flags to values) -> command-line arguments."""
    import yaml

    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    if not isinstance(spec, dict):
        raise UsageError(f"--spec {path}: expected a mapping of flag names to values")
    argv: list[str] = []
    for key, value in spec.items():
        flag = f"--{str(key).replace('_', '-')}"
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, dict):  # model-arg: {num_classes: 10}
            for k, v in value.items():
                argv += [flag, f"{k}={json.dumps(v)}"]
        elif isinstance(value, list):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def expand_specs(argv: list[str]) -> list[str]:
    """Replace ``--spec FILE`` after ``run`` by the file's flags (later flags override them)."""
    if "--spec" not in argv:
        return argv
    i = argv.index("--spec")
    if i + 1 >= len(argv):
        raise UsageError("--spec needs a file")
    return [*argv[:i], *spec_to_argv(argv[i + 1]), *argv[i + 2 :]]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lnstd`` console script and ``python -m lnstd``."""
    parser = build_parser()
    try:
        argv = expand_specs(list(sys.argv[1:] if argv is None else argv))
    except (UsageError, OSError) as exc:
        print(f"lnstd: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from jobs.attribute import ConfigMismatchError, ReplicaStartError

    from .arch import UnsupportedModelError
    from .storage import StorageError

    try:
        return int(args.func(args) or 0)
    except (
        UsageError,
        ConfigMismatchError,
        ReplicaStartError,
        StorageError,
        UnsupportedModelError,
        FileNotFoundError,
        ValueError,
    ) as exc:
        print(f"lnstd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
