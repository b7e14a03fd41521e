"""The benchmarks. Each function measures gradlab and its baseline in the same process and
returns a dict of numbers; ``SIZES`` scales them (``tiny`` for the test suite, ``quick`` for
``--quick``, ``full`` for ``benchmarks/results.md``)."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

SIZES = {
    "tiny": dict(steps=10, seeds=2, betas=(0.1, 0.5), points=16, check_losses=("dpo",), loop_points=16,
                 figures=("gradient_field",), torch_points=1,
                 torch_compile=(), cold=False),
    "quick": dict(steps=100, seeds=4, betas=(0.05, 0.1, 0.3, 0.5), points=500, check_losses=("dpo", "ipo", "simpo"),
                  loop_points=200, figures=("gradient_field", "force_vs_length", "length_force"), torch_points=None,
                  torch_compile=("loss",), cold=True),
    "full": dict(steps=500, seeds=16, betas=(0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0), points=1000, check_losses=None,
                 loop_points=500, figures=None, torch_points=None, torch_compile=("loss", "loss_autotune", "step"),
                 cold=True),
}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("gradlab", "jax", "jaxlib", "optax", "sympy", "numpy", "matplotlib", "torch"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "versions": versions}


@functools.cache
def _bytecode() -> None:
    """Compile this repository's packages (gradlab, benchmarks) to bytecode, as installing a
    package does: the fresh processes the benchmarks time then read it, like an installed user's
    and like torch's and jax's installed modules. Without it a child started under
    ``PYTHONDONTWRITEBYTECODE`` (which stops Python writing bytecode, not reading it) compiles
    every gradlab module from source (~0.09 CPU-s of a fresh ``gradlab simulate``), a cost no
    installed user pays. Called before every measurement that starts fresh processes, for
    gradlab's children and torch's alike."""
    import compileall

    root = Path(__file__).resolve().parents[1]
    for package in ("gradlab", "benchmarks"):
        compileall.compile_dir(root / package, quiet=1)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _warm(fn, repeats: int) -> float:
    """Seconds per call of a JAX computation after a first call that compiles it."""
    import jax

    jax.block_until_ready(fn())  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - start) / repeats


# --------------------------------------------------------------------------------------------
# 1. Toy training throughput
# --------------------------------------------------------------------------------------------


def _pair_rows(fam, pairs) -> tuple[np.ndarray, np.ndarray]:
    """The chosen and rejected responses of ``pairs`` (a ``PairData``: a response table and
    indices into it) as rows of ``all_sequences``, the enumeration the torch loops use."""
    from gradlab.policies import response_index

    rows = response_index(fam.vocab, fam.max_len, np.asarray(pairs.items), np.asarray(pairs.lengths))
    return rows[np.asarray(pairs.w)], rows[np.asarray(pairs.l)]


def sweep_experiment(family: str, steps: int, seeds: int | list[int], betas: list[float], record_every: int) -> dict:
    """The training benchmark's work as a gradlab experiment: DPO on equal-length data (64 pairs,
    vocabulary 3 + EOS, forced stop at 6 tokens), full-batch Adam at lr 0.05 from a seeded policy
    (scale 0.5) that is also the reference, over seeds x beta; loss and expected length recorded."""
    raw = {"policy": {"family": family, "vocab": 3, "max_len": 6, "scale": 0.5},
           "data": {"kind": "equal_length", "n_pairs": 64}, "loss": {"name": "dpo"},
           "train": {"optimizer": "adam", "lr": 0.05, "steps": steps, "seeds": seeds, "record_every": record_every,
                     "metrics": ["loss", "expected_length"]}}
    if len(betas) == 1:
        raw["loss"]["beta"] = betas[0]
    else:
        raw["sweep"] = {"loss.beta": list(betas)}
    return raw


def sweep_torch_inputs(raw: dict, seeds: int) -> tuple:
    """(family, inits, rows): what the torch loops need of the experiment ``raw``, from gradlab's
    own draws and data (``runner.initial_params``, ``datasets.build``), per seed: the initial
    parameter array and the (chosen, rejected) rows of ``all_sequences``."""
    import jax

    from gradlab.experiments import datasets, runner
    from gradlab.experiments.config import load

    exp = load(raw)
    fam = runner.build_family(exp.policy)
    inits, rows = [], []
    with jax.enable_x64(True):
        for s in range(seeds):
            params, ref = runner.initial_params(exp, fam, s)
            inits.append(params)
            rows.append(_pair_rows(fam, datasets.build(exp.data, fam, s, params, ref)))
    return fam, inits, rows


def _torch_runs(family: str, fam, points, inits, rows, seqs, lengths, steps: int, record_at: int) -> list:
    """The PyTorch eager baseline: one DPO run per (beta, seed) sweep point."""
    from benchmarks.torch_baseline import train_dpo

    return [train_dpo(family, fam.vocab, fam.max_len, inits[s], seqs, lengths, *rows[s], b, steps, 0.05, record_at)
            for b, s in points]


_COLD_SWEEP = """
import json, sys, time
t = time.perf_counter()
from gradlab import runtime
runtime.configure()  # as the CLI does: float64 and XLA's persistent compilation cache
from gradlab.experiments import runner
runner.run(json.loads(sys.argv[1]))
print(time.perf_counter() - t)
"""


def _fresh(args: list[str], cache: str, ok_codes: tuple[int, ...] = (0,)) -> float:
    """Wall time of ``python ARGS`` in a fresh process with ``GRADLAB_CACHE_DIR=cache``; an exit
    status outside ``ok_codes`` raises (``gradlab check`` exits 1 when a row fails: the time is
    still the time, and the rows' verdict is reported apart)."""
    _bytecode()
    env = dict(os.environ, GRADLAB_CACHE_DIR=cache)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    if done.returncode not in ok_codes:
        raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)
    return time.perf_counter() - start


