"""Loopback TCP proxies: one that a test cuts and restores, one whose close lags."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr

from consumer.settings import Settings

from .config import DATABASE_URL


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.links: set[asyncio.StreamWriter] = set()

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", port or self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for writer in list(self.links):
            writer.close()
        self.links.clear()

    async def restore(self) -> None:
        await self.start(self.port)

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.links.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.links.discard(writer)
        self.links.discard(up_writer)


def database_address() -> tuple[str, int]:
    parsed = urlsplit(DATABASE_URL)
    return parsed.hostname or "127.0.0.1", parsed.port or 5432


def database_url_via(port: int) -> str:
    """DATABASE_URL, through a proxy on ``port``."""
    host, real = database_address()
    return DATABASE_URL.replace(f"{host}:{real}", f"127.0.0.1:{port}", 1)


@contextlib.asynccontextmanager
async def database_proxy(settings: Settings, **update: Any) -> AsyncIterator[tuple[Proxy, Settings]]:
    """A proxy to PostgreSQL, and ``settings`` (with ``update``) that reach the database through it."""
    proxy = Proxy(*database_address())
    port = await proxy.start()
    through = settings.model_copy(update={"database_url": SecretStr(database_url_via(port)), **update})
    try:
        yield proxy, through
    finally:
        await proxy.cut()


class LaggingLink:
    """A loopback TCP proxy that passes bytes at once but a server's close only after ``lag`` seconds.

    Between the last bytes of a server (say PostgreSQL's "terminating connection"
    notice) and the end of the connection there is then a window that a client
    can be caught in, every time instead of now and then.
    """

    def __init__(self, target_host: str, target_port: int, lag: float) -> None:
        self.target = (target_host, target_port)
        self.lag = lag
        self.server: asyncio.Server | None = None
        self.port = 0
        self.upstream_ports: set[int] = set()  # local ports of our connections to the server
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop listening and close every link at once, both ends (no lag)."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            writer.transport.abort()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            self.tasks.discard(task)
            return
        self.upstream_ports.add(up_writer.get_extra_info("sockname")[1])
        self.writers.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, lag: float) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            await asyncio.sleep(lag)
            dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer, 0), pipe(up_reader, writer, self.lag))
        finally:
            self.tasks.discard(task)
            self.writers.difference_update({writer, up_writer})
