"""GradAgenda images and voice clips over HTTP (issue 23) against real
servers: each accepted type, bytes that are not what they claim, an SVG
with a script, over the bounds, a non-member, another node of a cluster."""

from __future__ import annotations

import base64
import http.client
import json
import struct
import zlib

import pytest
import trio

from chatd.media import sniff
from chatd.store import media as media_store
from chatd.store.sqlite import SQLiteStore
from chatd.tokens import mint
from tests.cluster_helpers import cluster, redis_server  # noqa: F401 (fixtures)
from tests.conftest import GUARD, JWT_SECRET
from tests.pg import pg_run_database, pg_url  # noqa: F401 (fixtures)
from tests.test_cluster_gradagenda import login as node_login
from tests.test_gradagenda import create, failed, login


# --- tiny valid files, made here -------------------------------------------------


def png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    pixels = zlib.compress(b"\x00\xff\x00\x00")  # filter 0, one red pixel
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
            + chunk(b"IEND", b""))


def gif() -> bytes:  # 1x1, a two-colour table, one pixel
    return (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\x00\x00\x00\x00\x00"
            b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")


#: A 1x1 baseline JPEG and a 1x1 lossless WebP.
JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQEASABIAAD/2wBDAP//////////////////////////////////////////////////////"
    "////////////////////////////////wgALCAABAAEBAREA/8QAFBABAAAAAAAAAAAAAAAAAAAAAP/aAAgBAQAB"
    "PxA=")
WEBP = base64.b64decode("UklGRhoAAABXRUJQVlA4TA0AAAAvAAAAEAcQERGIiP4HAA==")


def _ogg_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    return crc


def ogg_opus() -> bytes:
    """The first page of an Ogg Opus stream: its OpusHead (RFC 7845, 5.1)."""
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, 312, 48000, 0, 0)
    page = (b"OggS" + bytes([0, 2]) + struct.pack("<qIII", 0, 1, 0, 0) + bytes([1, len(head)])
            + head)
    crc = _ogg_crc(page)
    return page[:22] + struct.pack("<I", crc) + page[26:]


def webm() -> bytes:
    """An EBML header whose DocType is webm."""
    body = (b"\x42\x86\x81\x01\x42\xf7\x81\x01\x42\xf2\x81\x04\x42\xf3\x81\x08"
            b"\x42\x82\x84webm\x42\x87\x81\x04\x42\x85\x81\x02")
    return b"\x1a\x45\xdf\xa3" + bytes([0x80 | len(body)]) + body


def m4a() -> bytes:
    return struct.pack(">I", 24) + b"ftypM4A " + struct.pack(">I", 0) + b"M4A isom"


ACCEPTED = {"png": (png(), "image/png", "image"), "jpeg": (JPEG, "image/jpeg", "image"),
            "gif": (gif(), "image/gif", "image"), "webp": (WEBP, "image/webp", "image"),
            "opus": (ogg_opus(), "audio/ogg", "voice"), "webm": (webm(), "audio/webm", "voice"),
            "m4a": (m4a(), "audio/mp4", "voice")}

SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)">'
       b"<script>alert(document.cookie)</script></svg>")
HTML = b"<!doctype html><html><script>fetch('/steal?'+document.cookie)</script></html>"


# --- HTTP --------------------------------------------------------------------------


def _request(port: int, method: str, path: str, user: str | None, body: bytes | None,
             headers: dict) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD)
    try:
        sent = dict(headers)
        if user is not None:
            sent["Authorization"] = f"Bearer {mint(JWT_SECRET, user)}"
        conn.request(method, path, body=body, headers=sent)
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()


async def upload(port: int, user: str | None, session_id: str, data: bytes,
                 claim: str = "application/octet-stream") -> tuple[int, dict, dict]:
    status, headers, body = await trio.to_thread.run_sync(
        _request, port, "POST", f"/media?session-id={session_id}", user, data,
        {"Content-Type": claim})
    return status, json.loads(body), headers


async def download(port: int, user: str | None, media_id: str) -> tuple[int, dict, bytes]:
    return await trio.to_thread.run_sync(_request, port, "GET", f"/media/{media_id}", user,
                                         None, {})


