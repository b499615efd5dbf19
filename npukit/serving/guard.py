"""`Guard`: the checks every HTTP request passes before a handler runs (a pure ASGI middleware).

- `Host` must be one the server answers to (default: loopback names). A web page the user opens cannot
  reach 127.0.0.1 through DNS rebinding, since its requests carry the attacker's host name.
- the API key (when set) on every route but /health and /version, compared in constant time.
- POST bodies must be `application/json` (415 otherwise): a cross-site form or `text/plain` fetch needs
  no CORS preflight, a JSON one does, and CORS is off unless `--allowed-origins` is given.
- bodies over `max_body_bytes` are refused with 413: by Content-Length before any byte is read, and
  while reading for chunked bodies.

NOTE: pure ASGI, not Starlette's BaseHTTPMiddleware: that one wraps streaming responses and gets in the
way of client-disconnect detection.
"""
import secrets

from .protocol import OpenAIError

DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
OPEN_PATHS = ("/health", "/version")


def _host_name(value: str) -> str:
    if value.startswith("["):  # [::1]:8000
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    def __init__(self, app, api_key: str | None = None, allowed_hosts=DEFAULT_ALLOWED_HOSTS,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.key = f"Bearer {api_key}".encode() if api_key is not None else None
        hosts = list(allowed_hosts or ["*"])
        self.allowed_hosts = None if "*" in hosts else {h.lower().strip("[]") for h in hosts}

    def _check(self, scope) -> OpenAIError | None:
        headers = dict(scope["headers"])
        if self.allowed_hosts is not None:
            host = _host_name(headers.get(b"host", b"").decode("latin-1")).lower()
            if host not in self.allowed_hosts:
                return OpenAIError(f"Host {host!r} is not allowed; start the server with --allowed-hosts "
                                   f"{host or 'NAME'} (or '*') to serve it.", 400)
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            if not secrets.compare_digest(headers.get(b"authorization", b""), self.key):
                return OpenAIError("Unauthorized: pass the server's API key as 'Authorization: Bearer <key>' "
                                   "(openai.OpenAI(api_key=...)).", 401)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if ctype != b"application/json":
                return OpenAIError("the request body must be JSON with 'Content-Type: application/json'.", 415)
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                return self._too_large()
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self._check(scope)
        if problem is not None:
            return await _send_error(send, problem, close=True)
        received = 0

        async def limited_receive():
            # NOTE: raised inside the handler's `await request.body()`: the app answers it as any OpenAIError
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> OpenAIError:
        return OpenAIError(f"the request body is larger than {self.max_body_bytes} bytes "
                           "(--max-request-body-bytes).", 413)


async def _send_error(send, e: OpenAIError, close: bool) -> None:
    import json

    body = json.dumps(e.to_dict()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": e.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
