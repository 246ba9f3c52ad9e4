"""Plain HTTP on the listener: health, readiness, metrics, the web client.

A GET (or HEAD) that does not ask for a WebSocket is answered here, once,
and the connection closed:

- ``/healthz``: 200 while the process serves;
- ``/readyz``: 200 when chatd can do its work (listening, store writable,
  broker connected when one is configured), else 503 with the reason;
- ``/metrics``: Prometheus' text format (chatd.metrics);
- the browser client under ``web-client`` (default ``/app/``): files
  shipped in ``chatd/web/``, with a Content-Security-Policy that allows
  nothing but this origin (no inline script, no foreign site);
- anything else: 404 with a short body.

With ``admin-host`` set, the first three move to that listener and the
public one answers 404 for them.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Awaitable, Callable
from importlib import resources

from chatd.handshake import HttpRequest, response
from chatd.metrics import CONTENT_TYPE, Metrics

#: Served with every web client file: this origin only, no inline script or
#: style, no framing, no plugins (the browser must not run what a peer sent).
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data: blob:; media-src blob:; connect-src 'self'; manifest-src 'self'; "
                           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_WEB_HEADERS = (("Content-Security-Policy", CONTENT_SECURITY_POLICY),
                ("X-Content-Type-Options", "nosniff"),
                ("Referrer-Policy", "no-referrer"),
                ("Cache-Control", "no-cache"))

Ready = Callable[[], Awaitable[str | None]]


def load_web_client() -> dict[str, tuple[bytes, str]]:
    """The web client's files: name -> (bytes, content type). Read once, so
    no request path ever reaches the file system."""
    files: dict[str, tuple[bytes, str]] = {}
    root = resources.files("chatd") / "web"
    if not root.is_dir():
        return files
    for entry in root.iterdir():
        # admin.*: the admin page, served by chatd.api on the API's
        # listener only (under /app/ it reached the public listener).
        if entry.is_file() and not entry.name.startswith((".", "admin.")):
            kind = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
            if kind.startswith("text/") or kind in ("application/javascript", "image/svg+xml",
                                                     "application/json", "application/manifest+json"):
                kind += "; charset=utf-8"
            files[entry.name] = (entry.read_bytes(), kind)
    return files


class Routes:
    """Answers plain HTTP requests for one listener."""

    def __init__(self, *, admin: bool, web_path: str | None, ready: Ready,
                 metrics: Metrics) -> None:
        #: True if this listener serves /healthz, /readyz and /metrics.
        self.admin = admin
        self.web_path = web_path
        self.ready = ready
        self.metrics = metrics
        self.web_files = load_web_client() if web_path else {}

    async def answer(self, request: HttpRequest) -> tuple[int, bytes]:
        """(status, the whole response) for a request that is not an upgrade."""
        head = request.method == "HEAD"
        if request.method not in ("GET", "HEAD"):
            return 405, response(405, "only GET is served here\n", headers=(("Allow", "GET, HEAD"),),
                                 head_only=head)
        path = request.path
        if self.admin:
            if path == "/healthz":
                return 200, response(200, "ok\n", head_only=head)
            if path == "/readyz":
                reason = await self.ready()
                if reason is None:
                    return 200, response(200, "ready\n", head_only=head)
                return 503, response(503, f"not ready: {reason}\n", head_only=head)
            if path == "/metrics":
                return 200, response(200, self.metrics.exposition(), content_type=CONTENT_TYPE,
                                     head_only=head)
        web = self.web_path
        if web is not None:
            if path == web.rstrip("/"):
                return 301, response(301, "", headers=(("Location", web),), head_only=head)
            if path.startswith(web):
                name = path[len(web):] or "index.html"
                found = self.web_files.get(name)
                if found is not None:
                    body, kind = found
                    return 200, response(200, body, content_type=kind, headers=_WEB_HEADERS,
                                         head_only=head)
        return 404, response(404, "not found\n", head_only=head)