def _cold_sweep(raw: dict) -> dict:
    """The sweep in a fresh process, timed inside it from before ``import gradlab`` to the end
    (imports, tracing, compilation, the run): first with an empty cache folder (so neither the
    derivation cache nor XLA's persistent compilation cache can help), then again with the
    caches that first run filled."""
    import json

    _bytecode()
    args = ["-c", _COLD_SWEEP, json.dumps(raw)]
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, GRADLAB_CACHE_DIR=cache)

        def run() -> tuple[float, float]:  # (inside the child, the child's whole wall time)
            start = time.perf_counter()
            inside = float(subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                                          check=True).stdout)
            return inside, time.perf_counter() - start

        (cold, cold_wall), (cached, cached_wall) = run(), run()
        return {"gradlab_cold_s": cold, "gradlab_cached_s": cached, "gradlab_cold_wall_s": cold_wall,
                "gradlab_cached_wall_s": cached_wall}


# every baseline must reach gradlab's recorded metrics to this (tests/test_benchmarks.py checks
# it): the bigram runs part by ~1e-10 under Adam (a coordinate whose exact gradient is 0 turns
# rounding noise into steps), the unigram ones by ~1e-14
METRIC_TOLERANCE = 1e-8


def _fastest_batched(batched_args: tuple, gap, beside, repeats: int = 3) -> tuple[dict, dict, float]:
    """Every batched eager form (``torch_baseline.BATCHED_VARIANTS``) with every Adam
    implementation (``ADAMS``), best of ``repeats`` runs, the rounds interleaved so that a burst
    of load elsewhere hits every form alike; ``beside`` (gradlab's warm sweep of the same runs) is
    timed right after each of them (its second call: the first brings its data back into the
    caches, as a torch run's first steps do for its ~500), so that both sides of a ratio are the
    best of as many runs taken over the same stretch of the machine's time. Returns (per form
    ``variant+adam``: ms per step, metric gap, whether it reaches the metrics; the fastest result
    that does; the best seconds of ``beside``)."""
    from benchmarks.torch_baseline import ADAMS, BATCHED_VARIANTS, train_dpo_fast

    forms = [(v, a) for v in BATCHED_VARIANTS for a in ADAMS]
    best: dict = {}
    best_beside = float("inf")
    for _ in range(repeats):
        for v, a in forms:
            res = train_dpo_fast(*batched_args, variant=v, adam=a)
            if (v, a) not in best or res["run_s"] < best[(v, a)]["run_s"]:
                best[(v, a)] = res
            beside()  # untimed: its data back in the caches after torch's run, the steady state
            best_beside = min(best_beside, _timed(beside)[1])
    steps = batched_args[9]
    table = {f"{v}+{a}": {"ms_per_step": 1e3 * r["run_s"] / steps, "max_metric_difference": gap(r),
                          "reaches_metrics": gap(r) < METRIC_TOLERANCE} for (v, a), r in best.items()}
    ok = [(r["run_s"], v, a) for (v, a), r in best.items() if table[f"{v}+{a}"]["reaches_metrics"]]
    if not ok:
        raise RuntimeError(f"no batched torch form reaches gradlab's metrics to {METRIC_TOLERANCE:g}: {table}")
    _, v, a = min(ok)
    return table, dict(best[(v, a)], variant=v, adam=a), best_beside


def _fastest_compiled(batched_args: tuple, variant: str, adam: str, forms: tuple, gap) -> tuple[dict, dict | None]:
    """``torch.compile`` of the batched form ``variant`` in each of ``forms``
    (``torch_baseline.COMPILE_FORMS``), each compiled cold; returns (per form: compile s, warm ms
    per step, metric gap, or the error it raised; the fastest warm run that reaches the metrics)."""
    from benchmarks.torch_baseline import train_dpo_fast

    table, best = {}, None
    steps = batched_args[9]
    for form in forms:
        try:
            res = train_dpo_fast(*batched_args, variant=variant, adam=adam, compile=form)
        except Exception as err:  # noqa: BLE001 - a form Inductor cannot compile here is reported, not fatal
            table[form] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            continue
        table[form] = {"adam": res["adam"], "compile_s": res["compile_s"], "ms_per_step": 1e3 * res["run_s"] / steps,
                       "max_metric_difference": gap(res), "reaches_metrics": gap(res) < METRIC_TOLERANCE}
        if table[form]["reaches_metrics"] and (best is None or res["run_s"] < best["run_s"]):
            best = dict(res, form=form)
    return table, best


def _fresh_torch(batched_args: tuple, variant: str, adam: str, threads: int, gap) -> dict:
    """The fastest batched eager loop as a fresh process, like gradlab's cold sweep: the inputs
    (gradlab's draws and data) written to an .npz first, then ``python -m benchmarks.torch_baseline``
    timed from outside (interpreter start, ``import torch``, reading, the loop, writing its records);
    its records are checked against gradlab's like every baseline's. ``_inside_s`` is timed in
    the child from before ``import torch``, ``_import_s`` is the import alone."""
    names = ("family", "vocab", "max_len", "inits", "seqs", "lengths", "w", "l", "betas", "steps", "lr",
             "record_every")
    _bytecode()
    with tempfile.TemporaryDirectory() as folder:
        inputs, outputs = Path(folder) / "inputs.npz", Path(folder) / "records.npz"
        np.savez(inputs, **dict(zip(names, batched_args, strict=True)), variant=variant, adam=adam, threads=threads)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "benchmarks.torch_baseline", str(inputs), str(outputs)],
                              cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        with np.load(outputs) as rec:
            res = {"loss": rec["loss"], "expected_length": rec["expected_length"]}
    inside, imported = (float(x) for x in done.stdout.split())
    return {"torch_batched_fresh_s": wall, "torch_batched_fresh_inside_s": inside,
            "torch_batched_fresh_import_s": imported, "torch_batched_fresh_max_metric_difference": gap(res)}


