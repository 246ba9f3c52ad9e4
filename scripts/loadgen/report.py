"""The result of a run: one dict (the ``--json`` line), and the summary table.

:func:`compile_result` merges what the workers counted (their final totals
and their interval samples) with the parent's readings of the server and
the host; :func:`summary_table` is what a person reads. Shared by the
scenarios: each adds its own rows (``Scenario.rows``).
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from typing import Any

from .dialects import DIALECTS
from .histogram import merged, summarize
from .plan import Layout, Plan
from .process import cpu_list
from .scenarios import SCENARIOS


def timeline_point(k: int, parts: list[dict], interval: float) -> dict[str, Any]:
    """Interval ``k`` (1-based) from every worker's sample ``parts``: rates a second."""
    return {
        "t": round(k * interval, 3),
        "deliveries_per_s": sum(s["deliveries"] for s in parts) / interval,
        "publishes_per_s": sum(s["publishes"] for s in parts) / interval,
        "connects_per_s": sum(s["connects"] for s in parts) / interval,
        "open": sum(s["open"] for s in parts),
        "latency_ms": summarize(merged([s["latency"] for s in parts])),
        "connect_latency_ms": summarize(merged([s["connect_latency"] for s in parts]))}


def host_figures(duration: float, before: tuple, after: tuple, own: float) -> dict[str, Any]:
    """The machine over the window, in % of a core: ``before``/``after`` are
    ``process.read_host_seconds()``, ``own`` the parent's CPU seconds."""
    def pct(seconds: float) -> float:
        return round(100 * seconds / duration, 1)

    return {"cpus": os.cpu_count(), "busy_pct": pct(after[0] - before[0]),
            "interrupts_pct": pct(after[1] - before[1]), "parent_pct": pct(own),
            "cpu_busy_pct": [pct(b - a) for a, b in zip(before[2], after[2])]}


def compile_result(args: argparse.Namespace, plans: list[Plan], layout: Layout,
                   samples: dict[int, list[dict]], finals: list[dict], ran: list[dict],
                   setup_seconds: float, server: dict | None,
                   host: dict[str, Any]) -> dict[str, Any]:
    """The run's result: counts, rates a second, latencies in ms, CPU in % of a core."""
    scenario = SCENARIOS[args.scenario]
    duration = args.duration
    timeline = [timeline_point(k, samples[k], args.interval) for k in sorted(samples)]
    every_sample = [s for k in samples for s in samples[k]] + finals
    latency = merged([s["latency"] for s in every_sample])
    connect_latency = merged([s["connect_latency"] for s in every_sample])
    errors: Counter = Counter()
    close_codes: Counter = Counter()
    reasons: dict[int, str] = {}
    connected: Counter = Counter()
    room_publishes: Counter = Counter()
    for f in finals:
        errors.update(f["errors"])
        close_codes.update(f["close_codes"])
        for code, reason in f["close_reasons"].items():
            reasons.setdefault(code, reason)
        connected.update(f["connected"])
        room_publishes.update(f["room_publishes"])
    echo = DIALECTS[args.protocol].echo
    expected = sum(n * (connected[r] - (0 if echo else 1)) for r, n in room_publishes.items())

    def total(key: str) -> int:
        return sum(f[key] for f in finals)

    deliveries, late, publishes, connects = (total(k) for k in (
        "deliveries", "late", "publishes", "connects"))
    cpu_user = sum(r["user"] for r in ran)
    cpu_system = sum(r["system"] for r in ran)
    seconds = max(max(r["seconds"] for r in ran), duration)
    open_now = total("open")
    if server:
        held = scenario.held(args, open_now)
        base = server["rss_before_kib"]
        after = server[scenario.rss_reading[0]]
        server["rss_per_connection_kib"] = (round((after - base) / held, 2)
                                            if held and base and after else None)
    result = {
        "scenario": args.scenario, "protocol": args.protocol, "engine": args.engine,
        "target": f"{'wss' if args.tls else 'ws'}://{plans[0].host_header}", "tls": args.tls, "paths": sorted(set(layout.paths)),
        "workers": args.workers, "duration_s": duration,
        "subscribers": len(layout.subscribers), "publishers": len(layout.publishers),
        "rooms": len(layout.groups) if DIALECTS[args.protocol].groups else len(set(layout.paths)),
        "message_bytes": args.size, "rate_target": args.rate,
        "window": plans[0].window,
        "connections": open_now, "setup_s": round(setup_seconds, 3),
        "publishes": publishes, "publish_rate": round(publishes / duration, 1),
        "deliveries": deliveries, "deliveries_per_s": round(deliveries / duration, 1),
        "late_deliveries": late, "expected_deliveries": expected,
        "delivered_ratio": round((deliveries + late) / expected, 4) if expected else None,
        "latency_ms": summarize(latency, max(f["latency_max"] for f in finals) or None),
        "connects": connects, "late_connects": total("late_connects"),
        "connect_attempts": total("attempts"),
        "connects_per_s": round(connects / duration, 1) if scenario.storm else None,
        "connect_latency_ms": summarize(connect_latency,
                                        max(f["connect_latency_max"] for f in finals) or None),
        "errors": dict(errors), "error_count": sum(errors.values()),
        "close_codes": {str(c): n for c, n in sorted(close_codes.items())},
        "close_reasons": {str(c): r for c, r in sorted(reasons.items()) if r},
        "server": server,
        "client": {"cpu_pct": round(100 * (cpu_user + cpu_system) / seconds, 1),
                   "user_pct": round(100 * cpu_user / seconds, 1),
                   "system_pct": round(100 * cpu_system / seconds, 1),
                   "worker_cpu_pct": [round(100 * (r["user"] + r["system"]) / seconds, 1)
                                      for r in ran]},
        "host": host,
        "pinned": {"server": cpu_list(args.server_cpus), "client": cpu_list(args.cpus)},
        "timeline": timeline,
    }
    result["bottleneck"] = bottleneck(result)
    return result


