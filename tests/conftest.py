"""Strict harness: float64 JAX, warnings are errors (pyproject), one shared derivation cache.

The test session is an entry point: it configures JAX (float64, compilation cache) through
``gradlab.runtime.configure``; no library import does."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GRADLAB_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".gradlab-cache"))
os.environ.setdefault("JAX_ENABLE_X64", "1")  # inherited by the subprocesses some tests start
os.environ.setdefault("MPLBACKEND", "Agg")

from hypothesis import HealthCheck, settings  # noqa: E402

from gradlab import runtime  # noqa: E402

runtime.configure()

settings.register_profile(
    "gradlab", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("gradlab")