def _torch_threads(probe) -> int:
    """Set torch to the faster of one thread and one per core for ``probe`` (a short batched run)
    and return it: on a shared, loaded machine OpenMP's spinning threads make two threads 5-30x
    slower than one on these tiny tensors, and a fair baseline uses the better setting."""
    import torch

    best = None
    for n in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(n)
        probe()
        _, t = _timed(probe)
        best = (t, n) if best is None or t < best[0] else best
    torch.set_num_threads(best[1])
    return best[1]


def _warm_row(seconds: float, runs: int, steps: int) -> dict:
    """gradlab's warm sweep, ``seconds`` a call, as the training rows report it."""
    return {"gradlab_vmap_warm_s": seconds, "gradlab_vmap_warm_steps_per_s": runs * steps / seconds,
            "gradlab_warm_ms_per_step": 1e3 * seconds / steps}


def training(size: str = "quick") -> dict:
    """DPO on equal-length data, a sweep over seeds x beta: gradlab (``gradlab.experiments``: one
    compiled, vmapped program), gradlab one run at a time, and the PyTorch loops, each from
    gradlab's own initial parameters and data:

    - batched eager (the runs on a batch axis): every form of ``torch_baseline.train_dpo_fast``
      (hoisted gather, count matrices) with every Adam implementation, best of 3 each;
      ``torch_batched_s`` is the fastest that reaches gradlab's metrics (the best peer, named in
      ``torch_batched_variant``); ``torch_batched_naive_s`` the plain loop
      (``train_dpo_batched``) the earlier ratios were taken against;
    - ``torch.compile`` of that fastest form, in each of ``SIZES[size]["torch_compile"]``'s
      forms (compiled loss, max-autotune, the whole step with Adam), the fastest warm one kept;
    - one eager run per sweep point, as before;
    - (``cold``) the fastest batched eager loop as a fresh process (``torch_batched_fresh_s``,
      timed from outside, like ``gradlab_cold_wall_s``): the ``_fresh`` ratios compare whole
      processes on both sides.

    gradlab is timed in this process (first call, then warm) and, for the ratios that include
    start-up (``cold``), in fresh processes with empty and with populated caches. Its warm time
    is the best of three calls, and where torch is installed the best of the calls timed beside
    the batched torch runs, one after each (``_fastest_batched``): the machine's speed drifts by
    10-30% over minutes, and a ratio of two bests taken minutes apart moved with it. The PyTorch
    loops are timed after a warm-up, so torch's import (and, for ``torch.compile``, the
    compilation, reported apart as ``torch_compile_s``) is not in their times."""
    from gradlab.experiments import runner
    from gradlab.policies import all_sequences

    cfg = SIZES[size]
    steps, seeds, betas = cfg["steps"], cfg["seeds"], list(cfg["betas"])
    out: dict = {"steps": steps, "seeds": seeds, "betas": betas, "families": {}}
    record_every = max(1, steps // 10)  # ten rows of metrics per run
    for family in ("unigram", "bigram"):
        raw = sweep_experiment(family, steps, seeds, betas, record_every)
        runs = seeds * len(betas)
        sweep = lambda raw=raw: runner.run(raw)  # noqa: E731
        sim, t_vmap = _timed(sweep)  # includes compiling the program (unless a cache helps)
        # warm: the compiled program is cached, execution only, best of three as the batched torch
        # loop, in the steady state. The runner compiles a program fast (XLA level 0) first and
        # optimised once its calls have run as long as its first one took (``_engine.Tiered``, a
        # JIT's tier-up); ``optimise`` asks for that now, and the call that compiles is timed apart
        runner.optimise(raw)
        t_optimise = _timed(sweep)[1]
        t_vmap_warm = min(_timed(sweep)[1] for _ in range(3))
        _, t_single = _timed(lambda family=family: [
            runner.run(sweep_experiment(family, steps, [s], [b], record_every)) for b in betas for s in range(seeds)
        ])
        row = {
            "runs": runs,
            "gradlab_vmap_s": t_vmap,
            **_warm_row(t_vmap_warm, runs, steps),
            "gradlab_optimising_call_s": t_optimise,
            "gradlab_vmap_steps_per_s": runs * steps / t_vmap,
            "gradlab_single_s": t_single,
            "gradlab_single_steps_per_s": runs * steps / t_single,
            "vmap_speedup_vs_single": t_single / t_vmap,
        }
        if cfg["cold"]:
            row.update(_cold_sweep(raw))
        from benchmarks.torch_baseline import train_dpo, train_dpo_batched, train_dpo_fast

        try:
            import torch  # noqa: F401 - only whether it is installed
        except ImportError:
            row["torch"] = "not installed (pip install '.[bench]')"
            out["families"][family] = row
            continue
        fam, inits, rows = sweep_torch_inputs(raw, seeds)
        seqs, lengths = all_sequences(fam.vocab, fam.max_len)
        all_points = [(b, s) for b in betas for s in range(seeds)]  # gradlab's (setting, seed) order
        points = all_points[: cfg["torch_points"] or None]
        # the torch loops record at the start of steps 0, r, 2r, ... < steps; gradlab also records
        # the state after the last step, so the rows compared are gradlab's first ones
        torch_steps = list(range(0, steps, record_every))
        record_at = torch_steps[-1]
        last = sim.runs[0].steps.index(record_at)
        name = "theta" if family == "unigram" else "W"

        batched_args = (family, fam.vocab, fam.max_len, np.stack([np.asarray(inits[s][name]) for _, s in all_points]),
                        seqs, lengths, np.stack([rows[s][0] for _, s in all_points]),
                        np.stack([rows[s][1] for _, s in all_points]), np.array([b for b, _ in all_points]),
                        steps, 0.05, record_every)
        train_dpo_batched(*batched_args[:9], 2, 0.05, 1)  # warm-up (allocator, kernels)
        row["torch_threads"] = _torch_threads(functools.partial(train_dpo_fast, *batched_args[:9], 20, 0.05, 10,
                                                                variant="counts_mul"))
        train_dpo(family, fam.vocab, fam.max_len, inits[0], seqs, lengths, *rows[0], 0.1, 2, 0.05, 1)
        torch_runs = functools.partial(_torch_runs, family, fam, points, inits, rows, seqs, lengths, steps, record_at)
        torch_results, t_torch = _timed(torch_runs)  # after a warm-up: torch's import is not timed
        t_torch_sweep = t_torch * runs / len(points)  # extrapolated when only a subset is timed
        # fairness: every implementation reaches the same metrics as gradlab
        diffs = []
        for i, res in enumerate(torch_results):  # points are the first runs, in gradlab's order
            diffs.append(abs(res["loss"] - float(sim.runs[i].metrics["loss"][last])))
            diffs.append(abs(res["expected_length"] - float(sim.runs[i].metrics["expected_length"][last])))

        want = {m: np.stack([r.metrics[m][: len(torch_steps)] for r in sim.runs], axis=1)
                for m in ("loss", "expected_length")}

        def gap(res: dict, want: dict = want) -> float:  # every recorded row of every run
            return max(float(np.max(np.abs(res[m] - want[m]))) for m in want)

        # the naive batched loop (the baseline before issue 17's session 3), kept to show the change
        naive = min((train_dpo_batched(*batched_args) for _ in range(3)), key=lambda r: r["run_s"])  # best of 3
        # the best peer: the fastest batched eager form that reaches the metrics
        forms, batched, t_vmap_warm = _fastest_batched(batched_args, gap, sweep)
        row.update(_warm_row(t_vmap_warm, runs, steps))
        row.update({
            "torch_points_timed": len(points),
            "torch_eager_s": t_torch_sweep,
            "torch_eager_steps_per_s": runs * steps / t_torch_sweep,
            "torch_batched_s": batched["run_s"],
            "torch_batched_ms_per_step": 1e3 * batched["run_s"] / steps,
            "torch_batched_variant": f"{batched['variant']}+{batched['adam']}",
            "torch_batched_variants": forms,
            "torch_batched_naive_s": naive["run_s"],
            "torch_batched_naive_ms_per_step": 1e3 * naive["run_s"] / steps,
            "train_speedup_vs_torch_eager_inprocess": t_torch_sweep / t_vmap,
            "train_speedup_vs_torch_eager_warm": t_torch_sweep / t_vmap_warm,
            "train_speedup_vs_torch_batched_warm": batched["run_s"] / t_vmap_warm,
            "train_speedup_vs_torch_batched_naive_warm": naive["run_s"] / t_vmap_warm,
            "max_final_metric_difference": max(diffs),
            "torch_batched_max_metric_difference": gap(batched),
            "torch_batched_naive_max_metric_difference": gap(naive),
            "torch_batched_all_variants_max_metric_difference": max(f["max_metric_difference"]
                                                                    for f in forms.values()),
        })
        if "gradlab_cold_s" in row:
            row.update({
                "train_speedup_vs_torch_eager": t_torch_sweep / row["gradlab_cold_s"],
                "train_speedup_vs_torch_batched": batched["run_s"] / row["gradlab_cold_s"],
                "train_speedup_vs_torch_batched_cached": batched["run_s"] / row["gradlab_cached_s"],
            })
            # like for like: both sides whole fresh processes, timed from outside
            row.update(_fresh_torch(batched_args, batched["variant"], batched["adam"], row["torch_threads"], gap))
            row.update({
                "train_speedup_vs_torch_batched_fresh": row["torch_batched_fresh_s"] / row["gradlab_cold_wall_s"],
                "train_speedup_vs_torch_batched_cached_fresh": row["torch_batched_fresh_s"]
                / row["gradlab_cached_wall_s"],
            })
        else:  # tiny: no fresh processes; the in-process first call stands in for cold
            row["train_speedup_vs_torch_eager"] = t_torch_sweep / t_vmap
        if cfg["torch_compile"]:
            compile_forms, compiled = _fastest_compiled(batched_args, batched["variant"], batched["adam"],
                                                        cfg["torch_compile"], gap)
            row["torch_compile_forms"] = compile_forms
            if compiled is None:
                raise RuntimeError(f"no torch.compile form reaches gradlab's metrics: {compile_forms}")
            row.update({
                "torch_compile_form": compiled["form"],
                "torch_compile_s": compiled["compile_s"],
                "torch_compile_run_s": compiled["run_s"],
                "torch_compile_ms_per_step": 1e3 * compiled["run_s"] / steps,
                "torch_compile_max_metric_difference": gap(compiled),
                "train_speedup_vs_torch_compile_warm": compiled["run_s"] / t_vmap_warm,
                "train_speedup_vs_torch_compile_cold": (compiled["compile_s"] + compiled["run_s"])
                / row.get("gradlab_cold_s", t_vmap),
            })
        out["families"][family] = row
    for key in ("train_speedup_vs_torch_eager", "train_speedup_vs_torch_eager_warm",
                "train_speedup_vs_torch_batched", "train_speedup_vs_torch_batched_cached",
                "train_speedup_vs_torch_batched_warm", "train_speedup_vs_torch_batched_naive_warm",
                "train_speedup_vs_torch_batched_fresh", "train_speedup_vs_torch_batched_cached_fresh",
                "train_speedup_vs_torch_compile_warm", "train_speedup_vs_torch_compile_cold"):
        speedups = [r[key] for r in out["families"].values() if key in r]
        out[key] = min(speedups) if speedups else None  # the worse family
    diffs = [r[k] for r in out["families"].values() for k in r if k.endswith("metric_difference")]
    out["max_metric_difference_all_baselines"] = max(diffs) if diffs else None
    return out


# --------------------------------------------------------------------------------------------
# 2. Numeric verification throughput
# --------------------------------------------------------------------------------------------


def verification(size: str = "quick") -> dict:
    """Points per second of ``gradlab check`` against evaluating the same closed forms with
    sympy ``lambdify`` (numpy) in a Python loop, one point at a time, with no autodiff."""
    import sympy

    from gradlab import checks, symbolic
    from gradlab.losses import LOSSES

    cfg = SIZES[size]
    losses = list(cfg["check_losses"] or LOSSES)
    rows, t_check = _timed(lambda: checks.run_matrix(losses, points=cfg["points"]))
    checked = sum(r.points for r in rows)
    rng = np.random.default_rng(0)

    def loop():
        n = 0
        for name in losses:
            loss = LOSSES[name]
            args = list(loss.variables) + list(loss.hyperparameters)
            syms = [symbolic.symbol_of(a) for a in args]
            fns = [sympy.lambdify(syms, symbolic.standard(e), modules="numpy")
                   for e in symbolic.gradient(loss, "log").values()]
            for _ in range(cfg["loop_points"] * 4):  # four families' worth of points
                x = [5.0 if a.startswith("len") else float(-rng.uniform(0.1, 5)) for a in args]
                x[len(loss.variables):] = [float(loss.defaults[h]) for h in loss.hyperparameters]
                for f in fns:
                    f(*x)
                n += 1
        return n

    looped, t_loop = _timed(loop)
    return {
        "check_points": checked,
        "check_s": t_check,
        "check_points_per_s": checked / t_check,
        "lambdify_loop_points": looped,
        "lambdify_loop_s": t_loop,
        "lambdify_loop_points_per_s": looped / t_loop,
        "verification_speedup": (checked / t_check) / (looped / t_loop),
        "all_rows_ok": all(r.ok for r in rows),
    }


# --------------------------------------------------------------------------------------------
# 3. Symbolic derivation, cold and warm
# --------------------------------------------------------------------------------------------

_DERIVE_ALL = """
import sys
import time
t = time.perf_counter()
import gradlab
import gradlab.symbolic  # sympy, the loss registry and the derivation code
from gradlab import _shipped
from gradlab.errors import UnknownVariableError
table = _shipped.TABLE if sys.argv[1] == "table" else None
names = list(gradlab.LOSSES)[: int(sys.argv[2]) or None]
loaded = time.perf_counter()
for name in names:
    for view in gradlab.VIEWS:
        try:
            gradlab.gradient(name, view, table=table)
        except UnknownVariableError:
            pass
print(time.perf_counter() - loaded, loaded - t)
"""


def derivation(size: str = "quick") -> dict:
    """Every gradient of every loss in every view: cold (empty disk cache) and warm (a new
    process with the disk cache the first filled), each in a fresh interpreter so no memory
    cache helps.

    ``zoo_derivation_{cold,warm}_s`` are what a user gets: registered losses are read from the
    shipped answers table. ``zoo_derivation_untabled_{cold,warm}_s`` pass ``table=None``, so
    they cost what a user's own formulas cost: sympy's derivation, then the disk cache with its
    numerical read-back check; at ``tiny`` over the first three losses only (``..._losses``).
    The times start once gradlab's derivation code is imported; that import (sympy and the loss
    registry) is reported apart as ``zoo_derivation_import_s``."""
    untabled = 3 if size == "tiny" else 0  # 0: every loss
    _bytecode()

    def run(source: str, cache: str, losses: int) -> tuple[float, float]:
        out = subprocess.run([sys.executable, "-c", _DERIVE_ALL, source, str(losses)], capture_output=True, text=True,
                             check=True, env=dict(os.environ, GRADLAB_CACHE_DIR=cache)).stdout.split()
        return float(out[0]), float(out[1])

    out: dict = {}
    for source, label, losses in (("table", "", 0), ("none", "untabled_", untabled)):
        with tempfile.TemporaryDirectory() as cache:
            out[f"zoo_derivation_{label}cold_s"], _ = run(source, cache, losses)
            out[f"zoo_derivation_{label}warm_s"], out["zoo_derivation_import_s"] = run(source, cache, losses)
    out["zoo_derivation_untabled_losses"] = untabled or "all"
    return out


# --------------------------------------------------------------------------------------------
# 4. Figures, 5. notebook latency, 6. import time
# --------------------------------------------------------------------------------------------


def figures(size: str = "quick") -> dict:
    from gradlab import figures as figs

    names = SIZES[size]["figures"]
    with tempfile.TemporaryDirectory() as out:
        _, seconds = _timed(lambda: figs.save_all(out, names=names))
    return {"figures": list(names or figs.FIGURES), "figures_s": seconds}


def notebook_latency(size: str = "quick") -> dict:
    """One slider move in the gradient-atlas notebook: the callback recomputes both fields and
    produces the PNG the browser shows (blitted over a cached background)."""
    from gradlab import explore

    with contextlib.redirect_stdout(io.StringIO()):  # no notebook: views print nothing useful
        _, update = explore.atlas_view("dpo")
    update(beta=0.2)  # warm
    repeats = 3 if size == "tiny" else 20
    values = np.linspace(0.05, 0.9, repeats)
    start = time.perf_counter()
    for b in values:
        update(beta=float(b))
    return {"slider_update_s": (time.perf_counter() - start) / repeats}


# whole-process commands, timed against a bare interpreter in the same run: the CLI answers that
# need neither sympy nor JAX (gradlab.answers), eval included (it computes with mpmath alone), and
# the help of a command whose families' list would otherwise import JAX
_CLI = {
    "cli_version_s": ["-m", "gradlab", "--version"],
    "cli_list_s": ["-m", "gradlab", "list"],
    "cli_show_s": ["-m", "gradlab", "show", "dpo"],
    "cli_grad_s": ["-m", "gradlab", "grad", "dpo", "--wrt", "p_l", "--view", "probability"],
    "cli_eval_s": ["-m", "gradlab", "eval", "dpo", "--at", "lp_w=-1,lp_l=-2,ref_w=-1,ref_l=-1"],
    "cli_simulate_help_s": ["-m", "gradlab", "simulate", "--help"],
}


def import_time(size: str = "quick") -> dict:
    """``import gradlab`` timed inside a fresh process, and ``python -c pass`` and each command
    of ``_CLI`` as whole processes (warm caches: each runs once before it is timed); each the
    median of several processes, so one unlucky or lucky start does not decide it.
    ``cli_*_over_startup_s`` is the command's time less the bare interpreter's."""
    repeats = 1 if size == "tiny" else 5
    _bytecode()
    code = "import time; t = time.perf_counter(); import gradlab; print(time.perf_counter() - t)"
    imp = statistics.median(
        float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
        for _ in range(repeats))

    def whole(args: list[str]) -> float:
        subprocess.run([sys.executable, *args], capture_output=True, check=True)  # warm the caches
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, *args], capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    out = {"import_s": imp, "python_startup_s": whole(["-c", "pass"])}
    for key, args in _CLI.items():
        out[key] = whole(args)
    for key in ("cli_version_s", "cli_list_s"):
        out[key.replace("_s", "_over_startup_s")] = out[key] - out["python_startup_s"]
    return out


