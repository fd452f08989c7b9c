"""Shared fixtures (model factories live in helpers.py so tests can import them)."""

from __future__ import annotations

import pytest

from .helpers import make_swin, make_vit_avg_reg, make_vit_token, sharpen  # also sets torch's threads


@pytest.fixture
def vit_token():
    return sharpen(make_vit_token())


@pytest.fixture
def vit_avg_reg():
    return sharpen(make_vit_avg_reg())


@pytest.fixture
def swin():
    return sharpen(make_swin())


S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "lnstd-test-key",
    "AWS_SECRET_ACCESS_KEY": "lnstd-test-secret-do-not-log",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class S3Server:
    """A real S3 HTTP endpoint (moto's server mode) on 127.0.0.1, with test credentials."""

    def __init__(self, port: int) -> None:
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = dict(S3_CREDENTIALS)

    def fs(self):
        """A pyarrow S3 filesystem on this server (for reading what a run wrote)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key=self.env["AWS_ACCESS_KEY_ID"], secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
            endpoint_override=self.endpoint.split("://")[1], scheme="http", region="us-east-1",
        )  # fmt: skip

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )


# moto's server checks a conditional write's If-Match / If-None-Match, then stores the object, in
# threads that interleave: two racing conditional writes can both pass. S3 applies each request
# atomically; one request at a time models that (requests are small and fast here).
_ATOMIC_MOTO = """
import sys, threading
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
app, lock = DomainDispatcherApplication(create_backend_app), threading.Lock()
def atomic(environ, start_response):
    with lock:
        return list(app(environ, start_response))
run_simple("127.0.0.1", int(sys.argv[1]), atomic, threaded=True, request_handler=MotoRequestHandler)
"""


@pytest.fixture(scope="session")
def s3_server():
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", _ATOMIC_MOTO, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = S3Server(port)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{server.endpoint}/moto-api/", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)
    try:
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """A seeded tiny ViT checkpoint (tests/jobhelpers.py's TINY_MODEL), made once per session."""
    from .jobhelpers import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def no_ray(monkeypatch):
    """Ray cannot start (``ray.init`` raises): an error found before Ray is started still comes out
    as the user's one line; anything that started Ray first would be an internal error. (Importing
    Ray stays possible: the job layer's modules import it when they load.)"""
    import ray

    def refuse(*args, **kwargs):
        raise RuntimeError("Ray was started before the run's checks")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="module")
def _ray_head():
    """One Ray head node per test module (``ray.cluster_utils.Cluster``, a real raylet and GCS) with
    this machine's two CPUs: the job tests that use :func:`shared_ray` join it as a user's
    ``RAY_ADDRESS`` would, instead of starting and stopping a cluster per run (about 7 s each).
    Per module, not per session: a test that kills or pauses drivers may leave actors holding CPUs
    for a while, which must not starve another module's runs. Tests about starting Ray itself run
    without it."""
    from .jobhelpers import ray_head

    # its node holds the test S3 server's credentials, as a cluster's nodes hold theirs (a run does
    # not ship secrets to its actors; the endpoint it does ship)
    with ray_head(2, S3_CREDENTIALS) as address:
        yield address


@pytest.fixture
def shared_ray(request, monkeypatch):
    """Runs of this test (subprocesses and in-process) join the module's Ray head; only for tests
    marked ``integration`` (the fast subset starts no Ray)."""
    if request.node.get_closest_marker("integration") is None:
        return None
    address = request.getfixturevalue("_ray_head")
    monkeypatch.setenv("RAY_ADDRESS", address)
    return address
