"""``--plot FILE.png``: latency and throughput over the run, with matplotlib.

Top: the latency percentiles of each interval (end-to-end message latency,
or connect + auth time in a storm), log scale. Bottom: deliveries/s and
publishes/s, or for the connect and idle scenarios connects/s and open
connections. Needs matplotlib (the ``bench`` extra); checked before the run.
"""

from __future__ import annotations

from typing import Any

from .scenarios import SCENARIOS


def check_plotting() -> None:
    """Before the run: --plot needs matplotlib (the ``bench`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("loadtest: --plot needs matplotlib: pip install matplotlib "
                         "(or pip install -e '.[bench]')") from None


def plot(path: str, r: dict[str, Any]) -> None:
    """Draw the result ``r`` (with its ``timeline``) to the PNG ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenario = SCENARIOS[r["scenario"]]
    timeline = r["timeline"]
    t = [p["t"] for p in timeline]
    key = "connect_latency_ms" if scenario.storm else "latency_ms"
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6.5))
    for q, style in (("p50", "-"), ("p90", "-"), ("p99", "-"), ("max", ":")):
        values = [p[key][q] if p[key] else float("nan") for p in timeline]
        top.plot(t, values, style, label=q)
    top.set_yscale("log")
    top.set_ylabel("connect + auth time (ms)" if scenario.storm else "end-to-end latency (ms)")
    top.legend(loc="upper left", ncol=4)
    top.grid(True, which="both", alpha=0.3)
    if scenario.messages:
        left, right = ("deliveries_per_s", "deliveries/s"), ("publishes_per_s", "publishes/s")
        style = "r--"
    else:
        left, right = ("connects_per_s", "connects/s"), ("open", "open connections")
        style = "g--"
    bottom.plot(t, [p[left[0]] for p in timeline], label=left[1])
    bottom.set_ylabel(left[1])
    other = bottom.twinx()
    other.plot(t, [p[right[0]] for p in timeline], style, label=right[1])
    other.set_ylabel(right[1])
    lines = bottom.get_lines() + other.get_lines()
    bottom.legend(lines, [line.get_label() for line in lines], loc="upper right")
    for ax in (top, bottom):
        ax.axvline(r["duration_s"], color="grey", lw=0.8)
    bottom.set_xlabel("seconds (grey line: end of the measured window)")
    bottom.grid(True, alpha=0.3)
    fig.suptitle(f"chatd {r['scenario']} ({r['protocol']}), {r['target']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
