"""Calling the server API (chatd.api) from tests: real HTTP over loopback."""

from __future__ import annotations

import http.client
import json
from typing import Any

import trio

from tests.conftest import GUARD

KEY = "test-api-key-of-some-length-0123456789"


def post(port: int, method: str, body: Any = None, key: str | None = KEY,
         raw: bytes | None = None, headers: dict | None = None,
         verb: str = "POST") -> tuple[int, Any, dict]:
    """(status, JSON answer, headers) of ``POST /api/METHOD`` (blocking)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD)
    try:
        sent = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        conn.request(verb, f"/api/{method}", body=data, headers=sent)
        answer = conn.getresponse()
        text = answer.read()
        try:
            decoded = json.loads(text)
        except ValueError:
            decoded = text.decode(errors="replace")
        return answer.status, decoded, dict(answer.getheaders())
    finally:
        conn.close()


async def api(port: int, method: str, body: Any = None, key: str | None = KEY,
              status: int | None = 200, **kwargs: Any) -> Any:
    """The answer of an API call; asserts its status unless ``status`` is None."""
    got, answer, _ = await trio.to_thread.run_sync(
        lambda: post(port, method, body, key, **kwargs))
    if status is not None:
        assert got == status, (got, answer)
    return answer
