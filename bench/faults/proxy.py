"""A fault-injecting HTTP proxy in front of an S3-compatible server, for the bucket fault cases and
tests: real object storage answers in tens of milliseconds, throttles, fails, resets connections
and is sometimes gone for a while; this makes a local moto server do the same, on purpose.

    proxy = FaultProxy(upstream_port, faults=0.05, latency=(0.02, 0.08), seed=0).start()
    url = f"s3://bucket/prefix?endpoint={proxy.endpoint}"
    proxy.outage(30)       # connections refused for 30 s
    proxy.counts()         # {"ok": 812, "503": 14, "500": 13, "reset": 16, "refused": ...}
    proxy.stop()

Per request, in a seeded order: a delay drawn from ``latency`` (seconds), then with probability
``faults`` one fault, a third each: 503 SlowDown, 500 InternalError, or the request forwarded and
its answer cut mid-body with a TCP reset (the server has done the work; the client must not count
on it). It listens on 127.0.0.1 only and is bounded: it stops answering after ``max_requests``
requests or ``max_seconds`` seconds, so a runaway test ends. Every answer closes its connection,
so each request is a fresh connection and an outage refuses every request made during it.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler

_XML = '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{}</Code><Message>{}</Message><RequestId>fault</RequestId></Error>'
ANSWERS = {"503": (503, "Slow Down", _XML.format("SlowDown", "Please reduce your request rate.")),
           "500": (500, "Internal Server Error", _XML.format("InternalError", "We encountered an internal error."))}
FAULT_KINDS = ("503", "500", "reset")
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect",
        "content-length"}


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (linger 0) instead of an orderly close."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # curl's PUTs send "Expect: 100-continue", which needs HTTP/1.1

    def log_message(self, *args):
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _any(self):
        proxy: FaultProxy = self.server
        body = self._body()
        delay, kind = proxy._next()
        self.close_connection = True
        if kind == "closed":
            _reset(self.connection)
            return
        time.sleep(delay)
        if kind in ANSWERS:
            status, reason, text = ANSWERS[kind]
            payload = text.encode()
            self.send_response(status, reason)
            for key, value in (("Content-Type", "application/xml"), ("Content-Length", str(len(payload))),
                               ("Connection", "close")):
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        headers["Content-Length"] = str(len(body))
        upstream.request(self.command, self.path, body=body, headers=headers)
        answer = upstream.getresponse()
        data = answer.read()
        upstream.close()
        head = [f"HTTP/1.1 {answer.status} {answer.reason}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in answer.getheaders() if k.lower() not in _HOP]
        length = answer.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        head += ([f"Content-Length: {length}\r\n"] if length is not None else []) + ["Connection: close\r\n\r\n"]
        raw = "".join(head).encode() + (b"" if self.command == "HEAD" else data)
        if kind == "reset":  # the work is done upstream; the answer is cut halfway
            self.connection.sendall(raw[: max(1, len(raw) // 2)])
            time.sleep(0.02)
            _reset(self.connection)
            return
        self.connection.sendall(raw)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any


class FaultProxy:
    """See the module's docstring."""

    def __init__(self, upstream_port: int, *, faults: float = 0.0, latency: tuple[float, float] = (0.0, 0.0),
                 seed: int = 0, max_requests: int = 200_000, max_seconds: float = 3600.0):
        self.upstream_port, self.faults, self.latency = upstream_port, faults, latency
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.port = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._listener: socket.socket | None = None
        self._down_since = self._down_until = 0.0
        self._started = 0.0
        self._stopped = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._started = time.monotonic()
        self._listen()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._close()

    def set(self, *, faults: float | None = None, latency: tuple[float, float] | None = None) -> None:
        with self._lock:
            self.faults = self.faults if faults is None else faults
            self.latency = self.latency if latency is None else latency

    def outage(self, seconds: float) -> None:
        """Refuse every connection for ``seconds`` from now (the listener closed), then listen again."""
        self._close()
        self._down_since = time.monotonic()
        self._down_until = self._down_since + seconds

        def back():
            while time.monotonic() < self._down_until and not self._stopped.is_set():
                time.sleep(0.05)
            if not self._stopped.is_set():
                self._listen()

        threading.Thread(target=back, daemon=True).start()

    def outage_elapsed(self) -> float:
        """Seconds since the last outage began."""
        return time.monotonic() - self._down_since

    def counts(self) -> dict[str, int]:
        """Requests answered so far, by what they got: ok, 503, 500, reset (and closed: past the bounds)."""
        with self._lock:
            return dict(self._counts)

    @property
    def requests(self) -> int:
        return sum(self.counts().values())

    # internals
    def _next(self) -> tuple[float, str]:
        with self._lock:
            total = sum(self._counts.values())
            if total >= self.max_requests or time.monotonic() - self._started > self.max_seconds:
                kind, delay = "closed", 0.0
            else:
                delay = self._rng.uniform(*self.latency)
                kind = self._rng.choice(FAULT_KINDS) if self._rng.random() < self.faults else "ok"
            self._counts[kind] = self._counts.get(kind, 0) + 1
            return delay, kind

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _close(self) -> None:
        sock, self._listener = self._listener, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, address = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, address), daemon=True).start()

    def _serve(self, conn, address) -> None:
        try:
            _Handler(conn, address, self)
        except Exception:  # noqa: BLE001 - a client that went away mid-request: nothing to answer
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass
