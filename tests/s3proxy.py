"""An HTTP proxy in front of the test S3 server that loses replies or holds requests on cue."""

from __future__ import annotations

import http.client
import http.server
import socket
import threading


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 server. ``arm(fault)`` makes it forward the next
    PUT of the lease, let the server apply it, and then drop the connection without a reply
    (``"drop"``) or answer 503 (``"503"``) in place of the server's reply. ``hold(match)`` keeps
    the next request that ``match(method, path, headers)`` accepts until :meth:`release`, then
    forwards it (its client may have given up long before: a write that lands late)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.split("://", 1)[1]
        self.armed: str | None = None
        self.fired: list[str] = []
        self.match = None
        self.held = threading.Event()  # a request is being held
        self.released = threading.Event()
        self.landed: list[int] = []  # the upstream status of each held request once forwarded
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> tuple[bytes, bool]:
                """The request's body as it came (chunked framing and trailers kept: the AWS C++
                SDK puts its checksum in a chunked trailer), and whether it came chunked."""
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = b""
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0], 16)
                        while size == 0:  # the trailer's lines, up to the empty one
                            line = self.rfile.readline()
                            raw += line
                            if line in (b"\r\n", b""):
                                return raw, True
                        raw += self.rfile.read(size + 2)
                return self.rfile.read(int(self.headers.get("Content-Length", 0))), False

            def _forward(self) -> None:
                body, chunked = self._body()
                hold = proxy.match is not None and proxy.match(self.command, self.path, self.headers)
                if hold:
                    proxy.match = None
                    proxy.held.set()
                    proxy.released.wait(300)
                skip = {"expect", "transfer-encoding", "content-length", "connection"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                if chunked:  # forwarded as it came
                    headers["Transfer-Encoding"] = "chunked"
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if hold:
                    proxy.landed.append(resp.status)
                fault = None
                if self.command == "PUT" and self.path.split("?")[0].endswith("lease.json"):
                    fault, proxy.armed = proxy.armed, None
                if fault:
                    proxy.fired.append(fault)
                if fault == "drop":  # the server applied the write; its reply never arrives
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "503":
                    status, data = 503, b"<Error><Code>ServiceUnavailable</Code></Error>"
                    out = [("Content-Type", "application/xml")]
                else:
                    status = resp.status
                    hop = ("transfer-encoding", "connection", "content-length")
                    out = [(k, v) for k, v in resp.getheaders() if k.lower() not in hop]
                self.send_response(status)
                for k, v in out:
                    self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                try:
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                except OSError:  # the client gave up on a held request
                    self.close_connection = True

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def arm(self, fault: str) -> None:
        self.armed = fault

    def hold(self, match) -> None:
        self.match = match

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
