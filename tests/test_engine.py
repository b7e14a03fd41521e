"""The compiled training engine (``gradlab.experiments._engine``): a run's steps cut into calls
short enough for a signal to be handled between them, with the same numbers as one call; and the
runs cut into blocks spread across devices, with the same numbers on one device or several."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from gradlab.experiments import _engine
from gradlab.experiments.validate import load

ROOT = Path(__file__).resolve().parents[1]

BASE = {"policy": {"family": "bigram", "vocab": 3, "max_len": 5, "scale": 0.5},
        "data": {"kind": "equal_length", "n_pairs": 16}, "loss": {"name": "dpo"},
        "train": {"optimizer": "adam", "lr": 0.05, "steps": 23, "seeds": 2, "record_every": 5,
                  "metrics": ["loss", "lp_w", "expected_length", "params"]}}


def _with(**tables):
    return {**BASE, **{k: {**BASE.get(k, {}), **v} for k, v in tables.items()}}


CASES = {
    "bigram-dpo-adam": BASE,
    "bigram-adam-minibatch": _with(train={"batch_size": 4}),
    "unigram-simpo-sgd": _with(policy={"family": "unigram", "vocab": 3, "max_len": 5}, loss={"name": "simpo"},
                               train={"optimizer": "sgd"}),
    "two-losses-one-program": _with(sweep={"loss.name": ["dpo", "ipo"]}),
    "linear-head-soft-labels": _with(policy={"family": "linear_head", "vocab": 3, "max_len": 4, "dim": 3},
                                     data={"labels": "soft"}, train={"optimizer": "adamw"}),
    "one-record-at-the-end": _with(train={"record_every": 23, "batch_size": 8}),
    # more records than one call holds (``_engine.SEGMENTS``): even the longest calls are several
    "a-record-every-step": _with(train={"steps": 150, "record_every": 1, "metrics": ["loss", "params"]}),
}


def _calls(raw, steps_per_call):
    """Every run's (records, guard), each group called with ``steps_per_call`` steps a call."""
    with jax.enable_x64(True):
        jobs = _engine.jobs([load(raw)])
        out = []
        for static, members in _engine.groups(jobs):
            out += _engine.call(_engine.program(static), static, [jobs[i] for i in members],
                                steps_per_call=steps_per_call)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_calls_of_a_few_steps_equal_one_call_bit_for_bit(name):
    raw = CASES[name]
    steps, every = raw["train"]["steps"], raw["train"]["record_every"]
    whole = _calls(raw, steps)  # one call: every segment of the run (at most SEGMENTS a call)
    cut = _calls(raw, 3)  # calls of 3 steps, cut inside the gaps between records and at records
    assert len(whole) == len(cut) > 0
    records = steps // every + 1 + (steps % every > 0)
    for (metrics_a, guard_a), (metrics_b, guard_b) in zip(whole, cut, strict=True):
        assert guard_a.shape == (records, 2) and np.array_equal(guard_a, guard_b)
        assert list(metrics_a) == list(metrics_b)
        assert not np.array_equal(metrics_a["loss"][0], metrics_a["loss"][-1])  # the runs moved
        for key in metrics_a:
            assert metrics_a[key].shape[0] == records
            assert np.array_equal(metrics_a[key], metrics_b[key]), key


def test_the_guard_reads_the_recorded_loss():
    """J is computed once per record and shared: the guard's J is the recorded loss."""
    for metrics, guard in _calls(BASE, None):
        assert np.array_equal(guard[:, 0], metrics["loss"])


def test_runs_with_equal_datasets_train_in_groups_of_whole_classes():
    """The group size cuts every class of equal datasets into whole groups (their greatest common
    divisor, at most a block), the blocks hold whole groups, and the order lists each class's runs
    together, classes in order of first appearance."""
    sweep = [s for _ in range(8) for s in range(16)]  # 8 settings x 16 seeds, setting outer
    order, per, count, size = _engine.layout(sweep)
    assert (per, count, size) == (8, 2, 8)  # two blocks of 8 seeds x 8 settings
    assert [sweep[i] for i in order] == sorted(sweep) and list(order[:8]) == [16 * b for b in range(8)]
    assert _engine.layout([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])[1:] == (2, 1, 5)  # gcd(4, 2, 4)
    assert _engine.layout(list(range(130)))[1:] == (1, 3, 44)  # nothing shared: runs as blocks
    assert _engine.layout([0] * 100)[1:] == (50, 2, 1)  # a group is at most a block
    assert _engine.layout([0] * 7 + [1] * 7)[1:] == (7, 1, 2)
    assert _engine.blocking(13, 10) == (3, 5)  # 6 groups of 10 at most to a block of 64


def test_equal_datasets_are_one_class_whoever_built_them():
    a = {"w": np.arange(4), "label": np.ones(4)}
    copy = {"w": np.arange(4), "label": np.ones(4)}
    other = {"w": np.arange(4), "label": np.full(4, 0.5)}
    assert _engine._classes([a, other, copy, a, other]) == [0, 1, 0, 0, 1]


def test_grouped_runs_give_the_runs_of_one_at_a_time_contractions():
    """Runs that share a dataset, trained as groups (one matrix product per group, the runs
    reordered into groups and put back), give each run's records as the program that contracts
    each run alone (every run its own class) does, to rounding: no run's records go to another
    run, and the settings of one seed do differ."""
    raw = _with(train={"seeds": 3, "steps": 12, "record_every": 4},
                sweep={"loss.beta": [0.1, 0.3, 0.9, 2.0]})
    with jax.enable_x64(True):
        jobs = _engine.jobs([load(raw)])
        ((static, members),) = _engine.groups(jobs)
        program = _engine.program(static)
        inps = [jobs[i].inputs for i in members]
        stacked = _engine._stack(inps)
        classes = _engine._classes([inp["data"] for inp in inps])
        assert classes == [0, 1, 2] * 4  # each seed's data in every setting
        grouped = _engine.Calls(program, static, stacked, None, classes)
        assert grouped.layout.per == 4
        alone = _engine.Calls(program, static, stacked, None)
        assert alone.layout.per == 1
        (a, guard_a), (b, guard_b) = grouped.run(np.int32(0)), alone.run(np.int32(0))
    # to rounding as Adam amplifies it: a bigram coordinate whose exact gradient is 0 turns
    # rounding noise into steps (~1e-10, the benchmarks' METRIC_TOLERANCE says the same)
    np.testing.assert_allclose(guard_a, guard_b, rtol=1e-8, atol=1e-8)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-8, atol=1e-8, err_msg=key)
    assert not np.allclose(a["loss"][0], a["loss"][3])  # seed 0 at two betas: runs that differ


