"""Job specs: YAML files of ``lnstd run`` flags (the ``.yaml`` files in this folder are examples,
shipped with the package), and their expansion into command-line arguments (``--spec FILE``).

A spec maps flag names (``model``, ``batch_size`` or ``batch-size``) to values: ``true`` / ``false``
for on/off flags, a mapping for the repeatable ``KEY=VALUE`` flags (``model_arg``, ``option``), a
list for comma lists (``methods``).
"""

from __future__ import annotations

import json
import os

import yaml

from lnstd.errors import UsageError

__all__ = ["expand_specs", "spec_to_argv"]


def _spec_path(name: str) -> str:
    """A spec file, or the name of one shipped beside this module (``folder-local``)."""
    if os.path.isfile(name):
        return name
    shipped = os.path.join(os.path.dirname(__file__), name if name.endswith(".yaml") else f"{name}.yaml")
    if os.path.isfile(shipped):
        return shipped
    raise UsageError(f"--spec {name}: no such file (nor a shipped spec of that name)")


def spec_to_argv(path: str) -> list[str]:
    """A job spec (YAML mapping of ``run`` flags to values) -> command-line arguments."""

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
