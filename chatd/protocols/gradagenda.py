"""gradagenda: accounts on several devices, direct and group sessions.

The first action must be ``authenticate`` with a JWT (HS256) whose ``sub``
is the ``user-id`` and whose ``exp`` has not passed (``chatd.tokens``,
with the configured clock-skew leeway); anything else first gets a failed
``status-response``, and three failures end the connection (1008), as
does the auth timeout. A refused ``authenticate`` says why (which claim,
what is wrong) and is reported (``AuthFailed``). Every answer echoes the
action's ``cdid``. Frames that are not JSON chatd reads (``base.decode``:
syntax, too deep, numbers out of range) close the connection (1007); JSON
that is not a valid action gets a failed ``status-response``.

Actions whose answer goes to the asker alone (direct session info,
listing, history) are router requests answered here: several answers are
packed into ``batch-mode-action`` frames that fit the frame limit, then a
``succeeded`` status marks the end. Session changes and messages fan out
from ``chatd.sessions``, which calls ``encode``. A client's own
``batch-mode-action`` is handled as its actions one by one.

Checked here so that every frame the server sends fits the frame limit: a
message, or a session's participant list, whose answer would not fit is
refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from chatd import names, tokens
from chatd.events import (
    Command, CreateSession, DeleteSession, DirectSessionInfo, Event, ListMarks, ListSessions,
    Login, Logout, MarkMessages, MarksInfo, ModifySession, ReadHistory, ReadMarksSetting,
    Refused, SendMessage, SessionInfo, Status, StoredMessage,
)
from chatd.protocols.base import (
    AuthFailed, Close, NotJSON, Output, Protocol, SafeInt, Send, Stream, WrongShape, decode,
    dumps,
)

log = logging.getLogger("chatd.gradagenda")

MAX_AUTH_FAILURES = 3
HISTORY_LIMIT = 100

Seq = Annotated[int, Meta(ge=0, le=2**63 - 1)]


# --- client actions --------------------------------------------------------


class _Action(msgspec.Struct, tag_field="type", rename="kebab", kw_only=True):
    cdid: str


class Authenticate(_Action, tag="authenticate"):
    user_id: str
    device_id: str
    token: str


class RequestDirectSessionInfo(_Action, tag="request-direct-session-info"):
    user_id: str


class RequestMutableSessionCreation(_Action, tag="request-mutable-session-creation"):
    user_id: list[str]


class RequestMutableSessionModification(_Action, tag="request-mutable-session-modification"):
    session_id: str
    user_id: list[str]
    #: Issue 23 (chatd.roles): the new admin list; absent: unchanged.
    admin_id: list[str] | None = None


class RequestMutableSessionDeletion(_Action, tag="request-mutable-session-deletion"):
    session_id: str


class RequestMutableSessionListing(_Action, tag="request-mutable-session-listing"):
    pass


class MessageIn(msgspec.Struct, rename="kebab"):
    type: str
    body: Any
    #: Issue 23: ``image`` (width, height) and ``voice`` (duration, ms) messages.
    media_id: Any = None
    width: Any = None
    height: Any = None
    duration: Any = None


class TextMessage(msgspec.Struct):
    """The only message type so far; stored and relayed in this form."""

    type: str
    body: str


class ImageMessage(msgspec.Struct, rename="kebab"):
    """An image (issue 23, chatd.media): ``body`` is the text a client that
    cannot show images shows (a caption, may be empty); pixels."""

    type: str
    body: str
    media_id: str
    width: int
    height: int


class VoiceMessage(msgspec.Struct, rename="kebab"):
    """A voice clip (issue 23, chatd.media); ``duration`` in milliseconds."""

    type: str
    body: str
    media_id: str
    duration: int


#: Largest width or height of an image, and duration of a voice clip (ms).
MAX_PIXELS = 65_535
MAX_DURATION_MS = 60 * 60 * 1000


def _media_message(message: MessageIn) -> bytes | str:
    """An image or voice message as stored, or why it is refused."""
    if not isinstance(message.body, str):
        return f"an {message.type} message's body must be a string (shown where it cannot be)"
    if not isinstance(message.media_id, str) or not message.media_id.startswith("media-") \
            or len(message.media_id) > 64:
        return f"an {message.type} message needs the media-id its upload answered"
    if message.type == "image":
        for key in ("width", "height"):
            value = getattr(message, key)
            if type(value) is not int or not 1 <= value <= MAX_PIXELS:
                return f"an image message needs '{key}': pixels, 1 to {MAX_PIXELS}"
        return dumps(ImageMessage(type="image", body=message.body, media_id=message.media_id,
                                  width=message.width, height=message.height))
    value = message.duration
    if type(value) is not int or not 1 <= value <= MAX_DURATION_MS:
        return f"a voice message needs 'duration': milliseconds, 1 to {MAX_DURATION_MS}"
    return dumps(VoiceMessage(type="voice", body=message.body, media_id=message.media_id,
                              duration=value))


class RequestSendingAMessage(_Action, tag="request-sending-a-message"):
    session_id: str
    message: MessageIn
    sender_timestamp: SafeInt  # relayed as sent


class RequestMessageHistory(_Action, tag="request-message-history"):
    session_id: str
    before: Seq | None = None
    after: Seq | None = None
    limit: Annotated[int, Meta(ge=1)] = HISTORY_LIMIT


# --- issue 23: delivery and read marks (chatd.marks) -----------------------------


class RequestMarkingMessages(_Action, tag="request-marking-messages"):
    session_id: str
    delivered_seq: Seq | None = None
    read_seq: Seq | None = None


class RequestMarks(_Action, tag="request-marks"):
    session_id: str


class RequestReadMarksSetting(_Action, tag="request-read-marks-setting"):
    enabled: bool


class BatchModeAction(msgspec.Struct, tag_field="type", tag="batch-mode-action"):
    actions: list[msgspec.Raw]
    cdid: Any = None


Action = (Authenticate | RequestDirectSessionInfo | RequestMutableSessionCreation
          | RequestMutableSessionModification | RequestMutableSessionDeletion
          | RequestMutableSessionListing | RequestSendingAMessage | RequestMessageHistory
          | RequestMarkingMessages | RequestMarks | RequestReadMarksSetting | BatchModeAction)
_decoder = msgspec.json.Decoder(Action)
ACTION_TYPES = {cls.__struct_config__.tag for cls in Action.__args__}


# --- server actions --------------------------------------------------------


class _Out(msgspec.Struct, tag_field="type", rename="kebab", kw_only=True, omit_defaults=True):
    cdid: Any = None


class StatusResponse(_Out, tag="status-response"):
    status: str
    message: str | None = None


class ProvidingSessionInfo(_Out, tag="providing-session-info"):
    session_id: str
    session_type: str
    status: str
    user_id: list[str]
    #: Issue 23 (chatd.roles): a group's owners and admins; absent for direct sessions.
    owner_id: list[str] | None = None
    admin_id: list[str] | None = None


class MessageBroadcast(_Out, tag="message-broadcast"):
    session_id: str
    sender_id: str
    message: Any
    sender_timestamp: int
    seq: int
    server_timestamp: int


class MarkOut(msgspec.Struct, rename="kebab", omit_defaults=True):
    user_id: str
    delivered_seq: int
    read_seq: int | None = None


class ProvidingMarks(_Out, tag="providing-marks"):
    session_id: str
    marks: list[MarkOut]


NOT_JSON = Close(1007, "frame is not valid JSON")


# Placeholders as wide as the real values can get, for the frame-size checks.
_WIDEST_SESSION_ID = "x" * 64
_WIDEST_SEQ = 2**63 - 1
_WIDEST_MS = 10**14
#: A ``message-broadcast``'s bytes besides its cdid, session-id, sender-id,
#: message and sender-timestamp, with the widest seq and server-timestamp.
_BROADCAST_KEYS = len(dumps(MessageBroadcast(
    cdid="", session_id="", sender_id="", message=msgspec.Raw(b""), sender_timestamp=0,
    seq=_WIDEST_SEQ, server_timestamp=_WIDEST_MS))) - 3 * len(b'""') - len(b"0")


class GradAgenda(Protocol):
    name = "gradagenda"
    auth_stage = True

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.user_id: str | None = None
        self.failures = 0

    # --- frames in -------------------------------------------------------------

    def receive(self, text: str) -> list[Output]:
        try:
            action = decode(_decoder, text)
        except NotJSON:
            return [NOT_JSON]
        except WrongShape as exc:
            return self._invalid(exc)
        if not isinstance(action, BatchModeAction):
            return self._act(action)
        outputs: list[Output] = []
        for raw in action.actions:
            try:
                inner = decode(_decoder, raw)
            except NotJSON:
                return [*outputs, NOT_JSON]
            except WrongShape as exc:
                outputs += self._invalid(exc)
            else:
                if isinstance(inner, BatchModeAction):
                    outputs += self._fail(inner.cdid, "batch-mode-action cannot be nested")
                else:
                    outputs += self._act(inner)
            if outputs and isinstance(outputs[-1], Close):
                break
        return outputs

    def _invalid(self, exc: WrongShape) -> list[Output]:
        value = exc.value
        if not isinstance(value, dict):
            return self._fail(None, "an action must be a JSON object")
        cdid, kind = value.get("cdid"), value.get("type")
        if kind is None:
            return self._fail(cdid, "an action needs a 'type'")
        if not isinstance(kind, str) or kind not in ACTION_TYPES:
            return self._fail(cdid, f"unknown action type {_short(kind)}")
        return self._fail(cdid, f"invalid {kind}: {exc}")

    def _fail(self, cdid: Any, message: str) -> list[Output]:
        """A failed status-response; before authentication it counts as a
        failed attempt, and the last allowed one ends the connection."""
        outputs: list[Output] = [Send(dumps(StatusResponse(cdid=cdid, status="failed",
                                                           message=message)))]
        if not self.authenticated:
            self.failures += 1
            if self.failures >= MAX_AUTH_FAILURES:
                outputs.append(Close(1008, "too many failed authentication attempts"))
        return outputs

    def _act(self, action: _Action) -> list[Output]:
        kind = type(action)
        if kind is Authenticate:
            if self.authenticated:
                return self._fail(action.cdid, "already authenticated")
        elif not self.authenticated:
            return self._fail(action.cdid, "authenticate first")
        if kind in _NAMED:
            bad = _bad_name(action)
            if bad:
                refused = self._fail(action.cdid, bad)
                if kind is Authenticate:
                    refused.insert(0, AuthFailed(action.user_id, bad))
                return refused
        return _HANDLERS[kind](self, action)

    def _direct_info(self, action: RequestDirectSessionInfo) -> list[Output]:
        return [DirectSessionInfo(cdid=action.cdid, peer=action.user_id)]

    def _create(self, action: RequestMutableSessionCreation) -> list[Output]:
        cdid, members = action.cdid, sorted({*action.user_id, self.user_id})
        return self._if_fits(cdid, len(dumps(_session_answer(cdid, members))),
                             CreateSession(cdid=cdid, members=members))

    def _modify(self, action: RequestMutableSessionModification) -> list[Output]:
        cdid = action.cdid
        if not action.user_id:
            return self._fail(cdid, "a session needs participants; delete it instead")
        members = sorted(set(action.user_id))
        admins = None if action.admin_id is None else sorted(set(action.admin_id))
        return self._if_fits(cdid, len(dumps(_session_answer(cdid, members, action.session_id,
                                                             admins))),
                             ModifySession(cdid=cdid, session_id=action.session_id,
                                           members=members, admins=admins))

    def _delete(self, action: RequestMutableSessionDeletion) -> list[Output]:
        return [DeleteSession(cdid=action.cdid, session_id=action.session_id)]

    def _list(self, action: RequestMutableSessionListing) -> list[Output]:
        return [ListSessions(cdid=action.cdid)]

    def _history(self, action: RequestMessageHistory) -> list[Output]:
        return [ReadHistory(cdid=action.cdid, session_id=action.session_id, before=action.before,
                            after=action.after, limit=min(action.limit, HISTORY_LIMIT))]

    def _mark(self, action: RequestMarkingMessages) -> list[Output]:
        if action.delivered_seq is None and action.read_seq is None:
            return self._fail(action.cdid, "request-marking-messages needs delivered-seq or "
                                           "read-seq")
        return [MarkMessages(cdid=action.cdid, session_id=action.session_id,
                             delivered=action.delivered_seq, read=action.read_seq)]

    def _marks(self, action: RequestMarks) -> list[Output]:
        return [ListMarks(cdid=action.cdid, session_id=action.session_id)]

    def _read_marks_setting(self, action: RequestReadMarksSetting) -> list[Output]:
        return [ReadMarksSetting(cdid=action.cdid, enabled=action.enabled)]

    def _authenticate(self, action: Authenticate) -> list[Output]:
        try:
            self._check_token(action)
        except tokens.TokenRefused as exc:
            reason = f"token refused: {exc}"
            return [AuthFailed(action.user_id, reason), *self._fail(action.cdid, reason)]
        self.authenticated = True
        self.user_id = action.user_id
        return [Login(cdid=action.cdid, user_id=action.user_id, device_id=action.device_id)]

    def _check_token(self, action: Authenticate) -> None:
        """Raises ``tokens.TokenRefused`` unless the token proves ``user-id``."""
        if not self.ctx.jwt_secret:
            raise tokens.TokenRefused("this server has no jwt-secret")
        claims = tokens.verify(self.ctx.jwt_secret, action.token, require_exp=True,
                               require_sub=True, leeway=self.ctx.jwt_leeway)
        if claims["sub"] != action.user_id:
            raise tokens.TokenRefused(f"its 'sub' {_short(claims['sub'])} is not this user-id")

    def _send_message(self, action: RequestSendingAMessage) -> list[Output]:
        cdid, message = action.cdid, action.message
        if message.type in ("image", "voice"):  # issue 23
            stored = _media_message(message)
            if isinstance(stored, str):
                return self._fail(cdid, stored)
        elif message.type != "text":
            return self._fail(cdid, f"unsupported message type {_short(message.type)}: "
                                    "'text', 'image' or 'voice'")
        elif not isinstance(message.body, str):
            return self._fail(cdid, "a text message's body must be a string")
        else:
            stored = dumps(TextMessage(type="text", body=message.body))
        return self._if_fits(cdid, broadcast_size(cdid, action.session_id, self.user_id, stored,
                                                  action.sender_timestamp),
                             SendMessage(cdid=cdid, session_id=action.session_id,
                                         message=msgspec.Raw(stored),
                                         sender_timestamp=action.sender_timestamp))

    def _if_fits(self, cdid: str, answer_size: int, command: Command) -> list[Output]:
        """``command``, unless its answer (``answer_size`` bytes) would
        exceed the frame limit."""
        limit = self.ctx.max_frame_bytes
        if answer_size > limit:
            return self._fail(cdid, f"too large: the answer would exceed the {limit}-byte "
                                    "frame limit")
        return [command]

    # --- answers from the router -------------------------------------------------

    def on_result(self, command: Command, result: Any) -> list[Output]:
        cdid = command.cdid
        if isinstance(result, str):
            return self._fail(cdid, result)
        if isinstance(command, Login):
            return [Send(dumps(StatusResponse(cdid=cdid, status="succeeded")))]
        if isinstance(command, DirectSessionInfo):
            return [Send(self.encode(msgspec.structs.replace(result, cdid=cdid)))]
        # Written as the socket drains (a listing may be longer than the
        # outbox): Stream, not one Send per frame queued at once.
        return [Stream(_answer_frames(cdid, (self.encode(event) for event in result),
                                      self.ctx.max_frame_bytes))]

    def on_disconnect(self) -> list[Command]:
        return [Logout()] if self.user_id is not None else []

    # --- events out --------------------------------------------------------------

    @classmethod
    def encode(cls, event: Event) -> bytes | None:
        if isinstance(event, StoredMessage):
            return dumps(MessageBroadcast(
                cdid=event.cdid, session_id=event.session_id, sender_id=event.sender_id,
                message=event.message, sender_timestamp=event.sender_timestamp, seq=event.seq,
                server_timestamp=event.server_timestamp))
        if isinstance(event, SessionInfo):
            return dumps(ProvidingSessionInfo(cdid=event.cdid, session_id=event.session_id,
                                              session_type=event.kind, status=event.status,
                                              user_id=event.members, owner_id=event.owners,
                                              admin_id=event.admins))
        if isinstance(event, MarksInfo):
            return dumps(ProvidingMarks(cdid=event.cdid, session_id=event.session_id, marks=[
                MarkOut(user_id=mark.user, delivered_seq=mark.delivered, read_seq=mark.read)
                for mark in event.marks]))
        if isinstance(event, Status):
            return dumps(StatusResponse(cdid=event.cdid, status="succeeded" if event.ok
                                        else "failed", message=event.message))
        if isinstance(event, Refused):
            return dumps(StatusResponse(cdid=event.cdid, status="failed", message=event.message))
        return None


#: Each action's handler (``_act`` has checked authentication first).
_HANDLERS = {
    Authenticate: GradAgenda._authenticate,
    RequestDirectSessionInfo: GradAgenda._direct_info,
    RequestMutableSessionCreation: GradAgenda._create,
    RequestMutableSessionModification: GradAgenda._modify,
    RequestMutableSessionDeletion: GradAgenda._delete,
    RequestMutableSessionListing: GradAgenda._list,
    RequestSendingAMessage: GradAgenda._send_message,
    RequestMessageHistory: GradAgenda._history,
    RequestMarkingMessages: GradAgenda._mark,
    RequestMarks: GradAgenda._marks,
    RequestReadMarksSetting: GradAgenda._read_marks_setting,
}
#: Actions carrying names other users see (``_bad_name`` checks them).
_NAMED = {Authenticate, RequestDirectSessionInfo, RequestMutableSessionCreation,
          RequestMutableSessionModification}


def broadcast_size(cdid: str, session_id: str, sender_id: str, stored: bytes,
                   sender_timestamp: int) -> int:
    """Bytes of the widest ``message-broadcast`` this message can become
    (``seq`` and ``server-timestamp`` as wide as they get), from its parts:
    the JSON of the three strings, the stored message and the timestamp's
    digits, plus the fixed keys (``_BROADCAST_KEYS``). Equal to encoding
    that whole broadcast (tested), without building it."""
    strings = len(dumps((cdid, session_id, sender_id))) - 4  # without '[', ']' and two ','
    return _BROADCAST_KEYS + strings + len(stored) + len(str(sender_timestamp))


def _bad_name(action: _Action) -> str | None:
    """What is wrong with a name other users would see, if anything.

    GradAgenda ids are matched exactly (a token's ``sub``, stored session
    members), so they are never rewritten: an id must already be in its
    ``chatd.names`` form, and one that is not is refused with the reason."""
    if isinstance(action, Authenticate):
        reason = names.refusal(action.device_id)
        if reason:
            return f"device-id {_short(action.device_id)} {reason}"
    users = getattr(action, "user_id", None)
    if isinstance(users, str):
        users = [users]
    for user in users or ():
        reason = names.refusal(user)
        if reason:
            return f"user-id {_short(user)} {reason}"
    return None


def _short(value: Any) -> str:
    """A client's value quoted in an error message, cut to a sane length."""
    text = repr(value)
    return text if len(text) <= 64 else text[:60] + "...'"


