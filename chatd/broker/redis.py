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
come back: the broker is down (``BrokerDown``, /readyz not ready, one
WARNING saying why); both tasks reconnect with backoff (0.1 s doubling
to 2 s). While down, items published are dropped and counted, name
claims wait up to ``claim_timeout`` seconds and are then refused,
releases are kept and sent once Redis is back. Back up, the publisher
first claims again every name this node holds (``NamesLost`` for those
another node took meanwhile) and sends the releases kept, before any
new claim; the subscriber subscribes again to every channel, one INFO
line says the outage is over (how long, why, what was dropped) and
``BrokerUp(resumed=True)`` lets the services repair what was missed.
coredis's own log lines (its reconnect failures come with tracebacks at
ERROR) are chatd's to report: they are logged at DEBUG, in one line.

**Names** (docs/cluster.md): one key per room and look-alike key,
``chatd:name:ROOM:KEY``, holding ``NODE:BOOT:CLIENT``, with an expiry of
``name_ttl`` seconds that the holding node renews every ``refresh``
seconds: a node that dies (``kill -9``) leaves its names to expire, and
the node that takes it for dead releases them at once (``release`` on
its behalf). A name multichat bridges share (``claim``'s ``share``) is a
hash of owners instead, one per node holding it, each with its own end
of hold (Redis time): claimed only where every live owner shares it
under the same tag, released, renewed and expired per owner
(``NAME_LIB``). A release answers ``Released`` once Redis has run it, so a
departure is announced only when the name is free.

**The grace after a shared outage.** Every node renews ``chatd:alive``
(expiry ``probe_timeout``) and its entry in ``chatd:nodes`` (the
cluster's membership: node id -> Redis time of its heartbeat) with each
heartbeat (``BEAT``), which answers the other nodes alive: this node's
view. A script that finds ``chatd:alive`` gone knows that no node could
reach Redis meanwhile (a restart, empty or not; a pause; a partition of
Redis): names may have expired or been lost with it. It begins the grace
(``chatd:grace``), listing the nodes to wait for: those ``chatd:nodes``
knew alive (a pause keeps them) and, for each node that comes back
(``RESUME``), itself and its view (an empty restart lost them). No new
name is granted to anyone (claims wait, asking every ``GRACE_POLL``
seconds) until every node listed has claimed its own names again
(``REFRESH`` ignores the grace, then ``BACK``) or has been waited for
``node_timeout`` seconds, the time after which the others take it for
dead. A new node that finds nobody known on a Redis that started less
than ``BACKOFF_MAX + command_timeout`` seconds ago waits that long for
the nodes of before (``?``), or until the first of them is back with its
view. A claim still waits at most ``CLAIM_WAIT_MAX`` seconds in all, then
is refused. So the clients holding names when Redis came back keep them,
and nobody is closed for an outage every node shared.

**Leaving.** ``aclose`` (SIGTERM) releases every name this node still
holds and publishes ``Bye`` on ``chatd:cluster``, so the other nodes
forget it at once instead of waiting ``node_timeout`` for its silence.
"""

from __future__ import annotations

import logging
import math
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
    CLUSTER, Broker, BrokerDown, BrokerUp, ClaimDone, NamesLost, Released, Remote, Subscribed,
    Tick, node_channel, user_channel,
)
from chatd.broker.wire import Bye, Heartbeat, Item

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
#: Seconds a claim made during a grace may wait past its end.
GRACE_MARGIN = 1.0
#: Most seconds any claim waits, grace included: below ``auth-timeout``'s
#: default (10 s), which would close the client waiting for its name.
CLAIM_WAIT_MAX = 8.0
#: Seconds between two questions to Redis, while claims wait for a grace,
#: whether it is over (it ends as soon as the last node expected is back).
GRACE_POLL = 0.25

#: While this key exists no new name is granted (the grace after a shared
#: outage): a hash, node id -> the Redis time (ms) until which that node,
#: alive before the outage, is waited for, or 'done' once it has claimed
#: its names again ('?': nodes not known yet, below). Every node renews
#: ALIVE_KEY with each heartbeat, and its own entry of NODES_KEY (node id
#: -> Redis time, ms, of its last heartbeat): the cluster's membership.
GRACE_KEY = "chatd:grace"
ALIVE_KEY = "chatd:alive"
NODES_KEY = "chatd:nodes"

# Every name script starts with these helpers. A name key holds either
# one owner (a string: an exclusive claim) or, for a name bridges share
# (``Broker.claim``'s ``share``), a hash: field '*' is the share tag (the
# name as shown) and each other field an owner, whose value is the Redis
# time (ms) its hold ends; the key itself expires with its last owner.
TIME_LIB = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""
NAME_LIB = TIME_LIB + """
-- The key's live owners: 'one', nil, {owner}; 'set', tag, {owners} (owners
-- whose hold ended are deleted); or nil (free).
local function holders(key, now)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'string' then return 'one', nil, {redis.call('GET', key)} end
  if kind ~= 'hash' then return nil end
  local all = redis.call('HGETALL', key)
  local tag, owners, ended = nil, {}, {}
  for i = 1, #all, 2 do
    if all[i] == '*' then tag = all[i + 1]
    elseif tonumber(all[i + 1]) < now then ended[#ended + 1] = all[i]
    else owners[#owners + 1] = all[i] end
  end
  if #owners == 0 then redis.call('DEL', key) return nil end
  if #ended > 0 then redis.call('HDEL', key, unpack(ended)) end
  return 'set', tag, owners
end
-- Hold ``key`` for ``owner`` for ``ttl`` ms: alone (tag ''), or among the
-- owners sharing it under ``tag``.
local function hold(key, owner, tag, ttl, now, kind)
  if tag == '' then
    redis.call('SET', key, owner, 'PX', ttl)
  else
    if kind == 'one' then redis.call('DEL', key) end
    redis.call('HSET', key, '*', tag, owner, now + ttl)
    redis.call('PEXPIRE', key, ttl)
  end
end
-- Give up ``owner``'s hold of ``key``: 1 if it had one.
local function drop(key, owner)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'string' then
    if redis.call('GET', key) == owner then redis.call('DEL', key) return 1 end
  elseif kind == 'hash' then
    if redis.call('HDEL', key, owner) == 1 then
      if redis.call('HLEN', key) <= 1 then redis.call('DEL', key) end
      return 1
    end
  end
  return 0
end
"""
# The grace (docs/cluster.md, "Names across outages"): helpers of the
# scripts that may begin it (RESUME, BEAT, CLAIM) or end it (BACK).
GRACE_LIB = """
local GRACE, NODES = '%s', '%s'
-- Milliseconds the grace still lasts: until the last node waited for is
-- back or past its bound (0: none, and the key is gone).
local function grace_left(now)
  if redis.call('EXISTS', GRACE) == 0 then return 0 end
  local all = redis.call('HGETALL', GRACE)
  local left = 0
  for i = 2, #all, 2 do
    local ends = tonumber(all[i])
    if ends and ends - now > left then left = ends - now end
  end
  if left <= 0 then redis.call('DEL', GRACE) return 0 end
  return left
end
-- Wait for each node of ``nodes`` (ids) for ``bound`` ms from now, unless
-- this grace knows it already (waited for, or back): begins the grace if
-- none runs.
local function expect(now, bound, nodes)
  for _, node in ipairs(nodes) do
    redis.call('HSETNX', GRACE, node, now + bound)
  end
  if #nodes > 0 and redis.call('PTTL', GRACE) < bound then
    redis.call('PEXPIRE', GRACE, bound)
  end
end
-- The nodes NODES_KEY knew alive when the last heartbeat reached Redis
-- (before an outage: a pause keeps them): heard within ``bound`` ms of it.
local function known(bound)
  local all = redis.call('HGETALL', NODES)
  local last = 0
  for i = 2, #all, 2 do last = math.max(last, tonumber(all[i])) end
  local nodes = {}
  for i = 1, #all, 2 do
    if last - tonumber(all[i + 1]) <= bound then nodes[#nodes + 1] = all[i] end
  end
  return nodes
end
""" % (GRACE_KEY, NODES_KEY)
# KEYS[1]: GRACE_KEY; KEYS[2]: ALIVE_KEY; KEYS[3 .. ARGV[3] + 2]: the
# look-alike keys of a name to claim; the KEYS after them: keys the owner
# gives up in the same step (a rename). ARGV[1]: owner; ARGV[2]: expiry
# (ms); ARGV[3]: keys to claim; ARGV[4]: nodes' liveness bound (ms); ARGV[5]: the
# share tag ('' for a claim of its own). Nil if the owner holds the
# claimed keys now (and the others are freed); an owner of the first key
# held otherwise (by someone else; shared under another tag, or not
# shared while this claim is; or held at all, for a claim of its own);
# or, during the grace, the milliseconds it may still last (nothing
# changed in both cases). ALIVE_KEY gone means no node renewed it lately
# (a shared outage; a claim sent before a pause, run by Redis once it
# resumes): the grace starts here, for the nodes NODES_KEY knew alive
# (ARGV[4]: their liveness bound, ms). KEYS[1] is GRACE_KEY.
CLAIM = NAME_LIB + GRACE_LIB + """
local n = tonumber(ARGV[3])
local tag = ARGV[5]
local now = now_ms()
if n > 0 then
  if redis.call('EXISTS', KEYS[2]) == 0 then
    expect(now, tonumber(ARGV[4]), known(tonumber(ARGV[4])))
  end
  local grace = grace_left(now)
  if grace > 0 then return grace end
end
local kinds = {}
for i = 3, n + 2 do
  local kind, held_tag, owners = holders(KEYS[i], now)
  kinds[i] = kind
  if kind == 'one' and owners[1] ~= ARGV[1] then return owners[1] end
  if kind == 'set' and (tag == '' or held_tag ~= tag) then
    for _, other in ipairs(owners) do
      if other ~= ARGV[1] then return other end
    end
  end
end
for i = 3, n + 2 do
  hold(KEYS[i], ARGV[1], tag, ARGV[2], now, kinds[i])
end
for i = n + 3, #KEYS do
  drop(KEYS[i], ARGV[1])
end
return false
"""
# KEYS: ALIVE_KEY, GRACE_KEY; ARGV[1]: this node's id; ARGV[2]: '1' if it
# was connected before; ARGV[3]: ALIVE_KEY's expiry (ms); ARGV[4]: nodes'
# liveness bound (ms); ARGV[5]: how long (ms) after Redis starts any node
# alive reaches it; ARGV[6..]: the other nodes this node last knew alive.
# Run by a node (re)connecting. ALIVE_KEY gone: an outage every node
# shared (or a new cluster): the grace begins for the nodes NODES_KEY knew
# alive (a pause keeps them); a node coming back brings the nodes it knew
# (a restart lost them) and itself (done once it has claimed its names
# again: BACK). A new node that finds no node known, on a Redis that
# started less than ARGV[5] ms ago, cannot tell a new cluster from an empty
# restart whose nodes are not back yet: it waits for them ('?') until the
# first of them brings what it knew, or for ARGV[5] ms after Redis started.
# The milliseconds the grace may still last (0: none).
RESUME = TIME_LIB + GRACE_LIB + """
local now = now_ms()
local bound = tonumber(ARGV[4])
local outage = redis.call('EXISTS', KEYS[1]) == 0
if outage then expect(now, bound, known(bound)) end
if ARGV[2] == '1' then
  if outage or redis.call('EXISTS', GRACE) == 1 then
    redis.call('HDEL', GRACE, '?')
    local nodes = {ARGV[1]}
    for i = 6, #ARGV do nodes[#nodes + 1] = ARGV[i] end
    expect(now, bound, nodes)
  end
elseif outage and redis.call('HLEN', NODES) == 0 and redis.call('EXISTS', GRACE) == 0 then
  local info = redis.call('INFO', 'server')
  local up = tonumber(string.match(info, 'uptime_in_seconds:(%d+)')) or 0
  local wait = tonumber(ARGV[5]) - up * 1000
  if wait > 0 then expect(now, wait, {'?'}) end
end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[3])
return grace_left(now)
"""
# KEYS: ALIVE_KEY; ARGV[1]: this node's id; ARGV[2]: ALIVE_KEY's expiry
# (ms); ARGV[3]: nodes' liveness bound (ms). A heartbeat: renews
# ALIVE_KEY and this node's entry in NODES_KEY, forgets nodes not heard
# for the bound, and returns the ids of the other nodes alive (this node's
# view of the cluster, which it brings back after an empty restart). One
# sent before a pause and run when Redis resumes begins the grace, as a
# claim does.
BEAT = TIME_LIB + GRACE_LIB + """
local now = now_ms()
local bound = tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 0 then expect(now, bound, known(bound)) end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
redis.call('HSET', NODES, ARGV[1], now)
local all = redis.call('HGETALL', NODES)
local alive, gone = {}, {}
for i = 1, #all, 2 do
  if now - tonumber(all[i + 1]) > bound then gone[#gone + 1] = all[i]
  elseif all[i] ~= ARGV[1] then alive[#alive + 1] = all[i] end
end
if #gone > 0 then redis.call('HDEL', NODES, unpack(gone)) end
return alive
"""
# ARGV[1]: this node's id, back: it has claimed its names again (its
# REFRESH ran just before, in order). The milliseconds the grace may
# still last.
BACK = TIME_LIB + GRACE_LIB + """
local now = now_ms()
if redis.call('HEXISTS', GRACE, ARGV[1]) == 1 then
  redis.call('HSET', GRACE, ARGV[1], 'done')
end
return grace_left(now)
"""
# The milliseconds the grace may still last.
GRACE_LEFT = TIME_LIB + GRACE_LIB + """
return grace_left(now_ms())
"""
# KEYS: keys; ARGV[1]: owner. Gives up the owner's hold of each key (the
# other owners of a shared name keep theirs); how many it had.
RELEASE = NAME_LIB + """
local n = 0
for i = 1, #KEYS do
  n = n + drop(KEYS[i], ARGV[1])
end
return n
"""
# KEYS: keys; ARGV[1]: expiry (ms); ARGV[2i], ARGV[2i + 1]: the owner of
# KEYS[i] and its share tag ('' if its own). Renews each owner's hold,
# takes again those that ended (a Redis restart, a pause: a shared name is
# taken again beside the owners sharing it under the same tag), and
# returns the indexes of the keys someone else holds now.
REFRESH = NAME_LIB + """
local now = now_ms()
local lost = {}
for i = 1, #KEYS do
  local owner, tag = ARGV[2 * i], ARGV[2 * i + 1]
  local kind, held_tag, owners = holders(KEYS[i], now)
  local ok = not kind
  if kind == 'one' then ok = tag == '' and owners[1] == owner
  elseif kind == 'set' then ok = tag ~= '' and held_tag == tag end
  if ok then
    hold(KEYS[i], owner, tag, ARGV[1], now, kind)
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
    #: Keys the owner gives up in the same step (a rename).
    drop: list[str]
    #: The latest the deadline may be moved to (``CLAIM_WAIT_MAX``).
    cap: float
    #: The share tag ('' for a claim of its own; ``Broker.claim``).
    share: str = ""

    def wait_for(self, grace_until: float) -> None:
        """Wait until just after a grace that ends at ``grace_until``."""
        self.deadline = min(self.cap, max(self.deadline, grace_until + GRACE_MARGIN))


@dataclass(slots=True)
class _Release:
    keys: list[str]
    owner: str
    #: ``Released(token)`` is posted once Redis has run it (None: nobody waits).
    token: Any = None


@dataclass(slots=True)
class _Refresh:
    pass


@dataclass(slots=True)
class _Alive:
    """The heartbeat's script (BEAT)."""


@dataclass(slots=True)
class _Back:
    """This node has claimed its names again (BACK)."""


@dataclass(slots=True)
class _Leave:
    """This node leaves ``NODES_KEY`` (it stops): no grace waits for it."""


@dataclass(slots=True)
class _GraceCheck:
    """Whether the grace claims wait for is over (GRACE_LEFT)."""


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
        self.counters: Counter[str] = Counter()
        self._client = coredis.Redis.from_url(
            url, retry_policy=NoRetryPolicy(), stream_timeout=command_timeout,
            connect_timeout=command_timeout, client_name=f"chatd:{node}")
        self._claim = self._client.register_script(CLAIM)
        self._release = self._client.register_script(RELEASE)
        self._refresh = self._client.register_script(REFRESH)
        self._resume = self._client.register_script(RESUME)
        self._beat = self._client.register_script(BEAT)
        self._back = self._client.register_script(BACK)
        self._grace_check = self._client.register_script(GRACE_LEFT)
        quiet_coredis()
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
        #: Redis key -> share tag, for the keys of ``_held`` shared with
        #: other owners (``Broker.claim``'s ``share``).
        self._shares: dict[str, str] = {}
        #: Releases not sent yet because Redis was down, in order.
        self._releases: list[_Release] = []
        #: Claims held back until the grace ends (trio time: the latest it
        #: may end; it ends sooner if every node waited for is back), in
        #: order, and when Redis is next asked whether it is over.
        self._later: list[_Claim] = []
        self._grace_until = 0.0
        self._next_check = 0.0
        #: The other nodes alive at this node's last heartbeat (BEAT): the
        #: nodes it brings back to Redis after an outage (RESUME).
        self._view: list[str] = []
        #: Whether the publisher has been connected before (a grace may be due).
        self._connected_before = False
        self._pub_ok = False
        self._sub_ok = False
        self._up = False
        self._was_up = False
        #: Whether the current outage was logged and posted; when it began
        #: (trio time), why, and the events dropped since.
        self._reported = False
        self._down_since = 0.0
        self._down_reason = ""
        self._dropped_in_outage = 0
        self._reason = f"broker {self.shown}: connecting"
        #: trio time this node's own heartbeat last came back, and of the
        #: current subscription.
        self._echo: float | None = None
        self._subscribed_at = 0.0
        self._dropped_logged = -DROP_LOG_INTERVAL
        self._dropped_since_log = 0
        self._busy = False
        #: Set by ``aclose``: no heartbeat after the node left NODES_KEY.
        self._leaving = False
        self._scope = trio.CancelScope()
        #: How this process's own payloads begin (``wire.own_prefix``), and
        #: the cluster channel as Redis names it in a message.
        self._own = wire.own_prefix(node, boot)
        self._cluster = CLUSTER.encode()

    # --- the router's side (synchronous, never blocks) ------------------------------

    def publish(self, channel: str, item: Item) -> None:
        if not self._pub_ok or self._publishes >= self.queue_size:
            self._drop(1, "the broker is down" if not self._pub_ok else "the queue is full")
            return
        self._queue.append(_Publish(channel, item))
        self._publishes += 1
        self._wake.set()

    def claim(self, room: str, keys: Iterable[str], owner: str, token: Any,
              drop: Iterable[str] = (), share: str | None = None) -> None:
        # A claim waits at most ``claim_timeout`` seconds, or, made during a
        # grace, until just after its end.
        now = trio.current_time()
        op = _Claim([name_key(room, k) for k in sorted(keys)], owner, token,
                    now + self.claim_timeout, [name_key(room, k) for k in sorted(drop)],
                    now + max(self.claim_timeout, CLAIM_WAIT_MAX), share or "")
        if now < self._grace_until:
            op.wait_for(self._grace_until)
        self._queue.append(op)
        self._wake.set()
        return None

    def release(self, room: str, keys: Iterable[str], owner: str,
                token: Any = None) -> bool | None:
        keys = [name_key(room, k) for k in keys]
        if not keys:
            return True
        for key in keys:
            if self._held.get(key) == owner:
                self._forget_key(key)
        if not self._pub_ok:
            # Kept for when Redis is back, ahead of any claim; nothing can
            # be confirmed meanwhile, so the caller announces now.
            self._releases.append(_Release(keys, owner))
            return True
        self._queue.append(_Release(keys, owner, token))
        self._wake.set()
        return None if token is not None else True

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
        waiting = sum(1 for op in self._queue if type(op) is _Claim) + len(self._later)
        return dict(self.counters, queued=len(self._queue), subscriptions=len(self._active),
                    names=len(self._held), claims_waiting=waiting)

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
        """Leave the cluster: release every name this node still holds, say
        ``Bye`` on ``chatd:cluster`` (after what is queued: the last leaves),
        wait for it all to be sent, for at most ``command_timeout`` seconds,
        then stop."""
        if self._pub_ok:
            by_owner: dict[str, list[str]] = {}
            for key, owner in self._held.items():
                by_owner.setdefault(owner, []).append(key)
            self._held.clear()
            self._shares.clear()
            for owner, keys in by_owner.items():
                self._queue.append(_Release(keys, owner))
            self._queue.append(_Publish(CLUSTER, Bye()))
            self._queue.append(_Leave())
            self._leaving = True
            self._publishes += 1
            self._wake.set()
            log.info("broker %s: leaving the cluster (%d names released)", self.shown,
                     sum(len(keys) for keys in by_owner.values()))
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
                        grace = await self._resume(
                            [ALIVE_KEY, GRACE_KEY],
                            [self.node, "1" if self._connected_before else "0", self._alive_ms,
                             self._bound_ms, int(self._reach_after * 1000), *self._view])
                except Exception as exc:
                    await self._down(f"cannot reach it: {_describe(exc)}")
                    await self._expire_claims()
                    with trio.move_on_after(backoff):
                        await self._wake.wait()
                        await trio.sleep(backoff / 2)
                    self._wake = trio.Event()
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                backoff = BACKOFF_FIRST
                self._connected_before = True
                self._grace_left(grace)
                self._pub_ok = True
                # Names first: they are this node's, and nobody may take them
                # before it says so again (a Redis restart lost them); then
                # it tells the grace it is back. Then the releases kept while
                # down, before any new claim.
                pending, self._releases = self._releases, []
                self._queue.extendleft(reversed([_Refresh(), _Back(), *pending]))
                await self._check_up()
            if self._later:
                await self._release_later()
            if not self._queue:
                self._wake = trio.Event()
                wake_at = math.inf
                if self._later:
                    wake_at = min(self._grace_until, self._next_check,
                                  *(op.deadline for op in self._later))
                with trio.move_on_at(wake_at):
                    await self._wake.wait()
                continue
            ops = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
            self._publishes -= sum(1 for op in ops if type(op) is _Publish)
            self._busy = True
            try:
                await self._send(ops)
            except Exception as exc:
                self._pub_ok = False
                await self._down(_describe(exc))
                await self._failed(ops)
            finally:
                self._busy = False

    async def _release_later(self) -> None:
        """Claims held back for the grace: refused once past their deadline
        (the protocol's "name taken": never later than ``CLAIM_WAIT_MAX``);
        the others go first, in order, once it is over. Meanwhile Redis is
        asked every ``GRACE_POLL`` seconds whether it is over."""
        now = trio.current_time()
        keep = []
        for op in self._later:
            if now > op.deadline:
                await self._post(ClaimDone(token=op.token, ok=False))
            else:
                keep.append(op)
        self._later = keep
        if keep and now >= self._grace_until:
            self._later = []
            self._queue.extendleft(reversed(keep))
        elif keep and now >= self._next_check:
            self._next_check = now + GRACE_POLL
            self._queue.append(_GraceCheck())

    def _grace_left(self, grace_ms: Any) -> None:
        """Redis says the grace may last ``grace_ms`` milliseconds more (none
        if not > 0): the claims waiting now wait for its end (Redis answers
        again, and the answer will be right then; refusing a free name is
        not), and are sent again as soon as it is over."""
        now = trio.current_time()
        if isinstance(grace_ms, int) and grace_ms > 0:
            if self._grace_until <= now:
                self.counters["graces"] += 1
                self._next_check = now + GRACE_POLL
            self._grace_until = until = now + grace_ms / 1000
            for op in [*self._queue, *self._later]:
                if type(op) is _Claim:
                    op.wait_for(until)
        elif self._grace_until > now:
            self._grace_until = now  # over: the claims held back go now
            self._wake.set()

    @property
    def _alive_ms(self) -> int:
        return int(self.probe_timeout * 1000)

    @property
    def _bound_ms(self) -> int:
        """How long a node alive before an outage is waited for: as long
        as the others wait before they take a silent node for dead."""
        return int(self.node_timeout * 1000)

    @property
    def _reach_after(self) -> float:
        """Seconds after Redis starts within which every node alive reaches
        it: a reconnection attempt at least every ``BACKOFF_MAX`` seconds,
        each bounded by ``command_timeout``."""
        return BACKOFF_MAX + self.command_timeout

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
                    if op.keys and now < self._grace_until:
                        self._later.append(op)
                    elif now > op.deadline:
                        expired.append(op)
                    else:
                        answers.append((op, self._claim(
                            [GRACE_KEY, ALIVE_KEY, *op.keys, *op.drop],
                            [op.owner, self._ttl_ms, len(op.keys), self._bound_ms, op.share],
                            client=pipe)))
                elif kind is _Release:
                    answers.append((op, self._release(op.keys, [op.owner], client=pipe)))
                elif kind is _Alive:
                    answers.append((op, self._beat([ALIVE_KEY], [self.node, self._alive_ms,
                                                                 self._bound_ms], client=pipe)))
                elif kind is _Back:
                    answers.append((op, self._back([], [self.node], client=pipe)))
                elif kind is _GraceCheck:
                    answers.append((op, self._grace_check([], [], client=pipe)))
                elif kind is _Leave:
                    pipe.hdel(NODES_KEY, [self.node])
                else:
                    for chunk in self._refresh_chunks():
                        owners = [arg for key in chunk
                                  for arg in (self._held[key], self._shares.get(key, ""))]
                        answers.append((chunk, self._refresh(chunk, [self._ttl_ms, *owners],
                                                             client=pipe)))
        self.counters["published"] += published
        for op in expired:
            await self._post(ClaimDone(token=op.token, ok=False))
        lost: list[str] = []
        for op, request in answers:
            result = await request
            kind = type(op)
            if kind is _Claim:
                if isinstance(result, int):  # the grace: try again when it ends
                    self._grace_left(max(result, 1))
                    op.wait_for(self._grace_until)
                    self._later.append(op)
                    continue
                ok = result is None
                if ok:
                    for key in op.drop:
                        if self._held.get(key) == op.owner:
                            self._forget_key(key)
                    for key in op.keys:
                        self._held[key] = op.owner
                        if op.share:
                            self._shares[key] = op.share
                        else:
                            self._shares.pop(key, None)
                await self._post(ClaimDone(token=op.token, ok=ok))
            elif kind is _Release:
                if op.token is not None:
                    await self._post(Released(token=op.token))
            elif kind is _Alive:
                self._view = [_text(node) for node in result or ()]
            elif kind is _Back or kind is _GraceCheck:
                self._grace_left(result)
            else:
                for position in result or ():
                    key = op[int(position) - 1]
                    owner = self._held.pop(key, None)
                    self._shares.pop(key, None)
                    if owner is not None:
                        lost.append(owner)
        if lost:
            log.warning("%d names of this node were taken by other nodes while it could not "
                        "renew them", len(lost))
            await self._post(NamesLost(owners=sorted(set(lost))))

    def _forget_key(self, key: str) -> None:
        del self._held[key]
        self._shares.pop(key, None)

    @property
    def _ttl_ms(self) -> int:
        return int(self.name_ttl * 1000)

    def _refresh_chunks(self) -> list[list[str]]:
        keys = list(self._held)
        return [keys[i:i + REFRESH_CHUNK] for i in range(0, len(keys), REFRESH_CHUNK)]

    async def _failed(self, ops: list[Any]) -> None:
        """A pipeline failed: some of it may have run. Claims are refused and
        their keys released once Redis is back (the script may have run);
        releases wait for Redis (those awaited are told done: the broker is
        down, nothing is confirmed meanwhile); published items are lost
        (counted)."""
        dropped = 0
        for op in ops:
            kind = type(op)
            if kind is _Publish:
                dropped += 1
            elif kind is _Claim:
                if any(op is later for later in self._later):
                    continue  # held back for the grace, not sent: still waiting
                keys = [key for key in op.keys if self._held.get(key) != op.owner]
                if keys:
                    self._releases.append(_Release(keys, op.owner))
                await self._post(ClaimDone(token=op.token, ok=False))
            elif kind is _Release:
                self._releases.append(_Release(op.keys, op.owner))
                if op.token is not None:
                    await self._post(Released(token=op.token))
        self._drop(dropped, "the broker failed")
        await self._expire_claims()

    async def _expire_claims(self) -> None:
        """While down: refuse claims past their deadline (those held back
        for a grace included), drop queued items, keep releases for later."""
        now = trio.current_time()
        keep: deque[Any] = deque()
        dropped = 0
        later, self._later = self._later, []
        for op in [*later, *self._queue]:
            kind = type(op)
            if kind is _Publish:
                dropped += 1
            elif kind is _Claim and now > op.deadline:
                await self._post(ClaimDone(token=op.token, ok=False))
            elif kind is _Release:
                self._releases.append(_Release(op.keys, op.owner))
                if op.token is not None:
                    await self._post(Released(token=op.token))
            elif kind is _Claim:
                keep.append(op)
        self._queue = keep
        self._publishes = 0
        self._drop(dropped, "the broker is down")

    def _drop(self, count: int, why: str) -> None:
        """Count ``count`` items lost. During an outage the line that ends it
        says how many; otherwise (a full queue) a WARNING every
        ``DROP_LOG_INTERVAL`` seconds."""
        if not count:
            return
        self.counters["dropped"] += count
        if self._reported:
            self._dropped_in_outage += count
            return
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
                await self._down(_describe(exc))
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _receive(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message()
            if message is None or message["type"] != "message":
                continue
            await self._deliver(message["channel"], message["data"])

    async def _deliver(self, channel: bytes | str, data: bytes | str) -> None:
        if isinstance(data, bytes) and data.startswith(self._own) \
                and channel not in (self._cluster, CLUSTER):
            # This process's own payload on a channel it also subscribes to
            # (a user with devices here): nothing in it is news here, and
            # only the heartbeat on chatd:cluster is looked at (the probe).
            return
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
            if self._pub_ok and not self._leaving:
                # Not counted against queue-size: the probe must go out.
                self._queue.append(_Publish(CLUSTER, Heartbeat(rooms=self._versions())))
                self._queue.append(_Alive())
                self._publishes += 1
                if trio.current_time() >= next_refresh:
                    next_refresh = trio.current_time() + self.refresh
                    if self._held:
                        self._queue.append(_Refresh())
                self._wake.set()
            await self._post(Tick())

    # --- state -----------------------------------------------------------------------

    async def _down(self, reason: str) -> None:
        """Redis is lost (``reason``, without the URL): the first task to
        notice logs it (one WARNING per outage) and tells the router."""
        self._reason = f"broker {self.shown}: {reason}"
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
            self._down_since = trio.current_time()
            self._down_reason = reason
            self._dropped_in_outage = 0
            self.counters["outages"] += 1
            log.warning("broker %s lost: %s; nothing crosses nodes and no new name is given "
                        "until it is back", self.shown, reason)
            await self._post(BrokerDown(reason=reason))

    async def _check_up(self) -> None:
        if self._pub_ok and self._sub_ok and not self._up:
            self._up = True
            resumed, self._was_up = self._was_up, True
            if self._reported:
                # The end of an outage the operator was warned of (also one
                # at start: Redis was not there yet).
                now = trio.current_time()
                grace = self._grace_until - now
                log.info("broker %s back after %.1f s (lost: %s); %d events for other nodes "
                         "were dropped meanwhile%s%s", self.shown, now - self._down_since,
                         self._down_reason, self._dropped_in_outage,
                         "; new names wait until every node of before the outage has claimed "
                         f"its own again (at most {grace:.1f} s more)" if grace > 0 else "",
                         ": repairing what was missed" if resumed else "")
            else:
                log.info("broker %s: connected", self.shown)
            self._reported = False
            await self._post(BrokerUp(resumed=resumed))


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def quiet_coredis() -> None:
    """Route coredis's own log lines to DEBUG, each on one line: it logs
    every failed reconnection at ERROR with a traceback (and lost
    connections at INFO with one), which chatd handles and reports itself
    (one WARNING per outage, one INFO at its end). Seen at ``log-level
    debug`` only. Idempotent."""
    logger = logging.getLogger("coredis")
    if not any(isinstance(f, _ToDebug) for f in logger.filters):
        logger.addFilter(_ToDebug())


class _ToDebug(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not log.isEnabledFor(logging.DEBUG):
            return False
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()} ({_describe(record.exc_info[1])})"
            record.args = ()
        record.exc_info = record.exc_text = record.stack_info = None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


#: coredis's text for a failed pipeline command quotes the command and all
#: its arguments (a PUBLISH carries client text): kept out of the log.
_PIPELINE_ERROR = re.compile(r"^Command # \d+ \(.*\) of pipeline caused error: ", re.S)


def _describe(exc: BaseException) -> str:
    """One line for a failure, from inside exception groups too, without
    the arguments of a failed pipeline command; at most 300 characters."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = _PIPELINE_ERROR.sub("", str(exc))
    text = " ".join(text.split())
    if len(text) > 300:
        text = text[:300] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
