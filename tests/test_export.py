"""Compiled programs kept between processes (``gradlab.experiments._export``): a served program
gives the jitted program's bits without tracing it, any change of a key part misses, and a
damaged or misfiled entry is a miss that is traced and written again, never a crash or a
wrong number."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import caches
from gradlab.experiments import _engine, _export
from gradlab.experiments.validate import load

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


@pytest.mark.parametrize("damage", ["truncated", "payload byte", "head byte", "another key", "empty", "recomputed"])
def test_a_damaged_entry_is_a_miss_traced_and_written_again(cache, damage):
    path, good, expected = _entry(cache)
    head, _, payload = good.partition(b"\n")
    key = path.stem
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "payload byte":
        flipped = bytearray(good)
        flipped[len(head) + 1 + len(payload) // 2] ^= 0x10
        path.write_bytes(bytes(flipped))
    elif damage == "head byte":
        path.write_bytes(good.replace(key[:8].encode(), key[:7].encode() + b"x", 1))
    elif damage == "another key":
        path.unlink()
        _export.store("0" * 64, payload, folder=cache)
        (cache / f"{'0' * 64}.jaxexport").rename(path)
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