# --- one node ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ACCEPTED))
async def test_each_accepted_type_is_uploaded_sent_and_served_to_members(chat, name):
    server = await chat.start()
    data, content_type, kind = ACCEPTED[name]
    alice = await login(chat, "alice")
    bob = await login(chat, "bob")
    session_id = (await create(alice, "bob"))["session-id"]
    await bob.recv()
    # The claim is ignored: the bytes decide.
    status, answer, headers = await upload(server.port, "alice", session_id, data, "text/html")
    assert status == 201, answer
    assert (answer["content-type"], answer["kind"], answer["size"]) == (content_type, kind,
                                                                        len(data))
    media_id = answer["media-id"]
    shape = {"width": 1, "height": 1} if kind == "image" else {"duration": 1200}
    sent = {"type": kind, "body": f"[{kind}]", "media-id": media_id, **shape}
    await alice.send({"type": "request-sending-a-message", "cdid": "m", "session-id": session_id,
                      "message": sent, "sender-timestamp": 1})
    assert (await alice.recv())["message"] == sent
    got = await bob.recv()
    assert got["message"] == sent  # a 2014 client shows "body"
    status, headers, body = await download(server.port, "bob", media_id)
    assert (status, body) == (200, data)
    assert headers["content-type"] == content_type
    assert headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in headers["content-security-policy"]
    assert "sandbox" in headers["content-security-policy"]
    assert headers["content-disposition"].startswith(f'inline; filename="{media_id}.')


async def test_bytes_that_are_not_an_accepted_type_are_refused_whatever_they_claim(chat):
    server = await chat.start()
    alice = await login(chat, "alice")
    session_id = (await create(alice, "bob"))["session-id"]
    for data, claim in ((SVG, "image/svg+xml"), (HTML, "image/png"), (SVG, "image/png"),
                        (b"GIF8", "image/gif"), (b"", "image/png"),
                        (b"\x00" * 100, "audio/ogg"), (b"OggS" + b"\x00" * 60, "audio/ogg")):
        status, answer, headers = await upload(server.port, "alice", session_id, data, claim)
        assert status == 415, (data[:20], answer)
        assert "not an accepted type" in answer["error"]
        assert headers["x-content-type-options"] == "nosniff"
    # JPEG bytes claimed as PNG are a JPEG.
    status, answer, _ = await upload(server.port, "alice", session_id, JPEG, "image/png")
    assert (status, answer["content-type"]) == (201, "image/jpeg")


async def test_uploads_over_the_bound_or_the_quota_and_strangers_are_refused(chat):
    server = await chat.start(media_max_bytes=1000, media_quota_bytes=2500)
    alice = await login(chat, "alice")
    session_id = (await create(alice, "bob"))["session-id"]
    big = png() + b"\x00" * 1000
    status, answer, _ = await upload(server.port, "alice", session_id, big)
    assert status == 413 and "media-max-bytes" in answer["error"]
    small = png() + b"\x00" * 800
    for _ in range(2):
        assert (await upload(server.port, "alice", session_id, small))[0] == 201
    status, answer, _ = await upload(server.port, "alice", session_id, small)
    assert status == 413 and "media-quota-bytes" in answer["error"]
    # No token, a bad token, not a member of the session.
    assert (await upload(server.port, None, session_id, png()))[0] == 401
    status, answer, _ = await trio.to_thread.run_sync(
        lambda: _request(server.port, "POST", f"/media?session-id={session_id}", None, png(),
                         {"Authorization": "Bearer nonsense"}))
    assert status == 401
    status, answer, _ = await upload(server.port, "mallory", session_id, png())
    assert status == 403 and "member" in answer["error"]


async def test_only_members_of_the_session_download(chat):
    server = await chat.start()
    alice = await login(chat, "alice")
    session_id = (await create(alice, "bob"))["session-id"]
    status, answer, _ = await upload(server.port, "alice", session_id, png())
    media_id = answer["media-id"]
    assert (await download(server.port, "bob", media_id))[0] == 200
    status, headers, body = await download(server.port, "mallory", media_id)
    assert status == 403 and png() not in body
    assert (await download(server.port, None, media_id))[0] == 401
    assert (await download(server.port, "bob", "media-" + "0" * 32))[0] == 404
    # bob removed from the group: no longer.
    await alice.send({"type": "request-mutable-session-modification", "cdid": "kick",
                      "session-id": session_id, "user-id": ["alice"]})
    await alice.recv()
    assert (await download(server.port, "bob", media_id))[0] == 403


