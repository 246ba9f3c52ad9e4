"""The server API: JSON over HTTP for the operator and the application's backend.

``POST /api/METHOD`` with a JSON object as the body (an empty body is
``{}``), answered with JSON and a conventional status: 200 done, 400 a
body or parameter that is wrong (the error says which), 401 a missing or
wrong key, 404 an unknown method or a thing that does not exist, 405 not
a POST, 411 no Content-Length, 413 a body over ``MAX_BODY`` bytes, 429 too
many wrong keys from this address, 503 the store cannot take the change.
Every answer is an object; an error is ``{"error": "..."}``.

Served where ``/metrics`` is: on the ``admin-host`` listener when there is
one, else on the main listener, under ``/api/``; the admin page
(``chatd/web/admin.*``) is served beside it at ``/admin/``.

**The key** (``api-key`` in the config; on the embedded default generated
and kept in the store) comes in ``Authorization: Bearer KEY`` or
``X-API-Key: KEY``, is compared in constant time (``hmac.compare_digest``)
and never logged. Each address (IPv6: each /64) may present ``KEY_BURST`` wrong keys, then
one more every ``1 / KEY_RATE`` seconds; beyond that it gets 429 (with
``Retry-After``) without its key being looked at. Wrong and missing keys
and refusals are counted (``chatd_api_auth_failures_total``).

Every request is logged once, and every action that changes something
once more on ``chatd.audit``: the method, whom, why, from which address
(docs/api.md lists the methods, with a real exchange each).
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from importlib import resources
from typing import Annotated, Any

import msgspec
import trio
from msgspec import UNSET, UnsetType
from prometheus_client.core import CounterMetricFamily, Metric

from chatd import names
from chatd.broker.wire import Moderated
from chatd.config import MAX_RETENTION_AGE, MAX_STORED_INT
from chatd.handshake import HttpRequest, response
from chatd.logs import address_key
from chatd.http import CONTENT_SECURITY_POLICY
from chatd.moderation import (
    API_CALLER, MAX_DURATION, NOTICE_SENDER, TARGETS, Moderation, Operate, Operator, Rule, audit,
    ip_network, name_keys, new_rule_id, now_ms, parse_ip,
)
from chatd.router import DEFERRED, Router, RouterError
from chatd.store import moderation as db

log = logging.getLogger("chatd.api")

PREFIX = "/api/"
PAGE = "/admin/"
#: Largest request body, in bytes.
MAX_BODY = 64 * 1024
#: Wrong keys an address may present at once, and per second after that.
KEY_BURST, KEY_RATE = 10, 0.2
#: Addresses whose wrong keys are remembered at most (oldest forgotten).
_KEY_BUCKETS = 10_000
#: Close codes ``disconnect`` may send (RFC 6455 section 7.4).
_CLOSE_CODES = {1000, 1001, 1008, 1011, 1012, 1013} | set(range(3000, 5000))
_JSON = "application/json"
#: Sent with the admin page's files: the web client's policy (this origin
#: only, no inline script) and headers (chatd.http).
PAGE_HEADERS = (("Content-Security-Policy", CONTENT_SECURITY_POLICY),
                ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
                ("Cache-Control", "no-cache"))
#: Methods that change nothing (logged at debug when they succeed).
_READS = {"presence", "info", "bans", "mutes", "history", "activity"}
#: Actions kept for ``activity``.
RECENT = 100


#: A seq or a count as the store holds it: a larger number would make the
#: store job raise and fail the store (chatd.config.MAX_STORED_INT).
Stored = Annotated[int, msgspec.Meta(ge=0, le=MAX_STORED_INT)]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- request bodies ----------------------------------------------------------


class _In(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, rename="kebab"):
    pass


class _Target(_In, kw_only=True):
    """Exactly one of name, user, address (and device for disconnect)."""

    name: str | UnsetType = UNSET
    user: str | UnsetType = UNSET
    address: str | UnsetType = UNSET


class PublishIn(_In, kw_only=True):
    text: str
    room: str | UnsetType = UNSET
    session: str | UnsetType = UNSET


class PresenceIn(_In, kw_only=True):
    room: str


class InfoIn(_In, kw_only=True):
    pass


class DisconnectIn(_Target, kw_only=True):
    device: str | UnsetType = UNSET
    code: int = 1008
    reason: str = "disconnected by the operator"


class BanIn(_Target, kw_only=True):
    duration: float | None = None
    reason: str = ""


class MuteIn(BanIn, kw_only=True):
    room: str | None = None


class LiftIn(_Target, kw_only=True):
    id: str | UnsetType = UNSET
    room: str | None | UnsetType = UNSET


class ListIn(_In, kw_only=True):
    pass


class HistoryIn(_In, kw_only=True):
    session: str
    before: Stored | None = None
    after: Stored | None = None
    limit: int = 100


class DeleteMessageIn(_In, kw_only=True):
    session: str
    seq: Stored


class EraseUserIn(_In, kw_only=True):
    user: str


class RetentionIn(_In, kw_only=True):
    session: str | UnsetType = UNSET
    count: Stored | None | UnsetType = UNSET
    age: Annotated[float, msgspec.Meta(le=MAX_RETENTION_AGE)] | None | UnsetType = UNSET
    prune: bool = False


class Api:
    """The API for one server: ``key`` is the API key."""

    def __init__(self, moderation: Moderation, router: Router, key: str, metrics: Any) -> None:
        self.moderation = moderation
        self.router = router
        self._key = key.encode()
        #: address -> (tokens, when) for wrong keys.
        self._buckets: dict[str, tuple[float, float]] = {}
        #: (method, status) -> requests answered.
        self.requests: Counter[tuple[str, int]] = Counter()
        #: why -> authentication failures ("missing", "wrong", "limited").
        self.auth_failures: Counter[str] = Counter()
        self._page = _load_page()
        #: The last ``RECENT`` actions on this node, for the admin page.
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self._methods: dict[str, tuple[type, Callable[[Any, str], Awaitable[Any]]]] = {
            "publish": (PublishIn, self.publish),
            "presence": (PresenceIn, self.presence),
            "info": (InfoIn, self.info),
            "disconnect": (DisconnectIn, self.disconnect),
            "ban": (BanIn, self.ban),
            "unban": (LiftIn, self.unban),
            "bans": (ListIn, self.bans),
            "mute": (MuteIn, self.mute),
            "unmute": (LiftIn, self.unmute),
            "mutes": (ListIn, self.mutes),
            "history": (HistoryIn, self.history),
            "delete-message": (DeleteMessageIn, self.delete_message),
            "erase-user": (EraseUserIn, self.erase_user),
            "retention": (RetentionIn, self.retention),
            "activity": (ListIn, self.activity),
        }
        metrics.registry.register(self)

    @staticmethod
    def serves(path: str) -> bool:
        return path.startswith(PREFIX) or path.startswith(PAGE) or path == PAGE.rstrip("/")

    # --- HTTP ---------------------------------------------------------------------

    async def answer(self, request: HttpRequest, trailing: bytes,
                     receive: Callable[[], Awaitable[bytes]], client: str) -> bytes:
        """The whole HTTP response to ``request`` (its body: ``trailing`` and
        what ``receive`` reads)."""
        path = request.path
        if not path.startswith(PREFIX):
            return self._page_file(request)
        method = path[len(PREFIX):]
        status, body = await self._call(method, request, trailing, receive, client)
        label = method if method in self._methods else "unknown"
        self.requests[(label, status)] += 1
        # Reads that succeed (the admin page polls) and refusals past the
        # wrong-key limit (a brute force) are logged at debug only.
        quiet = (status == 200 and label in _READS) or status == 429
        log.log(logging.DEBUG if quiet else logging.INFO, "api %s from %s: %d", _short(method),
                client, status, extra={"peer": client, "code": status})
        headers: tuple[tuple[str, str], ...] = ()
        if status == 401:
            headers = (("WWW-Authenticate", 'Bearer realm="chatd"'),)
        elif status == 429:
            headers = (("Retry-After", str(math.ceil(1 / KEY_RATE))),)
        elif status == 405:
            headers = (("Allow", "POST"),)
        return response(status, msgspec.json.encode(body) + b"\n", content_type=_JSON,
                        headers=headers + (("Cache-Control", "no-store"),)
                        if status < 300 else headers)

    async def _call(self, method: str, request: HttpRequest, trailing: bytes,
                    receive: Callable[[], Awaitable[bytes]], client: str) -> tuple[int, Any]:
        parsed = parse_ip(client)  # "[2001:db8::1]" has no port behind a proxy
        ip = client if parsed is None else str(parsed)
        refusal = self._authenticate(request, ip)
        if refusal is not None:
            return refusal
        if request.method != "POST":
            return 405, {"error": "the API takes POST requests"}
        entry = self._methods.get(method)
        if entry is None:
            return 404, {"error": f"no API method {_short(method)}",
                         "methods": sorted(self._methods)}
        try:
            data = await _read_body(request, trailing, receive)
        except ApiError as exc:
            return exc.status, {"error": exc.message}
        kind, handler = entry
        try:
            body = msgspec.json.decode(data or b"{}", type=kind)
        except msgspec.ValidationError as exc:
            return 400, {"error": f"{method}: {exc}"}
        except msgspec.DecodeError as exc:
            return 400, {"error": f"the body is not JSON: {exc}"}
        try:
            return 200, await handler(body, client)
        except ApiError as exc:
            return exc.status, {"error": exc.message}

    def _authenticate(self, request: HttpRequest, ip: str) -> tuple[int, Any] | None:
        given = request.header("x-api-key")
        auth = request.header("authorization")
        if given is None and auth is not None:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer":
                given = value.strip()
        now = time.monotonic()
        bucket = address_key(ip)  # IPv6 by /64, as the logs' per-address bound
        tokens, stamp = self._buckets.get(bucket, (float(KEY_BURST), now))
        tokens = min(float(KEY_BURST), tokens + (now - stamp) * KEY_RATE)
        if tokens < 1:
            self.auth_failures["limited"] += 1
            self._buckets[bucket] = (tokens, now)
            return 429, {"error": "too many wrong API keys from this address: wait"}
        if given is None:
            self.auth_failures["missing"] += 1
            return 401, {"error": "an API key is needed: Authorization: Bearer KEY"}
        if hmac.compare_digest(given.encode(errors="surrogateescape"), self._key):
            return None
        self.auth_failures["wrong"] += 1
        if len(self._buckets) >= _KEY_BUCKETS and bucket not in self._buckets:
            del self._buckets[next(iter(self._buckets))]
        self._buckets[bucket] = (tokens - 1, now)
        log.warning("api: wrong API key from %s", ip)
        return 401, {"error": "wrong API key"}

    def _page_file(self, request: HttpRequest) -> bytes:
        head = request.method == "HEAD"
        if request.method not in ("GET", "HEAD"):
            return response(405, "GET only\n", headers=(("Allow", "GET, HEAD"),), head_only=head)
        name = request.path[len(PAGE):] if request.path.startswith(PAGE) else None
        if name is None:
            return response(301, "", headers=(("Location", PAGE),), head_only=head)
        found = self._page.get(name or "admin.html")
        if found is None:
            return response(404, "not found\n", head_only=head)
        body, kind = found
        return response(200, body, content_type=kind, headers=PAGE_HEADERS, head_only=head)

    # --- the router --------------------------------------------------------------

    async def _in_router(self, fn: Callable[[Operate], Any]) -> Any:
        try:
            return await self.router.call(Operate(client=API_CALLER, fn=fn))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ApiError(503, "the server is shutting down") from None
        except RouterError as exc:  # a bug, logged with its traceback by the router
            raise ApiError(500, f"internal error: {exc}") from None

    def _audit(self, message: str, *args: Any) -> None:
        """Log one operator action on ``chatd.audit`` and keep it for ``activity``."""
        audit.info(message, *args)
        self.recent.append({"time": time.time(), "action": message % args})

    async def _stored(self, run: Callable, then: Callable[[Any], Any] = lambda r: r) -> Any:
        """Run a store job; ``then(result)`` in the router task once committed."""
        moderation = self.moderation

        def start(cmd: Operate) -> Any:
            def done(result: Any) -> None:
                try:
                    Router.resolve(cmd, then(result))
                except ApiError as exc:
                    Router.resolve(cmd, exc)

            refused = moderation.submit(run, done, lambda why: Router.resolve(
                cmd, ApiError(503, why)))
            return ApiError(503, refused) if refused else DEFERRED

        return _raise(await self._in_router(start))

    # --- methods -----------------------------------------------------------------

    async def publish(self, body: PublishIn, actor: str) -> Any:
        if (body.room is UNSET) == (body.session is UNSET):
            raise ApiError(400, "publish: give exactly one of room (a lobby room) or session "
                                "(a GradAgenda session)")
        if not body.text:
            raise ApiError(400, "publish: text must not be empty")
        moderation = self.moderation
        if body.room is not UNSET:
            room = body.room
            reached = await self._in_router(lambda cmd: moderation.notice(room, body.text))
            moderation.actions["publish"] += 1
            self._audit("publish to room %r by %s: %r", room, actor, _short(body.text, 200))
            return {"room": room, "sender": NOTICE_SENDER, "delivered": reached}
        session = body.session

        def start(cmd: Operate) -> Any:
            moderation.session_notice(session, body.text, lambda result: Router.resolve(
                cmd, result if not isinstance(result, str) else ApiError(
                    404 if result == "no such session" else 503, result)))
            return DEFERRED

        result = _raise(await self._in_router(start))
        moderation.actions["publish"] += 1
        self._audit("publish to session %r by %s: %r", session, actor, _short(body.text, 200))
        return result

    async def presence(self, body: PresenceIn, actor: str) -> Any:
        clients = await self._in_router(lambda cmd: self.moderation.presence(body.room))
        return {"room": body.room, "clients": clients}

    async def info(self, body: InfoIn, actor: str) -> Any:
        return await self._in_router(lambda cmd: self._info())

    def _info(self) -> dict[str, Any]:
        server = self.moderation.server
        endpoints: Counter[str] = Counter(c.path for c in server.connections)
        writer = self.moderation.writer
        cluster = server.cluster
        broker = server.broker
        return {
            "node": broker.node,
            "nodes": sorted({broker.node, *(cluster.nodes if cluster is not None else ())}),
            "connections": {"total": len(server.connections),
                            "protocols": dict(sorted(server.metrics.connections.items())),
                            "endpoints": dict(sorted(endpoints.items()))},
            "rooms": {name: len(room) for name, room in sorted(server.lobby.rooms.items())},
            "store": {"name": server.store.name,
                      "state": "failed" if writer is not None and writer.failed else "ok",
                      "pending": writer.pending if writer is not None else 0},
            "broker": {"kind": "redis" if broker.shared else "local",
                       "state": broker.ready() or "ok"},
            "rules": {"bans": sum(1 for r in self.moderation.rules.values()
                                  if r.row.action == "ban"),
                      "mutes": sum(1 for r in self.moderation.rules.values()
                                   if r.row.action == "mute")},
        }

    async def disconnect(self, body: DisconnectIn, actor: str) -> Any:
        target, value = _target(body, ("name", "user", "device", "address"))
        if body.code not in _CLOSE_CODES:
            raise ApiError(400, "disconnect: code must be 1000, 1001, 1008, 1011-1013 or "
                                "3000-4999 (RFC 6455 section 7.4)")
        reason = _cut(body.reason)
        item = Moderated(op="disconnect", target=target, value=value, code=body.code,
                         reason=reason)
        count = await self._in_router(lambda cmd: self.moderation.apply(item))
        self.moderation.actions["disconnect"] += 1
        self._audit("disconnect %s %r with %d (%r) by %s: %d here", target, value, body.code,
                   reason, actor, count)
        return {"disconnected": count}

    async def ban(self, body: BanIn, actor: str) -> Any:
        return await self._add_rule("ban", body, None, actor)

    async def mute(self, body: MuteIn, actor: str) -> Any:
        return await self._add_rule("mute", body, body.room, actor)

    async def _add_rule(self, action: str, body: BanIn, room: str | None, actor: str) -> Any:
        target, value = _target(body, TARGETS)
        if body.duration is not None and not 0 < body.duration <= MAX_DURATION:
            raise ApiError(400, f"{action}: duration must be 0 < seconds <= {MAX_DURATION} "
                                "(or null: until lifted)")
        created = now_ms()
        expires = None if body.duration is None else created + int(body.duration * 1000)
        row = db.RuleRow(new_rule_id(), action, target, value, room, _cut(body.reason, 500),
                         created, expires, actor)
        rule = Rule(row)
        moderation = self.moderation

        def then(_: None) -> Any:
            closed = moderation.apply(Moderated(op="rule", rule=list(row)))
            return {**rule.as_json(), "disconnected": closed}

        result = await self._stored(lambda s: db.add_rule(s, row), then)
        moderation.actions[action] += 1
        self._audit("%s %s (%r) by %s: %d connections closed here", action, rule.describe(),
                    row.reason or "no reason given", actor, result["disconnected"])
        return result

    async def unban(self, body: LiftIn, actor: str) -> Any:
        return await self._lift("ban", body, actor)

    async def unmute(self, body: LiftIn, actor: str) -> Any:
        return await self._lift("mute", body, actor)

    async def _lift(self, action: str, body: LiftIn, actor: str) -> Any:
        rules = self.moderation.rules.values()
        if body.id is not UNSET:
            lifted = [r for r in rules if r.row.id == body.id and r.row.action == action]
        else:
            target, value = _target(body, TARGETS)
            value = _normal(target, value, action)
            keys = name_keys(value) if target == "name" else frozenset()
            lifted = [r for r in rules if r.row.action == action and r.row.target == target
                      and (r.row.value == value or not r.keys.isdisjoint(keys))
                      and (body.room is UNSET or r.row.room == body.room)]
        if not lifted:
            raise ApiError(404, f"un{action}: no such {action}")
        ids = [r.row.id for r in lifted]
        moderation = self.moderation
        await self._stored(lambda s: db.remove_rules(s, ids),
                           lambda _: moderation.apply(Moderated(op="unrule", ids=ids)))
        moderation.actions[f"un{action}"] += 1
        for rule in lifted:
            self._audit("un%s %s by %s", action, rule.describe(), actor)
        return {"lifted": [r.as_json() for r in lifted]}

    async def activity(self, body: ListIn, actor: str) -> Any:
        """The last actions taken on this node, newest first."""
        return {"actions": list(reversed(self.recent))}

    async def bans(self, body: ListIn, actor: str) -> Any:
        return {"bans": self._rules("ban")}

    async def mutes(self, body: ListIn, actor: str) -> Any:
        return {"mutes": self._rules("mute")}

    def _rules(self, action: str) -> list[dict[str, Any]]:
        stamp = now_ms()
        return [r.as_json() for r in self.moderation.rules.values()
                if r.row.action == action and r.live(stamp)]

    async def history(self, body: HistoryIn, actor: str) -> Any:
        if not 1 <= body.limit <= 1000:
            raise ApiError(400, "history: limit must be 1 to 1000")
        self._session_exists(body.session)
        rows = await self._stored(lambda s: s.history(body.session, before=body.before,
                                                      after=body.after, limit=body.limit))
        return {"session": body.session, "messages": [
            {"seq": seq, "sender-id": sender, "message": msgspec.json.decode(message),
             "sender-timestamp": sent, "server-timestamp": stored}
            for seq, sender, message, sent, stored in rows]}

    def _session_exists(self, session_id: str) -> None:
        sessions = self.moderation.sessions
        if sessions is None:
            raise ApiError(404, "no GradAgenda endpoint is mounted")
        if session_id not in sessions.sessions:
            raise ApiError(404, "no such session")

    async def delete_message(self, body: DeleteMessageIn, actor: str) -> Any:
        self._session_exists(body.session)
        session_id = body.session

        def recount(deleted: bool) -> bool:
            if deleted:
                self.moderation.recount((session_id,))
            return deleted

        deleted = await self._stored(lambda s: db.delete_message(s, body.session, body.seq,
                                                                 NOTICE_SENDER), recount)
        if not deleted:
            raise ApiError(404, "delete-message: no such message")
        self.moderation.actions["delete-message"] += 1
        self._audit("delete-message %d of session %r by %s", body.seq, body.session, actor)
        return {"session": body.session, "seq": body.seq, "deleted": True}

    async def erase_user(self, body: EraseUserIn, actor: str) -> Any:
        """Remove the user's messages everywhere, the user from every
        group session and the groups nobody else is in (through the
        sessions service, so members are told), and every message of the
        user's direct sessions. A direct session itself stays: it cannot
        be deleted, and its id is made of the pair, so a new one would
        hand out its seqs again."""
        sessions = self.moderation.sessions
        if sessions is None:
            raise ApiError(404, "no GradAgenda endpoint is mounted")
        user = body.user

        def leave_sessions(cmd: Operate) -> dict[str, int]:
            from chatd.events import DeleteSession, ModifySession

            left = deleted = 0
            operator = Operator(user)
            for session in list(sessions.joined.get(user, {}).values()):
                rest = sorted(session.members - {user})
                if session.kind == "direct":
                    direct.append(session.id)
                elif not rest:
                    sessions.delete(DeleteSession(client=operator, cdid="erase-user",
                                                  session_id=session.id))
                    deleted += 1
                else:
                    sessions.modify(ModifySession(client=operator, cdid="erase-user",
                                                  session_id=session.id, members=rest))
                    left += 1
            return {"sessions-left": left, "sessions-deleted": deleted}

        direct: list[str] = []
        changed = await self._in_router(leave_sessions)

        def erase(store: Any) -> int:
            erased = db.erase_messages(store, user, NOTICE_SENDER)
            for session_id in direct:
                db.empty_session(store, session_id, NOTICE_SENDER)
            return erased

        def recount(erased: int) -> int:
            self.moderation.recount()  # every session the user may have written in
            return erased

        erased = await self._stored(erase, recount)
        self.moderation.actions["erase-user"] += 1
        self._audit("erase-user %r by %s: %d messages, %d sessions left, %d deleted, "
                    "%d direct emptied", user, actor, erased, changed["sessions-left"],
                    changed["sessions-deleted"], len(direct))
        return {"user": user, "messages": erased, **changed,
                "direct-sessions-emptied": len(direct)}

    async def retention(self, body: RetentionIn, actor: str) -> Any:
        moderation = self.moderation
        out: dict[str, Any] = {"count": moderation.retention_count,
                               "age": moderation.retention_age}
        if body.session is not UNSET:
            self._session_exists(body.session)
            count = None if body.count is UNSET else body.count
            age = None if body.age is UNSET else body.age
            if count is not None and count < 1:
                raise ApiError(400, "retention: count must be at least 1 (or null)")
            if age is not None and not age > 0:
                raise ApiError(400, "retention: age must be positive seconds (or null)")
            if body.count is not UNSET or body.age is not UNSET:
                await self._stored(lambda s: db.set_retention(
                    s, body.session, count, None if age is None else int(age * 1000)))
                moderation.actions["retention"] += 1
                self._audit("retention of session %r set to count %s, age %s s by %s",
                           body.session, count, age, actor)
            stored = await self._stored(db.retention)
            count, age_ms = stored.get(body.session, (moderation.retention_count, None if
                                                      moderation.retention_age is None else
                                                      int(moderation.retention_age * 1000)))
            out = {"session": body.session, "count": count,
                   "age": None if age_ms is None else age_ms / 1000}
        if body.prune:
            def start(cmd: Operate) -> Any:
                moderation.prune(lambda result: Router.resolve(
                    cmd, result if not isinstance(result, str) else ApiError(503, result)))
                return DEFERRED

            out["pruned"] = _raise(await self._in_router(start))
            self._audit("retention pruned %d messages now, asked by %s", out["pruned"], actor)
        return out

    # --- metrics -----------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("chatd_api_requests", "Server API requests answered",
                                       labels=["method", "status"])
        for (method, status), count in sorted(self.requests.items()):
            requests.add_metric([method, str(status)], count)
        yield requests
        failures = CounterMetricFamily("chatd_api_auth_failures",
                                       "Server API requests refused for their key",
                                       labels=["reason"])
        for reason in ("missing", "wrong", "limited"):
            failures.add_metric([reason], self.auth_failures[reason])
        yield failures

    def describe(self) -> list[Any]:
        return []


def _raise(result: Any) -> Any:
    if isinstance(result, ApiError):
        raise result
    return result


def _target(body: Any, allowed: tuple[str, ...]) -> tuple[str, str]:
    """The one target the body names, checked and in its stored form."""
    given = [(field, getattr(body, field)) for field in allowed
             if getattr(body, field, UNSET) is not UNSET]
    if len(given) != 1:
        raise ApiError(400, f"give exactly one of {', '.join(allowed)}")
    target, value = given[0]
    return target, _normal(target, value)


def _normal(target: str, value: str, action: str = "") -> str:
    if target in ("name", "user", "device"):
        try:
            name = names.parse(value)
        except names.InvalidName as exc:
            raise ApiError(400, f"{target} {_short(value)} {exc.reason}") from None
        return name.shown if target == "name" else value
    try:
        return str(ip_network(value))
    except ValueError:
        raise ApiError(400, f"address {_short(value)} is not an IP address or CIDR") from None


async def _read_body(request: HttpRequest, trailing: bytes,
                     receive: Callable[[], Awaitable[bytes]]) -> bytes:
    if "transfer-encoding" in request.headers:
        raise ApiError(411, "send the body with a Content-Length")
    length_text = request.header("content-length")
    if length_text is None:
        if trailing:
            raise ApiError(411, "send the body with a Content-Length")
        return b""
    if not length_text.isdigit():
        raise ApiError(400, "Content-Length is not a number")
    length = int(length_text)
    if length > MAX_BODY:
        raise ApiError(413, f"the body exceeds {MAX_BODY} bytes")
    data = trailing
    while len(data) < length:
        more = await receive()
        if not more:
            raise ApiError(400, "the body ended early")
        data += more
    return data[:length]


def _load_page() -> dict[str, tuple[bytes, str]]:
    files = {}
    root = resources.files("chatd") / "web"
    for name, kind in (("admin.html", "text/html"), ("admin.js", "text/javascript"),
                       ("admin.css", "text/css")):
        entry = root / name
        if entry.is_file():
            files[name] = (entry.read_bytes(), f"{kind}; charset=utf-8")
    return files


def _short(value: Any, limit: int = 64) -> str:
    text = repr(value) if not isinstance(value, str) else value
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _cut(text: str, limit: int = 123) -> str:
    data = text.encode()
    return text if len(data) <= limit else data[:limit].decode(errors="ignore")


__all__ = ["Api", "ApiError", "PAGE", "PREFIX"]
