"""Whether anything answers at an S3 endpoint, asked once, in seconds, before the SDK would spend a
minute of retries finding out."""

from __future__ import annotations

import socket
import urllib.parse
import urllib.request
from typing import TypeVar

__all__ = ["check_endpoint", "checked_client"]

C = TypeVar("C")
_REACHED: set[tuple[str, int]] = set()


def check_endpoint(url: str, timeout: float = 5.0) -> str:
    """Fail in one line, naming the flag, when nothing answers at an S3 endpoint's host and port
    (a TCP connection, once per endpoint and process; skipped behind an HTTP proxy). Without it an
    unreachable endpoint is a minute of the SDK's retries, then a connection error of its own.
    Returns ``url``.

    Raises:
        StorageError: the host has no address, or refuses or ignores the connection.
    """
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    if (host, port) in _REACHED:
        return url
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(host):
        return url  # the proxy connects, not this process
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        from .storage import StorageError

        raise StorageError(
            f"S3 endpoint {url} cannot be reached ({why}): check --s3-endpoint "
            "(or AWS_ENDPOINT_URL) and that the server is up"
        ) from None
    _REACHED.add((host, port))
    return url


def checked_client(client: C) -> C:
    """A botocore client, once its endpoint answers (:func:`check_endpoint`)."""
    check_endpoint(client.meta.endpoint_url)  # type: ignore[attr-defined]
    return client
