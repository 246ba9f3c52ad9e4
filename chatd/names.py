"""Names users see: which are allowed, how they are shown, what they compare as.

One rule for every name any protocol accepts (multichat ``client-name``,
socialvp ``name``, wcp ``user_id`` and ``display_name``, wschat ``usr``,
GradAgenda ``user-id`` and ``device-id``), built from two standards so
that no name can pass for another on screen:

- **PRECIS Nickname** (RFC 8266, on the PRECIS framework of RFC 8264, as
  XMPP uses it), via the ``precis-i18n`` library. Enforcement maps
  full-width and compatibility characters (NFKC: ``ａｌｉｃｅ`` -> ``alice``),
  maps every space to ASCII space, trims and collapses spaces, and
  refuses what the FreeformClass disallows: control characters, zero-width
  and other default-ignorable characters (bidi overrides, joiners,
  variation selectors), unassigned code points. The enforced form
  (case preserved) is what everyone is shown: ``Name.shown``. Its
  case-mapped form (RFC 8266 section 2.4) is what a name is addressed as:
  ``Name.address``.
- **Confusable skeletons** (Unicode UTS #39 section 4), via ICU's
  ``SpoofChecker`` (the ``pyicu-wheels`` package, ICU with its own
  confusables table). Two names whose skeletons match look alike
  (``alice`` and ``аlice`` with a Cyrillic a, ``paypal`` and ``paypaI``,
  ``m`` and ``rn``). As Ergo does, the skeleton is taken of the case-
  preserved and of the case-mapped form and case-folded, so ``ALICE``,
  ``Alice`` and ``aIice`` all collide with ``alice``: ``Name.keys``.

chatd adds rules of its own, for what neither catches (each found by
trying look-alikes of ``alice``):

- at most ``MAX_CHARS`` characters (before and after enforcement);
- no combining mark first (RFC 5891 section 4.2.3.2 has the same rule
  for domain labels: it would combine with whatever a client prints
  before the name);
- no character that draws nothing though PRECIS allows it (a symbol or
  letter, not a space or format character): ``BLANK``, the characters
  Unicode names as blank or filler (``alice\u2800`` looks like ``alice``);
- UTS #39 section 5.4's optional checks for nonspacing marks: the same
  mark twice in a row (ICU's ``INVISIBLE`` check), and a dot above on a
  letter that has one already (a Soft_Dotted letter + U+0307: ``ali\u0307ce``
  looks like ``alice``).

Names are checked when they are claimed, and wschat's ``usr`` with every
message, so results are cached (``parse``): a repeated name costs a
dictionary look-up. A name not in the cache costs about 1 µs per UTF-8
byte (PRECIS twice, skeletons twice: 0.23 ms for 254 ASCII characters,
0.77 ms for 254 CJK ones, several messages' worth; plain ASCII names skip
PRECIS, ``_PLAIN``, and cost less), so each check is
charged to the client that asked for it: ``meter`` counts
``cost(raw)`` flood-bucket tokens per check, and the connection takes
what one frame's handling added from its ``message-rate`` bucket
(chatd.connection).
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Final

import icu
import precis_i18n

__all__ = ["MAX_CHARS", "InvalidName", "Name", "cost", "meter", "parse", "refusal", "skeleton"]

#: Longest name (in characters) a client may claim, before and after enforcement.
MAX_CHARS: Final = 256

_SHOWN = precis_i18n.get_profile("NicknameCasePreserved")
_ADDRESS = precis_i18n.get_profile("NicknameCaseMapped")
_SPOOF = icu.SpoofChecker()
_MARKS = icu.SpoofChecker()
_MARKS.setChecks(icu.USpoofChecks.INVISIBLE)
#: Characters that render as blank and are not spaces: Unicode names them
#: blank or filler. PRECIS allows the symbols and letters among them; the
#: Hangul fillers it refuses too, but this names them for what they are.
BLANK: Final = frozenset({
    "\u115f", "\u1160", "\u2800", "\u3164", "\uffa0",  # Hangul fillers, BRAILLE PATTERN BLANK
    "\U00016fe4",  # KHITAN SMALL SCRIPT FILLER
    "\U0001da7f", "\U0001da80",  # SIGNWRITING LOCATION-WALLPLANE / FLOORPLANE SPACE
})
_DOT_ABOVE = "\u0307"
#: UTF-8 bytes of a name checked per flood-bucket token (a message's own
#: handling is about one token's worth of work; see ``cost``).
BYTES_PER_TOKEN: Final = 64


class Meter:
    """Tokens charged for name checks since start (``tokens``): read it
    before and after handling a frame; the difference is that frame's
    name checks."""

    __slots__ = ("tokens",)

    def __init__(self) -> None:
        self.tokens = 0


meter = Meter()


def cost(raw: str) -> int:
    """Flood-bucket tokens one uncached check of ``raw`` costs beyond the
    message's own: one per ``BYTES_PER_TOKEN`` UTF-8 bytes, so a short name
    is free and 254 CJK characters (762 bytes) cost 11."""
    return len(raw.encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN


#: Skeleton and case folding feed each other (``M`` -> ``m`` -> ``rn``);
#: three rounds reach the fixed point for every code point (tested).
_SKELETON_ROUNDS = 8


class InvalidName(ValueError):
    """A name no client may use; ``reason`` says why, for the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Name:
    """A valid name in its three forms.

    ``shown``: what other users see (PRECIS NicknameCasePreserved).
    ``address``: what the name is compared as when a client names a user
    (PRECIS NicknameCaseMapped): ``Alice`` reaches ``alice``.
    ``keys``: UTS #39 skeletons, case-folded; two names that share a key
    look alike, so only one of them may be held in a room.
    """

    __slots__ = ("shown", "address", "keys")

    def __init__(self, shown: str, address: str, keys: frozenset[str]) -> None:
        self.shown = shown
        self.address = address
        self.keys = keys

    def __repr__(self) -> str:
        return f"Name({self.shown!r})"


