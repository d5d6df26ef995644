"""A null OTLP/HTTP collector for the tracing benchmark: its own process, 200 to every POST.

    .venv/bin/python -m bench.otlp_sink      # prints its port, serves until stdin closes

It reads each request whole (so the exporter really sends every batch) and counts requests
and bytes (`GET /stats`); it decodes nothing, so it costs the machine as little as possible.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_counts = {"requests": 0, "bytes": 0}
_lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        size = int(self.headers.get("content-length") or 0)
        self.rfile.read(size)
        with _lock:
            _counts["requests"] += 1
            _counts["bytes"] += size
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        with _lock:
            body = json.dumps(_counts).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.shutdown()


if __name__ == "__main__":
    main()
