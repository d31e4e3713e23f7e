"""A real S3-protocol server on loopback for the object-store tests, and a fault-injecting proxy.

``MotoS3`` runs moto's ``ThreadedMotoServer`` (an in-memory S3 speaking the real
HTTP protocol) on ``127.0.0.1``. ``FaultProxy`` sits between a client and that
server and forwards every request, except that it can

- answer the next ``n`` matching requests with ``503 ServiceUnavailable`` or by
  closing the connection without a response (``fail``), and
- hold a matching request without forwarding it until the proxy is told to let go
  or shuts down (``stall``): a test kills the client while its upload hangs there.

``s3_options``/``s3_env`` give fsspec's configuration for an endpoint: in-process
through ``fsspec.config.conf``, for subprocesses through the ``FSSPEC_S3`` variable
(fsspec reads it at import), so code that calls ``fsspec.open("s3://...")``
without options reaches the loopback server.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import logging
import re
import socket
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import fsspec

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# botocore's own retries off (s3fs' retry loop is a class attribute: see ``no_client_retries``)
NO_BOTOCORE_RETRIES = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}  # the first try only
UPSTREAM_TIMEOUT_S = 30
STALL_LIMIT_S = 60  # a stalled request is dropped after this even if nobody lets it go


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    """moto's S3 server on a free loopback port; ``endpoint`` is its URL."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self) -> "MotoS3":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()


def s3_options(endpoint: str, **extra) -> dict:
    """s3fs keyword arguments for ``endpoint`` (what fsspec's config holds for ``s3``)."""
    return {"endpoint_url": endpoint, **extra}


def s3_env(endpoint: str, **extra) -> dict[str, str]:
    """Environment variables that point a subprocess's fsspec (and boto) at ``endpoint``."""
    return {**CREDENTIALS, "FSSPEC_S3": json.dumps(s3_options(endpoint, **extra))}


def clear_s3_caches() -> None:
    """Forget cached s3fs instances (and with them their directory listings)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def s3_config(endpoint: str, **extra) -> Iterator[None]:
    """Point in-process ``s3://`` URLs at ``endpoint`` for the duration (fresh s3fs instances)."""
    before = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = s3_options(endpoint, **extra)
    clear_s3_caches()
    try:
        yield
    finally:
        if before is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = before
        clear_s3_caches()


@contextlib.contextmanager
def no_client_retries() -> Iterator[dict]:
    """Turn off the retries below our code, botocore's and s3fs' (a dropped connection is retried by
    s3fs 5 times): yields the s3fs options to pass to ``s3_config``."""
    import s3fs

    before = s3fs.S3FileSystem.retries
    s3fs.S3FileSystem.retries = 1
    try:
        yield NO_BOTOCORE_RETRIES
    finally:
        s3fs.S3FileSystem.retries = before


def fresh_s3(endpoint: str):
    """An s3fs filesystem with no cached listings, for checking what is really on the server."""
    return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False, endpoint_url=endpoint)


# --------------------------------------------------------------------------- fault proxy

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}
SERVICE_UNAVAILABLE = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
                       b"<Message>injected by the test proxy</Message></Error>")


@dataclass
class Request:
    method: str
    path: str  # path and query, as sent


Matcher = Callable[[Request], bool]


def object_reads(req: Request) -> bool:
    """HEAD or GET of an object (not a bucket listing): what reading a shard sends."""
    path, _, query = req.path.partition("?")
    return req.method in ("GET", "HEAD") and path.count("/") >= 2 and "list-type" not in query


def path_matches(pattern: str, methods: tuple[str, ...] = ("PUT", "POST")) -> Matcher:
    """Requests with one of ``methods`` whose path (without the query) matches regex ``pattern``."""
    rx = re.compile(pattern)
    return lambda req: req.method in methods and rx.search(req.path.partition("?")[0]) is not None


@dataclass
class _Plan:
    failures_left: int = 0
    failure_kind: str = "503"
    failure_match: Matcher = object_reads
    stall_match: Optional[Matcher] = None
    log: list[Request] = field(default_factory=list)
    faults: list[tuple[str, Request]] = field(default_factory=list)


class FaultProxy:
    """An HTTP/1.1 proxy on loopback in front of ``upstream`` (``http://host:port``) that injects faults.

    ``requests`` lists every request seen, ``faults`` every one it failed
    (``("503" | "drop", request)``); ``stalled`` is set once a request is held.
    """

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.plan = _Plan()
        self.lock = threading.Lock()
        self.stalled = threading.Event()
        self.release = threading.Event()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail(self, n: int, kind: str = "503", match: Matcher = object_reads) -> None:
        """Fail the next ``n`` requests that ``match``: ``"503"`` or ``"drop"`` (close, no response)."""
        if kind not in ("503", "drop"):
            raise ValueError(f"unknown fault kind {kind!r}")
        with self.lock:
            self.plan.failures_left, self.plan.failure_kind, self.plan.failure_match = n, kind, match

    def stall(self, match: Matcher) -> None:
        """Hold every request that ``match`` (never forwarded) until ``release`` is set or the proxy stops."""
        with self.lock:
            self.plan.stall_match = match

    @property
    def requests(self) -> list[Request]:
        with self.lock:
            return list(self.plan.log)

    @property
    def faults(self) -> list[tuple[str, Request]]:
        with self.lock:
            return list(self.plan.faults)

    def _decide(self, req: Request) -> str:
        """What to do with a request: "forward", "503", "drop" or "stall"."""
        with self.lock:
            p = self.plan
            p.log.append(req)
            if p.stall_match is not None and p.stall_match(req):
                return "stall"
            if p.failures_left > 0 and p.failure_match(req):
                p.failures_left -= 1
                p.faults.append((p.failure_kind, req))
                return p.failure_kind
            return "forward"


def _handler_for(proxy: FaultProxy):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real S3 clients expect

        def log_message(self, format, *args):  # quiet
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _drop(self) -> None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        def _handle(self) -> None:
            body = self._body()
            req = Request(self.command, self.path)
            action = proxy._decide(req)
            if action == "stall":
                proxy.stalled.set()
                proxy.release.wait(STALL_LIMIT_S)
                self._drop()
                return
            if action == "drop":
                self._drop()
                return
            if action == "503":
                self.send_response_only(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SERVICE_UNAVAILABLE)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(SERVICE_UNAVAILABLE)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=UPSTREAM_TIMEOUT_S)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            self.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() in HOP_BY_HOP or (k.lower() == "content-length" and self.command != "HEAD"):
                    continue
                self.send_header(k, v)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

    return Handler