def skeleton(text: str) -> str:
    """The UTS #39 skeleton of ``text`` (NFD, each character mapped to its
    confusable prototype, NFD again), case-folded, repeated until it no
    longer changes: ``skeleton("ALICE") == skeleton("aIice")`` is false but
    ``skeleton("аlice") == skeleton("alice")`` (Cyrillic a) is true.
    Meant for names that passed ``parse``; any string is accepted."""
    for _ in range(_SKELETON_ROUNDS):
        folded = unicodedata.normalize("NFD", _SPOOF.getSkeleton(0, text).casefold())
        if folded == text:
            break
        text = folded
    return text


def parse(raw: str) -> Name:
    """The name ``raw`` as chatd shows and compares it.

    Raises ``InvalidName`` (with a reason naming the offending character)
    for an empty or all-space name, one over ``MAX_CHARS`` characters, one
    that starts with a combining mark, or one the PRECIS Nickname profile
    refuses (RFC 8266 section 2.3; RFC 8264 section 9 for the classes).
    """
    result = _parse(raw)
    if isinstance(result, str):
        raise InvalidName(result)
    return result


def refusal(raw: str) -> str | None:
    """Why ``raw`` cannot be used as it is, or None when it can.

    For identifiers that are matched exactly elsewhere (GradAgenda
    ``user-id`` is a token's ``sub`` and a session member), so chatd must
    not rewrite them: on top of ``parse``'s rule, the name must already be
    in its shown form (``ａｌｉｃｅ`` is refused: it would be shown as
    ``alice``)."""
    result = _parse(raw)
    if isinstance(result, str):
        return result
    if result.shown != raw:
        return f"is not in its normalised form (it would be shown as {result.shown!r})"
    return None


