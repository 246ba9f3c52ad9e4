"""Names: which are allowed, what they look like, and that no one can pass for another.

First ``chatd.names`` alone (examples, then hypothesis), then the real
server: look-alike and invisible names refused on every protocol (issue #9
item 5), one owner per name across every pair of protocols (item 6), the
wcp roster, and direct messages addressed by name.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd import names
from tests.conftest import SECRET, Harness, Peer
from tests.lobby_peers import INIT, signed, socialvp, wcp, wschat

# --- chatd.names alone -------------------------------------------------------------------


@pytest.mark.parametrize("invisible", [
    "\u200b",  # ZERO WIDTH SPACE (issue #9 item 5)
    "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad",  # non-joiner, joiner, word joiner, BOM, soft hyphen
    "\u202e", "\u2066", "\u061c",  # bidi controls
    "\u180e", "\ufe0f", "\U000e0061",  # Mongolian vowel separator, variation selector, tag
])
def test_invisible_characters_make_a_name_invalid(invisible):
    with pytest.raises(names.InvalidName) as refused:
        names.parse("alice" + invisible)
    assert refused.value.reason == ("contains an invisible or formatting character "
                                    f"({names._describe(invisible)})")


@pytest.mark.parametrize("raw, reason", [
    # Characters PRECIS allows that show as nothing, and marks that hide
    # (found by a review: each was accepted and announced as a new user).
    ("alice\u2800", "contains a character that shows as blank (U+2800 BRAILLE PATTERN BLANK)"),
    ("\u2800alice", "contains a character that shows as blank (U+2800 BRAILLE PATTERN BLANK)"),
    ("ali\U00016fe4ce",
     "contains a character that shows as blank (U+16FE4 KHITAN SMALL SCRIPT FILLER)"),
    ("alice\U0001da80", "contains a character that shows as blank "
                        "(U+1DA80 SIGNWRITING LOCATION-FLOORPLANE SPACE)"),
    ("ali\u0307ce", "puts a dot above a letter that has one (U+0069 LATIN SMALL LETTER I + U+0307)"),
    ("\u0456\u0307", "puts a dot above a letter that has one "
                     "(U+0456 CYRILLIC SMALL LETTER BYELORUSSIAN-UKRAINIAN I + U+0307)"),
    ("ali\u0328\u0307ce", "puts a dot above a letter that has one "
                          "(U+0069 LATIN SMALL LETTER I + U+0307)"),
    ("alice\u0301\u0301", "repeats a combining mark (it would show once)"),
    ("alice\u3164", "contains a character that shows as blank (U+3164 HANGUL FILLER)"),
    ("alice\uffa0", "contains a character that shows as blank (U+FFA0 HALFWIDTH HANGUL FILLER)"),
    ("", "is empty or only spaces"),
    ("\u3000 \u00a0", "is empty or only spaces"),
    ("a\x07", "contains a control character (U+0007)"),
    ("a\nb", "contains a control character (U+000A)"),
    ("x" * 257, "is longer than 256 characters"),
    ("\ufdfa" * 20, "is longer than 256 characters once normalised"),
    ("\u0301a", "starts with a combining mark (U+0301 COMBINING ACUTE ACCENT)"),
    ("a\ud800", "contains a character not allowed in names (U+D800)"),
    ("a\U000e01f0", "contains an unassigned character (U+E01F0)"),
])
def test_invalid_names_say_why(raw, reason):
    with pytest.raises(names.InvalidName) as refused:
        names.parse(raw)
    assert refused.value.reason == reason


@pytest.mark.parametrize("raw, shown, address", [
    ("alice", "alice", "alice"),
    ("Alice", "Alice", "alice"),
    ("\uff41\uff4c\uff49\uff43\uff45", "alice", "alice"),  # full-width letters
    ("  Ann  Lee ", "Ann Lee", "ann lee"),  # spaces trimmed and collapsed
    ("Ann\u3000Lee", "Ann Lee", "ann lee"),  # any space is shown as a space
    ("\u210cello", "Hello", "hello"),  # compatibility characters (NFKC)
    ("Zoe\u0308", "Zo\u00eb", "zo\u00eb"),  # composed (NFC)
    ("\u0416\u0435\u043d\u044f", "\u0416\u0435\u043d\u044f", "\u0436\u0435\u043d\u044f"),
    # Marks where they belong stay allowed: the blank and hidden-mark rules
    # refuse only what shows as something else.
    ("\u0928\u092e\u0938\u094d\u0924\u0947", "\u0928\u092e\u0938\u094d\u0924\u0947",
     "\u0928\u092e\u0938\u094d\u0924\u0947"),  # Devanagari, with a virama
    ("\u0130stanbul", "\u0130stanbul", "i\u0307stanbul"),  # capital I with dot above
    ("\u00c6r\u00f8sk\u00f8bing", "\u00c6r\u00f8sk\u00f8bing", "\u00e6r\u00f8sk\u00f8bing"),
])
def test_names_are_shown_normalised_and_addressed_case_mapped(raw, shown, address):
    name = names.parse(raw)
    assert (name.shown, name.address) == (shown, address)


ALICE_LOOK_ALIKES = [
    "Alice", "ALICE", "aLiCe",  # case
    "\u0430lice",  # Cyrillic a
    "alic\u0435", "\u0430lic\u0435",  # Cyrillic e, both
    "\uff41\uff4c\uff49\uff43\uff45",  # full-width
    "aIice",  # capital I for l
    "a1ice",  # digit one for l
    "\U0001d41a\U0001d425\U0001d422\U0001d41c\U0001d41e",  # mathematical bold
]


@pytest.mark.parametrize("other", ALICE_LOOK_ALIKES)
def test_look_alikes_share_a_key(other):
    assert names.parse("alice").keys & names.parse(other).keys


@pytest.mark.parametrize("one, other", [
    ("rnallory", "mallory"), ("paypal", "p\u0430yp\u0430l"), ("bob", "b\u043eb"),
    ("0scar", "Oscar"), ("ΑlaskaJazz", "AlaskaJazz"),
])
def test_other_confusables_share_a_key(one, other):
    assert names.parse(one).keys & names.parse(other).keys


@pytest.mark.parametrize("one, other", [
    ("alice", "bob"), ("alice", "alicia"), ("Zoë", "Zoe"), ("anna", "anne"), ("ann lee", "annlee"),
    ("\u0416\u0435\u043d\u044f", "\u0416\u0435\u043d\u044c"),
])
def test_distinct_names_do_not_collide(one, other):
    assert not names.parse(one).keys & names.parse(other).keys


def test_identifiers_must_already_be_in_their_shown_form():
    assert names.refusal("alice") is None
    assert names.refusal("Alice") is None  # case is kept: ids are matched exactly
    assert names.refusal("\uff41lice") == ("is not in its normalised form "
                                           "(it would be shown as 'alice')")
    assert names.refusal(" alice") == "is not in its normalised form (it would be shown as 'alice')"
    assert names.refusal("alice\u200b").startswith("contains an invisible")


#: Names of any kind, weighted towards the characters that make trouble.
awkward = st.text(st.characters(codec=None) | st.sampled_from(
    " \u3000\u00a0\u200b\u200d\u202e\u0301\u0308Il1O0rnmаеоІ\uff41\ufdfa\u2126"), max_size=40)


@settings(max_examples=500, deadline=None)
@given(awkward)
def test_any_text_is_a_valid_name_or_refused_with_a_reason(raw):
    try:
        name = names.parse(raw)
    except names.InvalidName as refused:
        assert refused.reason
        return
    # What is shown can be shown: no invisible, control or unassigned character,
    # nothing too long, and it is itself a valid name with the same keys.
    assert 0 < len(name.shown) <= names.MAX_CHARS
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Cn") for c in name.shown)
    again = names.parse(name.shown)
    assert (again.shown, again.address, again.keys) == (name.shown, name.address, name.keys)
    assert names.parse(name.address).address == name.address
    assert names.refusal(name.shown) is None
    # A key is its own skeleton: stable, so equal names always meet.
    assert all(names.skeleton(key) == key for key in name.keys)
    assert names.skeleton(name.address) in name.keys


@settings(max_examples=300, deadline=None)
@given(awkward, awkward)
def test_names_with_the_same_address_always_collide(one, other):
    try:
        a, b = names.parse(one), names.parse(other)
    except names.InvalidName:
        return
    if a.address == b.address:
        assert a.keys & b.keys


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_skeleton_is_stable_for_any_text(text):
    once = names.skeleton(text)
    assert names.skeleton(once) == once


_PRINTABLE = [chr(c) for c in range(0x20, 0x7F)]


def _same(fast: names.Name | str, full: names.Name | str) -> bool:
    if isinstance(fast, str) or isinstance(full, str):
        return fast == full
    return (fast.shown, fast.address, fast.keys) == (full.shown, full.address, full.keys)


def test_plain_ascii_names_get_what_the_full_check_gives():
    # Plain ASCII names skip PRECIS (chatd.names._PLAIN): for every printable
    # ASCII text of up to two characters the shortcut must agree with PRECIS
    # and every other rule; texts the shortcut does not take go the full way.
    taken = 0
    for first in _PRINTABLE:
        for raw in [first, *(first + second for second in _PRINTABLE)]:
            if names._PLAIN.fullmatch(raw) is not None:
                taken += 1
                assert _same(names._name(raw, raw.lower()), names._checked(raw)), raw
            else:
                assert raw.startswith(" ") or raw.endswith(" ")
    assert taken == 94 + 94 * 94


@settings(max_examples=500, deadline=None)
@given(st.text(st.sampled_from(_PRINTABLE + ["\t", "\u00a0", "\u0307", "\uff41"]),
               min_size=1, max_size=40))
def test_the_ascii_shortcut_agrees_with_precis_on_any_text(raw):
    if names._PLAIN.fullmatch(raw) is not None:
        assert _same(names._name(raw, raw.lower()), names._checked(raw))
    assert _same(names._parse(raw), names._checked(raw))


# --- against the server: look-alikes and invisible names (issue #9 item 5) --------------

TAKEN = {"type": "error", "message": "user_id already in use"}
NAME_TAKEN = {"type": "outcome", "success": False, "code": 305,
              "message": "Client with that name already exists!"}


async def test_issue_9_zero_width_name_is_refused_not_announced(chat):
    await chat.start()
    alice = await wcp(chat, "alice")
    intruder = await chat.connect("/wcp")
    await intruder.send({"type": "user_joined", "user_id": "alice\u200b", "display_name": "alice"})
    assert await intruder.recv() == {
        "type": "error",
        "message": "user_id contains an invisible or formatting character (U+200B ZERO WIDTH SPACE)"}
    # Nobody was announced: alice's next frame is the next real join.
    await wcp(chat, "bob")
    assert (await alice.recv())["user_id"] == "bob"


@pytest.mark.parametrize("other", ALICE_LOOK_ALIKES)
async def test_look_alikes_of_a_held_name_are_taken_on_wcp_and_socialvp(chat, other):
    await chat.start()
    await wcp(chat, "alice")
    w = await chat.connect("/wcp")
    await w.send({"type": "user_joined", "user_id": other, "display_name": "A"})
    assert await w.recv() == TAKEN
    s = await chat.connect("/socialvp")
    assert await s.recv() == INIT
    await s.send({"command": "identify", "name": other})
    assert await s.recv() == NAME_TAKEN


async def test_a_wcp_display_name_is_held_like_a_user_id(chat):
    await chat.start()
    await wcp(chat, "m4", display_name="Alice")
    s = await chat.connect("/socialvp")
    await s.recv()
    await s.send({"command": "identify", "name": "alice"})
    assert await s.recv() == NAME_TAKEN
    w = await chat.connect("/wcp")
    await w.send({"type": "user_joined", "user_id": "bob", "display_name": "ALICE"})
    assert await w.recv() == TAKEN


async def test_names_are_shown_in_their_normalised_form(chat):
    await chat.start()
    watcher = await wcp(chat, "watcher")
    s = await socialvp(chat, "\uff53\uff41\uff4d")  # full-width "sam"
    assert await watcher.recv() == {"type": "user_joined", "user_id": "sam", "display_name": "sam"}
    await s.send({"command": "broadcast", "message": "hi"})
    assert (await watcher.recv())["user_id"] == "sam"
    # A wcp client may leave with the id as it sent it.
    w = await chat.connect("/wcp")
    await w.send({"type": "user_joined", "user_id": "  Wendy  ", "display_name": "Wendy"})
    assert await watcher.recv() == {"type": "user_joined", "user_id": "Wendy",
                                    "display_name": "Wendy"}
    await w.send({"type": "user_joined", "user_id": "x", "display_name": "x"})
    roster = [await w.recv(), await w.recv()]
    assert [f["user_id"] for f in roster] == ["watcher", "sam"]
    assert await w.recv() == {"type": "error", "message": "already joined as Wendy"}
    await w.send({"type": "user_left", "user_id": "  Wendy  "})
    assert await w.closed() == 1000
    assert await watcher.recv() == {"type": "user_left", "user_id": "Wendy"}


# --- one name, one owner, across every pair of protocols (issue #9 item 6) ---------------

LOBBY = ["wschat", "multichat", "socialvp", "wcp"]


async def hold(chat: Harness, protocol: str, name: str) -> Peer:
    """A client of ``protocol`` that holds ``name`` in the lobby."""
    if protocol == "wschat":
        peer = await wschat(chat)
        await peer.send(signed(name, "hello"))
        assert (await peer.recv())["usr"] == name  # the echo: the name is now held
        return peer
    if protocol == "multichat":
        return await chat.multichat(name)
    if protocol == "socialvp":
        return await socialvp(chat, name)
    return await wcp(chat, name)


async def refused(chat: Harness, protocol: str, name: str) -> None:
    """A client of ``protocol`` tries to use ``name`` and gets its protocol's refusal."""
    if protocol == "wschat":
        peer = await wschat(chat)
        await peer.send(signed(name, "I am the real one"))
        await peer.send(signed("impostor", "probe"))
        # No echo for the first: it was dropped. The probe comes back.
        assert (await peer.recv())["msg"] == "probe"
    elif protocol == "multichat":
        peer = await chat.connect("/multichat")
        await peer.send({"action": "register", "client-name": name, "secret-key": SECRET})
        assert await peer.closed() == 1008
        assert peer.ws.closed.reason == "client-name already in use"
    elif protocol == "socialvp":
        peer = await chat.connect("/socialvp")
        assert await peer.recv() == INIT
        await peer.send({"command": "identify", "name": name})
        assert await peer.recv() == NAME_TAKEN
    else:
        peer = await chat.connect("/wcp")
        await peer.send({"type": "user_joined", "user_id": name, "display_name": "x"})
        assert await peer.recv() == TAKEN


