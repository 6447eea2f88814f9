"""Run an app with uvicorn in a background thread on a free loopback port (tests, benchmarks)."""

from __future__ import annotations

import threading
import time


class BackgroundServer:
    """`BackgroundServer(app).url` serves `app` on 127.0.0.1; `stop()` shuts it down."""

    def __init__(self, app, timeout: float = 30.0) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
