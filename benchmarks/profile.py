"""python -m benchmarks.profile COMMAND [ARGS ...]

Where the cold time of one ``gradlab`` command goes: runs ``gradlab COMMAND ARGS`` in this
(fresh) process and prints, as JSON, the wall time of the imports and of the command, and the
time JAX spent tracing (Python to jaxpr), lowering (jaxpr to StableHLO) and compiling (XLA),
summed over every program, with the number of programs, from ``jax.monitoring``'s duration
events. Run it with ``GRADLAB_CACHE_DIR`` set to an empty folder for a cold profile, or again
with the same folder to see what the persistent caches save."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from collections import defaultdict

_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "xla_compile",
}


def profile(argv: list[str]) -> dict:
    start = time.perf_counter()
    import jax.monitoring

    seconds: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)

    def listener(event: str, duration: float, **_) -> None:
        name = _EVENTS.get(event, event)
        seconds[name] += duration
        counts[name] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    from gradlab import cli

    imported = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(argv)
    done = time.perf_counter()
    return {
        "command": "gradlab " + " ".join(argv), "rc": rc,
        "import_s": imported - start, "command_s": done - imported,
        **{f"{name}_s": seconds.get(name, 0.0) for name in _EVENTS.values()},
        "programs_compiled": counts.get("xla_compile", 0), "programs_traced": counts.get("trace", 0),
        "other_events_s": {k: v for k, v in seconds.items() if k not in _EVENTS.values()},
    }


if __name__ == "__main__":
    print(json.dumps(profile(sys.argv[1:]), indent=2))
