"""The ``lnstd`` command: run, aggregate, report, explain, eval, train-toy, methods.

Problems a user can act on (the project's own error types, :mod:`lnstd.errors`) are printed as one
line, ``lnstd: error: ...``, with exit code 2. Anything else is a bug: one line saying so, exit code
1, and the full traceback with ``--traceback`` (or ``-v``). The only module of the library that
imports the job layer (:mod:`lnstd.jobs`). The work is done by library functions: ``explain`` by
:func:`lnstd.pictures.explain_files`, ``eval`` by :func:`lnstd.benchmark.evaluate_model`, ``run``
by ``lnstd.jobs.attribute.run``, ``--spec`` by :mod:`lnstd.jobs.specs`.
"""

from __future__ import annotations

import argparse
import copy
import errno
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .choices import CAPTURE_MODES, DECODERS, FITS, METHODS, PRECISIONS
from .errors import LnstdError, OptionError, UsageError, one_line, one_line_warnings
from .jobs.specs import expand_specs
from .timm_names import check_timm_name

__all__ = ["build_parser", "main"]

# A write that fails for want of room or permission on the machine, not for a bug: one line, exit 2.
_FULL = {errno.ENOSPC: ("no space left on the device", "make room"),
         errno.EDQUOT: ("the disk quota is used up", "make room"),
         errno.EROFS: ("the file system is read-only", "make it writable")}  # fmt: skip

DEMO_IMAGES = 48
# The paper's method and the cheapest gradient baseline: one forward + backward per image. `all`
# adds attention, rollout, gradcam and the LRP methods (their own passes: about 4x the time: README).
DEFAULT_METHODS = "lnstd,gae"


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _methods(text: str) -> list[str]:
    if text == "all":
        return []  # every method that applies to the model (resolved once the model is known)
    names = [m.strip() for m in text.split(",") if m.strip()]
    for n in names:
        if n not in METHODS:  # the same words as lnstd.methods.get_method, without importing torch
            raise argparse.ArgumentTypeError(f"unknown method {n!r}; available: {', '.join(METHODS)}")
    return names


