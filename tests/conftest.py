"""Session-wide test settings: hypothesis profiles.

Property tests under ``tests/fuzz/`` take their example counts from the
loaded profile, so CI stays quick and a longer local run is one flag:

    pytest tests/fuzz --hypothesis-profile=fuzz-long --hypothesis-show-statistics

This file is loaded before the hypothesis plugin reads
``--hypothesis-profile``, so the profiles must be registered here.
"""
from __future__ import annotations

from hypothesis import HealthCheck, settings

#: CI: bounded examples per target, no deadline (CI machines are slow and shared).
settings.register_profile(
    "fuzz-ci", max_examples=100, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
#: A long local run: 50 times the CI count.
settings.register_profile(
    "fuzz-long", max_examples=5000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