async def test_a_media_message_must_be_well_formed(chat):
    await chat.start()
    alice = await login(chat, "alice")
    session_id = (await create(alice, "bob"))["session-id"]
    for message, why in (
            ({"type": "image", "body": "", "media-id": "media-x", "width": 0, "height": 1},
             "width"),
            ({"type": "image", "body": "", "width": 1, "height": 1}, "media-id"),
            ({"type": "voice", "body": "", "media-id": "media-x"}, "duration"),
            ({"type": "voice", "body": 3, "media-id": "media-x", "duration": 5}, "body"),
            ({"type": "video", "body": ""}, "unsupported")):
        await alice.send({"type": "request-sending-a-message", "cdid": "m",
                          "session-id": session_id, "message": message, "sender-timestamp": 1})
        assert why in await failed(alice, "m")


def test_sniffing_names_each_accepted_type_and_nothing_else():
    for data, content_type, kind in ACCEPTED.values():
        assert sniff(data) == (content_type, kind)
        assert sniff(data[:3]) in (None, ("image/jpeg", "image"))  # cut short
    assert sniff(SVG) is None and sniff(HTML) is None
    assert sniff(b"RIFF\x00\x00\x00\x00WAVE") is None  # RIFF, but not WebP


def test_media_go_with_their_messages():
    store = SQLiteStore(":memory:")
    message = json.dumps({"type": "image", "body": "", "media-id": "media-1", "width": 1,
                          "height": 1}, separators=(",", ":"))

    def setup(s):
        s.create_session("g", "mutable", ["alice"], 0)
        media_store.add(s, "media-1", "alice", "g", "image/png", png(), 0, 10**6)
        media_store.add(s, "media-2", "alice", "g", "image/png", png(), 0, 10**6)
        s.append_message("g", "alice", message, 0, 0)

    store.run_batch([setup])
    # media-2 was never sent: gone after the grace; media-1 stays while its message does.
    assert store.run_batch([lambda s: media_store.sweep(s, 10**12)]) == [1]
    assert store.run_batch([lambda s: media_store.fetch(s, "media-1", "alice")])[0][0] == \
        "image/png"
    store.run_batch([lambda s: s.delete_session("g")])
    assert store.run_batch([lambda s: media_store.sweep(s, 10**12)]) == [1]
    assert store.run_batch([lambda s: media_store.fetch(s, "media-1", "alice")]) == [True]


# --- a cluster -------------------------------------------------------------------------


async def test_a_file_uploaded_on_one_node_is_served_by_another(cluster):  # noqa: F811
    n1, n2 = await cluster.nodes_up("n1", "n2")
    alice = await node_login(cluster, n1, "alice")
    bob = await node_login(cluster, n2, "bob")
    session_id = (await create(alice, "bob"))["session-id"]
    await bob.recv()
    status, answer, _ = await upload(n1.port, "alice", session_id, ogg_opus())
    assert status == 201
    status, headers, body = await download(n2.port, "bob", answer["media-id"])
    assert (status, headers["content-type"], body) == (200, "audio/ogg", ogg_opus())
    assert (await download(n2.port, "carol", answer["media-id"]))[0] == 403


async def test_a_banned_user_can_neither_upload_nor_download(chat, tmp_path):
    from tests.api_helpers import api
    from tests.test_api import config
    server = await chat.start(config(tmp_path))
    alice = await login(chat, "alice")
    session_id = (await create(alice, "bob"))["session-id"]
    status, answer, _ = await upload(server.port, "bob", session_id, png())
    assert status == 201
    await api(server.port, "ban", {"user": "bob", "reason": "spam"})
    status, refused, _ = await upload(server.port, "bob", session_id, png())
    assert status == 403 and "banned" in refused["error"]
    assert (await download(server.port, "bob", answer["media-id"]))[0] == 403
    assert (await download(server.port, "alice", answer["media-id"]))[0] == 200
