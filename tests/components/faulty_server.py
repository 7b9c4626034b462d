"""A loopback HTTP server that serves good images and the faults a real crawl meets.

Routes (every good image under `/good/<name>`; `FAULTS` lists the bad ones with the reason code
the download stage must give them):
- `/dup/<name>`: the same bytes as `/good/<name>` under another URL (kept once by the filter)
- `/redirect/<name>`: 302 to `/good/<name>`
- `/flaky/<name>`: 429 with Retry-After: 1 on the first request, then the image
- `/slow/<seconds>/<name>`: waits before answering (a delay below the timeout still arrives)
"""

from __future__ import annotations

import io
import re
import struct
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

# path -> reason code the download stage must report
FAULTS = {
    "/missing.png": "http_404",
    "/error.png": "http_500",
    "/rate-limited.png": "http_429",
    "/hang.png": "timeout",
    "/loop.png": "redirect_loop",
    "/to-file.png": "redirect_scheme",
    "/truncated.jpg": "truncated_image",
    "/corrupt.png": "corrupt_image",
    "/page.jpg": "not_an_image",
    "/bomb.png": "decompression_bomb",
    "/huge.png": "too_large",
    "/noai.png": "disallowed_by_robots",
    "/short-body.png": "truncated_response",
}
HANG_SECONDS = 4.0  # longer than the tests' timeout
MAX_BYTES = 200_000  # the byte cap the tests configure: /huge.png is above it, the bomb below


def bomb_png(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: a few kB on the wire, 400 M pixels decoded."""
    row = b"\x00" + bytes((side + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def fault_bodies() -> dict[str, tuple[bytes, str]]:
    """Bodies and content types of the routes that serve bytes."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    jpeg = _encoded(photo, "JPEG")
    png = bytearray(_encoded(photo, "PNG"))
    png[len(png) // 2 : len(png) // 2 + 16] = bytes(16)  # damaged IDAT: its CRC no longer matches
    noise = Image.fromarray(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8))
    return {
        "/truncated.jpg": (jpeg[: len(jpeg) // 2], "image/jpeg"),
        "/corrupt.png": (bytes(png), "image/png"),
        "/page.jpg": (b"<!doctype html><html><body>Not found</body></html>", "image/jpeg"),
        "/bomb.png": (bomb_png(), "image/png"),
        "/huge.png": (_encoded(noise, "PNG"), "image/png"),
    }


class FaultyServer:
    """Serves `images_dir` under /good/ plus the fault routes, on 127.0.0.1, in a daemon thread."""

    def __init__(self, images_dir: Path) -> None:
        self.images_dir = images_dir
        self.bodies = fault_bodies()
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _count(self, path: str) -> int:
        with self._lock:
            self.requests[path] += 1
            return self.requests[path]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def send(self, status: int, body: bytes = b"", content_type: str = "image/png",
                     headers: dict[str, str] | None = None, length: int | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeouts, caps)
                    pass

            def image(self, name: str, headers: dict[str, str] | None = None) -> None:
                path = server.images_dir / name
                if "/" in name or not path.is_file():
                    self.send(404, b"no such image", "text/plain")
                else:
                    self.send(200, path.read_bytes(), headers=headers)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path
                count = server._count(path)
                if match := re.fullmatch(r"/(good|dup)/(.+)", path):
                    return self.image(match.group(2))
                if match := re.fullmatch(r"/redirect/(.+)", path):
                    return self.send(302, headers={"Location": f"/good/{match.group(1)}"})
                if match := re.fullmatch(r"/flaky/(.+)", path):
                    if count == 1:
                        return self.send(429, b"slow down", "text/plain", {"Retry-After": "1"})
                    return self.image(match.group(1))
                if match := re.fullmatch(r"/slow/([0-9.]+)/(.+)", path):
                    time.sleep(float(match.group(1)))
                    return self.image(match.group(2))
                if path in self.server_bodies():
                    body, content_type = server.bodies[path]
                    return self.send(200, body, content_type)
                if path == "/error.png":
                    return self.send(500, b"boom", "text/plain")
                if path == "/rate-limited.png":
                    return self.send(429, b"come back tomorrow", "text/plain", {"Retry-After": "86400"})
                if path == "/hang.png":
                    time.sleep(HANG_SECONDS)
                    return self.send(503, b"too late", "text/plain")
                if path == "/loop.png":
                    return self.send(302, headers={"Location": "/loop.png"})
                if path == "/to-file.png":
                    return self.send(302, headers={"Location": "file:///etc/passwd"})
                if path == "/noai.png":
                    return self.image(sorted(p.name for p in server.images_dir.iterdir())[0],
                                      headers={"X-Robots-Tag": "noai"})
                if path == "/short-body.png":
                    return self.send(200, b"\x89PNG\r\n", length=5000)  # then the connection closes
                return self.send(404, b"not here", "text/plain")

            def server_bodies(self) -> dict[str, tuple[bytes, str]]:
                return server.bodies

        return Handler
