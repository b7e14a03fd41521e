"""Hostile input, numeric extremes, interrupted runs and determinism across processes.

Fuzzing (hypothesis) checks that the parser, the CLI arguments and the Python API give either
a correct result or a clear, typed error (GradlabError), never a traceback from deep inside
sympy or JAX. The extremes sweep covers every registered loss."""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

import gradlab
import gradlab.experiments
from gradlab import output, symbolic
from gradlab.checks import hyper_range
from gradlab.cli import main
from gradlab.errors import DomainError, GradlabError

ROOT = Path(__file__).resolve().parents[1]
NAMES = sorted(gradlab.SYMBOLS) + sorted(gradlab.HYPERPARAMETERS) + ["x", "__class__", "os", "eval", "pi"]
FUNCS = ["log", "exp", "sigmoid", "softplus", "sqrt", "tanh", "max", "getattr", "open", "__import__"]


# -- hostile expressions --------------------------------------------------------------------


def test_megabyte_input_is_refused_quickly():
    start = time.perf_counter()
    with pytest.raises(gradlab.ParseError, match="characters long"):
        gradlab.parse("lp_w+" * 200_000 + "1")
    assert time.perf_counter() - start < 1.0


def test_nothing_is_executed(tmp_path):
    marker = tmp_path / "pwned"
    for text in (f"__import__('os').system('touch {marker}')", f"open('{marker}', 'w')", "exec('1')"):
        with pytest.raises(gradlab.ParseError):
            gradlab.custom(text)
    assert not marker.exists()


@settings(max_examples=300)
@given(st.text(max_size=80))
def test_parser_fuzz_arbitrary_text(text):
    try:
        out = gradlab.parse(text)
    except gradlab.ParseError as exc:
        assert str(exc)
    else:
        assert isinstance(out, sympy.Basic)


def _expressions():
    leaf = st.one_of(st.sampled_from(NAMES), st.integers(-20, 20).map(str),
                     st.floats(-1e3, 1e3, allow_nan=False).map(repr))

    def extend(inner):
        return st.one_of(
            st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "**"]), inner).map(lambda t: f"({t[0]}{t[1]}{t[2]})"),
            st.tuples(st.sampled_from(FUNCS), inner).map(lambda t: f"{t[0]}({t[1]})"),
            inner.map(lambda s: f"-{s}"),
        )

    return st.recursive(leaf, extend, max_leaves=12)


@settings(max_examples=300)
@given(_expressions())
def test_parser_fuzz_grammar_like_input(text):
    try:
        out = gradlab.parse(text)
    except gradlab.ParseError:
        return
    assert isinstance(out, sympy.Basic)


# -- CLI and API fuzzing ----------------------------------------------------------------------


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own usage errors: status 2 and a message
            code = exc.code
    return code, out.getvalue(), err.getvalue()


pair_text = st.one_of(
    st.text(max_size=40),
    st.lists(st.tuples(st.sampled_from(NAMES), st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                                                         st.text(max_size=6))), max_size=6)
    .map(lambda kv: ",".join(f"{k}={v}" for k, v in kv)),
)


@settings(max_examples=150)
@given(loss=st.sampled_from(["dpo", "simpo", "orpo", "kto", "nope"]), at=pair_text, values=pair_text,
       view=st.sampled_from(["log", "probability", "length", "margin", "polar", ""]))
def test_cli_eval_fuzz(loss, at, values, view):
    code, out, err = _run(["eval", loss, "--at", at, "--set", values, "--view", view, "--json"])
    assert code in (0, 2), err
    if code == 0:
        data = json.loads(out)
        assert all(isinstance(v, float | str) for v in data["gradient"].values())
    else:
        assert "error: " in err and "Traceback" not in err


@settings(max_examples=150)
@given(
    loss=st.sampled_from(list(gradlab.LOSSES)[:8] + ["aot", "x"]),
    wrt=st.one_of(st.sampled_from(NAMES), st.text(max_size=10)),
    view=st.one_of(st.sampled_from(list(gradlab.VIEWS)), st.text(max_size=8)),
)
def test_cli_grad_fuzz(loss, wrt, view):
    code, out, err = _run(["grad", loss, "--wrt", wrt, "--view", view, "--json"])
    assert code in (0, 2), err
    if code == 0:
        data = json.loads(out)
        local = {n: sympy.Symbol(n) for n in data["variables"]}
        sympy.sympify(data["expr"], locals=local)