def bottleneck(r: dict[str, Any]) -> dict[str, Any]:
    """Which side limited the run, judged by the figures it returns (% of a core):

    - ``server``: the server's process used >= 85% of a core, or its pinned
      core was >= 95% busy (its share of the loopback's interrupts runs there)
      while other processes took less than 30% of a core;
    - ``load``: a load worker used >= 85% of a core (the figures measure the
      client);
    - ``others``: a pinned core was >= 95% busy although neither process
      was near a full core, and other processes took 30% of a core or more;
    - ``neither``: the window, the pacing, or another job limited the run.
    """
    busy = r["host"]["cpu_busy_pct"]

    def core(cpus: list[int] | None) -> float | None:
        cores = [busy[c] for c in cpus or () if c < len(busy)]
        return max(cores) if cores else None

    server_cpu = (r["server"] or {}).get("cpu_pct")
    load_cpu = max(r["client"]["worker_cpu_pct"] or [0.0])
    server_core, load_core = core(r["pinned"]["server"]), core(r["pinned"]["client"])
    if (server_cpu or 0) >= 85 and (server_cpu or 0) >= load_cpu:
        side = "server"
    elif load_cpu >= 85:
        side = "load"
    elif max(server_core or 0, load_core or 0) >= 95:
        side = "others" if r["server"] and others_pct(r) >= 30 or not server_core \
            or server_core < 95 else "server"
    else:
        side = "neither"
    return {"side": side, "server_cpu_pct": server_cpu, "load_worker_cpu_pct": load_cpu,
            "server_core_busy_pct": server_core, "load_core_busy_pct": load_core}


def others_pct(r: dict[str, Any]) -> float:
    """CPU (% of a core) used during the window by other processes than the
    server and this test: another load on the machine skews the result."""
    host, server = r["host"], r["server"] or {}
    # A process's own CPU time may include interrupts it served.
    return max(0.0, host["busy_pct"] + host["interrupts_pct"] - r["client"]["cpu_pct"]
               - host["parent_pct"] - (server.get("cpu_pct") or 0))


