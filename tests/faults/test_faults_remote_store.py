"""A store on a remote file system that stops answering (a real local HTTP server whose chunk
requests hang): a clear timeout naming the chunk, and no thread left behind (marker `fault`)."""

from __future__ import annotations

import functools
import http.server
import threading
import time

import numpy as np
import pytest

from distnet.data import StreamLoader, open_dataset, write_dataset

aiohttp = pytest.importorskip("aiohttp", reason="fsspec's HTTP file system needs aiohttp")
pytestmark = [pytest.mark.fault, pytest.mark.timeout(120)]


class HangingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files; while ``hang`` is set, requests for chunks wait (at most 30 s)."""

    hang = threading.Event()
    release = threading.Event()

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.hang.is_set() and "/c/" in self.path:
            self.release.wait(30)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def served_store(tmp_path):
    # 64 chunks: far more than the loader reads ahead (up to 16 requests at a time)
    x = (np.arange(512 * 6) % 200).astype(np.uint8).reshape(512, 6)
    write_dataset(str(tmp_path / "s"), x, np.arange(512) % 3, chunk_samples=8)
    handler = functools.partial(HangingHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    HangingHandler.hang.clear()
    HangingHandler.release.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/s"
    HangingHandler.release.set()
    server.shutdown()


def test_a_store_that_stops_answering_times_out_naming_the_chunk(served_store):
    client = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=4)}}
    open_dataset(served_store, client)  # fsspec's event-loop thread exists from here on
    before = set(threading.enumerate())
    loader = StreamLoader(
        served_store, 8, seed=0, shuffle=False, prefetch=1, timeout=2.0, storage_options=client
    )
    batches = iter(loader)
    next(batches)  # the store answered at first
    HangingHandler.hang.set()
    started = time.monotonic()
    with pytest.raises(TimeoutError) as e:
        for _ in batches:
            pass
    assert time.monotonic() - started < 15
    assert "chunk" in str(e.value) and served_store in str(e.value), str(e.value)
    loader.close()

    def left_behind() -> set[threading.Thread]:
        """The loader's threads still alive (its prefetch thread and chunk readers); the test
        server's threads and asyncio's pooled idle workers (zarr, fsspec) are not its own."""
        new = set(threading.enumerate()) - before
        return {t for t in new if t.name.startswith("StreamLoader")}

    deadline = time.monotonic() + 15  # the HTTP client's own timeout ends the stuck read
    while time.monotonic() < deadline and left_behind():
        time.sleep(0.1)
    assert left_behind() == set()
