"""The notebooks' views, driven through their callbacks as the controls would drive them."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

from gradlab import explore


def _render(fig) -> None:
    fig.savefig(io.BytesIO(), format="png")


def test_posts_facts_all_hold():
    facts = explore.posts_facts()
    assert len(facts) >= 7 and all(ok for _, _, ok in facts)


def test_field_functions_match_the_derivative_and_take_hyperparameters():
    f = explore.field_functions("dpo", "log")
    x, y = np.array([-1.0, -2.0]), np.array([-1.5, -0.5])
    gx, gy = f(x, y, {"beta": 0.7})
    np.testing.assert_allclose(gx, -gy)
    gx2, _ = f(x, y, {"beta": 0.1})
    assert not np.allclose(gx, gx2)


def test_atlas_view_updates_without_symbolic_work(monkeypatch):
    panel, update = explore.atlas_view("ipo")
    import sympy

    monkeypatch.setattr(sympy, "diff", lambda *a, **k: pytest.fail("a slider did symbolic work"))
    monkeypatch.setattr(sympy, "lambdify", lambda *a, **k: pytest.fail("a slider recompiled"))
    start = time.perf_counter()
    images = [update(beta=beta) for beta in (0.2, 0.4, 0.8)]
    print(f"atlas slider update incl. PNG: {(time.perf_counter() - start) / 3 * 1e3:.1f} ms")
    assert all(img.startswith(b"\x89PNG") for img in images)
    assert images[0] != images[2]  # the picture follows the slider
    assert bytes(panel.children[3].value) == images[-1]  # and the Image widget shows it


def test_atlas_dropdown_switches_loss():
    panel, update = explore.atlas_view("dpo")
    dropdown = panel.children[0]
    dropdown.value = "simpo"
    sliders = panel.children[1].children
    assert {s.description for s in sliders} == {"beta", "simpo_gamma"}


def test_length_entropy_displacement_views_drive():
    panel, update, train = explore.length_view(losses=("dpo", "simpo"))
    panel.children[1].value = -2.0  # the m slider
    _render(update())
    panel.children[2].children[1].value = 10  # steps
    _render(train())
    panel, update = explore.entropy_view()
    panel.children[0].value = 2.0
    _render(update())
    panel, update = explore.displacement_view()
    panel.children[0].children[1].value = 10
    _render(update())


def test_custom_loss_view_reports_checks_and_scorecard():
    panel, analyse = explore.custom_loss_view("log(1 + exp(-beta*((lp_w - ref_w) - (lp_l - ref_l))))")
    result = analyse()
    assert all(r.ok for r in result["checks"])
    assert result["scorecard"]["force exponent s"] == pytest.approx(-0.9, abs=1e-6)
    panel.children[0].children[0].value = "__import__('os')"
    assert "error" in analyse()
