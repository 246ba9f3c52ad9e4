"""The Redis broker (coredis, on trio through anyio): several nodes as one.

Three tasks per node, none of them the router's:

- the **publisher** sends what the router queued, in order: each pass
  takes everything queued (up to ``MAX_BATCH`` operations) and sends it
  in one pipeline; consecutive items for one channel travel as one
  PUBLISH (``chatd.broker.wire.Batch``). Name claims, releases and
  refreshes are Lua scripts in the same pipeline, so they keep their
  place in the node's order. Nothing is retried: coredis' default retry
  policy would run a PUBLISH or a claim twice after a timeout, so every
  client here has ``NoRetryPolicy`` and a failure counts as an outage.
- the **subscriber** holds one pub/sub connection, decodes each payload
  (``wire.decode``) and posts it to the router (``Remote``). coredis
  buffers pub/sub messages without bound; the liveness probe bounds how
  far behind that buffer may fall (below).
- the **ticker** publishes this node's heartbeat every ``heartbeat``
  seconds on ``chatd:cluster``, queues the refresh of the names this node
  holds every ``refresh`` seconds, and posts ``Tick`` to the router.

**Liveness probe.** Every node subscribes to ``chatd:cluster``, so its own
heartbeat comes back to it. If none has come back for ``probe_timeout``
seconds while the publisher works, the subscription is taken for dead
(a failover that left it silent, or a backlog that long): it is dropped
and made again, and /readyz reports not ready meanwhile.

**Outages.** A failed command, a lost connection or a probe that does not
come back: the broker is down (``BrokerDown``, /readyz not ready); both
tasks reconnect with backoff (0.1 s doubling to 2 s). While down, items
published are dropped and counted, name claims wait up to
``claim_timeout`` seconds and are then refused, releases are kept and
sent once Redis is back. Back up, the publisher first claims again every
name this node holds (``NamesLost`` for those another node took
meanwhile), the subscriber subscribes again to every channel, and
``BrokerUp(resumed=True)`` lets the services repair what was missed.

**Names** (docs/cluster.md): one key per room and look-alike key,
``chatd:name:ROOM:KEY``, holding ``NODE:BOOT:CLIENT``, with an expiry of
``name_ttl`` seconds that the holding node renews every ``refresh``
seconds: a node that dies (``kill -9``) leaves its names to expire.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import coredis
import trio
from coredis.retry import NoRetryPolicy

from chatd.broker import wire
from chatd.broker.base import (
    CLUSTER, Broker, BrokerDown, BrokerUp, ClaimDone, NamesLost, Remote, Subscribed, Tick,
    node_channel, user_channel,
)
from chatd.broker.wire import Heartbeat, Item

log = logging.getLogger("chatd.broker")

#: Most operations sent in one pipeline, and items in one PUBLISH.
MAX_BATCH = 1000
MAX_ITEMS = 256
#: Seconds between reconnection attempts: doubling from the first to the last.
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 2.0
#: Most keys refreshed by one script call.
REFRESH_CHUNK = 500
#: GradAgenda user channels: each carries one user's messages, in order,
#: and nothing on another channel depends on them (batched by channel).
USER_PREFIX = user_channel("")
#: Seconds between two log lines about dropped items.
DROP_LOG_INTERVAL = 10.0

# KEYS: the look-alike keys of one name; ARGV[1]: owner; ARGV[2]: expiry (ms).
# Nil if the owner holds them all now, else the holder of the first held by
# someone else (nothing changed).
CLAIM = """
for i = 1, #KEYS do
  local holder = redis.call('GET', KEYS[i])
  if holder and holder ~= ARGV[1] then return holder end
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
end
return false
"""
# KEYS: keys; ARGV[1]: owner. Deletes the keys the owner still holds.
RELEASE = """
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
    n = n + 1
  end