def _session_answer(cdid: str, members: list[str], session_id: str = _WIDEST_SESSION_ID,
                    admins: list[str] | None = None) -> _Out:
    """The widest ``providing-session-info`` for these members: as owner,
    the longest member's id; as admins, those asked for (issue 23)."""
    owner = [max(members, key=len)] if members else []
    return ProvidingSessionInfo(cdid=cdid, session_id=max(session_id, _WIDEST_SESSION_ID, key=len),
                                session_type="mutable", status="unchanged", user_id=members,
                                owner_id=owner, admin_id=admins or [])


def batch_frames(cdid: Any, actions: Iterable[bytes], limit: int) -> Iterator[bytes]:
    """Pack encoded actions, in order, into ``batch-mode-action`` frames of at
    most ``limit`` bytes; an action too large to wrap is sent on its own.
    Lazy: each frame is built when the writer asks for it."""
    head = b'{"type":"batch-mode-action","cdid":' + dumps(cdid) + b',"actions":['
    tail = b"]}"
    room = limit - len(head) - len(tail)
    batch: list[bytes] = []
    size = 0
    for action in actions:
        if batch and size + 1 + len(action) > room:
            yield head + b",".join(batch) + tail
            batch, size = [], 0
        if len(action) > room:
            yield action
            continue
        size += len(action) + (1 if batch else 0)
        batch.append(action)
    if batch:
        yield head + b",".join(batch) + tail


def _answer_frames(cdid: Any, actions: Iterable[bytes], limit: int) -> Iterator[bytes]:
    """A multi-action answer: its batch frames, then the succeeded status."""
    yield from batch_frames(cdid, actions, limit)
    yield dumps(StatusResponse(cdid=cdid, status="succeeded"))
