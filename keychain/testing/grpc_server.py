"""What the test servers share: a gRPC asyncio server on a thread of its own (its own event loop), so that sync and
async callers (the tests, the benchmarks, the demo) can share one."""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc

log = logging.getLogger(__name__)


class ThreadedGrpcServer:
    """A subclass gives `_handlers()` (its service's generic handler) and a `name` for its thread and log line."""

    name = "grpc-test-server"

    def __init__(self) -> None:
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self.host = "127.0.0.1"

    def _handlers(self) -> grpc.GenericRpcHandler:
        raise NotImplementedError

    @property
    def address(self) -> str:
        return f"{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.port}"

    def start(self, port: int = 0, host: str = "127.0.0.1"):
        """Serve on `host` (loopback by default; 0.0.0.0 where other containers reach it by name)."""
        self.host = host
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self._start(port))
            except BaseException as exc:  # report start-up failures to the caller
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        return self

    async def _start(self, port: int) -> None:
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((self._handlers(),))
        self.port = self._server.add_insecure_port(f"{self.host}:{port}")
        await self._server.start()
        log.info("%s on %s", self.name, self.address)

    def stop(self) -> None:
        if self._loop is None or self._server is None:
            return
        asyncio.run_coroutine_threadsafe(self._server.stop(grace=0.5), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._server = None

    def serve_until_interrupted(self, announce: str) -> None:
        """Run alone (`python -m keychain.testing...`): print the line that says where it serves, serve until Ctrl-C."""
        print(announce, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            self.stop()
