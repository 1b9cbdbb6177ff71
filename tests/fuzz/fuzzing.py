"""Shared helpers for the fuzz tests: how many examples each target runs.

A target asks for ``examples(n)``: ``n`` in CI (the default), or the loaded
profile's ``max_examples`` when a longer profile (``fuzz-long``) was chosen
with ``--hypothesis-profile``.
"""
from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
             HealthCheck.filter_too_much, HealthCheck.data_too_large]


def examples(n: int) -> settings:
    """Hypothesis settings for one target: ``n`` examples unless a long profile is loaded.

    Outside the long profile the examples are derandomized: the same ``n``
    cases every run, so ``make test`` cannot turn red on a draw that no change
    caused. New cases are what the long profile (random, 5,000) is for.
    """
    chosen = settings.get_current_profile_name()
    long_run = chosen == "fuzz-long"
    count = settings().max_examples if long_run else n
    return settings(max_examples=count, deadline=None, suppress_health_check=_SUPPRESS,
                    derandomize=not long_run)


#: Any JSON value (what a file, a request or a signed payload can carry),
#: with the numbers parsers get wrong: huge ints, NaN, infinities, -0.0.
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**300, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=12,
)


def flip_bits(data: bytes, positions: list[int]) -> bytes:
    """``data`` with one bit flipped at each position (taken modulo the bit length)."""
    out = bytearray(data)
    for p in positions:
        p %= len(out) * 8
        out[p // 8] ^= 1 << (p % 8)
    return bytes(out)
