"""Closed forms against autodiff on every family (reduced size), the proper loss exactly, and
the exact one-step facts of docs/background.md and docs/architecture.md."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gradlab import checks
from gradlab.errors import DomainError
from gradlab.losses import LOSSES
from gradlab.policies import FAMILIES, make_family


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_closed_form_matches_autodiff(family):
    rows = checks.check_family(list(LOSSES), family, points=64, fd_points=16, vocab=3, max_len=4)
    assert {r.loss for r in rows} == set(LOSSES)
    bad = [r for r in rows if not r.ok]
    assert not bad, bad


def test_a_wrong_closed_form_is_caught(monkeypatch):
    # sanity: break the derivative of dpo and the check must fail
    from gradlab import symbolic

    real = symbolic.derivative

    def broken(loss, wrt, view="log"):
        d = real(loss, wrt, view)
        return 2 * d if wrt == "lp_w" else d

    monkeypatch.setattr(symbolic, "derivative", broken)  # gradlab.gradient is built from it
    row = checks.check("dpo", "bigram", points=16, vocab=3, max_len=3)
    assert not row.ok and row.max_rel_error > 1e-3
    assert row.fd_max_rel_error > checks.FD_TOLERANCE  # the finite differences disagree too


@pytest.mark.parametrize("wrt", ["lp_l", "tail_w", "tail_l"])
def test_a_wrong_partial_of_any_policy_variable_is_caught(monkeypatch, wrt):
    # LD-DPO reads six variables and has four closed-form partials: a wrong one in any column
    # must fail (the columns of the loss program are matched to the Jacobian's rows by name)
    from gradlab import symbolic

    real = symbolic.derivative
    monkeypatch.setattr(symbolic, "derivative",
                        lambda loss, v, view="log": real(loss, v, view) * (1.01 if v == wrt else 1))
    row = checks.check("ld_dpo", "unigram", points=64, vocab=3, max_len=4)
    assert not row.ok and row.max_rel_error > 1e-4, row


def test_the_check_verifies_the_partials_gradlab_shows():
    # the closed forms checked are exactly gradlab.gradient's (log view), policy variables only
    from gradlab import symbolic

    for name in ("dpo", "ld_dpo", "simpo", "kto"):
        loss = symbolic.as_loss(name)
        shown = symbolic.gradient(loss, "log")
        checked = dict(checks._policy_partials(loss))
        assert set(checked) == {v for v in checks.POLICY_VARS if v in loss.variables}
        assert all(checked[v] == shown[v] for v in checked), name


def _direct_relative_errors(values, autodiff, closed, jac, direction):
    """The chain rule in parameter space, as the check computed it before the Gram form."""
    n, m = closed.shape[0], direction.shape[0]
    moved = np.any(jac != 0, axis=(0, 2))
    auto = np.einsum("pk,pkd->pd", autodiff[:, moved], jac[:, moved])
    jp = jac[:, : closed.shape[1]]
    chain = np.einsum("pk,pkd->pd", closed, jp)
    terms = np.einsum("pk,pk->p", np.abs(closed), np.sqrt(np.einsum("pkd,pkd->pk", jp, jp)))
    scale = np.maximum(terms, np.linalg.norm(auto, axis=-1))
    rel = np.linalg.norm(chain - auto, axis=-1) / scale
    fd = (values[n:n + m] - values[n + m:]) / (2 * checks._FD_EPS)
    rounding = 1e3 * np.finfo(np.float64).eps * (np.abs(values[:m]) + 1.0) / checks._FD_EPS
    return rel, np.abs(fd - np.einsum("pd,pd->p", chain[:m], direction)) / (scale[:m] + rounding)


def test_the_gram_form_of_the_chain_rule_equals_the_direct_one():
    rng = np.random.default_rng(0)
    n, m, k, dim = 50, 7, 5, 9
    jac = rng.normal(size=(n, k, dim))
    jac[:, 4] = 0.0  # a variable the policy never moves: its autodiff partial does not count
    closed = rng.normal(size=(n, 3))  # the first three variables have closed forms
    autodiff = np.concatenate([closed + 1e-3 * rng.normal(size=(n, 3)), rng.normal(size=(n, 2))], axis=-1)
    autodiff[:, 4] = np.nan
    values, direction = rng.normal(size=n + 2 * m), rng.normal(size=(m, dim))
    gram, jdir = np.einsum("pkd,pld->pkl", jac, jac), np.einsum("pkd,pd->pk", jac[:m], direction)
    moved = np.any(jac != 0, axis=(0, 2))
    got = checks._relative_errors(values, autodiff, closed, gram, jdir, moved)
    want = _direct_relative_errors(values, np.where(moved, autodiff, 0.0), closed, jac, direction)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-9)
    assert np.median(got[0]) > 0.05  # variable 3 is moved and has no closed form: (a) misses it


def test_a_right_closed_form_scores_rounding_in_the_gram_form():
    # (a) == (b) exactly up to rounding: the Gram form must not invent an error from cancellation
    rng = np.random.default_rng(1)
    jac = rng.normal(size=(40, 4, 30))
    jac[:, 1] = jac[:, 0]  # y_w = y_l: the two rows coincide and the terms cancel
    closed = rng.normal(size=(40, 4))
    closed[:, 1] = -closed[:, 0]
    autodiff = closed * (1 + 1e-16 * rng.normal(size=closed.shape))
    gram = np.einsum("pkd,pld->pkl", jac, jac)
    rel, _ = checks._relative_errors(np.zeros(40), autodiff, closed, gram, np.zeros((0, 4)), np.ones(4, bool))
    assert rel.max() < 1e-12


def test_an_unknown_compile_option_is_dropped_and_a_real_error_is_not(monkeypatch):
    monkeypatch.setattr(checks, "_FAST_COMPILE", {**checks._FAST_COMPILE, "xla_gradlab_no_such_option": True})
    monkeypatch.setattr(checks, "_DROPPED_OPTIONS", set())
    lowered = jax.jit(lambda x: x * 2.0).lower(np.ones(3))
    assert float(checks._compile_lowered(lowered)(np.ones(3))[0]) == 2.0
    assert checks._DROPPED_OPTIONS == {"xla_gradlab_no_such_option"}
    assert "xla_cpu_use_fusion_emitters" in checks._compile_options()  # this jaxlib knows the real ones
    monkeypatch.setattr(checks, "_FAST_COMPILE", {"xla_backend_optimization_level": "not a level"})
    with pytest.raises(jax.errors.JaxRuntimeError):
        checks._compile_lowered(jax.jit(lambda x: x * 3.0).lower(np.ones(3)))


def test_fd_points_must_be_a_count():
    with pytest.raises(DomainError, match="fd_points"):
        checks.check("dpo", "unigram", points=8, fd_points=-1, vocab=3, max_len=3)
    row = checks.check("dpo", "unigram", points=8, fd_points=0, vocab=3, max_len=3)
    assert row.ok and row.fd_points == 0


def test_hyperparameter_ranges_are_legal():
    for loss in LOSSES.values():
        for h in loss.hyperparameters:
            lo, hi = checks.hyper_range(loss, h)
            assert lo <= hi and loss.domain(h).contains(lo) and loss.domain(h).contains(hi), (loss.name, h)


@pytest.fixture(scope="module")
def pdpo_setting():
    fam = make_family("bigram", vocab=3, max_len=4)
    params, ref = fam.init(jax.random.PRNGKey(0)), fam.init(jax.random.PRNGKey(1))
    reward = jnp.array([0.0, 1.0, -0.5])
    return fam, params, ref, reward


def test_pdpo_product_rule_gradient_matches_autodiff(pdpo_setting):
    J, autodiff, product_rule = checks.pdpo_exact(*pdpo_setting)
    a, b = ravel_pytree(autodiff)[0], ravel_pytree(product_rule)[0]
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 1e-12
    assert float(J) > 0


def test_pdpo_importance_weighted_estimator_converges(pdpo_setting):
    fam, params, ref, reward = pdpo_setting
    exact = ravel_pytree(checks.pdpo_exact(fam, params, ref, reward)[1])[0]
    errors = []
    for n in (10, 10_000):
        mean, terms = checks.importance_weighted_pdpo(fam, params, ref, reward, jax.random.PRNGKey(n), n)
        errors.append(float(jnp.linalg.norm(mean - exact)))
        stderr = np.sqrt(np.asarray(terms.var(0)) / n)
    assert errors[1] < errors[0]
    # unbiased: the large-sample estimate is within 5 standard errors, coordinate by coordinate
    assert np.all(np.abs(np.asarray(mean - exact)) < 5 * stderr + 1e-12)


def test_single_context_dpo_step_moves_only_two_logits():
    theta = jax.random.normal(jax.random.PRNGKey(2), (6,))
    new = checks.dpo_step_single_context(theta, chosen=1, rejected=4, beta=0.5, lr=0.3,
                                         ref_theta=jax.random.normal(jax.random.PRNGKey(3), (6,)))
    moved = np.flatnonzero(np.abs(np.asarray(new - theta)) > 1e-15)
    assert set(moved) == {1, 4}
    assert float((new - theta).sum()) == pytest.approx(0.0, abs=1e-15)
    assert float(new[1] - theta[1]) > 0 > float(new[4] - theta[4])
    # and the closed-form step equals autodiff of the loss on the softmax
    from gradlab.symbolic import numeric

    f = numeric(LOSSES["dpo"].expr, ["lp_w", "lp_l", "ref_w", "ref_l", "beta"], "jax")
    ref = jax.random.normal(jax.random.PRNGKey(3), (6,))
    g = jax.grad(lambda t: f(jax.nn.log_softmax(t)[1], jax.nn.log_softmax(t)[4],
                             jax.nn.log_softmax(ref)[1], jax.nn.log_softmax(ref)[4], 0.5))(theta)
    np.testing.assert_allclose(new, theta - 0.3 * g, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dpo_weight_at_initialisation_is_half_beta(family):
    from gradlab import symbolic

    fam = make_family(family, vocab=3, max_len=4)
    params = fam.init(jax.random.PRNGKey(5))
    e = fam.enumerate(params)
    lp = fam.logprob(params, e.seqs[:2], e.lengths[:2])  # policy == reference
    f = symbolic.numeric(symbolic.derivative("dpo", "lp_w"), ["lp_w", "lp_l", "ref_w", "ref_l", "beta"], "jax")
    for beta in (0.1, 0.7):
        assert float(f(lp[0], lp[1], lp[0], lp[1], beta)) == pytest.approx(-beta / 2, rel=1e-15)


def test_pair_expectation_is_exact_with_a_forced_stop(pdpo_setting):
    fam, params, ref, reward = pdpo_setting
    res = checks.pair_expectation(fam, params, ref, reward, values={"beta": 0.1})
    assert res.method == "exact" and res.value_se == 0.0 and not res.grad_se.any()
    assert res.mass == pytest.approx(1.0, abs=1e-12)  # every pair, stopped responses included
    J, grad, _ = checks.pdpo_exact(fam, params, ref, reward, 0.1)  # the proper loss J_PDPO
    assert res.value == pytest.approx(float(J), rel=1e-12)
    np.testing.assert_allclose(res.grad, ravel_pytree(grad)[0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method", ["score_function", "importance_weights"])
@pytest.mark.parametrize("score_term", [True, False])
def test_pair_expectation_estimates_are_unbiased(pdpo_setting, method, score_term):
    fam, params, ref, reward = pdpo_setting
    if method == "importance_weights":  # a policy near its reference, as in training: light-tailed weights
        params = jax.tree_util.tree_map(lambda p, r: r + 0.3 * (p - r), params, ref)
    exact = checks.pair_expectation(fam, params, ref, reward, score_term=score_term)
    est = checks.pair_expectation(fam, params, ref, reward, score_term=score_term, method=method, n=3000,
                                  key=jax.random.PRNGKey(3))
    assert est.method == method and est.pairs == 3000 and est.value_se > 0
    assert abs(est.value - exact.value) < 4 * est.value_se
    moving = est.grad_se > 0  # the unreachable state's row (after EOS) has no gradient at all
    np.testing.assert_array_equal(est.grad[~moving], 0.0)
    np.testing.assert_allclose(exact.grad[~moving], 0.0, atol=1e-15)
    z = np.abs(est.grad - exact.grad)[moving] / est.grad_se[moving]
    assert z.max() < 4.5, z  # each coordinate within 4.5 standard errors


def test_pair_expectation_on_unbounded_policies_is_estimated_or_refused():
    fam = make_family("bigram", vocab=3, max_len=None)
    params, ref = fam.init(jax.random.PRNGKey(0)), fam.init(jax.random.PRNGKey(1))
    reward = jnp.array([0.0, 1.0, -0.5])
    res = checks.pair_expectation(fam, params, ref, reward, n=500)
    assert res.method == "score_function" and np.isfinite(res.value) and res.value_se > 0
    assert np.isfinite(res.grad).all() and (res.grad_se > 0).sum() >= 9  # every reachable state's row
    with pytest.raises(DomainError, match="forced stop"):
        checks.pair_expectation(fam, params, ref, reward, method="exact")
    no_eos = {"W": params["W"].at[:, 0].set(-60.0)}  # P(EOS) ~ 1e-26: sampling whole responses is refused
    with pytest.raises(DomainError, match="too small"):
        checks.pair_expectation(fam, no_eos, ref, reward, n=10)
    forced = make_family("bigram", vocab=3, max_len=4)  # with a forced stop: exact, all mass accounted for
    res = checks.pair_expectation(forced, no_eos, ref, reward)
    assert res.method == "exact" and res.mass == pytest.approx(1.0, abs=1e-12) and np.isfinite(res.value)


def test_policy_variables_come_from_the_symbols():
    from gradlab.symbols import EXTRA

    assert checks.POLICY_VARS[:2] == ("lp_w", "lp_l")
    assert set(checks.POLICY_VARS[2:]) == {str(s) for s in EXTRA if not str(s).startswith("ref_")}


def test_float64_disagreements_near_a_gradient_zero_are_settled_exactly_and_wrong_forms_still_fail(monkeypatch):
    # EXO's gradient in the margin is sigma(m) sigma(-m) (m - log((1 - eps) / eps)): at m a hair
    # from its zero float64 cancellation decides the relative error, so such a point is
    # recomputed in 50 digits, where a right closed form agrees and a wrong one does not
    import math

    from gradlab import symbolic

    loss = symbolic.as_loss("exo_pair")
    variables, order = list(loss.variables), ["lp_w", "lp_l", "ref_w", "ref_l"]
    beta, eps = 0.1, 1e-3
    h = math.log((1 - eps) / eps) / beta * (1 + 1e-9)  # the margin h = (lp_w - ref_w) - (lp_l - ref_l)
    x = np.array([{"lp_w": -1.0, "lp_l": -1.0 - h, "ref_w": -1.0, "ref_l": -1.0}[v] for v in variables])
    hv = np.array([{"beta": beta, "label_smoothing": eps}[k] for k in loss.hyperparameters])
    jac = np.array([[1.0, 0.3], [-0.5, 1.0], [0.0, 0.0], [0.0, 0.0]])  # lp_w, lp_l move; the reference does not
    assert checks._settle(loss, variables, order, 2, x, hv, jac) < 1e-20
    right = symbolic.derivative

    def broken(expr, wrt, view="log"):  # a sign flipped in one partial
        d = right(expr, wrt, view)
        return -d if wrt == "lp_l" else d

    monkeypatch.setattr(symbolic, "derivative", broken)
    assert checks._settle(loss, variables, order, 2, x, hv, jac) > 1e-3


def test_the_default_check_matrix_passes():
    # what `gradlab check` runs with no arguments (it once failed on exo_pair x hidden_state by
    # float64 cancellation at a point near EXO's gradient zero)
    rows = checks.run_matrix()
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]


def test_losses_compiled_together_keep_their_own_rows(monkeypatch):
    # the loss programs are compiled a few to a program (_GROUP): a wrong closed form in one loss
    # must fail that loss's row and no other, in the first group and in a later one
    from gradlab import symbolic

    names = list(LOSSES)[: checks._GROUP + 3]
    broken = {names[2], names[checks._GROUP + 1]}
    real = symbolic.derivative

    def derivative(loss, v, view="log"):
        d = real(loss, v, view)
        return 1.01 * d if symbolic.as_loss(loss).name in broken and v == "lp_w" else d

    monkeypatch.setattr(symbolic, "derivative", derivative)
    rows = checks.check_family(names, "bigram", points=32, fd_points=8, vocab=3, max_len=3)
    assert [r.loss for r in rows] == names
    assert {r.loss for r in rows if not r.ok} == broken, rows