class _Formatter(argparse.HelpFormatter):
    """Help that shows every flag's default (unless its text already says it, or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or not action.option_strings
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or default == []
        ):
            return text
        return f"{text} (default: %(default)s)".strip()

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and self._get_help_string(action):
            action = copy.copy(action)  # a flag without help text still shows its default
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line ``lnstd: error:`` form and exit code 2 for wrong flags, and no
    prefix matching of long flags (``--method`` is not taken for ``--methods``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"lnstd: error: {one_line(message, 10_000)} (see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's own output and full tracebacks")


def _add_model_flags(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--model", required=required,
        help="timm model name, or hf:NAME for a Hugging Face ViT / DeiT / Swin classifier (a hub id, "
        "or with --checkpoint a save_pretrained folder)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint", help="local .safetensors/.pt weights (a JSON beside it may name the model)"
    )
    p.add_argument(
        "--pretrained", action=argparse.BooleanOptionalAction, default=False,
        help="download timm's pretrained weights (needs network access)",
    )  # fmt: skip
    p.add_argument(
        "--model-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
        help="timm.create_model argument, e.g. num_classes=10 (repeatable)",
    )  # fmt: skip


def _add_method_flags(p: argparse.ArgumentParser, default: str = DEFAULT_METHODS) -> None:
    p.add_argument(
        "--methods", type=_methods, default=default,
        help=f"comma list, or 'all' for every method that applies to the model (default: {default})",
    )  # fmt: skip
    p.add_argument(
        "--option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
        help="method option, e.g. blocks=2 (every method that has it) or lnstd.std=multiply "
        "(one method); `lnstd methods` lists them (repeatable)",
    )  # fmt: skip
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument(
        "--capture", choices=CAPTURE_MODES, default=None,
        help="how attention is read (default: unfused on the CPU, fused on CUDA where exact; same maps)",
    )  # fmt: skip


def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="attribute a dataset on Ray, writing Parquet heatmaps (no --input/--model: the demo)",
        description="Attribute every image of a folder, s3:// prefix, manifest or .mat file.",
    )
    p.add_argument("--input", help="folder, s3:// prefix, .parquet/.csv manifest (uri column) or .mat")
    p.add_argument("--output", default=None, help="local folder or s3:// prefix (default ./lnstd-out)")
    _add_model_flags(p, required=False)
    _add_method_flags(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=256, help="inputs per shard (the unit of commit)")
    p.add_argument("--actors", type=int, default=1, help="model replicas")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="also the actor's decoding threads")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--target", default="predicted", help="predicted | label | topk:K")
    p.add_argument("--fit", choices=FITS, default="resize")
    p.add_argument("--decode", choices=DECODERS, default="cpu", help="where JPEGs are decoded")
    _add_max_image_pixels(p)
    p.add_argument("--save-png", action=argparse.BooleanOptionalAction, default=False,
                   help="add pixel-size PNG heatmaps over the original image")  # fmt: skip
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace an output of another configuration (not one a live run holds)")  # fmt: skip
    p.add_argument("--refresh-input", action=argparse.BooleanOptionalAction, default=False,
                   help="on a resume, add inputs that appeared since the plan, as new shards")  # fmt: skip
    p.add_argument("--dedupe", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the first of repeated manifest ids/uris instead of refusing")  # fmt: skip
    p.add_argument(
        "--faithfulness", type=lambda v: [m for m in v.split(",") if m], default=[], metavar="TESTS",
        help="comma list of deletion,insertion,road: per-row faithfulness columns (off by default). "
        "Costly: per image and method, deletion or insertion alone 11 model forwards, both 20, road 18 "
        "plus its imputation (an iterative solve), all three 38, against about 1-3 for the maps",
    )  # fmt: skip
    p.add_argument("--fail-on-errors", action=argparse.BooleanOptionalAction, default=False,
                   help="exit 1 if any image got an error row (default: only if a shard failed)")  # fmt: skip
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default AWS_ENDPOINT_URL)")
    p.add_argument(
        "--lease-ttl", type=float, default=60.0, help="seconds before a silent run's lease expires"
    )
    p.add_argument("--startup-timeout", type=float, default=600.0,
                   help="seconds to wait for a node that can take an actor (autoscaling)")  # fmt: skip
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write _report.html at the end")  # fmt: skip
    p.add_argument(
        "--spec", metavar="FILE", help="YAML job spec of flags (jobs/specs/, or a shipped spec's name)"
    )  # read by expand_specs before parsing; kept here for --help
    _common(p)
    p.set_defaults(func=_cmd_run)


def _add_max_image_pixels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="refuse larger pictures (width x height), as a guard against decompression bombs "
                   "(default: Pillow's, 89,478,485)")  # fmt: skip


def _demo(args: argparse.Namespace) -> tuple[str, str, str, dict[str, Any]]:
    """The demo's input: generated known-answer images with masks, and the committed toy ViT."""
    from .data.toy import write_toy_dataset
    from .train import toy_checkpoint

    output = args.output or "lnstd-out"
    if "://" in output:
        raise UsageError("the demo (no --input/--model) writes to a local --output")
    # Inside the output, under a '_' name: dataset readers of the output skip it.
    manifest = write_toy_dataset(os.path.join(output, "_demo-input"), n=DEMO_IMAGES)
    print(f"lnstd: demo: {DEMO_IMAGES} generated images, the trained toy ViT -> {output}", file=sys.stderr)
    return manifest, output, str(toy_checkpoint("vit")), {}


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import RunConfig
    from .data.sources import open_source
    from .native_log import native_output_to_log
    from .storage import is_s3

    given: dict[str, Any] = {}
    if args.input is None and args.model is None and args.checkpoint is None:
        given["input"], given["output"], given["checkpoint"], given["model_args"] = _demo(args)
    elif args.input is None:
        raise UsageError("--input is required with --model")
    elif args.model is None and args.checkpoint is None:
        raise UsageError("--model is required with --input")
    checkpoint = given.get("checkpoint", args.checkpoint)
    if args.model is None and checkpoint is not None:
        from .models import checkpoint_config

        given["model"] = checkpoint_config(checkpoint).get("model") if os.path.isfile(checkpoint) else None
        if given["model"] is None:
            raise UsageError(f"--model is required: {checkpoint} has no JSON beside it naming the model")
    cfg = RunConfig.from_args(args, **given)  # every flag's value checked, then the model's name, the input
    if cfg.model:
        check_timm_name(cfg.model)
    if not is_s3(cfg.input):  # a local input that cannot be read at all: here, before torch loads
        open_source(cfg.input).check()
    from .jobs.attribute import run  # torch, timm and Ray: after every check that needs none of them

    with native_output_to_log(args.verbose):
        # a rerun with nothing to do keeps the real run's report (run() writes none then)
        manifest = run(cfg, progress=args.progress, report=args.report, traceback_on_error=args.traceback)
    counts = manifest.counts
    return 1 if counts["shards_failed"] or (args.fail_on_errors and counts["errors"]) else 0


def _model_name(args: argparse.Namespace) -> str:
    """A folder name for a model's outputs: the timm name, or the checkpoint's stem."""
    return Path(args.checkpoint).stem if args.checkpoint else str(args.model)


def _cmd_explain(args: argparse.Namespace) -> int:
    from .config import Target
    from .data.files import image_files

    target = Target.parse(args.target, allowed=("predicted", "class"))
    files = image_files(args.images)  # a wrong path: before torch and the model load
    if args.model:
        check_timm_name(args.model)  # a mistyped name too
    import torch

    from .models import load_model
    from .pictures import explain_files
    from .weights import weights_of

    torch.manual_seed(0)
    model = load_model(args.model, args.checkpoint, args.pretrained, **dict(args.model_arg))
    out_dir = os.path.join(args.out, _model_name(args))  # outputs of different models stay apart
    done = explain_files(
        files, out_dir, model, args.methods, target=target.k,
        fit=args.fit, batch_size=args.batch_size, precision=args.precision, capture=args.capture,
        options=dict(args.option), max_pixels=args.max_image_pixels,
        ready=lambda: weights_of(args.model, args.checkpoint, args.pretrained, digest=False),  # random?
    )  # fmt: skip
    skipped = f"; {len(done.skipped)} skipped" if done.skipped else ""
    print(f"lnstd: {len(files) - len(done.skipped)} images explained with {', '.join(done.methods)} "
          f"-> {out_dir}{skipped}", file=sys.stderr)  # fmt: skip
    return 1 if done.skipped else 0


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
    from .train import check_destination, train_toy

    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    check_destination(args.out, archs, args.force, args.dataset)  # before any training
    for arch in archs:
        train_toy(
            arch, args.out, steps=args.steps, seed=args.seed, train_images=args.train_images,
            batch=args.batch, lr=args.lr, warmup=args.warmup, target_accuracy=args.target_accuracy,
            device=args.device, max_minutes=args.max_minutes, threads=args.threads,
            log=lambda m: print(m, flush=True), force=args.force, dataset=args.dataset,
        )  # fmt: skip
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.model:
        check_timm_name(args.model)  # before torch
    from .benchmark import default_checkpoints, evaluate_model

    if args.model is None and args.checkpoint is None:
        checkpoints: list[str | None] = list(default_checkpoints(args.dataset))
    else:
        checkpoints = [args.checkpoint]
    for checkpoint in checkpoints:
        done = evaluate_model(
            args.dataset, args.model, checkpoint, pretrained=args.pretrained, model_args=dict(args.model_arg),
            methods=args.methods, precision=args.precision, capture=args.capture, options=dict(args.option),
            batch_size=args.batch_size, n=args.n, perturbation=not args.no_perturbation,
            two_object_n=args.two_object_n, with_ablation=args.ablation, out=args.out or "lnstd-eval",
            progress=not args.no_progress,
        )  # fmt: skip
        with open(done.markdown_path) as f:
            print(f.read())
        print(
            f"lnstd: results -> {done.json_path}, {done.markdown_path} ({done.seconds:.0f} s)",
            file=sys.stderr,
        )
    return 0


def _cmd_aggregate(args: argparse.Namespace) -> int:
    from .aggregate import aggregate, describe
    from .storage import StorageOptions

    print(
        describe(aggregate(args.output, StorageOptions.from_env(args.s3_endpoint), where=not args.no_where))
    )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .jobs.verify import command

    return command(args.output, args.s3_endpoint, args.repair)


def _cmd_methods(args: argparse.Namespace) -> int:
    from .methods import describe_methods

    print(describe_methods())
    return 0


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="measure explanation quality (segmentation, perturbation, sanity)")
    p.add_argument(
        "--dataset", required=True, help="toy | planted | planted-shortcut | imagenet-seg:PATH | folder:PATH"
    )
    _add_model_flags(p, required=False)
    _add_method_flags(p, default="all")  # a benchmark compares every method
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--n", type=int, default=None, help="images to use (generated sets: default 500)")
    p.add_argument("--ablation", action="store_true", help="also lnstd's std x normalize x blocks table")
    p.add_argument("--no-perturbation", action="store_true", help="skip the perturbation curves")
    p.add_argument(
        "--two-object-n", type=int, default=200, help="toy: two-object images for class sensitivity"
    )
    p.add_argument(
        "--out", default=None, help="results: OUT/<dataset>-<model>/results.{json,md} (default lnstd-eval)"
    )
    p.add_argument("--no-progress", action="store_true")
    _common(p)
    p.set_defaults(func=_cmd_eval)


