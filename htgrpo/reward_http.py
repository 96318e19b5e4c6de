"""The hardened HTTP layer of the reward servers: standard library only.

Shared by ``htgrpo.serve`` and ``experiments/reward_servers/external_scorer.py``; the external scorer runs in a
foreign environment (no torch, no Hydra, no htgrpo install), so it loads this file by path and nothing here may import
more than the standard library.

What a request meets, in order, before any scoring (each refusal is an HTTP 4xx/5xx with ``{"error": REASON}``):

1. **Connection slots** (:class:`BoundedHTTPServer`): a fixed pool of ``workers`` threads handles connections; at
   most ``workers + max_pending`` are accepted at once, and the next one gets ``503`` at once (``Retry-After: 1``).
2. **Deadline** (:class:`GuardedHandler`): the request line, headers and body must all arrive within ``timeout_s``
   of the connection being accepted (of the previous answer, for the next request on a keep-alive connection); a
   slow sender (slowloris), a connection queued too long behind slow ones, or an idle keep-alive connection is closed
   then (``408`` when the body was being read).
3. **Method** (405 for anything but GET/POST), **path** (404 for anything but the endpoints: no file is ever
   served, so ``/../`` goes nowhere), **authorisation** (401; ``hmac.compare_digest`` on the whole header), all
   checked before a single body byte is read; a refused connection is closed without reading its body.
4. **Body framing**: ``Transfer-Encoding`` (chunked) is refused (411), ``Content-Length`` is required (411), must
   be an integer >= 0 (400) and at most ``max_body_bytes`` (413), ``Content-Type`` must be ``application/json``
   (415); ``Expect: 100-continue`` is answered only after these checks.
5. **Memory budget for bodies** (:class:`ByteBudget`): the bodies read at once hold at most ``max_inflight_bytes``;
   a request that does not fit within ``timeout_s`` gets 503.
6. **JSON**: any malformed body, including one nested past the parser's recursion limit, is 400
   (:func:`parse_json_body`).
7. **Images** (:func:`check_png_batch`): at most ``max_images`` strings, each a PNG whose header (IHDR, read from
   the first 33 bytes) claims at most ``max_pixels`` pixels, together at most ``max_request_pixels``, all before any
   image is decoded (400 for count/format, 413 for pixels).

The caller then decodes under a semaphore of ``decode_concurrency`` slots (:attr:`GuardedHandler.guard`), so the
decoded pixels held at once are at most ``decode_concurrency × max_request_pixels``.

Memory bound of a server (what the probes in ``experiments/benchmarks/reward_server_probes.py`` measure)::

    RSS <= idle RSS + ~3 × max_inflight_bytes (raw body, parsed strings, PNG bytes)
                    + decode_concurrency × max_request_pixels × ~7 B (uint8 RGB array, tensor copy, reward's own)
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import logging
import os
import socket
import stat
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

log = logging.getLogger("htgrpo.reward_http")

#: environment variable holding the bearer token (server and client), so it never appears in a config file.
TOKEN_ENV = "HTGRPO_REWARD_TOKEN"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: bytes of a PNG that hold the signature and the whole IHDR chunk up to the interlace byte.
PNG_HEADER_BYTES = 33


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with ``message`` as ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = int(status), str(message)


class TokenError(ValueError):
    """The token file is missing, unreadable or empty."""


# ---- token --------------------------------------------------------------------------------------------------------
def load_token(token_file: str | os.PathLike | None, env: str = TOKEN_ENV) -> str | None:
    """The bearer token: the stripped contents of ``token_file`` when given, else ``$env``; None when neither is set.

    The token is never a config value, so Hydra never writes it into ``.hydra/*.yaml`` and no logger sees it. A token
    file readable by group or others is used but warned about. Raises :class:`TokenError` for a missing, unreadable
    or empty file.
    """
    if token_file:
        path = os.fspath(token_file)
        try:
            mode = os.stat(path).st_mode
            with open(path, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as err:
            raise TokenError(f"cannot read the token file {path!r}: {err.strerror or err}") from None
        if not token:
            raise TokenError(f"the token file {path!r} is empty")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("token file %s is readable by group/others; chmod 600 it", path)
        return token
    return os.environ.get(env) or None


def authorised(header: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header value carries ``Bearer <token>`` (always True without a token).

    Constant-time in the header's content (``hmac.compare_digest`` on the whole value), so the time taken does not
    tell how many leading characters of a guess were right.
    """
    if token is None:
        return True
    given = (header or "").encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, f"Bearer {token}".encode())


# ---- JSON and PNG checks ------------------------------------------------------------------------------------------
def parse_json_body(raw: bytes) -> Any:
    """``json.loads`` where every failure is :class:`RequestError` 400: bad syntax, bad encoding, integers past
    Python's digit limit, and nesting past the recursion limit (``[[[[...`` 100,000 deep raises RecursionError)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise RequestError(400, "JSON nested too deeply") from None
    except (ValueError, TypeError) as err:  # JSONDecodeError, UnicodeDecodeError and the int-digits limit
        raise RequestError(400, f"body is not valid JSON: {err}"[:300]) from None


@dataclass(frozen=True)
class PngHeader:
    """What a PNG's IHDR chunk claims (the decoder allocates by it)."""

    width: int
    height: int
    bit_depth: int
    colour_type: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def png_header(data: bytes, what: str = "image") -> PngHeader:
    """Parse the signature and IHDR of a PNG's first 33 bytes. Raises :class:`RequestError` 400 if it is no PNG.

    Layout: 8-byte signature, then the IHDR chunk: length (4, = 13), type ``IHDR``, width (4, big-endian),
    height (4), bit depth, colour type, compression, filter, interlace (1 byte each).
    """
    if len(data) < PNG_HEADER_BYTES or data[:8] != PNG_SIGNATURE:
        raise RequestError(400, f"{what}: not a PNG file (only PNG is accepted)")
    length, kind, width, height, depth, colour = struct.unpack(">I4sIIBB", data[8:26])
    if kind != b"IHDR" or length != 13:
        raise RequestError(400, f"{what}: PNG without a valid IHDR chunk")
    if width == 0 or height == 0:
        raise RequestError(400, f"{what}: PNG claims {width}x{height} pixels")
    return PngHeader(width, height, depth, colour)


def b64_png_header(text: Any, what: str) -> PngHeader:
    """The :class:`PngHeader` of a base64 PNG, decoding only its first 44 characters (33 bytes)."""
    if not isinstance(text, str):
        raise RequestError(400, f"{what}: expected a base64 string, got {type(text).__name__}")
    chars = 4 * ((PNG_HEADER_BYTES + 2) // 3)
    try:
        head = base64.b64decode(text[:chars], validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, f"{what}: not a base64 PNG ({err})") from None
    return png_header(head, what)


@dataclass(frozen=True)
class ImageLimits:
    """What one ``POST /score`` may carry (``serve.max_images``, ``serve.max_pixels``, ``serve.max_request_pixels``)."""

    max_images: int = 256
    max_pixels: int = 2048 * 2048
    max_request_pixels: int = 64 * 1024 * 1024

    def as_json(self) -> dict[str, int]:
        return {"max_images": self.max_images, "max_pixels": self.max_pixels,
                "max_request_pixels": self.max_request_pixels}


def check_png_batch(images: Any, limits: ImageLimits) -> list[PngHeader]:
    """Check a request's ``images`` from their PNG headers alone, before anything is decoded.

    400: not a non-empty list, more than ``max_images`` entries, an entry that is not a base64 PNG;
    413: an image over ``max_pixels`` or a request over ``max_request_pixels`` (as the headers claim them).
    """
    if not isinstance(images, list) or not images:
        raise RequestError(400, "images must be a non-empty list of base64 PNG strings")
    if len(images) > limits.max_images:
        raise RequestError(400, f"{len(images)} images in one request; this server takes at most {limits.max_images}"
                                " (serve.max_images)")
    headers, total = [], 0
    for i, text in enumerate(images):
        h = b64_png_header(text, f"images[{i}]")
        if h.pixels > limits.max_pixels:
            raise RequestError(413, f"images[{i}]: {h.width}x{h.height} = {h.pixels} pixels exceeds serve.max_pixels"
                                    f" = {limits.max_pixels}")
        total += h.pixels
        if total > limits.max_request_pixels:
            raise RequestError(413, f"images[0..{i}] hold {total} pixels, over serve.max_request_pixels = "
                                    f"{limits.max_request_pixels}; send fewer images per request (reward.batch_size)")
        headers.append(h)
    return headers


# ---- server -------------------------------------------------------------------------------------------------------
class ByteBudget:
    """A counting semaphore over bytes: ``reserve(n, timeout)`` waits until ``n`` more bytes fit under ``capacity``.

    A single request larger than the capacity is refused by the body cap before it gets here.
    """

    def __init__(self, capacity: int):
        self.capacity, self.used = int(capacity), 0
        self._cond = threading.Condition()

    def reserve(self, n: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.used + n <= self.capacity, timeout) and self._take(n)

    def _take(self, n: int) -> bool:
        self.used += n
        return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


@dataclass
class ServerGuard:
    """The settings and shared state every handler of one server checks against.

    Args:
        token: bearer token, or None (no authorisation).
        timeout_s: the request line, headers and body must arrive within this many seconds (slowloris closes).
        max_body_bytes: largest ``Content-Length`` accepted.
        max_inflight_bytes: most body bytes held by all requests at once.
        decode_concurrency: requests decoding / scoring images at once.
        limits: images per request and pixels.
    """

    token: str | None = None
    timeout_s: float = 30.0
    max_body_bytes: int = 320 * 2**20
    max_inflight_bytes: int = 1024 * 2**20
    decode_concurrency: int = 2
    limits: ImageLimits = ImageLimits()

    def __post_init__(self) -> None:
        self.body_budget = ByteBudget(max(self.max_inflight_bytes, self.max_body_bytes))
        self.decode_slots = threading.BoundedSemaphore(int(self.decode_concurrency))


class _DeadlineReader(io.RawIOBase):
    """The connection's read side, failing with ``TimeoutError`` once the handler's current deadline has passed.

    A plain socket timeout bounds each ``recv`` only, so a client sending one byte every few seconds would keep a
    worker forever; this bounds the whole request.
    """

    def __init__(self, sock: socket.socket, handler: "GuardedHandler"):
        super().__init__()
        self._sock, self._handler = sock, handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._handler.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"request not complete within {self._handler.guard.timeout_s} s")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class GuardedHandler(BaseHTTPRequestHandler):
    """Base handler: deadline per request, 405 for unknown methods, JSON answers, and the pre-body checks.

    Subclasses set ``guard`` (a :class:`ServerGuard`) and implement ``do_GET`` / ``do_POST`` with
    :meth:`allowed` and :meth:`read_json_body`.
    """

    protocol_version = "HTTP/1.1"  # keep-alive: a client may send several requests on one connection
    server_version = "htgrpo-reward"
    sys_version = ""
    guard: ServerGuard
    deadline = 0.0

    def setup(self) -> None:
        self.timeout = self.guard.timeout_s  # socket timeout of each write (StreamRequestHandler.setup applies it)
        super().setup()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self), 65536)
        # The first request's clock starts when the connection was accepted, not when a worker took it: connections
        # that queued behind slow ones (slowloris filling every worker) are closed at once once their time is up.
        accepted = getattr(self.server, "accepted_at", None)
        self._clock_start: float | None = accepted(self.connection) if accepted else None

    def handle_one_request(self) -> None:
        start, self._clock_start = self._clock_start or time.monotonic(), None
        self.deadline = start + self.guard.timeout_s
        super().handle_one_request()  # a TimeoutError anywhere in it closes the connection

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # any method without a do_ handler: 405 (http.server would answer 501)
            return self._method_not_allowed
        raise AttributeError(name)

    def _method_not_allowed(self) -> None:
        self.send_json(405, {"error": f"method {self.command} not allowed; use GET /health or POST /score"},
                       close=True, extra={"Allow": "GET, POST"})

    def log_message(self, fmt: str, *args: Any) -> None:  # through logging, not stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    def send_json(self, code: int, payload: dict[str, Any], close: bool = False,
                  extra: dict[str, str] | None = None) -> None:
        """Answer ``code`` with ``payload``; ``close`` also ends the connection (needed when the body was not read)."""
        data = json.dumps(payload).encode("utf-8")
        self.connection.settimeout(self.guard.timeout_s)  # the last read may have left a near-zero timeout
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def handle_expect_100(self) -> bool:
        """Hold ``Expect: 100-continue`` until the path, token and length are checked (see :meth:`read_json_body`)."""
        return True

    def has_body(self) -> bool:
        """Whether the request announces a body (a GET with one is answered, then its connection closed)."""
        return bool(self.headers.get("Transfer-Encoding")) or (self.headers.get("Content-Length") or "0").strip() != "0"

    def allowed(self, path: str) -> bool:
        """404 unless the request is for ``path`` exactly (a trailing ``/`` allowed), then 401 unless authorised.

        Answers and closes the connection (its body unread) when not allowed.
        """
        if self.path.split("?", 1)[0].rstrip("/") != path or "?" in self.path:
            self.send_json(404, {"error": "unknown path; use GET /health or POST /score"}, close=True)
            return False
        if not authorised(self.headers.get("Authorization"), self.guard.token):
            self.send_json(401, {"error": "missing or wrong bearer token (header Authorization: Bearer TOKEN)"},
                           close=True, extra={"WWW-Authenticate": "Bearer"})
            return False
        return True

    def read_json_body(self) -> tuple[Any, int] | None:
        """Check the framing headers, read the body within the deadline, parse it as JSON.

        Returns ``(value, reserved_bytes)`` (the caller releases ``reserved_bytes`` from the body budget when done
        with the request) or None after answering an error.
        """
        g = self.guard
        if self.headers.get("Transfer-Encoding"):
            self.send_json(411, {"error": "Transfer-Encoding (chunked) bodies are not accepted; send Content-Length"},
                           close=True)
            return None
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.send_json(411, {"error": "a Content-Length header is required"}, close=True)
            return None
        try:
            length = int(length_header.strip())
        except ValueError:
            length = -1
        if length < 0 or not length_header.strip().isdigit():
            self.send_json(400, {"error": f"bad Content-Length {length_header[:40]!r}"}, close=True)
            return None
        if length > g.max_body_bytes:
            self.send_json(413, {"error": f"body of {length} bytes exceeds the server's {g.max_body_bytes} "
                                          "(serve.max_body_mb); send fewer images per request (reward.batch_size)"},
                           close=True)
            return None
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            self.send_json(415, {"error": f"Content-Type must be application/json, got {content_type or 'none'!r}"},
                           close=True)
            return None
        if not g.body_budget.reserve(length, max(self.deadline - time.monotonic(), 0.0)):
            self.send_json(503, {"error": "server busy (body memory budget serve.max_inflight_mb in use); retry"},
                           close=True, extra={"Retry-After": "1"})
            return None
        try:
            if self.headers.get("Expect", "").lower() == "100-continue":
                self.send_response_only(100)
                self.end_headers()
            try:
                raw = self.rfile.read(length)
            except TimeoutError:
                self.send_json(408, {"error": f"body not received within {g.timeout_s} s (serve.timeout_s)"},
                               close=True)
                raise
            if len(raw) != length:  # the client closed early
                self.close_connection = True
                raise ConnectionAbortedError("body shorter than Content-Length")
            value = parse_json_body(raw)
        except RequestError as err:
            g.body_budget.release(length)
            self.send_json(err.status, {"error": err.message})
            return None
        except BaseException:
            g.body_budget.release(length)
            raise
        return value, length


class BoundedHTTPServer(HTTPServer):
    """An :class:`HTTPServer` whose connections are handled by ``workers`` pooled threads.

    At most ``workers + max_pending`` connections are held at once (handled or queued for a worker); one more gets
    ``503`` and is closed at once by the accepting thread, so neither threads nor queued sockets grow without bound
    (``ThreadingHTTPServer`` starts one thread per connection, however many).
    """

    request_queue_size = 128  # kernel accept backlog
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, workers: int = 32, max_pending: int = 64):
        super().__init__(address, handler)
        self.workers, self.max_pending = int(workers), int(max_pending)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="reward-http")
        self._slots = threading.BoundedSemaphore(self.workers + self.max_pending)
        self._accepted: dict[int, float] = {}  # id(socket) -> monotonic time it was accepted
        self.refused_connections = 0

    def accepted_at(self, request: Any) -> float | None:
        """When ``request`` (a connection) was accepted (once: the entry is removed)."""
        return self._accepted.pop(id(request), None)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused_connections += 1
            self._refuse(request)
            return
        self._accepted[id(request)] = time.monotonic()
        try:
            self._pool.submit(self._work, request, client_address)
        except RuntimeError:  # the pool is shut down: the server is stopping
            self._accepted.pop(id(request), None)
            self._slots.release()
            self.shutdown_request(request)

    def _work(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - one connection's failure never stops the server
            self.handle_error(request, client_address)
        finally:
            self._accepted.pop(id(request), None)
            self.shutdown_request(request)
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        body = b'{"error": "server busy (serve.workers + serve.max_pending connections); retry"}'
        try:
            request.settimeout(0.5)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        err = sys.exc_info()[1]
        # A client that hangs up mid-request is routine; anything else is worth a warning (never a crash).
        level = logging.DEBUG if isinstance(err, (ConnectionError, TimeoutError)) else logging.WARNING
        log.log(level, "connection from %s failed: %s: %s", client_address, type(err).__name__, err)

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["BoundedHTTPServer", "ByteBudget", "GuardedHandler", "ImageLimits", "PngHeader", "RequestError",
           "ServerGuard", "TOKEN_ENV", "TokenError", "authorised", "b64_png_header", "check_png_batch", "load_token",
           "parse_json_body", "png_header"]