def test_a_repeated_sweep_reuses_its_placed_inputs_and_a_changed_one_does_not():
    """The stacked inputs of a call sequence, placed on the device, are kept for a repeat of the
    same runs (nothing stacked or copied again) and never serve runs whose setting values or seed
    tables differ: a changed learning rate gives the records it gives computed afresh."""
    raw = _with(sweep={"loss.beta": [0.1, 0.5]})
    faster = _with(train={"lr": 0.2}, sweep={"loss.beta": [0.1, 0.5]})
    _engine._STACKED.clear()
    first = _calls(raw, None)
    kept = dict(_engine._STACKED)
    assert len(kept) == 1 and all(v.placed for v in kept.values())  # placed on the device by the first sequence
    again = _calls(raw, None)
    assert dict(_engine._STACKED) == kept  # nothing stacked again
    for (a, guard_a), (b, guard_b) in zip(first, again, strict=True):
        np.testing.assert_array_equal(guard_a, guard_b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    changed = _calls(faster, None)
    assert len(_engine._STACKED) == 2  # its own entry: the learning rate is in the key
    _engine._STACKED.clear()
    fresh = _calls(faster, None)
    for (a, guard_a), (b, guard_b), (c, _) in zip(changed, fresh, first, strict=True):
        np.testing.assert_array_equal(guard_a, guard_b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        assert not np.array_equal(a["params.W"], c["params.W"])  # the learning rate mattered
    _engine._STACKED.clear()
    with jax.enable_x64(True):
        jobs = _engine.jobs([load(raw)])
        assert _engine._stacked(jobs, 1, keep_bytes=0).classes == [0, 1] * 2  # two seeds in two settings
        assert not _engine._STACKED  # inputs past the limit are not kept
        _engine._stacked(jobs, 1)
        assert len(_engine._STACKED) == 1


class _Counted:
    """A program that counts its calls and the steps each one ran."""

    def __init__(self, program):
        self.program, self.steps = program, []

    @property
    def tiered(self):
        return self.program.tiered

    def __call__(self, *args, **options):
        gaps = args[5]  # (data, inputs, loss, carry, t, gaps, todo)
        self.steps.append(int(gaps[gaps > 0].sum()))
        return self.program(*args, **options)


class _Seen(_Counted):
    """A program that keeps each call's gaps and guards (the J and parameter size each segment
    ended with), in run order."""

    def __init__(self, program):
        super().__init__(program)
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, *args, **options):
        carry, records, guard = super().__call__(*args, **options)
        self.calls.append((np.asarray(args[5]), np.asarray(guard).reshape(-1, *guard.shape[3:])))
        return carry, records, guard


def test_a_call_computes_only_the_segments_it_runs():
    """A segment marked ``UNUSED`` is not run: its records stay zeros, while every segment a call
    runs, a step-0 record with no steps before it included, ends in metrics of its own. (A call
    that computed the metrics of its whole list cost as much as a whole run's records: a group
    loss on an unbounded chain then measured its steps as slow and cut its calls ever shorter.)"""
    raw = _with(train={"steps": 12, "record_every": 5})
    with jax.enable_x64(True):
        jobs = _engine.jobs([load(raw)])
        ((static, members),) = _engine.groups(jobs)
        seen = _Seen(_engine.program(static))
        _engine.call(seen, static, [jobs[i] for i in members], steps_per_call=3)
    assert len(seen.calls) == 4 and any((gaps == _engine.UNUSED).any() for gaps, _ in seen.calls)
    for gaps, guard in seen.calls:
        used = gaps != _engine.UNUSED
        assert used.any() and np.all(guard[:, ~used] == 0), gaps
        assert np.all(guard[:, used, 1] > 0), gaps  # the largest parameter magnitude: never 0 once run


def test_a_new_program_is_measured_and_then_runs_in_one_call():
    raw = _with(train={"steps": 40})
    with jax.enable_x64(True):
        jobs = _engine.jobs([load(raw)])
        ((static, members),) = _engine.groups(jobs)
        _engine.program.cache_clear()
        _engine._SPEED.clear()
        _engine._COMPILED.clear()
        first, second = (_Counted(_engine.program(static)) for _ in range(2))
        a = _engine.call(first, static, [jobs[i] for i in members])
        b = _engine.call(second, static, [jobs[i] for i in members])
    assert first.steps[:2] == [1, 8] and sum(first.steps) == 40  # compiles on 1 step, times 8
    assert second.steps == [40]  # measured: far under a second, so one call
    for (ma, ga), (mb, gb) in zip(a, b, strict=True):
        assert np.array_equal(ga, gb) and all(np.array_equal(ma[k], mb[k]) for k in ma)


def test_a_new_program_traces_the_step_of_its_runs_once(monkeypatch):
    """Building a training program traces one run's step once: the loop over blocks reads the
    shapes of its outputs off the same trace as its body (traced twice, every new program took
    ~0.1-0.3 s longer to build)."""
    from gradlab.experiments import objective

    traced = []
    prepare = objective.prepare
    monkeypatch.setattr(objective, "prepare", lambda *a: traced.append(1) or prepare(*a))
    monkeypatch.setenv("GRADLAB_CACHE_DIR", "off")  # no program read back from disk: this one is traced
    raw = _with(train={"steps": 4}, sweep={"loss.name": ["dpo", "ipo"]})
    with jax.enable_x64(True):
        jobs = _engine.jobs([load(raw)])
        ((static, members),) = _engine.groups(jobs)
        _engine.program.cache_clear()
        _engine.call(_engine.program(static), static, [jobs[i] for i in members], steps_per_call=4)
    assert len(traced) == 1


# One process with JAX_NUM_CPU_DEVICES devices: the records and guards of a sweep of both chain
# families, 130 runs (13 seeds x 10 betas: 13 groups of 10 runs sharing a seed's data, in three
# blocks of 5 groups, the last padded, which one, two and three devices hold as 3, 2 + 1 and
# 1 + 1 + 1), unigram in the first tier and bigram optimised
# (one compilation each: a process takes a few seconds). At these sizes one vmapped block of 130
# runs and three of 44 differ in the last bits of the loss (smaller data agreed by chance). The
# optimised program spreads its blocks from the start; the first-tier one (SPREAD_S = 0: as soon
# as its speed is measured, in calls of one step past the first two) runs its first three calls
# (1 step, 8, then 1) on one device and moves its state to every device for the rest.
DEVICES = """
import sys
import jax
import numpy as np
from gradlab import runtime
runtime.configure()
from gradlab.experiments import _engine
from gradlab.experiments.validate import load
assert jax.device_count() == int(sys.argv[2])
_engine.SPREAD_S, _engine.CALL_S = 0.0, 1e-9
out = {}
for family, tier in (("unigram", False), ("bigram", True)):
    raw = {"policy": {"family": family, "vocab": 3, "max_len": 6, "scale": 0.5},
           "data": {"kind": "equal_length", "n_pairs": 64}, "loss": {"name": "dpo"},
           "train": {"optimizer": "adam", "lr": 0.05, "steps": 12, "seeds": 13, "record_every": 4,
                     "metrics": ["loss", "params"]},
           "sweep": {"loss.beta": [0.1 * (i + 1) for i in range(10)]}}
    jobs = _engine.jobs([load(raw)])
    ((static, members),) = _engine.groups(jobs)
    program = _engine.program(static)
    if tier:
        program.optimise()
    for i, (records, guard) in enumerate(_engine.call(program, static, [jobs[j] for j in members])):
        out.update({f"{family} {i} {k}": v for k, v in records.items()}, **{f"{family} {i}": guard})
np.savez(sys.argv[1], **out)
"""


@pytest.mark.long(seconds=11)
def test_a_sweep_gives_the_same_bits_on_one_two_and_three_devices(tmp_path):
    """A run's results do not depend on the machine's core count: blocks whose size depends on
    the run count alone, each trained by the same compiled computation on whichever device."""
    assert _engine.blocking(130) == (3, 44) and _engine.blocking(64) == (1, 64)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", DEVICES, str(tmp_path / f"{n}.npz"), str(n)], cwd=ROOT,
                              env={**env, "JAX_NUM_CPU_DEVICES": str(n)})
             for n in (1, 2, 3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    results = []
    for n in (1, 2, 3):
        with np.load(tmp_path / f"{n}.npz") as found:
            results.append(dict(found))
    one, *others = results
    assert len(one) == 2 * 130 * 3  # families x runs x (guard, loss, params.*)
    for other in others:
        assert other.keys() == one.keys()
        assert all(np.array_equal(other[k], one[k]) for k in one)


def _command(steps: int) -> list[str]:
    return [sys.executable, "-m", "gradlab", "simulate", "dpo", "--steps", str(steps), "--seeds", "64",
            "--set", f"train.record_every={steps}"]


@pytest.fixture(scope="module")
def startup(tmp_path_factory):
    """Seconds from start to the first step on this machine now: the same simulation with one
    step (imports, derivation, validation, compilation), so the signal lands in the training."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADLAB_CACHE_DIR": "off",
           "TMPDIR": str(tmp_path_factory.mktemp("tmp"))}
    began = time.monotonic()
    subprocess.run(_command(1), env=env, check=True, capture_output=True, cwd=ROOT)
    return time.monotonic() - began


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X"):
            parents[int(stat.parent.name)] = int(fields[1])
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        children = {p for p, pp in parents.items() if pp == parent} - found
        found |= children
        todo += children
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_a_long_training_run_within_a_second(tmp_path, startup, signum, status):
    """A million steps of 64 seeds run for minutes; a signal during the steps ends the process
    at the next call's end (``_engine.CALL_S``), with its status and nothing left behind. The
    promise is 1 s on an idle machine; the test allows 5 s, as test runs share busy cores."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADLAB_CACHE_DIR": "off", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(_command(1_000_000), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        time.sleep(1.25 * startup + 1.0)  # past start-up and compilation (with a margin for load), in the steps
        assert proc.poll() is None, "the run ended before it could be interrupted"
        children = _descendants(proc.pid)
        sent = time.monotonic()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=20)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"exit {proc.returncode} {took:.2f} s after the signal (start-up {startup:.2f} s)")
    assert proc.returncode == status and "interrupted" in err
    assert took < 5.0
    assert not {p for p in children if Path(f"/proc/{p}").exists()}
    assert not list(tmp_path.iterdir())


