"""What keeps a server safe by default: Host / Origin checks, the API key, body and concurrency limits.

* **Host** must name an allowed host (loopback by default): a page on another site that rebinds its DNS name
  to 127.0.0.1 sends its own name as Host, and is refused (400).
* **Origin**, when a browser sends one, must be an allowed host too (403): another site's page cannot drive a
  keyless loopback server from a visitor's browser.
* **API key**, when set (the `serve` command requires one off loopback): "Authorization: Bearer KEY" on every
  route but the page and its assets (401), compared in constant time.
* **Body** at most `max_body_bytes` (413), read before the app sees it, Content-Length or not; on the routes
  that take images (`image_paths`: /v1/chat/completions when a served model has a vision tower) at most
  `max_image_body_bytes`, since a data URL image is base64 (a 1 MB photo is a 1.4 MB body).
* **Concurrency**: at most `max_concurrent` generations queued or decoding (429); a request's share is given
  back as each of its generations finishes, is cancelled, or fails.
"""

from __future__ import annotations

import hmac
import json
import threading
from typing import Optional
from urllib.parse import urlsplit


class ApiError(Exception):
    """An HTTP error with a message naming the problem (and the field, when there is one)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def host_name(value: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '[::1]', 'Example.com' -> 'example.com'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[:value.find("]") + 1]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    def __init__(self, options, image_paths: tuple[str, ...] = ()):
        self.options = options
        self.image_paths = frozenset(image_paths)
        self.allowed = {host_name(h) for h in options.allowed_hosts}
        self._lock = threading.Lock()
        self.in_flight = 0

    # ------------------------------------------------------------------ concurrency
    def reserve(self, n: int) -> None:
        with self._lock:
            if self.in_flight + n > self.options.max_concurrent:
                raise ApiError(429, f"too many requests in flight ({self.in_flight} of "
                                    f"{self.options.max_concurrent}); retry later")
            self.in_flight += n

    def release(self, n: int = 1) -> None:
        with self._lock:
            self.in_flight = max(0, self.in_flight - n)

    def body_limit(self, path: str) -> int:
        """The largest body a route takes: larger where images may come (data URLs)."""
        if path in self.image_paths:
            return max(self.options.max_body_bytes, getattr(self.options, "max_image_body_bytes", 0))
        return self.options.max_body_bytes

    # ------------------------------------------------------------------ HTTP checks
    def refusal(self, scope) -> Optional[tuple[int, str]]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if host_name(host) not in self.allowed:
            return 400, (f"Host header {host!r} is not allowed (DNS-rebinding protection); allowed: "
                         f"{sorted(self.allowed)} (serve --allowed-host NAME)")
        origin = headers.get("origin")
        if origin is not None and (origin == "null" or host_name(urlsplit(origin).netloc) not in self.allowed):
            return 403, f"Origin {origin!r} is not allowed: this server only answers pages it serves itself"
        path = scope.get("path", "")
        if self.options.api_key and not (path == "/" or path.startswith("/static/")):
            auth = headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.options.api_key.encode()):
                return 401, "missing or wrong API key: send 'Authorization: Bearer KEY'"
        length, limit = headers.get("content-length"), self.body_limit(path)
        if length is not None and (not length.isdigit() or int(length) > limit):
            return 413, f"request body over {limit} bytes"
        return None

    def middleware(self):
        guard = self

        class GuardMiddleware:
            def __init__(self, app):
                self.app = app

            async def __call__(self, scope, receive, send):
                if scope["type"] != "http":
                    return await self.app(scope, receive, send)
                refused = guard.refusal(scope)
                if refused is None and scope["method"] in ("POST", "PUT", "PATCH"):
                    body, more = [], True
                    size, limit = 0, guard.body_limit(scope.get("path", ""))
                    while more:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            return
                        chunk = message.get("body", b"")
                        size += len(chunk)
                        if size > limit:
                            refused = 413, f"request body over {limit} bytes"
                            break
                        body.append(chunk)
                        more = message.get("more_body", False)
                    if refused is None:
                        receive = _replay(b"".join(body), receive)
                if refused is not None:
                    status, message = refused
                    return await _send_error(send, status, message)
                return await self.app(scope, receive, send)

        return GuardMiddleware


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later: the client's disconnect

    return replay


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "request_too_large", 422: "invalid_request_error",
               429: "rate_limit_error"}  # OpenAI's error "type" per status; the app and the guard share it


def error_body(status: int, message: str, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": None}}


async def _send_error(send, status: int, message: str) -> None:
    payload = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
