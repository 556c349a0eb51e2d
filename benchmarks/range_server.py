"""A static file server with HTTP Range requests, in its own process, for the streaming benchmarks.

    python benchmarks/range_server.py ROOT [FAILURES]   # prints the port it listens on (127.0.0.1), then serves ROOT

FAILURES (JSON): {"GET name" or "HEAD name": what the file's next requests of that method get instead, one each}:
a status (503, or [503, "Retry-After value"]), or "drop" (half the body, then the connection closed).
On exit (SIGTERM) it prints the body bytes it sent as JSON, by the first folder of their paths ({"own": 48512000,
...}: one server tells its clients apart by the folder, a link to the same files, each reads through)."""

from __future__ import annotations

import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RangeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # (as nginx's tcp_nodelay: a body written after its headers goes out at once)
    sent: dict[str, int] = {}

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        failure = (self.server.failures.get(f"{self.command} {self.path.lstrip('/')}") or [None]).pop(0)
        if isinstance(failure, int | list):
            status, retry_after = failure if isinstance(failure, list) else (failure, None)
            self.send_response(status)
            if retry_after is not None:
                self.send_header("Retry-After", retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = os.path.join(self.server.root, self.path.lstrip("/"))
        if not os.path.isfile(path):
            self.send_error(404)
            return
        size = os.path.getsize(path)
        first, last = 0, size - 1
        ranged = self.headers.get("Range")
        if ranged:
            start, _, end = ranged.removeprefix("bytes=").partition("-")
            first, last = int(start), min(int(end) if end else size - 1, size - 1)
            if first >= size:
                self.send_error(416)
                return
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        if ranged:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        if body:
            with open(path, "rb") as handle:
                handle.seek(first)
                data = handle.read(last - first + 1)
            if failure == "drop":
                data, self.close_connection = data[: len(data) // 2], True
            folder = self.path.lstrip("/").split("/", 1)[0]
            RangeHandler.sent[folder] = RangeHandler.sent.get(folder, 0) + len(data)
            self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


class RangeServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # (a client that closed a part-read window)
            super().handle_error(request, client_address)


def main() -> None:
    server = RangeServer(("127.0.0.1", 0), RangeHandler)
    server.root = sys.argv[1]
    server.failures = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}

    def stop(*_) -> None:
        print(json.dumps(RangeHandler.sent), flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
