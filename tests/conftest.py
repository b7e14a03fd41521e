"""Strict harness: float64 JAX, warnings are errors (pyproject), one shared derivation cache."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GRADLAB_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".gradlab-cache"))
os.environ.setdefault("JAX_ENABLE_X64", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "gradlab", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("gradlab")