@pytest.mark.parametrize("holder, impostor, spelling", [
    (holder, impostor, spelling) for holder in LOBBY for impostor in LOBBY
    for spelling in ["wendy", "W\u0435ndy"]  # the same, and a look-alike
    # but a second bridge of the same name, which shares it (test_bridges.py)
    if not (holder == impostor == "multichat" and spelling == "wendy")])
async def test_no_client_can_speak_as_a_name_another_connection_holds(chat, holder, impostor,
                                                                      spelling):
    await chat.start()
    observer = await wcp(chat, "olive")
    listener = await socialvp(chat, "sol")
    assert (await observer.recv())["user_id"] == "sol"
    real = await hold(chat, holder, "wendy")
    assert await observer.recv() == {"type": "user_joined", "user_id": "wendy",
                                     "display_name": "wendy" if holder != "wcp" else "Wendy"}
    await refused(chat, impostor, spelling)
    # Then the real wendy speaks. Until then, nobody heard the impostor's
    # message or saw a second wendy announced.
    said = {"wschat": signed("wendy", "it's me"),
            "multichat": {"action": "client-message", "content": "it's me"},
            "socialvp": {"command": "broadcast", "message": "it's me"},
            "wcp": {"type": "message", "data": "it's me"}}[holder]
    await real.send(said)
    seen = await frames_until(observer, lambda f: f.get("data") == "it's me")
    assert seen[-1]["user_id"] == "wendy"
    assert not [f for f in seen if f.get("data") == "I am the real one"
                or f["type"] == "user_joined" and f["user_id"] != "impostor"], seen
    heard = await frames_until(listener, lambda f: f.get("message") == "it's me")
    assert heard[-1]["from"] == "wendy"
    assert not [f for f in heard if f.get("message") == "I am the real one"], heard


