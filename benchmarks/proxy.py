"""A loopback TCP proxy that counts round trips and can add latency.

Runs its own asyncio loop in a daemon thread, so sync and async clients alike
connect to ``127.0.0.1:<port>`` and reach the server behind it.

* **Round trips**: a connection's round trip starts whenever the client sends
  after having received (or for the first time). Counting turns of the
  conversation, not packets, makes the count independent of how TCP splits or
  merges the bytes: one query answered in three packets is one round trip.
* **Latency**: every chunk from the server is delivered ``delay`` seconds after
  it arrived, in order (a scheduled delivery, not a sleep per chunk), which adds
  ``delay`` to every round trip like a longer network path would.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

__all__ = ["Proxy"]


class Proxy:
    """``with Proxy("127.0.0.1", 5432, delay=0.0005) as proxy: proxy.port``."""

    def __init__(self, host: str, port: int, *, delay: float = 0.0) -> None:
        self.target = (host, port)
        self.delay = delay
        self.port = 0
        self._round_trips = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # -- control ----------------------------------------------------------------

    def start(self) -> Proxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = future.result(10)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def round_trips(self) -> int:
        """Round trips of every connection since the proxy started (or the last
        :meth:`reset`)."""
        with self._lock:
            return self._round_trips

    def reset(self) -> None:
        with self._lock:
            self._round_trips = 0

    # -- the loop's side ------------------------------------------------------------

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        self._writers.update((client_w, server_w))
        state = {"answered": True}  # the next client send starts a round trip

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if state["answered"]:
                    state["answered"] = False
                    with self._lock:
                        self._round_trips += 1
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        async def downstream() -> None:
            queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

            async def deliver() -> None:
                while True:
                    due, data = await queue.get()
                    if not data:
                        client_w.close()
                        return
                    wait = due - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    client_w.write(data)
                    await client_w.drain()

            sender = asyncio.ensure_future(deliver())
            try:
                while data := await server_r.read(65536):
                    state["answered"] = True
                    queue.put_nowait((time.monotonic() + self.delay, data))
            finally:
                queue.put_nowait((0.0, b""))
                await asyncio.gather(sender, return_exceptions=True)

        try:
            # A side that ends (or breaks) ends the connection; errors are the
            # peers' business, not the proxy's.
            await asyncio.gather(upstream(), downstream(), return_exceptions=True)
        finally:
            for writer in (client_w, server_w):
                writer.close()
                self._writers.discard(writer)
