"""A local S3-compatible server and a TCP proxy on 127.0.0.1 that makes a network slow and
flaky, for ``distnet bench loader --s3-server`` and the object-storage tests.

- :func:`start_s3_server`: moto's standalone server (``moto[server]``, the ``[dev]`` extra) in
  its own process, answering real HTTP on a free port; :func:`s3_env` the standard AWS
  variables that point a client at it (the only way distnet takes credentials).

:class:`FaultProxy` sits in front of an HTTP server (an S3-compatible one, say) and parses
HTTP/1.1 request heads so that it can act per request: add latency, answer ``503 SlowDown``
to the next N reads (throttling), hold requests unanswered (a server that hangs), or drop
the connection. Bodies and responses pass through byte for byte. An asyncio loop in a
daemon thread of the calling process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

ACCESS_KEY, SECRET_KEY = "testing-key-id", "testing-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def start_s3_server(timeout: float = 60.0, env: dict[str, str] | None = None) -> Iterator[str]:
    """Runs moto's S3 server in a subprocess (``env`` added to its environment: moto's
    ``INITIAL_NO_AUTH_ACTION_COUNT=0`` turns signature checks on); yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {url}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def s3_env(endpoint: str, key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> dict[str, str]:
    """The standard AWS environment for ``endpoint``; config files pointed at nothing."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def make_bucket(endpoint: str, name: str) -> None:
    """Creates bucket ``name`` (a plain PUT: moto accepts it without signing checks)."""
    req = urllib.request.Request(f"{endpoint}/{name}", method="PUT")
    urllib.request.urlopen(req, timeout=30).read()


SLOWDOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n"
    b"Connection: keep-alive\r\n\r\n%s"
)
SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``).

    Attributes to set while it runs: ``latency_s`` (added before each request goes on),
    ``throttle`` (the next this many GET requests get 503 SlowDown), ``hang`` (an Event: while
    set, requests are held unanswered), ``drop`` (the next this many requests have their
    connection closed). ``requests``, ``throttled`` and ``ranged`` (requests for a byte
    range) count what passed; ``max_in_flight`` is the peak of requests waiting for their
    response at once, ``max_connections`` of open connections (reset them to measure anew).
    """

    def __init__(self, upstream: str):
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.latency_s = 0.0
        self.throttle = 0
        self.drop = 0
        self.hang = threading.Event()
        self.requests = 0
        self.throttled = 0
        self.ranged = 0
        self.connections = self.max_connections = 0  # open client connections, and the peak
        self.in_flight = self.max_in_flight = 0  # requests awaiting a response, and the peak
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="FaultProxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("proxy did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.close()

    def close(self) -> None:
        """Stops serving; open connections are closed."""
        self.hang.clear()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _take(self, name: str) -> bool:
        with self._lock:
            if getattr(self, name) > 0:
                setattr(self, name, getattr(self, name) - 1)
                return True
        return False

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader = up_writer = None
        waiting = [False]  # a request of this connection awaits its response
        with self._lock:
            self.connections += 1
            self.max_connections = max(self.max_connections, self.connections)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            back = asyncio.ensure_future(self._pipe(up_reader, writer, waiting))
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                self.requests += 1
                if b"\r\nrange:" in head.lower():
                    self.ranged += 1  # a partial read (a chunk inside a shard)
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                while self.hang.is_set():
                    await asyncio.sleep(0.05)
                if self._take("drop"):
                    break
                length, chunked = _body_length(head)
                if head.startswith(b"GET ") and self._take("throttle"):
                    self.throttled += 1
                    writer.write(SLOWDOWN % (len(SLOWDOWN_BODY), SLOWDOWN_BODY))
                    await writer.drain()
                    continue
                with self._lock:
                    waiting[0] = True
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                up_writer.write(head)
                if chunked:  # rare here: pass the rest of the connection through raw
                    await self._pipe(reader, up_writer, [False])
                    break
                if length:
                    up_writer.write(await reader.readexactly(length))
                await up_writer.drain()
            back.cancel()
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            with self._lock:
                self.connections -= 1
                if waiting[0]:  # closed before its response came
                    waiting[0] = False
                    self.in_flight -= 1
            for w in (writer, up_writer):
                if w is not None:
                    w.close()

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, waiting: list[bool]
    ) -> None:
        try:
            while data := await src.read(1 << 16):
                with self._lock:
                    if waiting[0]:  # the response starts: one request fewer in flight
                        waiting[0] = False
                        self.in_flight -= 1
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()


def _body_length(head: bytes) -> tuple[int, bool]:
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    return length, chunked
