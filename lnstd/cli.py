"""The ``lnstd`` command: run, aggregate, report, explain, eval, train-toy, methods.

Problems a user can act on (the project's own error types, :mod:`lnstd.errors`) are printed as one
line, ``lnstd: error: ...``, with exit code 2. Anything else is a bug: one line saying so, exit code
1, and the full traceback with ``--traceback`` (or ``-v``). This is the only module of the library
that imports the job layer (:mod:`lnstd.jobs`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import LnstdError, UsageError, one_line

__all__ = ["build_parser", "main"]

DEMO_IMAGES = 48
# The paper's method and the cheapest gradient baseline: one forward + backward per image. `all`
# adds attention, rollout, gradcam and the LRP methods (their own passes: about 5x the time).
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
    from .methods import get_method

    if text == "all":
        return []  # every method that applies to the model (resolved once the model is known)
    names = [m.strip() for m in text.split(",") if m.strip()]
    for n in names:
        try:
            get_method(n)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
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
    """argparse with the one-line ``lnstd: error:`` form and exit code 2 for wrong flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's own output and full tracebacks")


def _add_model_flags(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=required, help="timm model name")
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
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument(
        "--capture", choices=["fused", "unfused"], default=None,
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
    p.add_argument("--fit", choices=["resize", "center-crop"], default="resize")
    p.add_argument("--decode", choices=["cpu", "gpu"], default="cpu", help="where JPEGs are decoded")
    p.add_argument("--save-png", action=argparse.BooleanOptionalAction, default=False,
                   help="add pixel-size PNG heatmaps over the original image")  # fmt: skip
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace an output of another configuration (not one a live run holds)")  # fmt: skip
    p.add_argument("--refresh-input", action=argparse.BooleanOptionalAction, default=False,
                   help="on a resume, add inputs that appeared since the plan, as new shards")  # fmt: skip
    p.add_argument("--dedupe", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the first of repeated manifest ids/uris instead of refusing")  # fmt: skip
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


def _demo(args: argparse.Namespace) -> tuple[str, str, str, list[tuple[str, Any]]]:
    """The demo's input: generated known-answer images with masks, and the committed toy ViT."""
    from .data.toy import write_toy_dataset
    from .train import toy_checkpoint

    output = args.output or "lnstd-out"
    if "://" in output:
        raise UsageError("the demo (no --input/--model) writes to a local --output")
    # Inside the output, under a '_' name: dataset readers of the output skip it.
    manifest = write_toy_dataset(os.path.join(output, "_demo-input"), n=DEMO_IMAGES)
    print(f"lnstd: demo: {DEMO_IMAGES} generated images, the trained toy ViT -> {output}", file=sys.stderr)
    return manifest, output, str(toy_checkpoint("vit")), []


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import RunConfig
    from .jobs.attribute import run
    from .models import checkpoint_config

    if args.spec is not None:  # only an abbreviation (--spe X) gets past expand_specs
        raise UsageError("--spec: spell the flag out (--spec NAME or --spec=NAME)")
    model, checkpoint, model_args = args.model, args.checkpoint, list(args.model_arg)
    if args.input is None and args.model is None and args.checkpoint is None:
        args.input, args.output, checkpoint, model_args = _demo(args)
    elif args.input is None:
        raise UsageError("--input is required with --model")
    elif args.model is None and args.checkpoint is None:
        raise UsageError("--model is required with --input")
    if model is None and checkpoint is not None:
        model = checkpoint_config(checkpoint).get("model") if os.path.isfile(checkpoint) else None
        if model is None:
            raise UsageError(f"--model is required: {checkpoint} has no JSON beside it naming the model")
    cfg = RunConfig(
        input=args.input,
        output=args.output or "lnstd-out",
        model=model,
        methods=args.methods or [],
        checkpoint=checkpoint,
        pretrained=args.pretrained,
        model_args=dict(model_args),
        options=dict(args.option),
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        address=args.address,
        precision=args.precision,
        capture=args.capture,
        target=args.target,
        fit=args.fit,
        decode=args.decode,
        save_png=args.save_png,
        overwrite=args.overwrite,
        refresh_input=args.refresh_input,
        dedupe=args.dedupe,
        s3_endpoint=args.s3_endpoint,
        lease_ttl=args.lease_ttl,
        startup_timeout=args.startup_timeout,
        verbose=args.verbose,
        fail_on_errors=args.fail_on_errors,
    )
    from .report import RANDOM_WEIGHTS, random_weights

    with native_output_to_log(args.verbose):
        # a rerun with nothing to do keeps the real run's report (run() writes none then)
        manifest = run(cfg, progress=args.progress, report=args.report, traceback_on_error=args.traceback)
        if random_weights({"checkpoint": cfg.checkpoint, "pretrained": cfg.pretrained}):
            print(f"lnstd: warning: {RANDOM_WEIGHTS}", file=sys.stderr)
    counts = manifest.counts
    return 1 if counts["shards_failed"] or (args.fail_on_errors and counts["errors"]) else 0


@contextlib.contextmanager
def native_output_to_log(verbose: bool) -> Iterator[str | None]:
    """Send what native code writes to file descriptor 2 (Ray's core worker and raylet state dumps,
    Arrow's and the AWS SDK's retry messages) to a log file, ``$TMPDIR/lnstd-native-*.log``, kept
    when the body raises and removed otherwise; Python's ``sys.stderr`` (our one-line messages, the
    progress bar, ``--traceback``) still reaches the user. With ``verbose`` nothing is redirected.

    A small keeper process (:mod:`lnstd._native_log`) writes the log; if this process ends abruptly
    (native code exits it, so no Python runs to say why), the keeper shows the last native line. Ray is shut
    down inside, so its teardown is logged too. Yields the log's path (None when verbose).
    """
    import subprocess

    if verbose:
        yield None
        return
    try:
        user_is_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a captured stream (tests): fd 2 is not the user
        user_is_fd2 = False
    sys.stderr.flush()
    log_fd, path = tempfile.mkstemp(prefix="lnstd-native-", suffix=".log")
    os.close(log_fd)
    out_r, out_w = os.pipe()
    life_r, life_w = os.pipe()  # not inheritable: only this process holds the write end
    keeper = subprocess.Popen(
        [sys.executable, "-I", "-S", os.path.join(os.path.dirname(__file__), "_native_log.py"),
         path, str(out_r), str(life_r)],
        pass_fds=(out_r, life_r), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(out_r)
    os.close(life_r)
    saved = os.dup(2)
    before = sys.stderr
    if user_is_fd2:  # the user's stderr through another descriptor (left open: handlers may hold it)
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, errors="backslashreplace")
    os.dup2(out_w, 2)
    os.close(out_w)
    failed = True
    try:
        yield path
        failed = False
    finally:
        with contextlib.suppress(Exception):
            if "ray" in sys.modules and sys.modules["ray"].is_initialized():
                sys.modules["ray"].shutdown()
        sys.stderr.flush()
        os.write(life_w, b"done")  # we finish by ourselves: the keeper need not speak
        os.dup2(saved, 2)
        os.close(saved)
        os.close(life_w)
        with contextlib.suppress(subprocess.TimeoutExpired):
            keeper.wait(timeout=10)
        if user_is_fd2:
            sys.stderr.flush()
            sys.stderr = before
        if not failed or os.path.getsize(path) == 0:
            os.remove(path)


def _explainer(make: Any, *args: Any, **kwargs: Any) -> Any:
    """Build an Explainer (or run anything that builds one); wrong methods or options are the
    user's one-line error, naming the option."""
    try:
        return make(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--option: {exc}" if isinstance(exc, TypeError) else str(exc)) from None


def _model_name(args: argparse.Namespace) -> str:
    """A folder name for a model's outputs: the timm name, or the checkpoint's stem."""
    if args.checkpoint:
        return Path(args.checkpoint).stem
    return str(args.model)


def _output_stems(files: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(path, name relative to its argument) -> (path, distinct output stem), each file once.

    A stem is the relative name without its extension; stems that two files share (``a/img.jpg``
    and ``b/img.jpg``, or ``img.jpg`` and ``img.png``) become the path below the files' common
    folder, then keep the extension (``img_jpg``), so no file's pictures overwrite another's.
    """
    seen: dict[str, str] = {}
    for path, rel in files:
        seen.setdefault(os.path.realpath(path), rel)
    stems = {p: os.path.splitext(rel)[0] for p, rel in seen.items()}

    def clashes() -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for p, stem in stems.items():
            groups.setdefault(stem, []).append(p)
        return {k: v for k, v in groups.items() if len(v) > 1}

    for group in clashes().values():
        root = os.path.commonpath([os.path.dirname(p) for p in group])
        for p in group:
            stems[p] = os.path.splitext(os.path.relpath(p, root))[0]
    for group in clashes().values():
        for p in group:
            stems[p] += os.path.splitext(p)[1].replace(".", "_")
    return [(p, stems[p]) for p in seen]


def _cmd_explain(args: argparse.Namespace) -> int:
    import torch

    from . import Explainer, load_model
    from .arch import get_adapter
    from .data import IMAGE_EXTENSIONS, DecodeError
    from .data.preprocess import Preprocess
    from .methods import applicable_methods
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
    files = _output_stems(files)
    torch.manual_seed(0)
    model = load_model(args.model, args.checkpoint, args.pretrained, **dict(args.model_arg))
    methods = args.methods or applicable_methods(get_adapter(model))
    explainer = _explainer(Explainer, model, methods, precision=args.precision, capture=args.capture,
                           **dict(args.option))  # fmt: skip
    prep = Preprocess.for_model(model, args.fit)
    target = None if args.target == "predicted" else int(args.target)
    out_dir = os.path.join(args.out, _model_name(args))  # outputs of different models stay apart
    failed = 0
    for k in range(0, len(files), args.batch_size):
        chunk, pictures, geoms, originals = [], [], [], []
        for path, rel in files[k : k + args.batch_size]:
            try:
                with open(path, "rb") as f:
                    data = f.read()
                img, geom = prep.decode(data)
                # the pictures are drawn on the full-size image; decode again only if the model's
                # input came from a reduced-scale (JPEG draft) decode
                full = img.size == (geom.width, geom.height)
                originals.append(img if full else prep.decode_full(data))
                pictures.append(img)
                geoms.append(geom)
                chunk.append((path, rel))
            except (DecodeError, OSError) as exc:
                failed += 1
                print(f"lnstd: skipped {path}: {exc}", file=sys.stderr)
        if not chunk:
            continue
        out = explainer(
            torch.stack([prep.tensor(im, g) for im, g in zip(pictures, geoms, strict=True)]), target
        )
        for i, (_, name) in enumerate(chunk):
            stem = os.path.join(out_dir, name)
            os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
            maps = {m: out.heatmaps[m][i] for m in methods}
            for m, heat in maps.items():
                overlay(originals[i], heat, geometry=geoms[i]).save(f"{stem}_{m}.png")
            strip(originals[i], maps, geometry=geoms[i]).save(f"{stem}_strip.png")
    print(f"lnstd: {len(files) - failed} images explained with {', '.join(methods)} -> {out_dir}"
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
    from .train import TRAIN_DATASETS, toy_checkpoint

    if args.model is None and args.checkpoint is None:
        if args.dataset not in TRAIN_DATASETS:
            raise UsageError(
                "--model or --checkpoint is required (only --dataset "
                + ", ".join(TRAIN_DATASETS) + " have default models)"
            )  # fmt: skip
        committed = [p for a in ("vit", "swin") if (p := toy_checkpoint(a, args.dataset)).exists()]
        if not committed:
            raise UsageError(f"--dataset {args.dataset}: no committed model yet; give --checkpoint")
        for path in committed:  # the committed known-answer models
            _eval_one(args, str(path))
        return 0
    _eval_one(args, args.checkpoint)
    return 0


def _eval_one(args: argparse.Namespace, checkpoint: str | None) -> None:
    import time

    import torch
    from tqdm import tqdm

    from . import Explainer, load_model
    from .arch import get_adapter
    from .data.eval_sets import dataset_batches
    from .data.toy import toy_batch
    from .evaluate import ablation, class_sensitivity, evaluate, write_results
    from .methods import applicable_methods
    from .train import toy_tensors

    t0 = time.time()
    torch.manual_seed(0)
    model = load_model(args.model, checkpoint, args.pretrained, **dict(args.model_arg))
    methods = args.methods or applicable_methods(get_adapter(model))
    options = {"precision": args.precision, "capture": args.capture, **dict(args.option)}
    _explainer(Explainer, model, methods, **options)  # a wrong method or option: one line, before work
    batches, n = dataset_batches(args.dataset, model, args.batch_size, args.n)
    name = args.model or os.path.splitext(os.path.basename(checkpoint or "model"))[0]
    with tqdm(total=n, unit="img", desc=f"eval {name}", file=sys.stderr, disable=args.no_progress) as bar:
        results = evaluate(
            model, batches, methods, perturbation=not args.no_perturbation, progress=bar.update, **options
        )
    results["dataset"], results["model"] = args.dataset, name
    if args.dataset == "toy" and args.two_object_n > 0:
        images, masks, labels = toy_batch(args.two_object_n, 30_000, n_objects=2)
        results["class_sensitivity"] = class_sensitivity(
            model, toy_tensors(images), torch.from_numpy(masks), torch.from_numpy(labels), methods, **options
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
    from .aggregate import aggregate, format_table, plural
    from .storage import StorageOptions

    out = aggregate(args.output, StorageOptions.from_env(args.s3_endpoint))
    c = out["counts"]
    print(
        f"{plural(c['images'], 'image')} ({c['ok_images']} ok, {plural(c['error_images'], 'error')}), "
        f"{plural(c['rows'], 'row')}, {plural(c['shards'], 'shard')}, "
        f"{plural(len(c['methods']), 'method')}: {', '.join(c['methods'])}"
    )
    for e in c["errors"][:5]:
        print(f"  {plural(e['images'], 'image')}: {e['error']}")
    print(format_table(out["per_method"]))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .jobs.verify import repair, verify
    from .output import Output
    from .storage import StorageOptions

    out = Output(args.output, StorageOptions.from_env(args.s3_endpoint))
    if args.repair:
        removed = repair(out)
        for uri in removed:
            print(f"removed {uri}")
        if removed:
            print("rerun the same lnstd run to redo the shards whose parts were removed")
    verdict = verify(out)
    print(verdict.table())
    return 0 if verdict.ok else 1


def _cmd_methods(args: argparse.Namespace) -> int:
    from .methods import get_method, list_methods

    names = list_methods()
    width = max(len(n) for n in names)
    for name in names:
        cls = get_method(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:{width}s} {doc}")
        for o in cls.options:
            fam = (
                f" ({', '.join(f'{k}: {v!r}' for k, v in o.family_defaults.items())})"
                if o.family_defaults
                else ""
            )
            choices = f" [{' | '.join(map(str, o.choices))}]" if o.choices else ""
            print(f"{'':4s}{o.name}={o.default!r}{fam}{choices}: {o.help}")
    return 0


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
    p = sub.add_parser("aggregate", help="summarise a run's output (counts, per-method, per-class)")
    p.add_argument("output", help="the run's --output (local or s3://)")
    p.add_argument("--s3-endpoint", default=None)
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
    p.add_argument("--out", required=True, help="folder for the PNGs (one subfolder per model)")
    p.add_argument("--fit", choices=["resize", "center-crop"], default="resize")
    p.add_argument("--target", default="predicted", help="'predicted' or a class index")
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
    _add_train_toy(sub)
    p = sub.add_parser("methods", help="list the attribution methods and their options")
    _common(p)
    p.set_defaults(func=_cmd_methods)
    return parser


def _spec_path(name: str) -> str:
    """A spec file, or the name of one shipped in lnstd.jobs (``folder-local``)."""
    if os.path.isfile(name):
        return name
    from importlib import resources

    shipped = resources.files("lnstd.jobs") / "specs" / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return str(shipped)
    raise UsageError(f"--spec {name}: no such file (nor a shipped spec of that name)")


def spec_to_argv(path: str) -> list[str]:
    """A job spec (YAML mapping of ``run`` flags to values) -> command-line arguments."""
    import yaml

    with open(_spec_path(path)) as f:
        spec = yaml.safe_load(f) or {}
    if not isinstance(spec, dict):
        raise UsageError(f"--spec {path}: expected a mapping of flag names to values")
    argv: list[str] = []
    for key, value in spec.items():
        flag = f"--{str(key).replace('_', '-')}"
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append(f"--no-{flag[2:]}")
        elif value is None:
            continue
        elif isinstance(value, dict):  # model-arg / option: {num_classes: 10}
            for k, v in value.items():
                argv += [flag, f"{k}={json.dumps(v)}"]
        elif isinstance(value, list):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def expand_specs(argv: list[str]) -> list[str]:
    """Replace ``--spec FILE`` (or ``--spec=FILE``) after ``run`` by the file's flags; flags given on
    the command line win (they are placed after the spec's, and argparse keeps the last value)."""
    i = next((k for k, a in enumerate(argv) if a == "--spec" or a.startswith("--spec=")), None)
    if i is None:
        return argv
    if argv[i] == "--spec":
        if i + 1 >= len(argv):
            raise UsageError("--spec needs a file")
        name, rest = argv[i + 1], [*argv[:i], *argv[i + 2 :]]
    else:
        name, rest = argv[i].partition("=")[2], [*argv[:i], *argv[i + 1 :]]
    if not name:
        raise UsageError("--spec needs a file")
    spec = spec_to_argv(name)
    cmd = rest.index("run") + 1 if "run" in rest else 0
    return [*rest[:cmd], *spec, *rest[cmd:]]


def _end_progress_bars() -> None:
    """Close the progress bars an interrupt left open: each ends its line, so the next message
    starts on a line of its own."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lnstd`` console script and ``python -m lnstd``."""
    raw = list(sys.argv[1:] if argv is None else argv)
    show = "--traceback" in raw or "-v" in raw or "--verbose" in raw
    try:
        parser = build_parser()
        args = parser.parse_args(expand_specs(raw))
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except LnstdError as exc:
        if show:
            traceback.print_exc()
        print(f"lnstd: error: {one_line(exc, 10_000)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _end_progress_bars()
        print("lnstd: interrupted (a rerun of the same command resumes)", file=sys.stderr)
        return 130
    except Exception as exc:
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