# --------------------------------------------------------------------------------------------
# 7. gradlab audit on a large generated dataset
# --------------------------------------------------------------------------------------------

_AUDIT_PAIRS = {"tiny": 20_000, "quick": 1_000_000, "full": 1_000_000}


def audit_data(size: str = "quick") -> dict:
    """``gradlab audit FILE --json`` with every registered pair loss, end to end in a fresh
    process (interpreter start, imports, reading, compiling and evaluating every closed form at
    every pair, the statistics, the JSON), on a generated Parquet file of a million pairs.

    The first run may derive and cache the closed forms; then the best of ``repeats`` runs is
    ``audit_s`` (what a user sees from then on). A shared machine's other work slows a run, so
    the load average and the child's CPU seconds (user + system, all threads) are recorded
    beside the wall time. ``full`` also times the same pairs as JSON Lines."""
    import resource

    from gradlab import audit

    n = _AUDIT_PAIRS[size]
    repeats = 1 if size == "tiny" else 3
    _bytecode()
    out: dict = {"audit_pairs": n}
    with tempfile.TemporaryDirectory() as folder:
        files = {"parquet": audit.write(Path(folder) / "pairs.parquet", audit.generate(n, length_bias=0.05))}
        if size == "full":
            files["jsonl"] = audit.write(Path(folder) / "pairs.jsonl", audit.generate(n, length_bias=0.05))

        def run(path: Path) -> tuple[float, float]:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "gradlab", "audit", str(path), "--json"], check=True,
                           capture_output=True)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

        out["audit_first_run_s"] = run(files["parquet"])[0]
        load = os.getloadavg()[0]
        runs = [run(files["parquet"]) for _ in range(repeats)]
        out["audit_s"], out["audit_cpu_s"] = min(runs)
        out["audit_runs_s"] = [round(w, 2) for w, _ in runs]
        out["audit_load_1min"] = round((load + os.getloadavg()[0]) / 2, 2)  # before and after the runs
        out["audit_cores"] = os.cpu_count()
        if "jsonl" in files:
            out["audit_1m_pairs_jsonl_s"] = run(files["jsonl"])[0]
    from gradlab.losses import LOSSES

    out["audit_losses"] = sum(loss.kind == "pair" for loss in LOSSES.values())
    out["audit_1m_pairs_s"] = out["audit_s"] if n == 1_000_000 else None
    return out