async def frames_until(peer: Peer, last: Callable[[dict], bool]) -> list[dict]:
    """``peer``'s frames up to and including the first for which ``last`` holds."""
    frames = [await peer.recv()]
    while not last(frames[-1]):
        frames.append(await peer.recv())
    return frames


async def test_a_name_is_free_again_once_its_holder_has_gone(chat):
    await chat.start()
    observer = await wcp(chat, "olive")
    speaker = await hold(chat, "wschat", "wes")
    assert (await observer.recv())["user_id"] == "wes"
    assert (await observer.recv())["data"] == "hello"
    await refused(chat, "wcp", "wes")
    await speaker.close()
    assert await observer.recv() == {"type": "user_left", "user_id": "wes"}
    await wcp(chat, "wes")
    assert (await observer.recv())["user_id"] == "wes"


async def test_a_wschat_connection_holds_one_name_and_a_new_usr_renames(chat):
    await chat.start()
    observer = await wcp(chat, "olive")
    speaker = await hold(chat, "wschat", "ann")
    assert (await observer.recv())["user_id"] == "ann"
    assert (await observer.recv())["data"] == "hello"
    await speaker.send(signed("annie", "new name"))
    assert (await speaker.recv())["usr"] == "annie"
    assert await observer.recv() == {"type": "user_left", "user_id": "ann"}
    assert await observer.recv() == {"type": "user_joined", "user_id": "annie",
                                     "display_name": "annie"}
    assert (await observer.recv())["data"] == "new name"
    # "ann" is free again.
    await socialvp(chat, "ann")


