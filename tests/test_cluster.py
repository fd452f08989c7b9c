"""Cluster definitions and job specs: they parse, and every lnstd command in them is a valid one."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from lnstd.cli import build_parser
from lnstd.jobs.specs import spec_to_argv

ROOT = Path(__file__).resolve().parents[1]


def _parse(cmd: str):
    words = shlex.split(cmd)
    assert words[0] == "lnstd", cmd
    return build_parser().parse_args(words[1:])


def test_rayjob_entrypoint_is_a_valid_run():
    job = yaml.safe_load((ROOT / "cluster/kuberay/rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    args = _parse(job["spec"]["entrypoint"])
    assert args.command == "run" and args.input.startswith("s3://") and args.output.startswith("s3://")
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert args.actors * args.gpus_per_actor <= int(gpus) * workers["maxReplicas"]


def test_raycluster_and_ray_up_configs():
    rc = yaml.safe_load((ROOT / "cluster/kuberay/raycluster.yaml").read_text())
    assert rc["kind"] == "RayCluster"
    gpu = rc["spec"]["workerGroupSpecs"][0]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    up = yaml.safe_load((ROOT / "cluster/ray-up-aws.yaml").read_text())
    assert up["head_node_type"] in up["available_node_types"]
    assert any("pip install" in c and "lnstd" in c for c in up["setup_commands"])
    for doc in (rc, up):
        text = yaml.safe_dump(doc)
        assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret" not in text.lower()


def test_readme_commands_are_valid():
    text = (ROOT / "cluster/README.md").read_text()
    cmds = [ln.split(" -- ", 1)[1] for ln in text.splitlines() if ln.startswith("ray job submit")]
    cmds += [line.split("#")[0].strip() for line in text.splitlines() if line.startswith("lnstd ")]
    assert len(cmds) >= 2
    for cmd in cmds:
        _parse(cmd)


@pytest.mark.parametrize("spec", sorted((ROOT / "jobs/specs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_specs_are_valid_runs(spec):
    args = build_parser().parse_args(["run", *spec_to_argv(str(spec))])
    assert args.input and args.output and args.model