def _add_train_toy(sub: Any) -> None:
    """The ``train-toy`` subcommand: the known-answer benchmarks' small models."""
    p = sub.add_parser("train-toy", help="train the known-answer benchmarks' small ViT / Swin (CPU)")
    p.add_argument("--arch", default="vit,swin", help="vit, swin or both (comma list)")
    p.add_argument(
        "--dataset", default="toy", help="toy | planted | planted-shortcut (the generated training set)"
    )
    p.add_argument(
        "--out", default="toy-checkpoints",
        help="folder for <dataset>_<arch>.safetensors/.json (the committed models stay in lnstd/checkpoints)",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace models already in --out")
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
    _common(p)
    p.set_defaults(func=_cmd_train_toy)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands), also used by tests to check job entrypoints."""
    from . import __version__

    parser = _Parser(
        prog="lnstd", description="Explain timm vision transformers (ViT, DeiT, Swin, EVA, BEiT) at scale."
    )
    parser.add_argument("--version", action="version", version=f"lnstd {__version__}")
    _common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_run(sub)
    p = sub.add_parser(
        "aggregate", help="summarise a run's output (counts, per-method, per-class, where the model looks)"
    )
    p.add_argument("output", help="the run's --output (local or s3://)")
    p.add_argument("--s3-endpoint", default=None)
    p.add_argument(
        "--no-where",
        action="store_true",
        help="leave out where the model looks (_aggregate/where*: two passes over the heatmaps)",
    )
    _common(p)
    p.set_defaults(func=_cmd_aggregate)
    p = sub.add_parser("verify", help="check an output against its manifest and plan (exit 0 / 1)")
    p.add_argument("output", metavar="OUTPUT")
    p.add_argument(
        "--repair", action="store_true", help="remove, under the output's lease, what no committed run wrote"
    )
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL)")
    _common(p)
    p.set_defaults(func=_cmd_verify)
    p = sub.add_parser("explain", help="overlay PNGs for a few local images (one per method, plus a strip)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    _add_model_flags(p, required=False)
    _add_method_flags(p)
    p.add_argument("--out", default="lnstd-explain", help="folder for the PNGs (one subfolder per model)")
    p.add_argument("--fit", choices=FITS, default="resize")
    p.add_argument("--target", default="predicted", help="'predicted' or a class index")
    _add_max_image_pixels(p)
    p.add_argument("--batch-size", type=int, default=16)
    _common(p)
    p.set_defaults(func=_cmd_explain)
    p = sub.add_parser("report", help="one self-contained HTML page for a run's output")
    p.add_argument("output", help="the run's --output (local or s3://)")
    p.add_argument("--samples", type=int, default=12, help="gallery images (best, worst, random)")
    p.add_argument(
        "--metric",
        default=None,
        help="metric that ranks the gallery (default foreground_iou, else probability)",
    )
    p.add_argument("--out", default=None, help="where to write the HTML (default OUTPUT/_report.html)")
    p.add_argument("--s3-endpoint", default=None)
    _common(p)
    p.set_defaults(func=_cmd_report)
    _add_eval(sub)
    _add_train_toy(sub)
    p = sub.add_parser("methods", help="list the attribution methods and their options")
    _common(p)
    p.set_defaults(func=_cmd_methods)
    return parser


def _end_progress_bars() -> None:
    """Close the progress bars an interrupt left open: each ends its line, so the next message
    starts on a line of its own."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lnstd`` console script and ``python -m lnstd``."""
    with one_line_warnings():  # the project's warnings: `lnstd: warning: ...`, one line
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    show = "--traceback" in raw or "-v" in raw or "--verbose" in raw
    args = None
    try:
        parser = build_parser()
        args = parser.parse_args(expand_specs(raw))
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except LnstdError as exc:
        _end_progress_bars()  # the message starts a line of its own
        if show:
            traceback.print_exc()
        flag = f"{exc.flag}: " if isinstance(exc, OptionError) else ""  # the flag the user typed
        print(f"lnstd: error: {flag}{one_line(exc, 10_000)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _end_progress_bars()
        resumes = getattr(args, "command", None) == "run"  # only a run keeps what it finished
        why = " (a rerun of the same command resumes)" if resumes else ""
        print(f"lnstd: interrupted{why}", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in _FULL:
            return _bug(exc, show)
        _end_progress_bars()
        if show:
            traceback.print_exc()
        where = f" ({exc.filename})" if exc.filename else ""
        again = " (it resumes from what was committed)" if getattr(args, "command", None) == "run" else ""
        what, fix = _FULL[exc.errno]
        print(f"lnstd: error: {what}{where}: {fix} and run the same command again{again}", file=sys.stderr)
        return 2
    except Exception as exc:
        return _bug(exc, show)


def _bug(exc: Exception, show: bool) -> int:
    """An error the code did not expect: one line saying so (the traceback with ``show``), exit 1."""
    _end_progress_bars()
    if show:
        traceback.print_exc()
    print(
        f"lnstd: internal error ({type(exc).__name__}: {one_line(exc, 300)}); "
        "this is a bug: rerun with --traceback and report it",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
