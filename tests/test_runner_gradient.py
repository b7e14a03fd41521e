"""The training step's gradient (issue 17): the loss's symbolic partial derivatives in its
canonical variables, pulled back through the policy by one vjp (``objective.gradient``). It must be
the gradient JAX autodiff takes of the whole objective (``objective.value`` of the values computed
from the policy), for every registered loss, a combination and a formula, with soft labels, a
minibatch, on-policy weights and the proper loss, and the runs it trains must match."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import caches, losses
from gradlab.experiments import _engine, objective, runner
from gradlab.experiments.config import settings
from gradlab.experiments.validate import load

BASE = {"policy": {"family": "bigram", "vocab": 3, "max_len": 4, "scale": 1.0},
        "reference": {"params": "seed"},
        "data": {"kind": "equal_length", "n_pairs": 12}}


def _gradients(raw: dict, minibatch: bool = False, loss_fns=objective.loss_fns) -> tuple[np.ndarray, np.ndarray]:
    """(autodiff, closed form) gradients of the first setting's objective at its seeded start,
    flattened. The policy and the reference are different seeded draws, so margins are not 0."""
    point = settings(load(raw))[0][1]
    fam = runner.build_family(point.policy)
    with jax.enable_x64(True):
        inp, data, _ = _engine.inputs(point, fam, 0)
        static = _engine.static_of(point, fam, data.on_policy)
        inp = jax.tree_util.tree_map(jnp.asarray, inp)
        pre = objective.prepare(static, inp)
        fns = loss_fns(*static.losses[0])
        idx = jnp.array([0, 3, 4, 7, 9]) if minibatch else None
        params = inp["params"]
        value = lambda p: objective.value(static, fns, objective.values(static, p, inp, pre, idx), inp, idx)  # noqa: E731
        auto = jax.grad(value)(params)
        cotangent = functools.partial(objective.cotangent, static, fns)
        closed = objective.gradient(static, cotangent, params, inp, pre, idx)
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])  # noqa: E731
    return flat(auto), flat(closed)


def _assert_equal(auto: np.ndarray, closed: np.ndarray) -> None:
    assert np.all(np.isfinite(closed))
    assert np.max(np.abs(auto)) > 1e-6  # a real gradient, not two zeros
    np.testing.assert_allclose(closed, auto, rtol=0, atol=1e-12 * max(1.0, np.max(np.abs(auto))))


PAIR_LOSSES = sorted(name for name, loss in losses.LOSSES.items() if loss.kind == "pair")


@pytest.mark.parametrize("name", [*PAIR_LOSSES, "mpo"])
def test_closed_form_gradient_is_autodiffs_for_every_loss(name):
    _assert_equal(*_gradients({**BASE, "loss": {"name": name}}))


@pytest.mark.parametrize("name", ["dpo", "sft", "ld_dpo_trl", "simpo", "orpo"])
def test_soft_labels_and_a_minibatch(name):
    """Soft labels add l at the swapped pair, whose partials land on the other side's variables
    (SFT reads only y_w: its swapped term moves lp_l); the minibatch renormalises its weights."""
    raw = {**BASE, "data": {**BASE["data"], "labels": "soft"}, "loss": {"name": name}}
    _assert_equal(*_gradients(raw))
    _assert_equal(*_gradients(raw, minibatch=True))


@pytest.mark.parametrize("name", ["dpo", "pdpo"])
def test_on_policy_weights_and_the_proper_loss(name):
    raw = {"policy": {"family": "unigram", "vocab": 3, "max_len": 3, "scale": 1.0}, "reference": {"params": "seed"},
           "data": {"kind": "on_policy"}, "loss": {"name": name}}
    _assert_equal(*_gradients(raw))


def test_a_formula_loss():
    formula = "softplus(-beta*((lp_w - ref_w) - (lp_l - ref_l))) + 0.1*(lp_w/len_w)**2"
    raw = {**BASE, "loss": {"expr": formula, "beta": 0.3}}
    _assert_equal(*_gradients(raw))


def test_a_planted_wrong_partial_is_caught():
    """The comparison above can fail: a partial with its sign flipped is far from autodiff."""

    def flipped(name, expr):
        fns = objective.loss_fns(name, expr)
        return fns._replace(partials=lambda *a: tuple(-x for x in fns.partials(*a)))

    auto, closed = _gradients({**BASE, "loss": {"name": "dpo"}}, loss_fns=flipped)
    assert np.max(np.abs(auto - closed)) > 0.5 * np.max(np.abs(auto))


def test_training_with_either_gradient_gives_the_same_runs():
    """End to end, compiled: Adam, soft labels and tails (LD-DPO's TRL form), a tempered
    reference. Adam parts rounding on coordinates whose exact gradient is 0 (see
    test_runner_lean), hence the looser tolerance on the parameters."""
    raw = {**BASE, "reference": {"params": "seed", "temperature": 1.5},
           "data": {**BASE["data"], "labels": "soft"}, "loss": {"name": "ld_dpo_trl"},
           "train": {"steps": 40, "seeds": 2, "record_every": 20, "optimizer": "adam", "lr": 0.05,
                     "metrics": ["loss", "lp_w", "lp_l", "expected_length", "params"]}}
    closed = runner.run(raw)
    auto = runner.run(raw, closed_form=False)
    for a, b in zip(closed.runs, auto.runs, strict=True):
        assert not np.allclose(a.metrics["loss"][0], a.metrics["loss"][-1])  # the runs moved
        for k in a.metrics:
            np.testing.assert_allclose(a.metrics[k], b.metrics[k], rtol=1e-9, atol=1e-9, err_msg=k)


def test_a_repeated_program_tiers_up_to_the_optimised_compile_with_the_same_results(monkeypatch, fresh_cache,
                                                                                     tmp_path):
    """``Tiered``: the first calls run the fast-compiled program; once the calls after the first
    have taken longer than ``TIER_UP`` times the first, the optimised one, with the same numbers
    up to rounding (the optimised code contracts a * b + c into fused multiply-adds: ~1e-12).
    Each part has a disk cache of its own (a stored optimised tier would start a new program
    optimised: tests/test_export.py)."""
    raw = {**BASE, "loss": {"name": "dpo"},
           "train": {"steps": 20, "seeds": 2, "record_every": 5, "metrics": ["loss", "expected_length", "params"]}}
    _engine.program.cache_clear()
    monkeypatch.setattr(_engine, "TIER_UP", 0.0)  # any time after the first call tiers up
    try:
        first, second, third = (runner.run(raw) for _ in range(3))
        (program,) = [_engine.program(s) for s, _ in _engine.groups(_engine.jobs([load(raw)]))]
        assert program.tiered
        assert program.optimised._cache_size() == 1 and program.fast._cache_size() == 1
        for a, b in zip(first.runs, third.runs, strict=True):
            for k in a.metrics:
                np.testing.assert_allclose(b.metrics[k], a.metrics[k], rtol=1e-10, atol=1e-12, err_msg=k)
        monkeypatch.setattr(_engine, "TIER_UP", float("inf"))  # never: a new program stays fast
        monkeypatch.setenv("GRADLAB_CACHE_DIR", str(tmp_path / "another cache"))
        caches.clear_caches()  # as a new process: no program in memory either
        runner.run(raw), runner.run(raw)
        (program,) = [_engine.program(s) for s, _ in _engine.groups(_engine.jobs([load(raw)]))]
        assert not program.tiered and program.optimised._cache_size() == 0
    finally:
        _engine.program.cache_clear()


def test_a_compile_option_this_jaxlib_lacks_is_dropped_and_a_real_error_is_not(monkeypatch):
    """jax>=0.4.30 is allowed, and not every jaxlib has every option the runner passes: one it
    does not know is dropped and the program compiled again (the options never change results)."""
    bogus = "xla_gradlab_no_such_option"
    monkeypatch.setattr(_engine, "RUN_ONCE_OPTIONS", {**_engine.RUN_ONCE_OPTIONS, bogus: True})
    program = _engine.Tiered(lambda x: x + 1.0)
    assert float(program(np.float64(1.0))) == 2.0
    assert program.dropped == {bogus}
    monkeypatch.setattr(_engine, "RUN_ONCE_OPTIONS", {"xla_backend_optimization_level": "not a level"})
    with pytest.raises(Exception):  # noqa: B017 - whatever XLA raises for a bad value, it is not swallowed
        _engine.Tiered(lambda x: x * 3.0)(np.float64(1.0))