async def test_a_dropped_wschat_message_is_logged_with_the_peer(chat, caplog):
    await chat.start()
    await wcp(chat, "wendy")
    caplog.set_level("INFO", logger="chatd")
    await refused(chat, "wschat", "wendy")
    assert any("message as 'wendy' dropped: the name (or one like it) is held by another "
               "connection in room lobby" in r.getMessage() and "127.0.0.1:" in r.getMessage()
               for r in caplog.records)


# --- the wcp roster (chatd's extension) ----------------------------------------------------


async def test_a_joining_wcp_client_gets_one_user_joined_per_name_in_the_room(chat):
    await chat.start()
    await wschat(chat)  # a listener holds no name
    await hold(chat, "wschat", "wes")
    await chat.multichat("bridge")
    await socialvp(chat, "sam")
    await wcp(chat, "wendy", display_name="Wendy W.")
    late = await wcp(chat, "late")
    assert late.roster == [
        {"type": "user_joined", "user_id": "wes", "display_name": "wes"},
        {"type": "user_joined", "user_id": "bridge", "display_name": "bridge"},
        {"type": "user_joined", "user_id": "sam", "display_name": "sam"},
        {"type": "user_joined", "user_id": "wendy", "display_name": "Wendy W."},
    ]


async def test_a_refused_join_gets_no_roster(chat):
    await chat.start()
    await socialvp(chat, "sam")
    w = await chat.connect("/wcp")
    await w.send({"type": "user_joined", "user_id": "Sam", "display_name": "Sam"})
    assert await w.recv() == TAKEN
    await w.send({"type": "user_joined", "user_id": "tom", "display_name": "Tom"})
    assert await w.recv() == {"type": "user_joined", "user_id": "sam", "display_name": "sam"}
    await w.send({"type": "user_left", "user_id": "sam"})
    assert await w.recv() == {"type": "error", "message": "user_left must carry your own user_id"}


# --- direct messages are addressed by name ----------------------------------------------------


async def test_a_direct_message_reaches_the_name_however_it_is_cased(chat):
    await chat.start()
    w = await wcp(chat, "wendy")
    s = await socialvp(chat, "sam")
    assert (await w.recv())["user_id"] == "sam"
    await s.send({"command": "message", "to": "WENDY", "message": "psst"})
    frame = await w.recv()
    assert (frame["user_id"], frame["data"], frame["to"]) == ("sam", "psst", "wendy")


@pytest.mark.parametrize("holder", ["multichat", "wschat"])
async def test_a_direct_message_to_a_protocol_without_them_gets_404(chat, holder):
    await chat.start()
    await hold(chat, holder, "nobox")
    s = await socialvp(chat, "sam")
    await s.send({"command": "message", "to": "nobox", "message": "psst"})
    assert await s.recv() == {"type": "outcome", "success": False, "code": 404,
                              "message": "No client with that name is currently connected!"}