#: Printable ASCII words joined by single spaces (no space first or
#: last): for these, PRECIS enforcement changes nothing but the case
#: (RFC 8264 section 9.11: printable ASCII is PVALID in the FreeformClass;
#: NFKC and the width, space and trimming rules of RFC 8266 section 2.2
#: leave such a name as it is, and its case mapping is ``str.lower``),
#: and none of chatd's own rules can apply (no blank character, no
#: combining mark). Tested against the full path on every printable ASCII
#: string of up to three characters and on random ones.
_PLAIN = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")


@lru_cache(maxsize=4096)
def _parse(raw: str) -> Name | str:
    """A ``Name``, or the reason ``raw`` is not one (cached either way;
    exceptions are not cached, so a fresh one is raised each time).

    Most names are plain ASCII (``_PLAIN``): they skip PRECIS (~60 µs for
    a short name, two pure-Python profiles) and the mark checks, and keep
    the skeletons (~6 µs each, one when the name is lower-case already)."""
    if len(raw) > MAX_CHARS:
        return f"is longer than {MAX_CHARS} characters"
    meter.tokens += cost(raw)
    if _PLAIN.fullmatch(raw) is not None:
        return _name(raw, raw.lower())
    return _checked(raw)


def _checked(raw: str) -> Name | str:
    """``_parse`` for any ``raw`` of at most ``MAX_CHARS`` characters,
    through PRECIS and every rule of chatd's."""
    for char in raw:
        if char in BLANK:
            return f"contains a character that shows as blank ({_describe(char)})"
    try:
        shown = _SHOWN.enforce(raw)
        address = _ADDRESS.enforce(raw)
    except UnicodeEncodeError as exc:
        return _explain(exc)
    if len(shown) > MAX_CHARS or len(address) > MAX_CHARS:
        return f"is longer than {MAX_CHARS} characters once normalised"
    if unicodedata.category(shown[0]).startswith("M"):
        return f"starts with a combining mark ({_describe(shown[0])})"
    if _MARKS.check(shown):
        return "repeats a combining mark (it would show once)"
    hidden = _hidden_dot(shown)
    if hidden is not None:
        return f"puts a dot above a letter that has one ({_describe(hidden)} + U+0307)"
    return _name(shown, address)


def _name(shown: str, address: str) -> Name:
    """The ``Name`` of a name that passed, with its skeletons."""
    key = skeleton(shown)
    return Name(shown, address, frozenset((key, key if address == shown else skeleton(address))))


def _hidden_dot(text: str) -> str | None:
    """The Soft_Dotted letter (``i``, ``j``, Cyrillic ``і``, ...) followed by
    U+0307 COMBINING DOT ABOVE among its marks, if any (UTS #39 section
    5.4: the mark overlays the dot already there)."""
    base = None
    for char in unicodedata.normalize("NFD", text):
        if unicodedata.combining(char):
            if char == _DOT_ABOVE and base is not None:
                return base
        else:
            soft = icu.Char.hasBinaryProperty(char, icu.UProperty.SOFT_DOTTED)
            base = char if soft else None
    return None


# precis-i18n reports what it refused as "DISALLOWED/<kind>".
_KINDS = {
    "controls": "contains a control character",
    "precis_ignorable_properties": "contains an invisible or formatting character",
    "zero_width_joiner": "contains an invisible or formatting character",
    "zero_width_nonjoiner": "contains an invisible or formatting character",
    "unassigned": "contains an unassigned character",
}


def _explain(exc: UnicodeEncodeError) -> str:
    kind = exc.reason.rpartition("/")[2]
    if kind == "empty":
        return "is empty or only spaces"
    if kind == "not_idempotent":
        return "changes each time it is normalised"
    if exc.end - exc.start != 1:
        return "is not allowed"
    char = exc.object[exc.start]
    what = _KINDS.get(kind, "contains a character not allowed in names")
    return f"{what} ({_describe(char)})"


def _describe(char: str) -> str:
    """``U+200B ZERO WIDTH SPACE``; code point alone when it has no name."""
    name = unicodedata.name(char, "")
    return f"U+{ord(char):04X}" + (f" {name}" if name else "")
