"""The fake Vertex server (support/vertex_server.py) with its echo responder in a child process,
for benchmarks that must not share the client's GIL::

    with VertexServerProcess(latency_ms=100) as server:
        ...  # point the client at server.base_url

or by hand: ``python -m promptopt_dagster_tests.support.vertex_process --port 8089 --latency-ms 100``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from promptopt_dagster_tests.support.server_process import (
    HOST,
    ServerHandle,
    ServerProcess,
    free_port,
    tcp_ready,
)
from promptopt_dagster_tests.support.vertex_server import VertexServer

MODULE = "promptopt_dagster_tests.support.vertex_process"
START_TIMEOUT_S = 30.0


class VertexServerProcess(ServerHandle):
    """`VertexServer` with the echo responder in a child process (support/server_process.py),
    ready once its port accepts connections, stopped by its pid."""

    _server: ServerProcess

    def __init__(self, latency_ms: float = 0.0, port: int | None = None) -> None:
        self.latency_ms = latency_ms
        self.port = port or free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self._server = ServerProcess("fake-vertex-server")

    def start(self) -> VertexServerProcess:
        cmd = [sys.executable, "-m", MODULE, "--port", str(self.port), "--latency-ms", str(self.latency_ms)]
        self._server.start(cmd, ready=tcp_ready(self.port), timeout=START_TIMEOUT_S)
        return self


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Vertex AI REST server (echo responder) on 127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    with VertexServer(latency=args.latency_ms / 1000.0, port=args.port):
        stopped.wait()


if __name__ == "__main__":
    main()