def throttled(r: dict[str, Any]) -> str | None:
    """Why the server held the publishers back, or None.

    What counts is the rate the server *relayed* messages in the window
    (deliveries divided by the receivers each message has), not the rate
    they were written: a throttled client's messages wait in TCP buffers
    and arrive late. Held back: with ``--rate``, under 95% of the rate
    asked was relayed; or each publisher was relayed at about what chatd's
    flood control lets one connection send over the run (``message-rate``
    a second after a ``message-burst``: chatd reads a connection over it
    later, so its messages wait and latency grows; nothing is dropped)."""
    duration, publishers = r["duration_s"], r["publishers"]
    if not r["publishes"] or not publishers or not duration or not r["expected_deliveries"]:
        return None
    receivers = r["expected_deliveries"] / r["publishes"]
    relayed = r["deliveries"] / receivers / duration
    asked = r.get("rate_target") or 0
    short = asked > 0 and relayed < 0.95 * asked
    rate, burst = r.get("server_message_rate"), r.get("server_message_burst")
    per = relayed / publishers
    # The most one connection may send over the run: the burst, then the rate.
    at_limit = rate is not None and per >= 0.9 * (rate + (burst or 0) / duration)
    if not (short or at_limit):
        return None
    said = (f"the server held the publishers back: it relayed {relayed:,.1f} messages/s"
            + (f" of {asked:,.1f}/s asked" if asked > 0 else "")
            + f" ({r['publish_rate']:,.1f}/s written)")
    if at_limit:
        said += (f"; {per:,.1f}/s per publisher is the server's message-rate ({rate:g}/s a "
                 f"connection, burst {burst}), beyond which chatd reads a client later: raise "
                 "message-rate and message-burst in the server's config, or add --publishers")
    else:
        said += "; the server (or the machine) could not keep up, see latency and CPU above"
    return said


def summary_table(r: dict[str, Any]) -> str:
    """The result as aligned ``label  text`` lines, with notes and warnings."""
    scenario = SCENARIOS[r["scenario"]]
    rows = [("target", f"{r['target']} {', '.join(r['paths'])} ({r['protocol']})"),
            ("run", f"{r['scenario']}: {scenario.shape(r)}; {r['duration_s']:g} s, "
                    f"{r['workers']} worker(s)"),
            ("connections", f"{r['connections']:,} open; set up in {r['setup_s']:.2f} s"),
            *scenario.rows(r)]
    errors = ", ".join(f"{n}x {k}" for k, n in sorted(r["errors"].items())) or "none"
    codes = ", ".join(f"{n}x {c}" + (f" ({r['close_reasons'][c]})" if c in r["close_reasons"]
                                     else "") for c, n in r["close_codes"].items()) or "none"
    rows += [("errors", errors), ("close codes", codes)]
    server = r["server"]
    if server:
        def mib(kib: int | None) -> str:
            return f"{kib / 1024:.1f} MiB" if kib else "?"
        per = server.get("rss_per_connection_kib")
        key, when = scenario.rss_reading
        rows.append(("server", f"pid {server['pid']}: CPU {server['cpu_pct']}% of a core; RSS "
                               f"{mib(server['rss_before_kib'])} idle, {mib(server[key])} {when}"
                               + (f" ({per:.1f} KiB per connection)" if per else "")))
    client = r["client"]
    rows.append(("client CPU", f"{r['engine']} engine: "
                               f"{client['cpu_pct']}% of a core (user {client['user_pct']}%, "
                               f"system {client['system_pct']}%); per worker "
                               f"{', '.join(f'{c}%' for c in client['worker_cpu_pct'])}"))
    host = r["host"]
    rows.append(("host", f"{host['cpus']} CPUs busy "
                         f"{', '.join(f'{c:.0f}%' for c in host['cpu_busy_pct'])}; processes "
                         f"used {host['busy_pct']}% of a core, interrupts {host['interrupts_pct']}%"
                         + (f"; {others_pct(r):.0f}% was neither the server nor this test"
                            if server else "")))
    b = r["bottleneck"]
    said = {"server": "the server (its process or its core was full)",
            "load": "the load generator (a worker used a full core): the figures "
                    "measure the client",
            "others": "other processes (a pinned core was full, mostly with their work)",
            "neither": "neither side's core was full (the window, the pacing, or "
                       "another job limited the run)"}[b["side"]]
    cores = ""
    if b["server_core_busy_pct"] is not None and b["load_core_busy_pct"] is not None:
        cores = (f"; server core {b['server_core_busy_pct']:.0f}% busy, load core "
                 f"{b['load_core_busy_pct']:.0f}%")
    rows.append(("bottleneck", said + cores))
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k.ljust(width)}  {v}" for k, v in rows]
    held = throttled(r)
    if r["delivered_ratio"] is not None and r["delivered_ratio"] < 0.99:
        lines.append("  note: messages went missing: " + (
            "the server had not read the held-back publishers' last messages when the run "
            "ended (next note)" if held and not r["close_codes"] else
            "see errors and close codes above (1008 'slow consumer': a subscriber read too "
            "slowly)"))
    if held:
        lines.append(f"  note: {held}")
    if b["side"] == "load":
        lines.append("  warning: the client was near a full core, so these numbers may "
                     "measure the client; add --workers (or cores)")
    return "\n".join(lines)