@settings(max_examples=150)
@given(
    point=st.dictionaries(st.sampled_from(NAMES), st.one_of(st.floats(), st.text(max_size=4), st.none()), max_size=7),
    values=st.dictionaries(st.sampled_from(NAMES), st.one_of(st.floats(), st.text(max_size=4)), max_size=3),
)
def test_api_evaluate_fuzz(point, values):
    try:
        out = gradlab.evaluate("gdpo", point, values)
    except GradlabError:
        return
    assert set(out) >= {"loss"}


# -- numeric extremes -------------------------------------------------------------------------


def _extreme_grid(loss):
    names = list(loss.variables) + list(loss.hyperparameters)
    vals = []
    for a in names:
        if a.startswith("len"):
            vals.append([1.0, 1e4])
        elif a == "beta":
            vals.append([1e-3, 1e3])
        elif a in loss.hyperparameters:
            vals.append(list(hyper_range(loss, a)))
        else:
            d = loss.domain(a)
            vals.append([-1e4, -1.0, 0.0 if d.contains(0.0) else -1e-12])
    return names, itertools.product(*vals)


@pytest.mark.parametrize("name", list(gradlab.LOSSES))
def test_extremes_give_finite_numbers_or_a_clear_error(name):
    loss = gradlab.get_loss(name)
    names, grid = _extreme_grid(loss)
    columns = [np.asarray(c, dtype=float) for c in zip(*grid, strict=True)]
    exprs = {"loss": loss.expr, **symbolic.gradient(loss, "log")}
    raised = 0
    for key, expr in exprs.items():
        raw_np = symbolic.numeric(expr, names)
        raw_jax = symbolic.numeric(expr, names, "jax")
        with np.errstate(all="ignore"):
            v = np.broadcast_to(raw_np(*columns), columns[0].shape)
        jv = np.broadcast_to(np.asarray(raw_jax(*columns)), columns[0].shape)
        finite = np.isfinite(v)
        # numpy and JAX agree on where float64 suffices, and on the values there
        np.testing.assert_array_equal(finite, np.isfinite(jv), err_msg=f"{name} d{key}")
        np.testing.assert_allclose(jv[finite], v[finite], rtol=1e-9, atol=1e-15, err_msg=f"{name} d{key}")
        # the strict functions pass the finite points and refuse the others with a DomainError
        strict_np = symbolic.numeric(expr, names, strict=True)
        strict_jax = symbolic.numeric(expr, names, "jax", strict=True)
        if finite.any():
            ok = [c[finite] for c in columns]
            strict_np(*ok)
            strict_jax(*ok)
        if not finite.all():
            raised += int((~finite).sum())
            bad = [float(c[~finite][0]) for c in columns]
            with pytest.raises(DomainError):
                strict_np(*bad)
            with pytest.raises(DomainError):
                strict_jax(*bad)
    # only losses that exponentiate log-ratios (f-DPO links, DiscoPOP) or, in AlphaPO's reward
    # (1 - p^-alpha)/alpha, the per-token log-prob may overflow float64
    if name not in {"fdpo_fkl", "fdpo_alpha", "fdpo_alpha_trl", "discopop", "alphapo"}:
        assert raised == 0, f"{name}: {raised} extreme evaluations are not finite"


def test_probability_view_overflow_is_reported_as_log_magnitude():
    code, out, _ = _run(
        [
            "eval",
            "dpo",
            "--view",
            "probability",
            "--json",
            "--at",
            "p_w=1e-320,p_l=1e-320,q_w=0.5,q_l=0.5",
            "--set",
            "beta=1",
        ]
    )
    data = json.loads(out)
    import mpmath

    # the CLI reads 1e-320 as the exact decimal, not as float64's nearest denormal
    expected = float(mpmath.log10(0.5) - mpmath.log10(mpmath.mpf("1e-320")))
    assert code == 0 and data["log10_abs"]["p_l"] == pytest.approx(expected, abs=1e-9)
    assert data["gradient"]["p_l"] != "inf"


def test_exact_evaluation_handles_what_float64_cannot():
    # where the float64 function raises, evaluate() gives the exact value
    f = symbolic.numeric(gradlab.get_loss("fdpo_fkl").expr, ["lp_w", "lp_l", "ref_w", "ref_l", "beta"], strict=True)
    with pytest.raises(DomainError):
        f(-1e4, -1e4, 0.0, 0.0, 1.0)
    out = gradlab.evaluate("fdpo_fkl", {"lp_w": -1e4, "lp_l": -1e4, "ref_w": 0, "ref_l": 0})
    assert float(out["loss"]) == pytest.approx(np.log(2))


# -- files and state --------------------------------------------------------------------------


# The killed runs start from the session's redrawn gallery (conftest's redrawn_gallery: every
# figure redrawn by another process into a copy of the committed gallery) and redraw two of its
# figures at one size in one format (the least work that still has a pool of two workers and
# rewrites the README whole, which must come out the same). Each kill waits for its phase to be
# seen from outside, rather than for a fixed time that a loaded or a fast machine moves to another
# phase: the pool drawing (its workers started), the first file replaced (publishing), and the
# README replaced (the last write, before the manifest's final update).
_KILLED_ARGS = ["figures", "gradient_field", "force_vs_length", "--size", "column", "--format", "png", "--quiet"]


def _replaced(out: Path, before: dict[str, int], names) -> bool:
    """Whether any of ``names`` in ``out`` is a new file (another inode) since ``before``."""
    for name in names:
        with contextlib.suppress(OSError):
            if (out / name).stat().st_ino != before[name]:
                return True
    return False


@pytest.mark.long(seconds=25, group="redrawn_gallery")  # the session's figure run (conftest), then these
def test_killed_figure_run_leaves_previous_figures_intact(redrawn_gallery, tmp_path):
    out = tmp_path / "figs"
    shutil.copytree(redrawn_gallery, out)  # the manifest comes along: the folder is gradlab's
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    drawn = ["gradient_field-column.png", "force_vs_length-column.png"]
    assert set(drawn) < set(before)
    phases = {
        "drawing": lambda pid, inodes: len(_descendants(pid)) >= 2,
        "publishing": lambda pid, inodes: _replaced(out, inodes, [*drawn, output.MANIFEST]),
        "README": lambda pid, inodes: _replaced(out, inodes, ["README.md"]),
    }
    for phase, reached in phases.items():
        inodes = {p.name: p.stat().st_ino for p in out.iterdir()}
        proc = subprocess.Popen([sys.executable, "-m", "gradlab", *_KILLED_ARGS, "--out", str(out)])
        with _reaped(proc):
            deadline = time.monotonic() + 300
            while not reached(proc.pid, inodes) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert proc.poll() is None, f"the run ended before the {phase} phase was seen"
            workers = _descendants(proc.pid)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            _assert_all_exit(workers, within=3.0)  # the pool's workers notice and exit by themselves
        after = {p.name: p.read_bytes() for p in out.iterdir()}
        assert after.keys() == before.keys(), (phase, sorted(set(after) ^ set(before)))  # no partial or temp files
        # deterministic output: whatever was replaced is byte-identical, and the manifest (which
        # a kill may leave with pending entries) still vouches for every file, so the next run
        # may replace them
        changed = sorted(n for n in before if n != output.MANIFEST and after[n] != before[n])
        assert not changed, (phase, changed)
        vouched = output.Folder(out, create=False).files()
        assert vouched == {n: hashlib.sha256(b).hexdigest() for n, b in after.items() if n != output.MANIFEST}, phase


# -- processes end cleanly --------------------------------------------------------------------


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found and _alive(child):  # _alive records its start time
                found.add(child)
                todo.append(child)
    return found


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


_STARTED: dict[int, str] = {}  # pid -> its start time, so that a reused pid is never taken for it


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):  # a zombie has exited; only bookkeeping is left
        return False
    return _STARTED.setdefault(pid, fields[19]) == fields[19]


def _assert_all_exit(pids: set[int], within: float) -> None:
    deadline = time.monotonic() + within
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = sorted(p for p in pids if _alive(p))
    for p in left:  # leave nothing behind, even when the test fails
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    assert not left, f"processes still running {within} s later: {left}"


# A figure-free run: a pool of two workers that block, while the parent holds a named temporary
# file of gradlab.output open; the signal arrives in the middle of it.
_BLOCKED_RUN = """
import os, sys, time
from pathlib import Path
from gradlab import output
from gradlab.processes import Pool, exit_status, stop_on_signals

def block(out):
    (Path(out) / f"started-{os.getpid()}").touch()
    time.sleep(600)

if __name__ == "__main__":
    out = Path(sys.argv[1])
    try:
        with stop_on_signals(), Pool(2) as pool, output.atomic_path(out / "result.bin") as tmp:
            tmp.write_bytes(b"partial")
            futures = [pool.submit(block, str(out)) for i in range(4)]
            while len(list(out.glob("started-*"))) < 2:  # both workers are inside a job
                time.sleep(0.01)
            print(*pool.pids(), flush=True)
            for f in futures:
                f.result()
    except KeyboardInterrupt as exc:
        sys.exit(exit_status(exc))
"""


