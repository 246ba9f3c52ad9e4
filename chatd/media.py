"""GradAgenda images and voice clips over HTTP (issue 23; docs/protocols.md,
"Images and voice clips").

A media file is too large for a 4 KB frame, so it travels over plain HTTP
on the chat listener, authenticated with the device's GradAgenda token:

- ``POST /media?session-id=SESSION`` with ``Authorization: Bearer TOKEN``
  and the file as the body (``Content-Length`` required): 201 and
  ``{"media-id": ..., "content-type": ..., "kind": "image"|"voice",
  "size": ...}``. Refused: 401 (no or bad token), 403 (not a member of the
  session), 411 (no length), 413 (over ``media-max-bytes``, or over the
  user's ``media-quota-bytes``), 415 (not one of the accepted types).
- ``GET /media/MEDIA-ID`` with the same header: the bytes, to members of
  the session it was uploaded for (403 to anyone else, 404 if none).

The type is decided from the bytes alone (``sniff``: a table of the
formats' own signatures), never from the client's ``Content-Type``; a
file that is none of them (SVG, HTML, a script, anything else) is refused,
so nothing but these types is ever served. Every answer carries
``X-Content-Type-Options: nosniff``, a ``Content-Security-Policy`` that
lets nothing run (``default-src 'none'; sandbox``) and a
``Content-Disposition`` (``inline`` with a file name of the sniffed type).

Stored through the sessions' writer (``chatd.store.media``): SQLite on one
node, PostgreSQL in a cluster, where every node serves every file.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import trio

from chatd import tokens
from chatd.handshake import HttpRequest, response
from chatd.store import media as stored

if TYPE_CHECKING:
    from chatd.sessions import Sessions

log = logging.getLogger("chatd.media")

PATH = "/media"
#: Seconds a client has to send an upload's body.
BODY_TIMEOUT = 60.0

#: Served with every answer here: nothing in it may run, load or be framed.
HEADERS = (("X-Content-Type-Options", "nosniff"),
           ("Content-Security-Policy", "default-src 'none'; sandbox"),
           ("Referrer-Policy", "no-referrer"))

#: Extension of the file name each type is served under.
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif",
               "image/webp": "webp", "audio/ogg": "opus", "audio/webm": "webm",
               "audio/mp4": "m4a", "audio/aac": "aac"}
#: ISO base media (MP4) brands of audio files (ftyp major brand).
_MP4_BRANDS = {b"M4A ", b"M4B ", b"mp41", b"mp42", b"isom", b"iso2", b"dash"}


def sniff(data: bytes) -> tuple[str, str] | None:
    """(content type, ``image`` or ``voice``) from a file's first bytes, or
    None. The signatures, each from its format's specification:

    - PNG: ``89 50 4E 47 0D 0A 1A 0A`` (RFC 2083, 3.1);
    - JPEG: ``FF D8 FF`` (SOI then a marker; ITU T.81);
    - GIF: ``GIF87a`` or ``GIF89a``;
    - WebP: ``RIFF`` size ``WEBP`` (RFC 9649, 2.5);
    - Ogg Opus: ``OggS`` whose first packet begins ``OpusHead`` (RFC 7845, 5.1);
    - WebM: the EBML magic ``1A 45 DF A3`` with DocType ``webm`` in its header;
    - MP4/AAC: ``ftyp`` at offset 4 with an audio-capable brand (ISO 14496-12),
      or an ADTS AAC frame sync ``FFF`` with layer 0 (ISO 14496-3).
    """
    head = data[:64]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png", "image"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg", "image"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif", "image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp", "image"
    if head.startswith(b"OggS") and b"OpusHead" in head[26:64]:
        return "audio/ogg", "voice"
    if head.startswith(b"\x1a\x45\xdf\xa3") and b"\x42\x82\x84webm" in head:
        return "audio/webm", "voice"
    if head[4:8] == b"ftyp" and head[8:12] in _MP4_BRANDS:
        return "audio/mp4", "voice"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:
        return "audio/aac", "voice"
    return None


class MediaError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Media:
    """The HTTP side of media; ``secret``: the JWT secret once resolved;
    ``max_bytes`` and ``quota``: config ``media-max-bytes``, ``media-quota-bytes``."""

    def __init__(self, sessions: Sessions, *, secret: Callable[[], str | None], leeway: float,
                 max_bytes: int, quota: int,
                 banned: Callable[[str, str], str | None] = lambda user, ip: None) -> None:
        self.sessions = sessions
        #: Why (user, address) is banned (chatd.moderation), or None.
        self.banned = banned
        self.secret = secret
        self.leeway = leeway
        self.max_bytes = max_bytes
        self.quota = quota

    @staticmethod
    def serves(request: HttpRequest) -> bool:
        return request.path == PATH or request.path.startswith(PATH + "/")

    async def answer(self, request: HttpRequest, trailing: bytes,
                     receive: Callable[[], Awaitable[bytes]], client: str = "") -> bytes:
        """The whole HTTP response to a request for ``PATH`` from ``client``
        (its address, for address bans)."""
        head = request.method == "HEAD"
        try:
            if request.method == "POST" and request.path == PATH:
                return await self._upload(request, self._user(request, client), trailing, receive)
            if request.method in ("GET", "HEAD") and request.path.startswith(PATH + "/"):
                return await self._download(self._user(request, client),
                                            request.path[len(PATH) + 1:], head)
            raise MediaError(405, "POST /media to upload, GET /media/ID to download")
        except MediaError as exc:
            body = msgspec.json.encode({"error": str(exc)}) + b"\n"
            extra = (("Allow", "GET, HEAD, POST"),) if exc.status == 405 else ()
            return response(exc.status, body, content_type="application/json",
                            headers=HEADERS + extra, head_only=head)

    def _user(self, request: HttpRequest, client: str) -> str:
        """The user the request's token proves, unless refused (401, 403)."""
        value = request.header("authorization") or ""
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise MediaError(401, "send Authorization: Bearer with your GradAgenda token")
        secret = self.secret()
        if not secret:
            raise MediaError(401, "this server has no jwt-secret")
        try:
            claims = tokens.verify(secret, token.strip(), require_exp=True, require_sub=True,
                                   leeway=self.leeway)
        except tokens.TokenRefused as exc:
            raise MediaError(401, f"token refused: {exc}") from None
        refusal = self.banned(claims["sub"], client)
        if refusal:
            raise MediaError(403, refusal)
        return claims["sub"]

    async def _upload(self, request: HttpRequest, user: str, trailing: bytes,
                      receive: Callable[[], Awaitable[bytes]]) -> bytes:
        session_id = (parse_qs(urlsplit(request.target).query).get("session-id") or [""])[0]
        if not session_id:
            raise MediaError(400, "say which session the file is for: ?session-id=")
        data = await self._body(request, trailing, receive)
        found = sniff(data)
        if found is None:
            raise MediaError(415, "not an accepted type (by its bytes): images PNG, JPEG, GIF, "
                                  "WebP; voice Ogg Opus, WebM, MP4/AAC")
        content_type, kind = found
        media_id = "media-" + secrets.token_hex(16)
        quota, now = self.quota, time.time_ns() // 1_000_000
        refused = await self._job(lambda store: stored.add(
            store, media_id, user, session_id, content_type, data, now, quota))
        if refused is not None:
            raise MediaError(refused.status, str(refused))
        log.info("%s uploaded %s (%s, %d bytes) for %s", user, media_id, content_type, len(data),
                 session_id)
        body = msgspec.json.encode({"media-id": media_id, "content-type": content_type,
                                    "kind": kind, "size": len(data)}) + b"\n"
        return response(201, body, content_type="application/json", headers=HEADERS)

    async def _download(self, user: str, media_id: str, head: bool) -> bytes:
        found = await self._job(lambda store: stored.fetch(store, media_id, user))
        if found is True:
            raise MediaError(404, "no such media")
        if found is False:
            raise MediaError(403, "not a member of a session this media was sent to")
        content_type, data = found
        name = f"{media_id}.{_EXTENSIONS.get(content_type, 'bin')}"
        return response(200, data, content_type=content_type, head_only=head, headers=HEADERS + (
            ("Content-Disposition", f'inline; filename="{name}"'),
            ("Cache-Control", "private, max-age=86400")))

    async def _body(self, request: HttpRequest, trailing: bytes,
                    receive: Callable[[], Awaitable[bytes]]) -> bytes:
        if "transfer-encoding" in request.headers:
            raise MediaError(411, "send the file with a Content-Length")
        text = request.header("content-length")
        if text is None or not text.isdigit():
            raise MediaError(411, "send the file with a Content-Length")
        length = int(text)
        if length > self.max_bytes:
            raise MediaError(413, f"the file has {length} bytes, over the {self.max_bytes} "
                                  "allowed (media-max-bytes)")
        data = bytearray(trailing[:length])
        with trio.move_on_after(BODY_TIMEOUT):
            while len(data) < length:
                more = await receive()
                if not more:
                    raise MediaError(400, "the body ended early")
                data += more[:length - len(data)]
            return bytes(data)
        raise MediaError(408, f"the body did not arrive within {BODY_TIMEOUT:g}s")

    async def _job(self, run: Callable[[Any], Any]) -> Any:
        """Run ``run`` as a store job (the sessions' writer) and wait for it."""
        finished = trio.Event()
        box: dict[str, Any] = {}

        def done(result: Any) -> None:
            box["result"] = result
            finished.set()

        def failed(answer: str) -> None:
            box["error"] = answer
            finished.set()

        refused = self.sessions.write(run, done, failed)
        if refused:
            raise MediaError(503, refused)
        await finished.wait()
        if "error" in box:
            raise MediaError(503, box["error"])
        return box["result"]
