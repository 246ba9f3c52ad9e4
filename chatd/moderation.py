"""Moderation: bans, mutes and the operator's actions, one rule for five protocols.

A router service (``chatd.router``) installed after every other one. It
owns the rules (bans and mutes) and enforces them by wrapping the
handlers of the commands where a client takes a name, speaks, or logs in,
so the lobby and the GradAgenda sessions never know about it:

- **Bans** (``ban``): by ``name`` (and every look-alike: ``chatd.names``
  skeletons, so a ban of ``alice`` refuses ``Alice`` and ``аlice`` with a
  Cyrillic a), by ``user`` id (exactly: a GradAgenda ``user-id`` or a wcp
  ``user_id``), or by ``address`` (an IP or a CIDR, via ``ipaddress``). An
  address ban refuses the WebSocket handshake (HTTP 403); a name or user
  ban refuses the auth stage with the protocol's own refusal
  (``refuse``): multichat closes 1008, socialvp gets an ``outcome`` 403,
  wcp an ``error``, GradAgenda a failed ``status-response`` with the
  ``cdid``, each followed by a close 1008 whose reason says "banned"; a
  wschat ``usr`` is refused by closing 1008 (it has no answer form). A new
  ban closes every matching connection the same way.
- **Mutes** (``mute``): per lobby room or GradAgenda session (or every
  room), by name, user id or address. A muted client still reads; each
  message it sends gets its protocol's error (socialvp ``outcome`` 403,
  wcp ``error``, GradAgenda a failed ``status-response``) or, where the
  protocol has none (multichat, wschat), is dropped and counted
  (``chatd_moderation_refused_total``). Never relayed.
- **Durations**: a rule lasts ``duration`` seconds, or until lifted.
  Expired rules stop matching at once and are removed from the store.
- **The notice sender** (``NOTICE_SENDER``): the name ``publish`` speaks
  as. It is reserved: a claim of it (or a look-alike) gets the protocol's
  "name taken" answer, a wschat message as it is dropped, a GradAgenda
  login as it is refused.

Rules live in the store (``chatd.store.moderation``), so they survive a
restart; every change goes through the store's ``Writer`` (never in the
router task) and takes effect here once committed. **Several nodes**: each
change is published on ``chatd:cluster`` (``chatd.broker.wire.Moderated``)
and applied by every node when it arrives; every ``RELOAD_INTERVAL``
seconds each node also reloads the rules from the shared store, so a
pub/sub message lost on the way costs at most that long.

The API (``chatd.api``) acts through ``call``: a function run in the
router task, answered at once or after a store commit.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import msgspec
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from chatd import hub, names
from chatd.broker.base import CLUSTER
from chatd.broker.wire import Moderated
from chatd.events import (
    Join, Leave, Login, Logout, Message, Publish, Refused, Request, SendMessage, StoredMessage,
)
from chatd.logs import charged_to
from chatd.router import DEFERRED, PASS, Router, Service
from chatd.store import Failure, Job, Writer
from chatd.store import media as media_store
from chatd.store import moderation as db

if TYPE_CHECKING:
    from chatd.outbox import Client
    from chatd.server import Server
    from chatd.sessions import Sessions

log = logging.getLogger("chatd.moderation")
#: The audit trail: one line per operator action (what, whom, why, from where).
audit = logging.getLogger("chatd.audit")

#: The sender name of ``publish`` notices; no client can hold it.
NOTICE_SENDER = "chatd"
_NOTICE_KEYS = names.parse(NOTICE_SENDER).keys
#: Seconds between reloads of the rules from a shared store (cluster).
RELOAD_INTERVAL = 5.0
#: Seconds between sweeps for expired rules.
SWEEP_INTERVAL = 5.0
#: Longest rule, in seconds (ten years).
MAX_DURATION = 10 * 365 * 86400
TARGETS = ("name", "user", "address")


class Rule:
    """A ban or a mute, ready for matching. ``keys``: the look-alike keys
    of a name rule; ``network``: an address rule's network."""

    __slots__ = ("row", "keys", "network")

    def __init__(self, row: db.RuleRow) -> None:
        self.row = row
        self.keys: frozenset[str] = frozenset()
        self.network = None
        if row.target == "name":
            self.keys = names.parse(row.value).keys
        elif row.target == "address":
            self.network = ip_network(row.value)

    def live(self, now_ms: int) -> bool:
        return self.row.expires_ms is None or self.row.expires_ms > now_ms

    def covers(self, room: str | None) -> bool:
        return self.row.room is None or self.row.room == room

    def matches(self, keys: frozenset[str], ids: tuple[str | None, ...],
                ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        target = self.row.target
        if target == "name":
            return not self.keys.isdisjoint(keys)
        if target == "user":
            return self.row.value in ids
        return ip is not None and ip in self.network

    def as_json(self) -> dict[str, Any]:
        row = self.row
        return {"id": row.id, "action": row.action, row.target: row.value, "room": row.room,
                "reason": row.reason, "created": row.created_ms / 1000,
                "expires": None if row.expires_ms is None else row.expires_ms / 1000,
                "by": row.actor}

    def describe(self) -> str:
        row = self.row
        where = "" if row.action == "ban" else f" in {row.room or 'every room'}"
        until = ("until lifted" if row.expires_ms is None
                 else f"for {max(0, row.expires_ms - row.created_ms) / 1000:g} s")
        return f"{row.target} {row.value!r}{where} {until}"


def parse_ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of an address as chatd logs it (``1.2.3.4:5``, ``[::1]:5``, ``1.2.3.4``)."""
    if not text:
        return None
    host = text
    if text.startswith("["):
        host = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        host = text.partition(":")[0]
    return _host_ip(host)


@functools.lru_cache(maxsize=4096)
def _host_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``parse_ip`` of a host without its port; cached (a few µs each, and
    every join asks: a storm comes from few hosts). Addresses are immutable."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def ip_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address rule's network (ValueError if ``text`` is no IP or CIDR).
    An IPv4-mapped IPv6 network (``::ffff:192.0.2.0/120``, as a dual-stack
    listener shows IPv4 clients) is its IPv4 network, since ``parse_ip``
    reads such clients as IPv4: kept as IPv6 it would match nobody."""
    network = ipaddress.ip_network(text, strict=False)
    if network.version == 6 and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        network = ipaddress.ip_network(
            (network.network_address.ipv4_mapped, network.prefixlen - 96))
    return network


def name_keys(*candidates: str | None) -> frozenset[str]:
    """Every look-alike key of the valid names among ``candidates``."""
    keys: frozenset[str] = frozenset()
    for candidate in candidates:
        if candidate:
            try:
                keys = keys | names.parse(candidate).keys
            except names.InvalidName:
                pass
    return keys


def is_reserved(name: str | None) -> bool:
    """True if ``name`` is, or looks like, the notice sender."""
    return bool(name) and not name_keys(name).isdisjoint(_NOTICE_KEYS)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Operate(Request, kw_only=True):
    """Run ``fn(command)`` in the router task (for the API). It returns the
    answer, or ``DEFERRED`` and calls ``Router.resolve`` itself later."""

    fn: Any


class _Caller:
    """The router's ``client`` for API requests: the answer is the result."""

    id = 0
    name = None

    @staticmethod
    def answer(command: Any, result: Any) -> Any:
        return result


API_CALLER = _Caller()


class Operator:
    """A stand-in GradAgenda client the API acts through (erasing a user
    goes through the sessions service as that user would): whatever it
    is answered is dropped."""

    def __init__(self, user_id: str) -> None:
        from chatd.protocols.gradagenda import GradAgenda

        self.id = -1
        self.protocol = GradAgenda
        self.user_id = user_id
        self.device_id = None
        self.name = None
        self.peer = "operator"

    def answered(self, frame: bytes | None) -> None:
        pass

    def deliver(self, frame: bytes) -> bool:
        return True


class Moderation(Service):
    """The service. ``server`` gives what the API looks at (connections,
    lobby, sessions, store, broker, metrics)."""

    def __init__(self, server: Server, retention_count: int | None = None,
                 retention_age: float | None = None, retention_interval: float = 60.0) -> None:
        self.server = server
        self.router: Router | None = None
        self.rules: dict[str, Rule] = {}
        self.writer: Writer | None = None
        self._own_writer = False
        #: client id -> wall-clock second it joined its lobby room (presence).
        self.since: dict[int, float] = {}
        self.retention_count = retention_count
        self.retention_age = retention_age
        self.retention_interval = retention_interval
        #: Operator actions done here, by method (for /metrics).
        self.actions: Counter[str] = Counter()
        #: Client actions refused by a rule: ("ban"|"mute", protocol).
        self.refused: Counter[tuple[str, str]] = Counter()
        #: Messages removed by retention.
        self.pruned = 0
        self.loaded = trio.Event()

    @property
    def sessions(self) -> Sessions | None:
        from chatd.sessions import Sessions

        return next((s for s in self.server.services if isinstance(s, Sessions)), None)

    @property
    def shared(self) -> bool:
        return self.server.broker.shared

    # --- service life ----------------------------------------------------------

    def install(self, router: Router) -> None:
        self.router = router
        guards: dict[type, Callable] = {Join: self._join, Publish: self._publish,
                                        Leave: self._left, Login: self._login, Logout: self._left,
                                        SendMessage: self._send_message}
        for command_type, check in guards.items():
            router.guard(command_type, check)
        router.handle(Operate, lambda cmd: cmd.fn(cmd))

    def remote_items(self) -> dict[type, Any]:
        """Another node's operator action: carried out here too."""
        return {Moderated: lambda remote, item: self.apply(item, remote=remote.origin)}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the rules (before the listener opens: a restarted server
        enforces its bans from its first connection), then sweep expired
        rules, reload them (cluster) and prune by retention."""
        store = self.server.store
        try:
            rows = await trio.to_thread.run_sync(
                store.run_batch, [db.ensure_schema, lambda s: db.load_rules(s, now_ms())])
            self._replace(rows[1])
        except Exception as exc:
            log.error("could not load bans and mutes from %s: %s", store.name, exc)
        self.loaded.set()
        sessions = self.sessions
        async with trio.open_nursery() as nursery:
            if sessions is not None:
                self.writer = sessions.writer
            else:
                self.writer = Writer(store, self._report)
                self._own_writer = True
                await nursery.start(self.writer.run)
            nursery.start_soon(self._sweep)
            task_status.started()

    async def aclose(self) -> None:
        if self._own_writer and self.writer is not None:
            await self.writer.aclose()

    async def _report(self, jobs: list[Job], results: list[Any] | None,
                      failure: Failure | None) -> None:
        if failure is None:
            for job, result in zip(jobs, results, strict=True):
                _call(job.done, result)
            return
        jobs = jobs + self.writer.resume()
        for job in jobs:
            _call(job.failed, failure)

    async def _sweep(self) -> None:
        last_reload = last_prune = trio.current_time()
        while True:
            await trio.sleep(min(SWEEP_INTERVAL, self.retention_interval))
            now = trio.current_time()
            stamp = now_ms()
            for rule_id in [r for r, rule in self.rules.items() if not rule.live(stamp)]:
                rule = self.rules.pop(rule_id)
                log.info("%s of %s expired", rule.row.action, rule.describe())
            if self.shared and now - last_reload >= RELOAD_INTERVAL:
                last_reload = now
                self.submit(lambda s: db.load_rules(s, now_ms()), self._replace)
            if (self.retention_count is not None or self.retention_age is not None
                    or self.sessions is not None) and now - last_prune >= self.retention_interval:
                last_prune = now
                self.prune(lambda n: None)

    def submit(self, run: Callable, done: Callable[[Any], None],
               failed: Callable[[str], None] | None = None) -> str | None:
        """Queue a store job; why not, if the writer cannot take it."""
        def failed_with(failure: Failure) -> None:
            if failed is not None:
                failed(f"store {'busy' if failure.busy else 'unavailable'}: {failure.cause}")

        writer = self.writer
        if writer is None:
            return "the store is not open yet"
        if writer.submit(Job(run, done, failed_with)):
            return None
        return "store unavailable" if writer.failed else "store busy"

    def _replace(self, rows: list[db.RuleRow]) -> None:
        rules = {}
        for row in rows:
            try:
                rules[row.id] = Rule(row)
            except (ValueError, names.InvalidName) as exc:
                log.warning("ignoring stored rule %s: %s", row.id, exc)
        self.rules = rules

    # --- matching ----------------------------------------------------------------

    def find(self, action: str, *, room: str | None = None, name_list: tuple = (),
             ids: tuple[str | None, ...] = (), ip: Any = None) -> Rule | None:
        """The first rule of ``action`` in force that matches."""
        if not self.rules:
            return None
        stamp = now_ms()
        keys = name_keys(*name_list)
        for rule in self.rules.values():
            if rule.row.action == action and rule.live(stamp) and (
                    action == "ban" or rule.covers(room)) and rule.matches(keys, ids, ip):
                return rule
        return None

    def _client_rule(self, action: str, client: Client, room: str | None = None,
                     extra: tuple[str | None, ...] = ()) -> Rule | None:
        ids = (client.name, client.user_id, *extra)
        return self.find(action, room=room, name_list=(client.name, client.display_name,
                                                        client.user_id, *extra),
                         ids=ids, ip=parse_ip(client.peer))

    def user_refusal(self, user_id: str, ip: str) -> str | None:
        """Why a GradAgenda user's media upload or download (issue 23,
        chatd.media) is refused (a ban of the user or the address), or None."""
        rule = self.find("ban", name_list=(user_id,), ids=(user_id,),
                         ip=parse_ip(ip)) if self.rules else None
        return None if rule is None else _reason("banned", rule)
    def _claiming(self, client: Client) -> Any:
        """The lobby claim ``client`` waits for the broker to grant (a
        ``chatd.lobby.Claim``; cluster), or None: its name is not yet
        ``client.name``, yet it is the name the client joins or speaks as."""
        room = self.server.lobby.rooms.get(client.room) if client.room is not None else None
        return room.reserved.get(client.id) if room is not None else None

    def _ban_of(self, client: Client) -> Rule | None:
        """The ban that matches ``client``, its pending claim included."""
        rule = self._client_rule("ban", client)
        claim = self._claiming(client)
        if rule is None and claim is not None:
            shown = claim.name.shown
            rule = self.find("ban", name_list=(shown, claim.display_name and
                                               claim.display_name.shown), ids=(shown,))
        return rule

    def address_refusal(self, ip: str) -> str | None:
        """Why a handshake from ``ip`` is refused (an address ban), or None."""
        rule = self.find("ban", ip=parse_ip(ip)) if self.rules else None
        if rule is None:
            return None
        self.refused[("ban", "handshake")] += 1
        return _reason("banned", rule)

    # --- the guards (chatd.router: PASS lets the command go on) ------------------------

    def _join(self, cmd: Join) -> Any:
        client = cmd.client
        if cmd.register and cmd.name is not None:
            if is_reserved(cmd.name) or is_reserved(cmd.display_name):
                return False  # the protocol's "name taken" answer
            rule = self.find("ban", name_list=(cmd.name, cmd.display_name), ids=(cmd.name,),
                             ip=parse_ip(client.peer))
        else:
            rule = self.find("ban", ip=parse_ip(client.peer)) if self.rules else None
        if rule is not None:
            refuse(client, rule)
            self.refused[("ban", client.protocol.name)] += 1
            return DEFERRED  # never answered: the connection is closing
        self.since.setdefault(client.id, time.time())
        return PASS

    def _publish(self, cmd: Publish) -> Any:
        client = cmd.client
        if cmd.sender is not None and cmd.sender != client.name:
            if is_reserved(cmd.sender):
                with charged_to(getattr(client, "log_source", None)):  # logged in the router
                    log.info("%s message as %r dropped: the notice sender's name", client.peer,
                             cmd.sender, extra={"peer": client.peer})
                return None
            if self.rules:
                rule = self.find("ban", name_list=(cmd.sender,), ids=(cmd.sender,))
                if rule is not None:
                    refuse(client, rule)
                    self.refused[("ban", client.protocol.name)] += 1
                    return None
        if self.rules:
            rule = self._client_rule("mute", client, client.room, (cmd.sender,))
            if rule is not None:
                self.refused[("mute", client.protocol.name)] += 1
                hub.send(client, muted(rule))
                return None
        return PASS

    def _left(self, cmd: Leave | Logout) -> Any:
        self.since.pop(cmd.client.id, None)
        return PASS

    def _login(self, cmd: Login) -> Any:
        client = cmd.client
        if is_reserved(cmd.user_id):
            refuse(client, None, cmd.cdid, "this user-id is reserved for the server's notices",
                   what="refused")
            return DEFERRED
        if self.rules:
            rule = self.find("ban", name_list=(cmd.user_id,), ids=(cmd.user_id,),
                             ip=parse_ip(client.peer))
            if rule is not None:
                refuse(client, rule, cmd.cdid)
                self.refused[("ban", client.protocol.name)] += 1
                return DEFERRED
        self.since.setdefault(client.id, time.time())
        return PASS

    def _send_message(self, cmd: SendMessage) -> Any:
        if self.rules:
            client = cmd.client
            rule = self._client_rule("mute", client, cmd.session_id)
            if rule is not None:
                self.refused[("mute", client.protocol.name)] += 1
                hub.answer(client, muted(rule, cmd.cdid))
                return None
        return PASS


    # --- actions (router task) ------------------------------------------------------

    def apply(self, item: Moderated, remote: str | None = None) -> int:
        """Carry out a rule change or a disconnect on this node (and, when
        ``remote`` is None, publish it to the others): the number of local
        connections it closed."""
        if remote is None and self.shared:
            self.server.broker.publish(CLUSTER, item)
        if item.op == "rule":
            rule = Rule(db.RuleRow(*item.rule))
            self.rules[rule.row.id] = rule
            if rule.row.action != "ban":
                return 0
            closed = 0
            for client in list(self.server.connections):
                if client.close_code is None and self._ban_of(client) is rule:
                    claim = self._claiming(client)
                    if claim is not None:
                        # Granted later, the claim is not told to the room
                        # (nor its end), and what waits behind it is not said.
                        claim.announced = False
                        self.server.lobby.drop_waiting(client)
                    refuse(client, rule)  # the protocol's refusal, then 1008
                    closed += 1
            return closed
        if item.op == "unrule":
            for rule_id in item.ids:
                self.rules.pop(rule_id, None)
            return 0
        if item.op == "disconnect":
            match = self.selector(item.target, item.value)
            return self.disconnect(match, item.code, item.reason)
        return 0

    def selector(self, target: str, value: str) -> Callable[[Client], bool]:
        """A predicate for the connections ``target`` (name, user, device,
        address) ``value`` names."""
        if target == "name":
            keys = name_keys(value)
            return lambda c: not keys.isdisjoint(name_keys(c.name, c.display_name, c.user_id))
        if target == "user":
            return lambda c: value in (c.user_id, c.name)
        if target == "device":
            return lambda c: c.device_id == value
        network = ip_network(value)

        def by_address(c: Client) -> bool:
            ip = parse_ip(c.peer)
            return ip is not None and ip in network

        return by_address

    def disconnect(self, match: Callable[[Client], bool], code: int, reason: str) -> int:
        count = 0
        for client in list(self.server.connections):
            if client.close_code is None and match(client):
                client.kill(code, reason)
                count += 1
        return count

    def presence(self, room: str) -> list[dict[str, Any]]:
        """Who is in lobby ``room`` (or GradAgenda session ``room``), here
        and on other nodes."""
        node = self.server.broker.node
        out = []
        lobby = self.server.lobby
        local = lobby.rooms.get(room)
        if local is not None:
            for members in local.receivers.values():
                for client in members.values():
                    out.append(self._who(client, node))
        remote = lobby.remote.get(room)
        for key, member in (remote.members.items() if remote is not None else ()):
            out.append({"name": member.claim.name.shown, "protocol": member.protocol,
                        "node": key[0], "address": None, "since": None, "device": None})
        sessions = self.sessions
        session = sessions.sessions.get(room) if sessions is not None else None
        if session is not None:
            for user in sorted(session.members):
                for client in sessions.devices.get(user, {}).values():
                    out.append(self._who(client, node))
        return out

    def _who(self, client: Client, node: str) -> dict[str, Any]:
        return {"name": client.name or client.user_id, "protocol": client.protocol.name,
                "node": node, "address": client.peer, "since": self.since.get(client.id),
                "device": client.device_id}

    def notice(self, room: str, text: str) -> int:
        """A notice from ``NOTICE_SENDER`` to every client of lobby
        ``room``, on every node: how many local clients it reached."""
        lobby = self.server.lobby
        event = Message(room=room, sender=NOTICE_SENDER, payload=text, time_ns=time.time_ns())
        local = lobby.rooms.get(room)
        if local is not None:
            lobby.fanout(local, event)
        if self.shared:
            from chatd.broker.base import room_channel
            from chatd.broker.wire import Said

            self.server.broker.publish(room_channel(room), Said(
                room=room, sender=NOTICE_SENDER, payload=text, time_ns=event.time_ns))
        return len(local) if local is not None else 0

    def session_notice(self, session_id: str, text: str, answer: Callable[[Any], None]) -> None:
        """A notice into GradAgenda session ``session_id``: stored with the
        session's next ``seq`` and delivered as any message (every device
        of every member, every node). ``answer`` gets the stored message
        as JSON, or an error text."""
        sessions = self.sessions
        session = sessions.sessions.get(session_id) if sessions is not None else None
        if session is None:
            return answer("no such session")
        sent = stored = now_ms()
        message = msgspec.json.encode({"type": "text", "body": text})

        def done(seq: int | None) -> None:
            if seq is None:
                return answer("no such session")
            event = StoredMessage(session_id=session_id, seq=seq, sender_id=NOTICE_SENDER,
                                  message=msgspec.Raw(message), sender_timestamp=sent,
                                  server_timestamp=stored)
            sessions.deliver_stored(event)
            answer({"session": session_id, "seq": seq, "sender": NOTICE_SENDER,
                    "server-timestamp": stored})

        refused = self.submit(lambda s: s.append_message(session_id, NOTICE_SENDER,
                                                         message.decode(), sent, stored),
                              done, answer)
        if refused:
            answer(refused)

    def recount(self, session_ids: Any = None) -> None:
        """Forget the per-sender message counts of these GradAgenda sessions
        (all when None) once messages were removed from the store: the next
        message is counted by the store again, so a removal frees the
        sender's ``max-messages-per-user-per-session`` at once, not at the
        next restart. Router task."""
        sessions = self.sessions
        if sessions is None:
            return
        chosen = sessions.sessions.values() if session_ids is None else (
            sessions.sessions[i] for i in session_ids if i in sessions.sessions)
        for session in chosen:
            session.sent = None

    def prune(self, answer: Callable[[Any], None]) -> None:
        count, age = self.retention_count, self.retention_age
        age_ms = None if age is None else int(age * 1000)

        def done(deleted: int) -> None:
            self.pruned += deleted
            if deleted:
                self.recount()
                log.info("retention removed %d stored messages", deleted)
            answer(deleted)

        def prune(s: Any) -> int:
            deleted = db.prune(s, now_ms(), count, age_ms)
            media_store.sweep(s, now_ms())  # media go with their messages (issue 23)
            return deleted

        refused = self.submit(prune, done, answer)
        if refused:
            answer(refused)

    # --- metrics --------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        actions = CounterMetricFamily("chatd_moderation_actions",
                                      "Operator actions carried out (server API), by method",
                                      labels=["method"])
        for method, count in sorted(self.actions.items()):
            actions.add_metric([method], count)
        yield actions
        refused = CounterMetricFamily("chatd_moderation_refused",
                                      "Client actions refused by a ban or a mute",
                                      labels=["rule", "protocol"])
        for (rule, protocol), count in sorted(self.refused.items()):
            refused.add_metric([rule, protocol], count)
        yield refused
        rules = GaugeMetricFamily("chatd_moderation_rules", "Bans and mutes in force",
                                  labels=["action"])
        stamp = now_ms()
        for action in ("ban", "mute"):
            rules.add_metric([action], sum(1 for r in self.rules.values()
                                           if r.row.action == action and r.live(stamp)))
        yield rules
        yield CounterMetricFamily("chatd_retention_pruned_messages",
                                  "Stored GradAgenda messages removed by retention",
                                  value=self.pruned)

    def describe(self) -> list[Any]:
        return []


def new_rule_id() -> str:
    return secrets.token_hex(8)


def _reason(what: str, rule: Rule | None, text: str = "") -> str:
    why = text or (rule.row.reason if rule is not None else "")
    return f"{what}: {why}" if why else what


def _cut(text: str, limit: int = 123) -> str:
    data = text.encode()
    return text if len(data) <= limit else data[:limit].decode(errors="ignore")


def refuse(client: Client, rule: Rule | None, cdid: Any = None, text: str = "",
           what: str = "banned") -> None:
    """Refuse a banned client in its protocol's form, then close it 1008."""
    reason = _reason(what, rule, text)
    hub.send(client, Refused(message=reason, cdid=cdid, sentence=(
        f"Banned: {text or (rule.row.reason if rule else '') or 'by the operator'}!")))
    client.kill(1008, _cut(reason))


def muted(rule: Rule, cdid: Any = None) -> Refused:
    """A muted client's message refused, in its protocol's form (none on
    multichat and wschat: the message is dropped and counted)."""
    expires = rule.row.expires_ms
    until = ("" if expires is None else
             f" until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(expires / 1000))}")
    return Refused(message=_reason(f"muted{until}", rule), cdid=cdid,
                   sentence=f"You are muted in this room{until}!")


def _call(callback: Callable[..., None], *args: Any) -> None:
    try:
        callback(*args)
    except Exception:
        log.exception("answering a moderation store job failed")


__all__ = ["NOTICE_SENDER", "Moderation", "Operate", "Operator", "Rule", "audit", "refuse"]