@contextlib.contextmanager
def _reaped(proc: subprocess.Popen):
    """``proc`` inside the block; after it, whatever is left of it and its children is killed."""
    try:
        yield proc
    finally:
        if proc.poll() is None:  # still running: it and its children are ours to end
            for pid in _descendants(proc.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
        proc.communicate()


def _blocked_run(tmp_path: Path) -> tuple[subprocess.Popen, set[int]]:
    script = tmp_path / "blocked.py"
    script.write_text(_BLOCKED_RUN)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    workers = {int(p) for p in proc.stdout.readline().split()}
    assert len(workers) == 2 and all(_alive(p) for p in workers)
    assert {int(p.name.split("-")[1]) for p in tmp_path.glob("started-*")} == workers
    return proc, workers | _descendants(proc.pid)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_every_worker_and_removes_temporary_files_within_2_s(tmp_path, signum, status):
    proc, started = _blocked_run(tmp_path)
    with _reaped(proc):
        assert list(tmp_path.glob(".gradlab-tmp-*"))  # the run holds a temporary file
        t0 = time.monotonic()
        proc.send_signal(signum)
        assert proc.wait(timeout=5) == status
        _assert_all_exit(started, within=max(0.0, 2.0 - (time.monotonic() - t0)))
        assert time.monotonic() - t0 < 2.0
    assert not list(tmp_path.glob(".gradlab-tmp-*")) and not (tmp_path / "result.bin").exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_workers_exit_by_themselves_when_their_parent_is_killed(tmp_path):
    proc, started = _blocked_run(tmp_path)
    with _reaped(proc):
        proc.send_signal(signal.SIGKILL)  # no handler runs: the workers must notice on their own
        proc.wait(timeout=5)
        _assert_all_exit(started, within=2.0)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_sigterm_stops_gradlab_figures_and_its_pool_within_2_s(tmp_path):
    out = tmp_path / "figs"
    proc = subprocess.Popen([sys.executable, "-m", "gradlab", "figures", "gradient_field", "force_vs_length",
                             "--out", str(out), "--quiet"], stderr=subprocess.PIPE, text=True)
    with _reaped(proc):
        _stop_figures(proc, out)


def _stop_figures(proc: subprocess.Popen, out: Path) -> None:
    # 2 s is the promise on an idle machine; the test allows 5 s, as test runs share busy cores
    deadline = time.monotonic() + 60
    while len(_descendants(proc.pid)) < 2 and time.monotonic() < deadline:  # the pool has started
        time.sleep(0.05)
    started = _descendants(proc.pid)
    assert len(started) >= 2 and proc.poll() is None
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 143, err
    _assert_all_exit(started, within=max(0.0, 5.0 - (time.monotonic() - t0)))
    assert "interrupted" in err
    assert not [p for p in out.iterdir() if p.name.startswith(".gradlab-tmp-")]


def test_simulation_is_deterministic_across_processes():
    # a fresh process and this one (another process, with its own hash seed) give the same JSON
    code = (
        "import json; from gradlab import experiments; "
        "r = experiments.simulate('simpo', policy='bigram', steps=15, seeds=2); "
        "print(json.dumps(r.as_dict()))"
    )
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = gradlab.experiments.simulate("simpo", policy="bigram", steps=15, seeds=2)
    assert fresh == json.dumps(here.as_dict()) + "\n"


@pytest.mark.long(seconds=25, group="redrawn_gallery")  # the session's figure run (conftest), then these
def test_figures_are_identical_across_processes(redrawn_gallery):
    """A fresh process's figures are the committed gallery's bytes, which another process drew
    (``tasks.py figures``, every figure at every size); its README says what that gallery's says
    of each figure, and its manifest holds nothing but the files' hashes."""
    from helpers import QUICK_FIGURES

    gallery = ROOT / "figures"
    drawn = sorted(p.name for p in redrawn_gallery.iterdir() if p.name.split("-")[0].split(".")[0] in QUICK_FIGURES)
    assert len(drawn) == 3 * 2 * 3, drawn  # three figures, two sizes, three formats
    for name in [*drawn, "README.md"]:
        assert (redrawn_gallery / name).read_bytes() == (gallery / name).read_bytes(), name
    manifest = json.loads((redrawn_gallery / output.MANIFEST).read_text())
    assert manifest["files"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                 for p in sorted(redrawn_gallery.iterdir()) if p.name != output.MANIFEST}