# --------------------------------------------------------------------------------------------
# 8. Cold start: whole fresh processes with empty caches
# --------------------------------------------------------------------------------------------

_CHECK_TWICE = """
import time
t = time.perf_counter()
from gradlab import checks, runtime
from gradlab.losses import LOSSES
runtime.configure()  # as gradlab check does: float64, the (empty) persistent compilation cache
rows = checks.run_matrix(list(LOSSES))
t1 = time.perf_counter()
checks.run_matrix(list(LOSSES))
print(t1 - t, time.perf_counter() - t1, all(r.ok for r in rows))
"""


def cold_start(size: str = "quick") -> dict:
    """What a user waits for the first time: each command as a whole fresh process (interpreter
    start, imports, derivations, tracing, XLA compilation, the work), timed from outside, with
    ``GRADLAB_CACHE_DIR`` a new empty folder so neither the derivation cache nor XLA's persistent
    compilation cache can help; then the same command again on the caches it filled (``cached``).

    - ``first_simulate_cold_s``: ``gradlab simulate dpo`` with default settings and empty caches;
      ``first_simulate_s``: the same with the caches a first run filled (the derivations, the
      serialised training programs and XLA's compiled code), what a user waits for from then on.
      Each is the median of several processes. Beside them, timed in the same run the same way:
      ``simulate_python_startup_s`` (``python -c pass``) and ``simulate_import_jax_s`` (``python
      -c "import jax"``), the floor any command that computes with JAX stands on;
    - ``check_full_cold_s``: the full check matrix (every loss, every family, default points,
      what ``gradlab check`` runs) in a fresh process, timed inside it from before the imports;
      ``check_full_warm_s``: the same matrix again in that process (compiled programs in
      memory); ``check_full_cached_s``: ``gradlab check`` as a new process on the filled caches;
    - ``figures_cold_s``: ``gradlab figures`` (every figure) into a temporary folder.

    ``tiny`` times only the first simulate, once each."""
    repeats = 1 if size == "tiny" else 3
    _bytecode()
    simulate = ["-m", "gradlab", "simulate", "dpo"]
    import resource

    def cpu() -> float:
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        return used.ru_utime + used.ru_stime

    times: dict[str, list[float]] = {"cold": [], "warm": [], "bare": [], "jax": [], "cold_cpu": [], "warm_cpu": []}
    for _ in range(repeats):  # interleaved, so a change of the machine's load touches each alike
        with tempfile.TemporaryDirectory() as cache:
            for name, args in (("cold", simulate), ("warm", simulate)):
                before = cpu()
                times[name].append(_fresh(args, cache))
                times[f"{name}_cpu"].append(cpu() - before)
            times["bare"].append(_fresh(["-c", "pass"], cache))
            times["jax"].append(_fresh(["-c", "import jax"], cache))
    med = {name: statistics.median(values) for name, values in times.items()}
    # the CPU seconds (user + system, every thread) of the child say how much of a slow wall time
    # is the machine's other work: on a loaded machine the wall time exceeds them
    out: dict = {"first_simulate_cold_s": med["cold"], "first_simulate_s": med["warm"],
                 "first_simulate_cpu_s": med["warm_cpu"], "first_simulate_cold_cpu_s": med["cold_cpu"],
                 "simulate_python_startup_s": med["bare"], "simulate_import_jax_s": med["jax"],
                 "first_simulate_runs_s": [round(t, 3) for t in times["warm"]],
                 "first_simulate_cold_runs_s": [round(t, 3) for t in times["cold"]],
                 "simulate_load_1min": os.getloadavg()[0]}
    if size == "tiny":
        return out
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, GRADLAB_CACHE_DIR=cache)
        first, again, ok = subprocess.run([sys.executable, "-c", _CHECK_TWICE], env=env, capture_output=True,
                                          text=True, check=True).stdout.split()
        out.update({"check_full_cold_s": float(first), "check_full_warm_s": float(again),
                    "check_full_all_rows_ok": ok == "True"})
        out["check_full_cached_s"] = _fresh(["-m", "gradlab", "check"], cache, ok_codes=(0, 1))
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as folder:
        out["figures_cold_s"] = _fresh(["-m", "gradlab", "figures", "--quiet", "--out", folder], cache)
    return out


