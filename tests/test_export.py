"""Compiled programs kept between processes (``gradlab.experiments._export``): a served program
gives the jitted program's bits without tracing it (and runs the executable stored beside it,
without compiling it), any change of a key part misses, and a damaged or misfiled entry is a
miss that is traced (or compiled) and written again, never a crash or a wrong number."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax import export

from gradlab import caches
from gradlab.errors import GradlabError
from gradlab.experiments import _engine, _export, config
from gradlab.experiments.validate import load

ROOT = Path(__file__).resolve().parents[1]

RAW = {"policy": {"family": "bigram", "vocab": 3, "max_len": 4, "scale": 1.0},
       "reference": {"params": "seed"},
       "data": {"kind": "equal_length", "n_pairs": 12},
       "loss": {"name": "dpo"},
       "train": {"steps": 12, "seeds": 2, "record_every": 4, "metrics": ["loss", "expected_length", "params"]}}


def _untraceable(*args):
    raise AssertionError("the program was traced: it should have been served from the disk cache")


def _same_bits(a, b) -> bool:
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in pairs)


@pytest.fixture
def cache(fresh_cache):
    """The programs' folder of an empty cache of this test's own, and no program in memory."""
    return fresh_cache / "programs"


def test_a_training_program_served_from_disk_gives_the_jitted_bits_without_tracing(cache):
    all_jobs = _engine.jobs([load(RAW)])
    ((static, members),) = _engine.groups(all_jobs)
    fn = _engine.program(static).fn
    plain = _engine.call(_engine.Tiered(fn), static, [all_jobs[i] for i in members])
    before = set(cache.glob("*.jaxexport"))  # the seeds' draws program, exported by jobs()
    name = f"train {static!r}"
    exported = _engine.call(_engine.Tiered(fn, name=name), static, [all_jobs[i] for i in members])
    assert len(set(cache.glob("*.jaxexport")) - before) == 1
    caches.clear_caches()  # as a new process: nothing in memory, the file on disk
    served = _engine.call(_engine.Tiered(_untraceable, name=name), static, [all_jobs[i] for i in members])
    assert _same_bits(plain, exported) and _same_bits(plain, served)
    assert any(np.any(r["loss"][0] != r["loss"][-1]) for r, _ in plain)  # the runs moved


def _small(x, k):
    return jax.lax.scan(lambda c, v: (c * k + v, c), jnp.zeros(()), x)


ARGS = (np.linspace(0.0, 1.0, 7), np.float64(0.5))


def test_every_key_part_changes_the_key(tmp_path):
    sig = _export.signature(ARGS)
    base = _export.key("p", sig, {"a": True})
    copy = tmp_path / "gradlab"
    for path in _export._PACKAGE.rglob("*.py"):
        (copy / path.relative_to(_export._PACKAGE)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy / path.relative_to(_export._PACKAGE))
    assert _export.key("p", sig, {"a": True}, package=copy) == base  # the same sources, the same key
    with open(copy / "experiments" / "objective.py", "a") as fh:
        fh.write("\n# an edit\n")
    _export.source_digest.cache_clear()
    others = [
        _export.key("p", sig, {"a": True}, package=copy),  # a source file edited
        _export.key("q", sig, {"a": True}),  # another program
        _export.key("p", _export.signature((ARGS[0][:6], ARGS[1])), {"a": True}),  # another shape
        _export.key("p", _export.signature((ARGS[0].astype(np.float32), ARGS[1])), {"a": True}),  # dtype
        _export.key("p", _export.signature(((ARGS[0],), ARGS[1])), {"a": True}),  # tree
        _export.key("p", sig, {"a": False}),  # compile options
    ]
    with jax.enable_x64(False):
        others.append(_export.key("p", sig, {"a": True}))  # a JAX setting that changes tracing
    assert len({base, *others}) == len(others) + 1
    assert _export.signature((ARGS[0], 0.5)) is None  # a Python number (weakly typed) is not served


def _entry(cache) -> tuple:
    program = _export.jit(_small, "small", compiler_options={})
    expected = jax.jit(_small)(*ARGS)
    assert _same_bits(program(*ARGS), expected)
    (path,) = cache.glob("*.jaxexport")
    return path, path.read_bytes(), expected


def _damage(path, damage: str, kind: str = _export.FORMAT) -> bool:
    """Damage the entry at ``path`` in one of the ways every kind of entry shares; False for a
    ``damage`` it does not know (the caller's own)."""
    good = path.read_bytes()
    head, _, payload = good.partition(b"\n")
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "payload byte":
        flipped = bytearray(good)
        flipped[len(head) + 1 + len(payload) // 2] ^= 0x10
        path.write_bytes(bytes(flipped))
    elif damage == "another key":
        path.unlink()
        _export.store("0" * 64, payload, folder=path.parent, kind=kind)
        (path.parent / f"{'0' * 64}{path.suffix}").rename(path)
    else:
        return False
    return True


@pytest.mark.parametrize("damage", ["truncated", "payload byte", "head byte", "another key", "empty", "recomputed"])
def test_a_damaged_entry_is_a_miss_traced_and_written_again(cache, damage):
    path, good, expected = _entry(cache)
    key = path.stem
    if _damage(path, damage):
        pass
    elif damage == "head byte":
        path.write_bytes(good.replace(key[:8].encode(), key[:7].encode() + b"x", 1))
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # the head rewritten to match a garbage payload: jax cannot read it
        _export.store(key, b"not a program" * 10, folder=cache)
    if damage != "recomputed":
        assert _export.load(key, folder=cache) is None
    caches.clear_caches()
    traced = []
    program = _export.jit(lambda *a: traced.append(1) or _small(*a), "small", compiler_options={})
    assert _same_bits(program(*ARGS), expected)
    assert traced  # a miss: traced again
    assert _export.load(key, folder=cache) is not None  # and written again, whole
    caches.clear_caches()
    assert _same_bits(_export.jit(_untraceable, "small", compiler_options={})(*ARGS), expected)


def test_inputs_it_cannot_serve_go_to_the_plain_jit(cache):
    program = _export.jit(_small, "small", compiler_options={})
    assert _same_bits(program(ARGS[0], 0.5), jax.jit(_small)(ARGS[0], 0.5))
    assert not cache.exists() or not list(cache.glob("*"))


# --------------------------------------------------------------------------------------------
# The executable stored beside the exported program
# --------------------------------------------------------------------------------------------


def _executable_entry(cache) -> tuple:
    path, _, expected = _entry(cache)
    (exe,) = cache.glob("*.xlaexe")
    assert exe.stem == path.stem
    return exe, exe.read_bytes(), expected


def test_a_later_process_runs_the_stored_executable_without_compiling(cache):
    exe, _, expected = _executable_entry(cache)
    assert not isinstance(_export._LOADED[exe.stem], _export._Executable)  # this process compiled it
    caches.clear_caches()
    served = _export.jit(_untraceable, "small", compiler_options={})
    assert _same_bits(served(*ARGS), expected) and _same_bits(served(*ARGS), expected)
    assert isinstance(_export._LOADED[exe.stem], _export._Executable)  # read back, not compiled


@pytest.mark.parametrize("damage", ["truncated", "payload byte", "facts", "another key", "another kind",
                                    "recomputed"])
def test_a_damaged_executable_is_compiled_again_and_rewritten(cache, damage):
    exe, good, expected = _executable_entry(cache)
    payload = good.partition(b"\n")[2]
    key = exe.stem
    if _damage(exe, damage, _export.EXECUTABLE):
        pass
    elif damage == "facts":  # the facts line unreadable, the hashes recomputed to match
        _export.store(key, b"{not json\n" + payload.partition(b"\n")[2], folder=cache, kind=_export.EXECUTABLE)
    elif damage == "another kind":  # the exported program's file in the executable's place
        exe.write_bytes((cache / f"{key}.jaxexport").read_bytes())
    else:  # the hashes recomputed over bytes XLA cannot load
        _export.store(key, b'{"custom_calls": false}\nnot an executable' * 10, folder=cache, kind=_export.EXECUTABLE)
    if damage not in ("facts", "recomputed"):
        assert _export.load(key, folder=cache, kind=_export.EXECUTABLE) is None
    caches.clear_caches()
    program = _export.jit(_untraceable, "small", compiler_options={})  # the exported program is whole
    assert _same_bits(program(*ARGS), expected)
    assert not isinstance(_export._LOADED[key], _export._Executable)  # compiled, not served
    assert _export.load(key, folder=cache, kind=_export.EXECUTABLE) is not None  # and written again
    caches.clear_caches()
    assert _same_bits(_export.jit(_untraceable, "small", compiler_options={})(*ARGS), expected)
    assert isinstance(_export._LOADED[key], _export._Executable)


def _solve(a, b):
    return jnp.linalg.solve(a, b)


SYSTEM = (np.eye(3) * 2.0 + 0.25, np.arange(3.0))


def test_a_program_with_a_lapack_call_runs_only_once_lapack_is_set_up(cache):
    # a loaded executable skips jax's lowering, which sets up jaxlib's LAPACK kernels: the
    # entry records that the program has custom calls, and it is served only once set up
    expected = jax.jit(_solve)(*SYSTEM)
    assert _same_bits(_export.jit(_solve, "solve", compiler_options={})(*SYSTEM), expected)
    key = _export.key("solve", _export.signature(SYSTEM), {})
    facts = _export.load(key, folder=cache, kind=_export.EXECUTABLE).partition(b"\n")[0]
    assert json.loads(facts) == {"custom_calls": True}
    _export.jit(_small, "small", compiler_options={})(*ARGS)
    small = _export.key("small", _export.signature(ARGS), {})
    assert json.loads(_export.load(small, folder=cache, kind=_export.EXECUTABLE).partition(b"\n")[0]) == {
        "custom_calls": False}  # a program without one is served without the set-up (scipy's import)
    exported = export.deserialize(bytearray(_export.load(key, folder=cache)))
    device = jax.devices()[0]
    assert _export._load_executable(exported, key, device, device.client, {}, folder=cache,
                                    initialise=lambda: False) is None  # not set up: compiled instead
    served = _export._load_executable(exported, key, device, device.client, {}, folder=cache)
    assert isinstance(served, _export._Executable) and _same_bits(served(*SYSTEM), expected)
    assert _export._initialise_lapack()  # this jax still has the entry point (else: compiled every time)


class _ClientWithoutExecutables:
    """A jaxlib whose client can neither serialise nor load executables (an older or newer API)."""


def test_a_jaxlib_without_executable_serialisation_runs_the_exported_program(cache):
    expected = jax.jit(_small)(*ARGS)
    key = _export.key("small", _export.signature(ARGS), {})
    old = _ClientWithoutExecutables()
    program = _export._compiled(_untraceable_once(), key, ARGS, {}, client=old)
    assert _same_bits(program(*ARGS), expected)
    assert not list(cache.glob("*.xlaexe")) and list(cache.glob("*.jaxexport"))  # the exported program only
    caches.clear_caches()
    assert _same_bits(_export._compiled(_untraceable, key, ARGS, {}, client=old)(*ARGS), expected)
    caches.clear_caches()  # the same entry with a client that can: the executable is stored and served
    assert _same_bits(_export.jit(_untraceable, "small", compiler_options={})(*ARGS), expected)
    caches.clear_caches()
    assert _same_bits(_export._compiled(_untraceable, key, ARGS, {}, client=old)(*ARGS), expected)
    assert not isinstance(_export._LOADED[key], _export._Executable)  # it cannot load it: compiled


def _untraceable_once():
    traced = []

    def fn(*args):
        assert not traced, "traced twice"
        traced.append(1)
        return _small(*args)

    return fn


def test_the_stored_compilation_is_named_after_its_key_and_kept_out_of_xlas_cache(cache):
    setting = jax.config.jax_persistent_cache_min_compile_time_secs  # type: ignore[attr-defined]
    exe, _, _ = _executable_entry(cache)
    compiled = _export._LOADED[exe.stem]
    assert f"gradlab_{exe.stem[:24]}" in compiled.as_text()  # no other program's cache entry can match it
    assert jax.config.jax_persistent_cache_min_compile_time_secs == setting  # type: ignore[attr-defined]
    before = _export._xla_cache_hits()
    jax.monitoring.record_event("/jax/compilation_cache/cache_hits")  # what jax reports on a hit
    assert _export._xla_cache_hits() == before + 1


def test_a_program_that_tiered_up_starts_optimised_in_a_later_process(cache):
    all_jobs = _engine.jobs([load(RAW)])
    ((static, members),) = _engine.groups(all_jobs)
    jobs = [all_jobs[i] for i in members]
    name = f"train {static!r}"
    fn = _engine.program(static).fn
    first = _engine.Tiered(fn, name=name)
    level0 = _engine.call(first, static, jobs)
    first.optimise()  # as tiering up does
    optimised = _engine.call(first, static, jobs)
    compiled = _engine.call(_engine.Tiered(fn), static, jobs)  # level 0, jitted as usual
    assert _same_bits(level0, compiled)
    caches.clear_caches()  # as a new process
    later = _engine.Tiered(_untraceable, name=name)
    served = _engine.call(later, static, jobs)
    assert later.tiered and _same_bits(served, optimised)
    assert not later.proven  # read from disk, it proves nothing of this process's runs (no spread for it)
    plain = _engine.Tiered(fn)
    plain.optimise()
    assert _same_bits(served, _engine.call(plain, static, jobs))  # the optimised tier jitted as usual


def test_a_program_that_never_tiered_up_starts_at_level_0_in_a_later_process(cache):
    all_jobs = _engine.jobs([load(RAW)])
    ((static, members),) = _engine.groups(all_jobs)
    jobs = [all_jobs[i] for i in members]
    name = f"train {static!r}"
    level0 = _engine.call(_engine.Tiered(_engine.program(static).fn, name=name), static, jobs)
    caches.clear_caches()
    later = _engine.Tiered(_untraceable, name=name)
    assert _same_bits(_engine.call(later, static, jobs), level0) and not later.tiered
    other = _engine.Tiered(_engine.program(static).fn, name=name + " (another program)")
    _engine.call(other, static, jobs)
    assert not other.tiered  # another name: another key, nothing of this program's is found


# --------------------------------------------------------------------------------------------
# The optimised tier compiled ahead, in the background, for later processes
# --------------------------------------------------------------------------------------------


def _training(raw=RAW) -> tuple:
    all_jobs = _engine.jobs([load(raw)])
    ((static, members),) = _engine.groups(all_jobs)
    return static, [all_jobs[i] for i in members], f"train {static!r}", _engine.program(static).fn


def _tier(fn, static, jobs, *, optimised: bool):
    """The records of a tier jitted as usual (nothing read from or written to the disk cache)."""
    plain = _engine.Tiered(fn)
    if optimised:
        plain.optimise()
    return _engine.call(plain, static, jobs)


def test_a_program_compiled_here_compiles_its_optimised_tier_ahead_for_later_processes(cache):
    static, jobs, name, fn = _training()
    before = set(cache.glob("*.xlaexe"))  # the seeds' draws program's
    first = _engine.Tiered(fn, name=name, ahead=True)
    level0 = _engine.call(first, static, jobs)
    assert not first.tiered and _same_bits(level0, _tier(fn, static, jobs, optimised=False))  # this experiment: level 0
    _export._settle()  # the compilation under way ends and its entries are written
    assert len(set(cache.glob("*.xlaexe")) - before) == 2  # both tiers
    read = lambda: [k for k, v in _export._LOADED.items() if isinstance(v, _export._Executable)]  # noqa: E731
    assert not read()  # every program so far compiled here
    first.optimise()  # a tier-up here reads the executable compiled ahead, it does not compile again
    optimised = _engine.call(first, static, jobs)
    assert len(read()) == 1
    assert _same_bits(optimised, _tier(fn, static, jobs, optimised=True))
    caches.clear_caches()  # as a new process
    later = _engine.Tiered(_untraceable, name=name)
    assert _same_bits(_engine.call(later, static, jobs), optimised)
    assert later.tiered and not later.proven


def test_no_tier_is_compiled_ahead_unless_asked(cache):
    static, jobs, name, fn = _training()
    before = set(cache.glob("*.xlaexe"))
    _engine.call(_engine.Tiered(fn, name=name), static, jobs)
    _export._settle()
    assert len(set(cache.glob("*.xlaexe")) - before) == 1  # level 0 alone


def test_a_compilation_ahead_that_fails_leaves_no_executable(cache):
    exported = export.export(jax.jit(_small))(*_export._specs(ARGS))
    k = _export.key("small", _export.signature(ARGS), {"xla_no_such_option": True})
    device = jax.devices()[0]
    _export._compile_ahead(exported, bytes(exported.serialize()), k, {"xla_no_such_option": True}, ARGS, device,
                           device.client, folder=cache)
    path = _export._executable_path(k, cache)
    assert path in _export._STARTED or any(job.path == path for job in _export._QUEUED)  # under way
    _export._settle()
    assert not path.exists() and not _export.jit(_small, "small", compiler_options={"xla_no_such_option": True}).stored(
        *ARGS)


@pytest.mark.parametrize(("value", "ahead"), [(None, False), ("1", True), (" 1 ", True), ("", False), ("0", False),
                                               (" 0 ", False)])
def test_compiling_ahead_is_off_unless_the_environment_says_1(monkeypatch, value, ahead):
    if value is None:
        monkeypatch.delenv(_export.AHEAD, raising=False)
    else:
        monkeypatch.setenv(_export.AHEAD, value)
    assert _export.compiles_ahead() is ahead


def test_a_pool_worker_never_compiles_ahead(monkeypatch):
    """The figures' pool gives every core a worker: none is left for compiling ahead."""
    from gradlab.processes import Pool

    monkeypatch.setenv(_export.AHEAD, "1")  # the workers inherit it
    with Pool(1) as pool:
        assert pool.submit(_export.compiles_ahead).result() is False
    assert _export.compiles_ahead() is True  # the pool's parent still does


def test_a_value_of_the_compile_ahead_variable_it_does_not_know_is_refused(monkeypatch):
    monkeypatch.setenv(_export.AHEAD, "yes")
    with pytest.raises(GradlabError, match=r"GRADLAB_COMPILE_AHEAD='yes'.*set it to 1 .* or 0"):
        _export.compiles_ahead()


# A process that trains one program with the optimised tier compiled ahead, and saves its records
# and whether it ran optimised. With a delay, a timer sends the process Ctrl-C that long after its
# code has ended, when it waits at exit for the compilation, and says whether one was under way.
FIRST_AND_LATER = """
import json, os, signal, sys, threading
import numpy as np
from gradlab import runtime
runtime.configure()
import jax
from gradlab.experiments import _engine, _export, config
from gradlab.experiments.validate import load
with jax.enable_x64(True):
    jobs = _engine.jobs([load(json.loads(sys.argv[1]))])
    ((static, members),) = _engine.groups(jobs)
    program = _engine.program(static)
    out = _engine.call(program, static, [jobs[i] for i in members])
np.savez(sys.argv[2], tiered=program.tiered, **{f"{i} {k}": v for i, (records, guard) in enumerate(out)
                                                for k, v in {**records, "guard": guard}.items()})
if len(sys.argv) > 3:
    def interrupt():
        if _export._STARTED:
            os.write(2, b"under way\\n")
        os.kill(os.getpid(), signal.SIGINT)
    timer = threading.Timer(float(sys.argv[3]), interrupt)
    timer.daemon = True
    timer.start()
"""


def _process(cache, out, *extra) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "GRADLAB_CACHE_DIR": str(cache.parent), _export.AHEAD: "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", FIRST_AND_LATER, json.dumps(RAW), str(out), *extra], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.exists(), done.stderr
    with np.load(out) as found:
        return done, dict(found)


def _as_saved(records) -> dict:
    return {f"{i} {k}": v for i, (r, guard) in enumerate(records) for k, v in {**r, "guard": guard}.items()}


def test_a_later_process_starts_on_the_optimised_tier_a_first_cold_one_compiled_ahead(cache, tmp_path):
    first, saved = _process(cache, tmp_path / "first.npz")
    assert first.returncode == 0, first.stderr  # it waited at exit for the compilation (a thread left in XLA aborts)
    later, served = _process(cache, tmp_path / "later.npz")
    assert later.returncode == 0, later.stderr
    static, jobs, _, fn = _training()
    assert not saved.pop("tiered") and served.pop("tiered")
    level0, optimised = (_as_saved(_tier(fn, static, jobs, optimised=o)) for o in (False, True))
    assert saved.keys() == level0.keys() == served.keys()
    assert all(np.array_equal(saved[k], level0[k]) for k in level0)  # the first: level 0's bits
    assert all(np.array_equal(served[k], optimised[k]) for k in optimised)  # the later: the optimised tier's


def test_ctrl_c_while_a_process_waits_at_exit_for_its_compilation_ends_it_at_once_leaving_whole_entries(cache,
                                                                                                        tmp_path):
    done, _ = _process(cache, tmp_path / "first.npz", "0.01")
    assert "terminate called" not in done.stderr and done.returncode != -signal.SIGABRT
    assert done.returncode == (-signal.SIGINT if "under way" in done.stderr else 0), done.stderr
    for path in cache.iterdir():  # every file an entry that reads back whole, none partly written
        kind = {".jaxexport": _export.FORMAT, ".xlaexe": _export.EXECUTABLE, ".json": _export.FACTS}[path.suffix]
        assert _export.load(path.stem, folder=cache, kind=kind) is not None


# A process that has a compilation ahead under way forks: the child finds none of its own (it
# would otherwise wait for ever on a compilation no thread of its runs) and can queue its own.
FORK = """
import os, sys, warnings
warnings.simplefilter("ignore")  # jax warns that a multithreaded process forks
import jax, numpy as np
from jax import export
from gradlab.experiments import _export
jax.config.update("jax_enable_x64", True)
args = (np.linspace(0.0, 1.0, 7), np.float64(0.5))
def small(x, k):
    return jax.lax.scan(lambda c, v: (c * k + v, c), jax.numpy.zeros(()), x)
exported = export.export(jax.jit(small))(*_export._specs(args))
device, folder = jax.devices()[0], _export.Path(sys.argv[1])
k = _export.key("small", _export.signature(args), {})
_export._compile_ahead(exported, bytes(exported.serialize()), k, {}, args, device, device.client, folder=folder)
pid = os.fork()
if pid == 0:
    if _export._STARTED or _export._QUEUED or _export._WORKER:
        os._exit(3)
    _export._wait(_export._executable_path(k, folder))  # returns: nothing of the parent's to wait for
    os._exit(0)
_, status = os.waitpid(pid, 0)
_export._settle()
print(os.waitstatus_to_exitcode(status), _export._executable_path(k, folder).is_file())
"""


def test_a_forked_child_does_not_wait_for_its_parents_compilations(cache):
    cache.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", FORK, str(cache)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "True"]  # the child saw none; the parent's compilation ended and was stored


# --------------------------------------------------------------------------------------------
# Facts a process would import optax to learn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", [None, "truncated", "payload byte", "another key", "not a table"])
def test_the_optimisers_read_back_are_optaxs_own_and_a_damaged_entry_is_learnt_again(cache, damage):
    live = config._optax_optimisers()
    assert live["adam"][:3] == ["b1", "b2", "eps"] and "sgd" in live and "lbfgs" not in live
    assert config._optimisers() == live  # learnt (optax imported) and written
    (path,) = cache.glob("*.json")
    if damage == "not a table":  # a whole entry whose content is not the table's shape
        _export.store(path.stem, b'{"adam": "b1"}', folder=cache, kind=_export.FACTS)
    elif damage is not None:
        assert _damage(path, damage, _export.FACTS)
    caches.clear_caches()
    learnt = []
    read = _export.remembered(path.stem, lambda: learnt.append(1) or live, config._is_optimiser_table)
    assert read == live and bool(learnt) == (damage is not None)  # read back whole, or learnt again
    caches.clear_caches()
    assert config._optimisers() == live


# A process that runs one experiment and says whether it imported optax, with its records' hash.
OPTAX = """
import hashlib, json, sys
import numpy as np
from gradlab import runtime
runtime.configure()
from gradlab.experiments import runner
result = runner.run(json.loads(sys.argv[1]))
blob = b"".join(np.asarray(v).tobytes() for run in result.runs for v in run.metrics.values())
print("optax" in sys.modules, hashlib.sha256(blob).hexdigest())
"""


def test_a_process_that_finds_its_program_on_disk_never_imports_optax(cache):
    raw = {**RAW, "train": {**RAW["train"], "optimizer": {"name": "adam", "b1": 0.8}}}
    # the default (compiling ahead unset): a later process computes with the first's code
    env = {**{k: v for k, v in os.environ.items() if k != _export.AHEAD}, "GRADLAB_CACHE_DIR": str(cache.parent),
           "PYTHONPATH": str(ROOT)}
    runs = [subprocess.run([sys.executable, "-c", OPTAX, json.dumps(raw)], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=300, check=True).stdout.split() for _ in range(2)]
    assert runs[0][0] == "True" and runs[1][0] == "False"  # the first learnt what the second read back
    assert runs[0][1] == runs[1][1]  # the same records, bit for bit


def test_configure_freezes_the_objects_alive_at_its_first_call_only():
    code = ("import gc; from gradlab import runtime; runtime.configure(compilation_cache=False); "
            "first = gc.get_freeze_count(); garbage = [[] for _ in range(1000)]; runtime.configure(); "
            "print(first, gc.get_freeze_count())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, again = (int(x) for x in done.stdout.split())
    assert first > 10_000 and again == first  # jax's objects frozen once; later objects stay collectable
    assert gc.get_freeze_count() > 0  # this session's own entry point (conftest) froze its imports