# every family with seeded parameters, and data its seeds draw
DRAWN = [({"family": "unigram", "vocab": 3, "max_len": 6}, {}), ({"family": "bigram", "vocab": 5, "max_len": 6}, {}),
         ({"family": "tabular", "vocab": 3, "max_len": 4}, {}),
         ({"family": "linear_head", "vocab": 4, "max_len": 5, "dim": 3}, {}),
         ({"family": "hidden_state", "vocab": 4, "max_len": 5, "dim": 3}, {}),
         ({"family": "softmax", "vocab": 7}, {"kind": "on_policy", "reward": [0.0, 1, 2, 3, 4, 5, 6]})]


@pytest.mark.parametrize(("policy", "data"), DRAWN, ids=[p["family"] for p, _ in DRAWN])
def test_a_seeds_draws_are_the_same_bits_drawn_alone_or_with_other_seeds(policy, data):
    """The seeds of an experiment are drawn in one call (padded to a power of two): each seed's
    parameters and key are the bits it gets drawn alone, so an experiment's records do not
    depend on which seeds it has."""
    raw = {"policy": {**policy, "scale": 0.7}, "reference": {"params": "seed"}}
    exp = load({**raw, "data": data} if data else raw)
    fam = _engine.build_family(exp.policy)
    alone = {}
    for s in (0, 3, 11, 12):
        _engine._DRAWN.clear()
        alone[s] = _engine._draws(fam, s, 0.7)
    _engine._DRAWN.clear()
    together = {s: _engine._draws(fam, s, 0.7, (12, 11, 3, 0, 5)) for s in (3, 0, 11, 12)}  # 5 seeds: 8 rows
    for s, drawn in alone.items():
        pairs = zip(jax.tree_util.tree_leaves(drawn), jax.tree_util.tree_leaves(together[s]), strict=True)
        assert all(a.tobytes() == b.tobytes() for a, b in pairs)
    assert len({jax.tree_util.tree_leaves(d)[0].tobytes() for d in alone.values()}) == 4  # the seeds differ
    jax.tree_util.tree_leaves(together[3])[0][...] = 0.0  # the caller's own arrays: the kept draws stay whole
    assert jax.tree_util.tree_leaves(_engine._draws(fam, 3, 0.7))[0].tobytes() == jax.tree_util.tree_leaves(
        alone[3])[0].tobytes()


def test_a_carrys_leaves_read_back_are_used_only_in_their_shape():
    leaves = [[[3, 4], "float64"], [[], "int32"], [[4], "float32"]]
    assert _engine._is_carry(leaves) and _engine._is_carry([])
    for bad in ({"a": 1}, [[[3], "float64", 1]], [[[3.0], "float64"]], [[[-1], "float64"]], [[[True], "float64"]],
                [[[3], "bfloat16"]], [[[3], "object"]], [[3, "float64"]]):
        assert not _engine._is_carry(bad)