# --------------------------------------------------------------------------------------------
# 9. Exact policy metrics
# --------------------------------------------------------------------------------------------


def exact_metrics(size: str = "quick") -> dict:
    """The exact chain metrics (expected length, entropies, EOS probability, expected reward):
    a bigram policy at vocabulary 1,000, unbounded (one LU solve over 1,000 states) and with a
    forced stop at 64 tokens (dynamic programming), warm (compiled) timings, with the values'
    relative error bound; and, at the largest size enumeration handles here, the same metrics by
    enumerating every response against the chain, with their largest relative difference."""
    import jax
    import jax.numpy as jnp

    from gradlab.policies import make_family

    repeats = 2 if size == "tiny" else 10

    warm = functools.partial(_warm, repeats=repeats)

    vocab = 1000
    out: dict = {"exact_metrics_vocab": vocab}
    for mode, max_len in (("unbounded", None), ("forced64", 64)):
        fam = make_family("bigram", vocab=vocab, max_len=max_len)
        params = fam.init(jax.random.PRNGKey(0))
        params = {"W": params["W"].at[:, 0].add(3.0)}  # EOS about 1% per step: E[L] in the tens
        reward = jnp.linspace(-1.0, 1.0, vocab)
        metrics = lambda fam=fam, params=params, r=reward: fam.metrics(params, r)  # noqa: E731
        out[f"exact_metrics_vocab{vocab}_{mode}_s"] = warm(metrics)
        grad = jax.jit(jax.grad(lambda p, fam=fam, r=reward: fam.metrics(p, r).expected_length))
        out[f"exact_metrics_vocab{vocab}_{mode}_grad_s"] = warm(lambda grad=grad, params=params: grad(params))
        m = fam.metrics(params)
        out[f"exact_metrics_vocab{vocab}_{mode}_expected_length"] = float(m.expected_length)
        # the stated accuracy: the relative error bound of the values (gradlab.policies.CHAIN_RTOL
        # refuses more than 1e-8; 0 where they come from a finite sum)
        out[f"exact_metrics_vocab{vocab}_{mode}_error_bound"] = float(m.error_bound)
    out["exact_metrics_vocab1000_s"] = out["exact_metrics_vocab1000_unbounded_s"]
    # the other sizes, unbounded (the LU solve grows as V^3; 5,000 states hold a
    # 5,001 x 5,000 parameter table, ~0.2 GB, so it runs once warm and not at --tiny)
    for other in (100,) if size == "tiny" else (100, 5000):
        fam = make_family("bigram", vocab=other, max_len=None)
        params = fam.init(jax.random.PRNGKey(0))
        params = {"W": params["W"].at[:, 0].add(3.0)}
        reward = jnp.linspace(-1.0, 1.0, other)
        fn = lambda fam=fam, params=params, r=reward: fam.metrics(params, r)  # noqa: E731
        if other > vocab:
            jax.block_until_ready(fn())
            start = time.perf_counter()
            jax.block_until_ready(fn())
            out[f"exact_metrics_vocab{other}_s"] = time.perf_counter() - start
        else:
            out[f"exact_metrics_vocab{other}_s"] = warm(fn)
        del fam, params
    # the machine's own yardstick: one dense 1000 x 1000 float64 product (the solve costs ~1-2)
    a = jax.random.normal(jax.random.PRNGKey(2), (vocab, vocab))
    out["matmul_vocab1000_s"] = warm(lambda: a @ a)
    # enumeration against the chain: responses grow as (V-1)^K and enumeration holds their
    # (N, K, V) logits; 4 content tokens and K = 9 is 3.5e5 responses (about 0.1 GB of logits),
    # the largest that stays within seconds and memory on a 2-core machine (tiny: K = 4)
    enum_vocab, enum_k = (4, 4) if size == "tiny" else (5, 9)
    fam = make_family("bigram", vocab=enum_vocab, max_len=enum_k)
    params = fam.init(jax.random.PRNGKey(1))
    chain = fam.metrics(params, jnp.linspace(-1.0, 1.0, enum_vocab))
    t_chain = warm(lambda: fam.metrics(params, jnp.linspace(-1.0, 1.0, enum_vocab)))
    start = time.perf_counter()
    enum = fam._enumerated_metrics(params, jnp.linspace(-1.0, 1.0, enum_vocab))
    jax.block_until_ready(enum)
    t_enum = time.perf_counter() - start  # one call, compilation included: enumeration is run once
    diff = max(abs(float(a) - float(b)) / max(abs(float(b)), 1e-300)
               for a, b in zip(chain[:-1], enum[:-1], strict=True))
    out.update({
        "enumeration_vocab": enum_vocab, "enumeration_max_len": enum_k,
        "enumeration_responses": int(sum((enum_vocab - 1) ** k for k in range(enum_k + 1))),
        "enumeration_metrics_s": t_enum, "chain_metrics_same_size_s": t_chain,
        "chain_vs_enumeration_max_rel_diff": diff,
    })
    return out


