"""A real HTTP server on 127.0.0.1 for the download tests: real images and fault endpoints.

Images are made with Pillow (JPEG, PNG, GIF, animated GIF, WebP) or are the upstream sample
photos. Fault endpoints: HTTP errors, 500-then-200, 429 with Retry-After, a body that drips,
a stalled body, a truncated JPEG, HTML served as image/jpeg, zero bytes, a PNG declaring huge
dimensions, a redirect loop, redirects to any location, an opt-out header, an oversized body.
Every request is counted per path, so tests can check retries and that a rerun fetches nothing.
"""
import collections
import http.server
import io
import struct
import threading
import time
import urllib.parse
import zlib

from PIL import Image


def _encode(image, fmt, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def _gradient(width, height, mode="RGB"):
    image = Image.new(mode, (width, height))
    image.putdata([((x * 255) // width, (y * 255) // height, 128)
                   for y in range(height) for x in range(width)])
    return image


def huge_png(width=40000, height=40000) -> bytes:
    """A valid small PNG whose header declares ``width`` x ``height`` (a decompression bomb)."""
    data = bytearray(_encode(Image.new("RGB", (8, 8)), "PNG"))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def make_images(sample_photos=()) -> dict:
    """name -> (bytes, content type, (format, width, height, animated))."""
    base = _gradient(64, 48)
    frames = [Image.new("RGB", (32, 32), (i * 90, 40, 200 - i * 60)) for i in range(3)]
    gif_anim = io.BytesIO()
    frames[0].save(gif_anim, "GIF", save_all=True, append_images=frames[1:], duration=50)
    jpeg = _encode(base, "JPEG", quality=90)
    images = {
        "a.jpg": (jpeg, "image/jpeg", ("JPEG", 64, 48, False)),
        "a-copy.jpg": (jpeg, "image/jpeg", ("JPEG", 64, 48, False)),  # same bytes, other URL
        "b.png": (_encode(_gradient(40, 30), "PNG"), "image/png", ("PNG", 40, 30, False)),
        "c.gif": (_encode(base.convert("P"), "GIF"), "image/gif", ("GIF", 64, 48, False)),
        "anim.gif": (gif_anim.getvalue(), "image/gif", ("GIF", 32, 32, True)),
        "d.webp": (_encode(base, "WEBP"), "image/webp", ("WEBP", 64, 48, False)),
        # Real format differs from the name and the declared type.
        "webp-as.jpg": (_encode(_gradient(50, 20), "WEBP"), "image/jpeg", ("WEBP", 50, 20, False)),
        "png-as.jpg": (_encode(_gradient(20, 50), "PNG"), "image/jpeg", ("PNG", 20, 50, False)),
    }
    for i, path in enumerate(sample_photos):
        with open(path, "rb") as handle:
            body = handle.read()
        with Image.open(io.BytesIO(body)) as photo:
            images[f"photo{i}.jpg"] = (body, "image/jpeg", (photo.format, *photo.size, False))
    return images


class ImageServer:
    """Threaded HTTP/1.1 server on 127.0.0.1 (a free port); use as a context manager."""

    def __init__(self, sample_photos=(), latency: float = 0.0):
        self.images = make_images(sample_photos)
        self.latency = latency
        self.hits = collections.Counter()
        whole = _encode(_gradient(256, 192), "JPEG", quality=95)
        self.truncated = whole[: len(whole) * 2 // 3]  # headers intact, scan data cut
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"server_state": self})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def count(self, path: str) -> int:
        with self._lock:
            return self.hits[path]

    def hit(self, path: str) -> int:
        with self._lock:
            self.hits[path] += 1
            return self.hits[path]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: ImageServer = None

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code, body=b"", content_type="image/jpeg", headers=None):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (the http.server API)
        state = self.server_state
        parts = urllib.parse.urlsplit(self.path)
        path, query = parts.path, dict(urllib.parse.parse_qsl(parts.query))
        count = state.hit(path)
        if state.latency:
            time.sleep(state.latency)
        name = path.rsplit("/", 1)[-1]
        if path.startswith("/img/") and name in state.images:
            body, content_type, _ = state.images[name]
            return self._send(200, body, content_type)
        route = FAULTS.get(path.split("/")[1] if path.count("/") > 1 else path.lstrip("/"))
        if route is None:
            return self._send(404, b"not found", "text/plain")
        return route(self, state, name, query, count)


def _status(handler, state, name, query, count):
    handler._send(int(name), b"<html>error</html>", "text/html")


def _flaky(handler, state, name, query, count):
    """500 for the first ``fail`` requests (default 1), then the JPEG."""
    if count <= int(query.get("fail", 1)):
        return handler._send(500, b"try again", "text/plain")
    handler._send(200, state.images["a.jpg"][0])


def _ratelimit(handler, state, name, query, count):
    if count <= int(query.get("fail", 1)):
        return handler._send(429, b"slow down", "text/plain",
                             {"Retry-After": query.get("after", "1")})
    handler._send(200, state.images["b.png"][0], "image/png")


def _drip(handler, state, name, query, count):
    """Declares a full JPEG, then sends one byte every ``every`` seconds."""
    body = state.images["a.jpg"][0]
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    try:
        for i in range(len(body)):
            handler.wfile.write(body[i:i + 1])
            handler.wfile.flush()
            time.sleep(float(query.get("every", 0.05)))
    except OSError:  # the client gave up, as it should
        pass


def _stall(handler, state, name, query, count):
    """Headers, then silence for ``seconds``."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    handler.wfile.flush()
    time.sleep(float(query.get("seconds", 5)))


def _reset(handler, state, name, query, count):
    """Closes the connection without an answer the first time, then serves the JPEG."""
    if count <= int(query.get("fail", 1)):
        handler.close_connection = True
        handler.connection.shutdown(2)
        return None
    handler._send(200, state.images["a.jpg"][0])


def _fixed(body_of, content_type="image/jpeg", headers=None):
    def route(handler, state, name, query, count):
        handler._send(200, body_of(state), content_type, headers)
    return route


def _redirect_loop(handler, state, name, query, count):
    target = "/loop/b" if name == "a" else "/loop/a"
    handler._send(302, b"", "text/plain", {"Location": target})


def _redirect(handler, state, name, query, count):
    """302 to ``to`` (any URL), or through ``hops`` redirects to the JPEG."""
    hops = int(query.get("hops", 0))
    if "to" in query:
        location = query["to"]
    elif hops > 0:
        location = f"/redirect/x?hops={hops - 1}"
    else:
        location = "/img/a.jpg"
    handler._send(302, b"", "text/plain", {"Location": location})


FAULTS = {
    "status": _status,
    "flaky": _flaky,
    "ratelimit": _ratelimit,
    "drip": _drip,
    "stall": _stall,
    "reset": _reset,
    "truncated.jpg": _fixed(lambda s: s.truncated),
    "html.jpg": _fixed(lambda s: b"<!DOCTYPE html><html><body>Not found</body></html>"),
    "empty.jpg": _fixed(lambda s: b""),
    "bomb.png": _fixed(lambda s: huge_png(), "image/png"),
    "optout.jpg": _fixed(lambda s: s.images["a.jpg"][0], headers={"X-Robots-Tag": "noai"}),
    "other-bot.jpg": _fixed(lambda s: s.images["a.jpg"][0],
                            headers={"X-Robots-Tag": "otherbot: noai"}),
    "big.jpg": _fixed(lambda s: s.images["a.jpg"][0] + b"\0" * 300_000),
    "loop": _redirect_loop,
    "redirect": _redirect,
}
