"""Hypothesis settings profiles shared by qnpu's own tests and users' test suites.

``ci``       derandomized, 25 examples: the same inputs on every run, fast on 2 cores.
``dev``      100 random examples per property (the default).
``nightly``  2,000 examples; properties that call ``hypothesis.target`` steer toward worst cases.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]


def register_profiles(load_from_env: bool = True) -> None:
    """Register the ``ci``, ``dev`` and ``nightly`` profiles; load ``$HYPOTHESIS_PROFILE`` (default ``dev``).

    pytest's ``--hypothesis-profile NAME`` option overrides the environment variable.
    """
    settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None,
                              database=None, print_blob=True, suppress_health_check=_SLOW_OK)
    settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=_SLOW_OK)
    settings.register_profile("nightly", max_examples=2000, deadline=None, suppress_health_check=_SLOW_OK,
                              phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])
    if load_from_env:
        settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