def group_gradient(size: str = "quick") -> dict:
    """One exact expected-gradient step of every group loss (gradlab.experiments.groups) at group
    size 16 and vocabulary 1,000: an unbounded unigram chain with a first-token reward, warm
    (compiled) timings, at two expected lengths: about 100 tokens (EOS logit raised by 3, as in
    ``exact_metrics``; the target's measure is the slowest loss there) and
    about 2,000 (a random start, EOS as likely as any token: the lengths are summed exactly to
    ~65,000 tokens and the group totals of bnpo/dapo/cispo/vespo to ~1,000,000). Baselines in
    the same run: the Monte Carlo estimate of the same step from 16 sampled groups (forced stop
    at 64 tokens, beside the exact step there), and one dense 1000 x 1000 float64 product (the
    machine's yardstick)."""
    import jax

    from gradlab.experiments import groups
    from gradlab.group_losses import GROUP_LOSSES
    from gradlab.policies import Unigram

    repeats = 1 if size == "tiny" else 3
    vocab, g = 1000, 16
    names = ("grpo", "dapo") if size == "tiny" else tuple(n for n in GROUP_LOSSES if n != "dr_grpo_paper")
    reward = groups.first_token(*range(1, 101))  # the first token among 100 of the 999: p about 0.1

    warm = functools.partial(_warm, repeats=repeats)

    fam = Unigram(vocab=vocab, max_len=None)
    out: dict = {"group_gradient_vocab": vocab, "group_gradient_group_size": g}
    for label, shift in (("short", 3.0),) if size == "tiny" else (("short", 3.0), ("long", 0.0)):
        params = fam.init(jax.random.PRNGKey(0))
        params = {"theta": params["theta"].at[0].add(shift)}
        out[f"group_gradient_{label}_expected_length"] = float(fam.expected_length(params))
        times = {}
        for name in names:
            times[name] = warm(lambda name=name, params=params: groups.exact_gradient(
                name, fam, params, reward, group_size=g).grad)
            out[f"group_exact_{label}_{name}_s"] = times[name]
        out[f"group_exact_{label}_max_s"] = max(times.values())
        out[f"group_exact_{label}_horizon"] = groups.horizon(fam, params)
    # the same-run baseline: the exact step against 16 sampled groups of the same step, on the
    # short policy with a forced stop at 64 tokens (sampling materialises (responses, 64, 1,000)
    # logits: 16 groups are 0.13 GB; the unbounded long policy would need tens of GB)
    stopped = Unigram(vocab=vocab, max_len=64)
    params = fam.init(jax.random.PRNGKey(0))
    params = {"theta": params["theta"].at[0].add(3.0)}
    out["group_exact_forced64_grpo_s"] = warm(lambda: groups.exact_gradient(
        "grpo", stopped, params, reward, group_size=g).grad)
    out["group_sample16_forced64_grpo_s"] = warm(lambda: groups.sample_gradient(
        "grpo", stopped, params, reward, group_size=g, groups=16, key=jax.random.PRNGKey(1)).grad)
    # the target's measure: the slowest loss at the exact_metrics convention (EOS logit + 3)
    out["group_exact_step_vocab1000_g16_s"] = out["group_exact_short_max_s"]
    a = jax.random.normal(jax.random.PRNGKey(2), (vocab, vocab))
    out["matmul_vocab1000_s"] = warm(lambda: a @ a)
    return out

from benchmarks.logps_bench import logps_throughput  # noqa: E402 - a benchmark of its own module

BENCHMARKS = {
    "training": training,
    "verification": verification,
    "derivation": derivation,
    "figures": figures,
    "notebook_latency": notebook_latency,
    "import_time": import_time,
    "audit": audit_data,
    "cold_start": cold_start,
    "exact_metrics": exact_metrics,
    "group_gradient": group_gradient,
    "logps": logps_throughput,
}
