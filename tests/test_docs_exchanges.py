"""The exchanges docs/protocols.md shows are replayed against a real server,
so the document cannot drift from what chatd does (issue 20 item 5).

Every fenced block whose info string is ``exchange`` is one scenario, run
on a fresh embedded-default server (all five endpoints, room ``lobby``,
``secret-key`` ``s3cret``, no ``jwt-secret`` configured). Its lines:

- ``NAME connects to PATH``: a new client;
- ``NAME > JSON``: it sends a text frame; ``NAME > binary HEX``: a binary one;
- ``NAME < JSON``: the next frame it receives is this JSON, where a value
  written ``"…"`` stands for any value (a server timestamp);
- ``NAME closes``: it closes (1000); ``NAME closed CODE [REASON]``: the
  server closed it with ``CODE`` (and ``REASON``, if given);
- a line starting with ``#`` is a comment.

GradAgenda's exchanges (issue 23) need a token and ids the server makes:
in a received JSON, a value ``"$NAME"`` matches anything and keeps it as
``NAME``; in a sent one, ``$NAME`` is replaced by what was kept, and
``$TOKEN:USER`` by a token for ``USER`` signed with the server's secret.

After each line the runner waits until the server has nothing left to do
(``wait_all_tasks_blocked``), so the lines happen in the order written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import trio.testing
from trio_websocket import ConnectionClosed

from chatd.config import default_config
from chatd.tokens import mint
from tests.conftest import GUARD, Peer

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocols.md"
ANY = "\u2026"
_BLOCK = re.compile(r"^```exchange\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks() -> list[tuple[str, list[str]]]:
    """(id, lines) of every exchange block, the id from the heading above it."""
    text = DOC.read_text()
    out = []
    for match in _BLOCK.finditer(text):
        heading = [h for h in re.findall(r"^#+ (.+)$", text[:match.start()], re.MULTILINE)][-1]
        lines = [line for line in match.group(1).splitlines()
                 if line.strip() and not line.startswith("#")]
        out.append((f"{heading} #{sum(1 for i, _ in out if i.startswith(heading)) + 1}", lines))
    return out


BLOCKS = blocks()


def test_the_document_shows_exchanges_for_every_lobby_protocol():
    paths = {line.split()[-1] for _, lines in BLOCKS for line in lines if " connects to " in line}
    assert {"/multichat", "/socialvp", "/wschat", "/wcp"} <= paths, paths


def matches(expected: Any, got: Any, kept: dict[str, Any] | None = None) -> bool:
    if expected == ANY:
        return True
    if isinstance(expected, str) and re.fullmatch(r"\$\w+", expected) and kept is not None:
        if expected[1:] in kept:
            return kept[expected[1:]] == got
        kept[expected[1:]] = got
        return True
    if isinstance(expected, dict):
        return (isinstance(got, dict) and expected.keys() == got.keys()
                and all(matches(v, got[k], kept) for k, v in expected.items()))
    if isinstance(expected, list):
        return (isinstance(got, list) and len(expected) == len(got)
                and all(matches(e, g, kept) for e, g in zip(expected, got)))
    return expected == got and type(expected) is type(got)


@pytest.mark.parametrize("lines", [lines for _, lines in BLOCKS], ids=[i for i, _ in BLOCKS])
async def test_each_documented_exchange_happens_as_written(chat, lines):
    config = default_config()
    config.secret_key = "s3cret"
    server = await chat.start(config)
    peers: dict[str, Peer] = {}
    kept: dict[str, Any] = {}

    def fill(text: str) -> str:
        text = re.sub(r"\$TOKEN:(\w+)",
                      lambda m: mint(server.secrets["jwt-secret"], m.group(1)), text)
        return re.sub(r"\$(\w+)", lambda m: str(kept[m.group(1)]), text)

    for line in lines:
        name, _, rest = line.partition(" ")
        with trio.fail_after(GUARD):
            if rest.startswith("connects to "):
                peers[name] = await chat.connect(rest.removeprefix("connects to "))
            elif rest.startswith("> binary "):
                await peers[name].ws.send_message(bytes.fromhex(rest.removeprefix("> binary ")))
            elif rest.startswith("> "):
                await peers[name].send(fill(rest[2:]))
            elif rest.startswith("< "):
                expected = json.loads(rest[2:])
                got = await peers[name].recv()
                assert matches(expected, got, kept), (line, got)
            elif rest == "closes":
                await peers[name].close()
            elif rest.startswith("closed "):
                code, _, reason = rest.removeprefix("closed ").partition(" ")
                try:
                    got = await peers[name].ws.get_message()
                except ConnectionClosed as exc:
                    assert exc.reason.code == int(code), line
                    if reason:
                        assert exc.reason.reason == json.loads(reason), line
                else:
                    raise AssertionError(f"{line}: got {got!r} instead")
            else:
                raise AssertionError(f"not an exchange line: {line!r}")
        await trio.testing.wait_all_tasks_blocked()
