"""Hypothesis strategies and helpers shared by the fuzz tests."""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

#: Any JSON value, small enough to keep frames under the 4 KB limit.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=8,
)


def draw(strategy: st.SearchStrategy, n: int) -> list:
    """``n`` examples from hypothesis, for a test that reuses one server or
    connection (hypothesis cannot drive an async test directly; a failure
    shows the bad input but is not shrunk)."""
    drawn: list = []

    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example):
        drawn.append(example)

    collect()
    return drawn
