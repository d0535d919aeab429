"""The local Prefect API that ``houseprice`` keeps between runs: Prefect's own app, as its
temporary server runs it, that exits once it has had no request and no open connection for
KEEP_S seconds, and then removes its record (if the record still names it).

    python -m flows.commands.apiserver PORT KEEP_S RECORD LOCK

Started by ``flows.commands.server`` only; the settings come from the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any


class IdleExit:
    """ASGI wrapper: counts open requests and websockets, remembers when the last one ended,
    and tells the server to stop after ``keep_s`` seconds with none. From the moment it
    decides to stop, it is closing: its record is removed first (``on_close``), so no run
    finds it any more, and a request that still arrives (a run that found it just before)
    gets 503, which the run's wait reads as not ready: it waits for the exit and starts
    another server, instead of running on one that is about to go."""

    def __init__(self, app: Any, keep_s: float, on_close: Any = lambda: None) -> None:
        self.app, self.keep_s, self.on_close = app, keep_s, on_close
        self.open, self.last = 0, time.monotonic()
        self.closing = False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if self.closing:
            if scope["type"] == "http":
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"text/plain")]})
                await send({"type": "http.response.body", "body": b"closing"})
            return None
        self.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= 1
            self.last = time.monotonic()

    def idle(self) -> bool:
        return self.open == 0 and time.monotonic() - self.last > self.keep_s

    async def watch(self, server: Any) -> None:
        while not server.should_exit:
            await asyncio.sleep(min(1.0, self.keep_s / 4 + 0.05))
            if self.idle():
                self.closing = True
                self.on_close()
                server.should_exit = True


def main(argv: list[str]) -> int:
    port, keep_s, record, lock = int(argv[0]), float(argv[1]), Path(argv[2]), Path(argv[3])
    import uvicorn
    from prefect.server.api.server import create_app

    from flows.commands.server import forget

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn re-raises a SIGTERM after it: forget first
            with super().capture_signals():
                try:
                    yield
                finally:
                    forget(record, lock)

    app = IdleExit(create_app(), keep_s, on_close=lambda: forget(record, lock))
    server = Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                   lifespan="on"))

    async def serve() -> None:
        watch = asyncio.ensure_future(app.watch(server))
        try:
            await server.serve()
        finally:
            watch.cancel()

    try:
        asyncio.run(serve())
    finally:
        forget(record, lock)  # again if the app failed before serving (a no-op otherwise)
    return 0 if server.started else 3


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main(sys.argv[1:]))