end
return n
"""
# KEYS: keys; ARGV[1]: expiry (ms); ARGV[i + 1]: the owner of KEYS[i].
# Renews the keys still held by their owner, takes again those that
# expired (a Redis restart, a pause), and returns the indexes of those
# another owner holds now.
REFRESH = """
local lost = {}
for i = 1, #KEYS do
  local holder = redis.call('GET', KEYS[i])
  if holder == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
  elseif not holder then
    redis.call('SET', KEYS[i], ARGV[i + 1], 'PX', ARGV[1])
  else
    lost[#lost + 1] = i
  end
end
return lost
"""


class SubscriptionDead(RuntimeError):
    """The liveness probe did not come back."""


@dataclass(slots=True)
class _Publish:
    channel: str
    item: Item


@dataclass(slots=True)
class _Claim:
    keys: list[str]
    owner: str
    token: Any
    deadline: float


@dataclass(slots=True)
class _Release:
    keys: list[str]
    owner: str


@dataclass(slots=True)
class _Refresh:
    pass


def shown_url(url: str) -> str:
    """``url`` without a password."""
    return re.sub(r"//[^@/]*@", "//", url)


def name_key(room: str, key: str) -> str:
    return f"chatd:name:{room}:{key}"


class RedisBroker(Broker):
    """A broker on the Redis server at ``url`` (``redis://HOST:PORT/DB``,
    ``rediss://`` for TLS). Times are in seconds; docs/cluster.md explains
    each and the bounds they give."""

    shared = True

    def __init__(self, url: str, node: str, boot: str, *, heartbeat: float = 1.0,
                 probe_timeout: float = 5.0, node_timeout: float = 10.0, name_ttl: float = 15.0,
                 refresh: float = 5.0, claim_timeout: float = 5.0, command_timeout: float = 2.0,
                 queue_size: int = 10_000) -> None:
        self.url = url
        self.shown = shown_url(url)
        self.node = node
        self.boot = boot
        self.heartbeat = heartbeat
        self.probe_timeout = probe_timeout
        self.node_timeout = node_timeout
        self.name_ttl = name_ttl
        self.refresh = refresh
        self.claim_timeout = claim_timeout
        self.command_timeout = command_timeout
        self.queue_size = queue_size
        self.owner_prefix = f"{node}:{boot}:"
        self.counters: Counter[str] = Counter()
        self._client = coredis.Redis.from_url(
            url, retry_policy=NoRetryPolicy(), stream_timeout=command_timeout,
            connect_timeout=command_timeout, client_name=f"chatd:{node}")
        self._claim = self._client.register_script(CLAIM)
        self._release = self._client.register_script(RELEASE)
        self._refresh = self._client.register_script(REFRESH)
        self._router: Any = None
        self._versions: Callable[[], dict[str, int]] = dict
        self._queue: deque[Any] = deque()
        self._publishes = 0  # _Publish ops in _queue
        self._wake = trio.Event()
        #: Channels wanted, and those the current subscription delivers.
        self._channels: set[str] = {CLUSTER, node_channel(node)}
        self._active: set[str] = set()
        self._changed = trio.Event()
        #: Redis key -> owner, for every name this node holds there.
        self._held: dict[str, str] = {}
        #: Releases not sent yet because Redis was down: key -> owner.
        self._releases: dict[str, str] = {}
        self._pub_ok = False
        self._sub_ok = False
        self._up = False
        self._was_up = False
        #: Whether the current outage was logged and posted.
        self._reported = False
        self._reason = f"broker {self.shown}: connecting"
        #: trio time this node's own heartbeat last came back, and of the
        #: current subscription.
        self._echo: float | None = None
        self._subscribed_at = 0.0
        self._dropped_logged = -DROP_LOG_INTERVAL
        self._dropped_since_log = 0
        self._busy = False
        self._scope = trio.CancelScope()

    # --- the router's side (synchronous, never blocks) ------------------------------

    def publish(self, channel: str, item: Item) -> None:
        if not self._pub_ok or self._publishes >= self.queue_size:
            self._drop(1, "the broker is down" if not self._pub_ok else "the queue is full")
            return
        self._queue.append(_Publish(channel, item))
        self._publishes += 1
        self._wake.set()

    def claim(self, room: str, keys: Iterable[str], owner: str, token: Any) -> None:
        self._queue.append(_Claim([name_key(room, k) for k in sorted(keys)], owner, token,
                                  trio.current_time() + self.claim_timeout))
        self._wake.set()
        return None

    def release(self, room: str, keys: Iterable[str], owner: str) -> None:
        keys = [name_key(room, k) for k in keys]
        if not keys:
            return
        for key in keys:
            if self._held.get(key) == owner:
                del self._held[key]
        self._queue.append(_Release(keys, owner))
        self._wake.set()

    def subscribe(self, channels: Iterable[str]) -> bool:
        self._channels.update(channels)
        self._changed.set()
        return False

    def unsubscribe(self, channels: Iterable[str]) -> None:
        self._channels.difference_update(channels)
        self._changed.set()

    def ready(self) -> str | None:
        if not self._up:
            return self._reason
        if self._echo is None:
            return f"broker {self.shown}: waiting for this node's first heartbeat to come back"
        late = trio.current_time() - self._echo
        if late > self.probe_timeout:
            return f"broker {self.shown}: no heartbeat came back for {late:.1f} s"
        return None

    def stats(self) -> dict[str, int]:
        return dict(self.counters, queued=len(self._queue), subscriptions=len(self._active),
                    names=len(self._held))

    # --- tasks ---------------------------------------------------------------------

    async def run(self, router: Any, versions: Callable[[], dict[str, int]], *,
                  task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._router = router
        self._versions = versions
        try:
            with self._scope:
                async with self._client:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._publisher)
                        nursery.start_soon(self._subscriber)
                        nursery.start_soon(self._ticker)
                        task_status.started()
        except Exception as exc:
            # coredis may fail while its connections are torn down by our
            # cancellation (a closed stream): that is the end, not an error.
            if not self._scope.cancel_called:
                raise
            log.debug("broker tasks ended while stopping: %s", _describe(exc))
        except BaseExceptionGroup as group:
            cancelled, rest = group.split(trio.Cancelled)
            if cancelled is None or rest is None:
                raise
            log.debug("broker tasks ended while stopping: %s", _describe(rest))
            raise cancelled from None

    async def aclose(self) -> None:
        """Send what is queued (the names released at shutdown, the last
        leaves), for at most ``command_timeout`` seconds, then stop."""
        with trio.move_on_after(self.command_timeout):
            while self._pub_ok and (self._queue or self._busy):
                await trio.sleep(0.01)
        self._scope.cancel()

    async def _post(self, command: Any) -> None:
        try:
            await self._router.send(command)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the router has stopped: shutting down

    # --- publisher ---------------------------------------------------------------

    async def _publisher(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            if not self._pub_ok:
                try:
                    with trio.fail_after(self.command_timeout):
                        await self._client.ping()
                except Exception as exc:
                    await self._down(f"cannot reach {self.shown}: {_describe(exc)}")
                    await self._expire_claims()
                    with trio.move_on_after(backoff):
                        await self._wake.wait()
                        await trio.sleep(backoff / 2)
                    self._wake = trio.Event()
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                backoff = BACKOFF_FIRST
                self._pub_ok = True
                # Names first: they are this node's, and nobody may take them
                # before it says so again (a Redis restart lost them).
                self._queue.appendleft(_Refresh())
                if self._releases:
                    pending, self._releases = self._releases, {}
                    for key, owner in pending.items():
                        self._queue.append(_Release([key], owner))
                await self._check_up()
            if not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            ops = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
            self._publishes -= sum(1 for op in ops if type(op) is _Publish)
            self._busy = True
            try:
                await self._send(ops)
            except Exception as exc:
                self._pub_ok = False
                await self._down(f"{self.shown}: {_describe(exc)}")
                await self._failed(ops)
            finally:
                self._busy = False

    async def _send(self, ops: list[Any]) -> None:
        """Run ``ops`` in one pipeline (raises if any command fails), then
        tell the router what became of the claims."""
        now = trio.current_time()
        answers: list[tuple[Any, Any]] = []
        expired: list[_Claim] = []
        published = 0
        async with self._client.pipeline(transaction=False) as pipe:
            index = 0
            while index < len(ops):
                op = ops[index]
                kind = type(op)
                if kind is _Publish:
                    # A run of publishes: consecutive items for one channel
                    # travel together; within a run of GradAgenda user
                    # channels, whose streams are independent of each other,
                    # each channel's items travel together (in their order).
                    independent = op.channel.startswith(USER_PREFIX)
                    groups: dict[str, list[Item]] = {}
                    while index < len(ops) and type(ops[index]) is _Publish:
                        channel = ops[index].channel
                        if independent:
                            if not channel.startswith(USER_PREFIX):
                                break
                        elif channel != op.channel:
                            break
                        groups.setdefault(channel, []).append(ops[index].item)
                        index += 1
                    for channel, items in groups.items():
                        for start in range(0, len(items), MAX_ITEMS):
                            chunk = items[start:start + MAX_ITEMS]
                            pipe.publish(channel, wire.encode(self.node, self.boot, chunk))
                        published += len(items)
                    continue
                index += 1
                if kind is _Claim:
                    if now > op.deadline:
                        expired.append(op)
                    else:
                        answers.append((op, self._claim(op.keys, [op.owner, self._ttl_ms],
                                                        client=pipe)))
                elif kind is _Release:
                    answers.append((op, self._release(op.keys, [op.owner], client=pipe)))
                else:
                    for chunk in self._refresh_chunks():
                        owners = [self._held[key] for key in chunk]
                        answers.append((chunk, self._refresh(chunk, [self._ttl_ms, *owners],
                                                             client=pipe)))
        self.counters["published"] += published
        for op in expired:
            await self._post(ClaimDone(token=op.token, ok=False))
        lost: list[str] = []
        for op, request in answers:
            result = await request
            if isinstance(op, _Claim):
                ok = result is None
                if ok:
                    for key in op.keys:
                        self._held[key] = op.owner
                await self._post(ClaimDone(token=op.token, ok=ok))
            elif isinstance(op, list):
                for position in result or ():
                    key = op[int(position) - 1]
                    owner = self._held.pop(key, None)
                    if owner is not None:
                        lost.append(owner)
        if lost:
            log.warning("%d names of this node were taken by other nodes while it could not "
                        "renew them", len(lost))
            await self._post(NamesLost(owners=sorted(set(lost))))

    @property
    def _ttl_ms(self) -> int:
        return int(self.name_ttl * 1000)

    def _refresh_chunks(self) -> list[list[str]]:
        keys = list(self._held)
        return [keys[i:i + REFRESH_CHUNK] for i in range(0, len(keys), REFRESH_CHUNK)]

    async def _failed(self, ops: list[Any]) -> None:
        """A pipeline failed: some of it may have run. Claims are refused and
        their keys released once Redis is back (the script may have run);
        releases wait for Redis; published items are lost (counted)."""
        dropped = 0
        for op in ops:
            kind = type(op)
            if kind is _Publish:
                dropped += 1
            elif kind is _Claim:
                for key in op.keys:
                    if self._held.get(key) != op.owner:
                        self._releases[key] = op.owner
                await self._post(ClaimDone(token=op.token, ok=False))
            elif kind is _Release:
                for key in op.keys:
                    self._releases[key] = op.owner
        self._drop(dropped, "the broker failed")
        await self._expire_claims()

    async def _expire_claims(self) -> None:
        """While down: refuse claims past their deadline, drop queued items,
        keep releases for later."""
        now = trio.current_time()
        keep: deque[Any] = deque()
        dropped = 0
        for op in self._queue:
            kind = type(op)
            if kind is _Publish:
                dropped += 1
            elif kind is _Claim and now > op.deadline:
                await self._post(ClaimDone(token=op.token, ok=False))
            elif kind is _Release:
                for key in op.keys:
                    self._releases[key] = op.owner
            elif kind is _Claim:
                keep.append(op)
        self._queue = keep
        self._publishes = 0
        self._drop(dropped, "the broker is down")

    def _drop(self, count: int, why: str) -> None:
        if not count:
            return
        self.counters["dropped"] += count
        self._dropped_since_log += count
        now = trio.current_time()
        if now - self._dropped_logged >= DROP_LOG_INTERVAL:
            log.warning("broker %s: %d events for other nodes dropped: %s (%d in all)",
                        self.shown, self._dropped_since_log, why, self.counters["dropped"])
            self._dropped_logged = now
            self._dropped_since_log = 0

    # --- subscriber --------------------------------------------------------------

    async def _subscriber(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            try:
                pubsub = self._client.pubsub(retry_policy=None, ignore_subscribe_messages=True,
                                             subscription_timeout=self.command_timeout,
                                             max_idle_seconds=max(1.0, self.probe_timeout))
                async with pubsub:
                    channels = sorted(self._channels)
                    self._changed = trio.Event()
                    await pubsub.subscribe(*channels)
                    self._active = set(channels)
                    self._subscribed_at = trio.current_time()
                    self._echo = None
                    self._sub_ok = True
                    backoff = BACKOFF_FIRST
                    await self._post(Subscribed(channels=channels))
                    await self._check_up()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._follow_changes, pubsub)
                        nursery.start_soon(self._watchdog)
                        await self._receive(pubsub)
            except Exception as exc:
                self._sub_ok = False
                self._active = set()
                await self._down(f"{self.shown}: {_describe(exc)}")
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _receive(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message()
            if message is None or message["type"] != "message":
                continue
            await self._deliver(message["channel"], message["data"])

    async def _deliver(self, channel: bytes | str, data: bytes | str) -> None:
        try:
            batch = wire.decode(data)
        except wire.WireError as exc:
            self.counters["malformed"] += 1
            log.warning("broker %s: dropped a payload on %r that is not chatd's: %s",
                        self.shown, channel, exc)
            return
        if batch.origin == self.node:
            if batch.boot == self.boot:
                if any(type(item) is Heartbeat for item in batch.items):
                    self._echo = trio.current_time()
            else:
                self.counters["foreign"] += 1
                log.error("broker %s: another process runs as node-id %r (boot %s): every node "
                          "needs its own node-id", self.shown, self.node, batch.boot)
            return
        self.counters["received"] += len(batch.items)
        if isinstance(channel, bytes):
            channel = channel.decode(errors="replace")
        await self._post(Remote(origin=batch.origin, boot=batch.boot, channel=channel,
                                items=batch.items))

    async def _follow_changes(self, pubsub: Any) -> None:
        """Apply ``subscribe``/``unsubscribe`` calls to the subscription."""
        while True:
            await self._changed.wait()
            self._changed = trio.Event()
            add = sorted(self._channels - self._active)
            remove = sorted(self._active - self._channels)
            if add:
                await pubsub.subscribe(*add)
                self._active.update(add)
                await self._post(Subscribed(channels=add))
            if remove:
                self._active.difference_update(remove)
                await pubsub.unsubscribe(*remove)

    async def _watchdog(self) -> None:
        while True:
            await trio.sleep(self.heartbeat / 2)
            since = self._echo if self._echo is not None else self._subscribed_at
            if self._pub_ok and trio.current_time() - since > self.probe_timeout:
                raise SubscriptionDead(f"no heartbeat came back within {self.probe_timeout:g} s: "
                                       "subscribing again")

    # --- ticker ----------------------------------------------------------------------

    async def _ticker(self) -> None:
        next_refresh = trio.current_time() + self.refresh
        while True:
            await trio.sleep(self.heartbeat)
            if self._pub_ok:
                # Not counted against queue-size: the probe must go out.
                self._queue.append(_Publish(CLUSTER, Heartbeat(rooms=self._versions())))
                self._publishes += 1
                if trio.current_time() >= next_refresh:
                    next_refresh = trio.current_time() + self.refresh
                    if self._held:
                        self._queue.append(_Refresh())
                self._wake.set()
            await self._post(Tick())

    # --- state -----------------------------------------------------------------------

    async def _down(self, reason: str) -> None:
        self._reason = f"broker {reason}"
        self._up = False
        # Whichever task noticed, the publisher starts over too: it claims
        # this node's names again once Redis answers (a restart lost them).
        self._pub_ok = False
        self._wake.set()
        # No connection of before is trusted again (a silent subscription
        # would be handed back by the pool; after a failover they all point
        # at the old server): every command and subscription starts afresh.
        try:
            self._client.connection_pool.disconnect()
        except Exception as exc:
            log.debug("broker %s: dropping connections: %s", self.shown, _describe(exc))
        if not self._reported:
            self._reported = True
            self.counters["outages"] += 1
            log.warning("broker down: %s", reason)
            await self._post(BrokerDown(reason=reason))

    async def _check_up(self) -> None:
        if self._pub_ok and self._sub_ok and not self._up:
            self._up = True
            self._reported = False
            resumed, self._was_up = self._was_up, True
            if resumed:  # the end of an outage an operator was warned of
                log.warning("broker %s: connected again: repairing what was missed", self.shown)
            else:
                log.info("broker %s: connected", self.shown)
            await self._post(BrokerUp(resumed=resumed))


def _describe(exc: BaseException) -> str:
    """One line for a failure, from inside exception groups too."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
