"""Hypothesis profiles (docs/decisions/0050): ``make test`` draws the same examples every
run, so CI fails only for a change; ``HYPOTHESIS_PROFILE=explore`` draws new ones."""

from __future__ import annotations

import os

from hypothesis import settings

# Per-test settings (max_examples, deadline) still apply; a profile only sets defaults.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
