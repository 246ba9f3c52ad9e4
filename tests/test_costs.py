"""What a client's choices cost the server is bounded (issue 19, item 8).

- ``/metrics`` keeps one ``chatd_closes_total`` series per close code RFC
  6455 registers; a client's own choice among ~4,000 codes is counted by
  class (``3xxx``, ``4xxx``, ``other``).
- A name chatd must check costs the flood bucket by its size
  (``chatd.names.cost``): a client sending long new names is read more
  slowly, as one sending many messages is.
"""

from __future__ import annotations

import logging
import random
import re

import trio
from hypothesis import given
from hypothesis import strategies as st

from chatd import names
from chatd.metrics import KNOWN_CLOSE_CODES, close_label
from tests.conftest import GUARD, open_websocket_url
from tests.lobby_peers import socialvp
from tests.test_http import get, http

LABELS = {str(code) for code in KNOWN_CLOSE_CODES} | {"3xxx", "4xxx", "other"}


@given(st.integers(-2**31, 2**31))
def test_any_close_code_has_one_of_a_few_labels(code):
    label = close_label(code)
    assert str(label) in LABELS
    assert (label == code) == (code in KNOWN_CLOSE_CODES)


async def test_clients_choosing_close_codes_add_no_series(chat):
    server = await chat.start()
    codes = [1000, 1001, 3000, 3999, 4000, 4321, 4999,
             *random.Random(19).sample(range(3000, 5000), 20)]
    for code in codes:
        async with open_websocket_url(chat.url("/wschat")) as ws:
            await ws.aclose(code)
    with trio.fail_after(GUARD):
        while sum(server.metrics.closes.values()) < len(codes):
            await trio.sleep(0.01)  # the server records the close in its own time
    _, _, body = await http(server.port, get("/metrics"))
    labels = re.findall(r'chatd_closes_total\{code="([^"]+)"\}', body.decode())
    assert set(labels) <= LABELS
    assert {"1000", "1001", "3xxx", "4xxx"} <= set(labels)
    count = {label: float(n) for label, n in
             re.findall(r'chatd_closes_total\{code="([^"]+)"\} (\S+)', body.decode())}
    assert count["3xxx"] + count["4xxx"] == len(codes) - 2


def test_a_long_name_costs_by_its_utf8_bytes():
    assert names.cost("alice") == 0
    assert names.cost("a" * 254) == 3
    assert names.cost("\u4e00" * 254) == 11  # 762 bytes
    before = names.meter.tokens
    names.parse("\u4e01" * 200 + "meter")  # new: checked, charged
    names.parse("\u4e01" * 200 + "meter")  # cached: free
    assert names.meter.tokens - before == names.cost("\u4e01" * 200 + "meter")


def _throttled(caplog) -> bool:
    return any("over the message rate" in r.getMessage() for r in caplog.records)


async def test_long_new_names_are_charged_to_the_flood_bucket(chat, caplog):
    caplog.set_level(logging.INFO, "chatd.connection")
    # 100 frames' worth of tokens and (all but) no refill.
    await chat.start(message_rate=0.001, message_burst=100)
    client = await socialvp(chat, "sender")
    for n in range(40):  # 41 frames: 41 tokens of 100, long as they are
        await client.send({"command": "message", "to": f"nobody{n}", "message": "hi"})
        assert (await client.recv())["code"] == 404
    assert not _throttled(caplog)
    # Each new 254-character CJK name costs 1 + 11 tokens: the fifth is over.
    for n in range(5):
        await client.send({"command": "message", "to": chr(0x4E00 + n) * 254, "message": "hi"})
        assert (await client.recv())["code"] == 404
    await client.send({"command": "message", "to": "nobody", "message": "hi"})
    with trio.fail_after(GUARD):
        while not _throttled(caplog):
            await trio.sleep(0.01)  # the server reads on in its own time
