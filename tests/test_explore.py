"""The notebooks' views, driven through their callbacks as the controls would drive them."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from gradlab import explore
from gradlab.errors import GradlabError
from gradlab.losses import LOSSES


def test_posts_facts_all_hold():
    facts = explore.posts_facts()
    assert len(facts) >= 7 and all(ok for _, _, ok in facts)


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


def _recording_blitter(monkeypatch) -> tuple[list, list]:
    """Replace explore._Blitter by a subclass that records its instances and png() calls."""
    made, frames = [], []

    class Recording(explore._Blitter):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

        def png(self, *args, **kwargs) -> bytes:
            frames.append(args or kwargs)
            return super().png(*args, **kwargs)

    monkeypatch.setattr(explore, "_Blitter", Recording)
    return made, frames


def test_atlas_colourbar_cache_draws_the_same_pixels_as_a_full_redraw(monkeypatch):
    """The colourbars are restored from pixels kept per colour range; every frame must equal,
    pixel for pixel, the frame drawn with every artist redrawn (ticks and labels included)."""
    made, _ = _recording_blitter(monkeypatch)
    panel, update = explore.atlas_view("dpo")
    (blitter,) = made
    keys = []
    # large steps change the colour range (new colourbar ticks), the return trips reuse kept pixels
    for beta in (0.01, 0.05, 1.0, 5.0, 0.05, 1.0, 0.01):
        update(beta=beta)
        keys.append(tuple(key() for _, key in blitter.keyed))
        cached = blitter.rgba(use_cache=True).copy()
        full = blitter.rgba(use_cache=False).copy()
        assert np.array_equal(cached, full), f"beta = {beta}: the kept colourbar pixels differ from a redraw"
    assert len(set(keys)) >= 2, "the test must cross colour ranges"
    assert sum(len(r) for r in blitter._regions) < len(keys) * len(blitter.keyed), "nothing was reused"


def test_atlas_update_from_code_draws_once(monkeypatch):
    """A value off the slider's grid adds a slider position; that must not trigger a second
    redraw through the slider's observer."""
    _, frames = _recording_blitter(monkeypatch)
    panel, update = explore.atlas_view("dpo")
    frames.clear()
    update(beta=0.1234)  # off the grid: new options
    update(beta=0.5)  # on the grid
    assert len(frames) == 2
    panel.children[1].children[0].value = 0.2  # a person moving the slider still redraws
    assert len(frames) == 3


def test_atlas_dropdown_switches_loss():
    panel, update = explore.atlas_view("dpo")
    dropdown = panel.children[0]
    dropdown.value = "simpo"
    sliders = panel.children[1].children
    assert {s.description.split("(")[-1].rstrip(")") for s in sliders} == {"beta", "simpo_gamma"}


def _is_png(data) -> bool:
    return bytes(data).startswith(b"\x89PNG")


def test_length_entropy_displacement_views_drive_and_show_images():
    panel, update, train = explore.length_view(losses=("dpo", "simpo"))
    before = update()
    panel.children[1].value = -2.0  # the m slider
    after = bytes(panel.children[4].children[0].value)
    assert _is_png(after) and after != before  # the image widget follows the slider
    panel.children[2].children[1].value = 10  # steps
    assert _is_png(train()) and _is_png(panel.children[4].children[1].value)
    panel, update = explore.entropy_view()
    before = update()
    panel.children[0].value = 2.0
    assert _is_png(panel.children[2].value) and bytes(panel.children[2].value) != before
    panel, update = explore.displacement_view()
    panel.children[0].children[1].value = 10
    assert _is_png(panel.children[1].value)


def test_limit_view_slider_changes_the_image():
    panel, update = explore.limit_view()
    before = bytes(panel.children[1].value)
    panel.children[0].value = 0.5
    assert _is_png(before) and bytes(panel.children[1].value) != before


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_default_is_a_slider_position_and_scales_are_logarithmic(loss):
    obj = LOSSES[loss]
    for h in obj.hyperparameters:
        values = explore.slider_values(obj, h)
        default = float(obj.defaults[h])
        assert default in values  # reachable exactly, not 0.104 for 0.1
        assert all(obj.domain(h).contains(v) for v in values) and list(values) == sorted(set(values))
        assert all(len(f"{v:g}") <= 6 for v in values)  # readouts are short, exact numbers
        if obj.domain(h).low == 0 and obj.domain(h).low_open and obj.domain(h).high == math.inf:
            ratios = np.diff(np.log10(values))
            assert values[-1] / values[0] >= 1e3 and ratios.max() < 0.5  # log spacing over decades


def test_atlas_demo_call_moves_the_slider_and_lasts():
    panel, update = explore.atlas_view("dpo")
    slider = panel.children[1].children[0]
    assert slider.value == 0.1
    png = update(beta=0.5)
    assert slider.value == 0.5 and bytes(panel.children[3].value) == png
    update(beta=0.123)  # a value off the grid becomes a position
    assert slider.value == 0.123
    with pytest.raises(GradlabError, match="no hyperparameter"):
        update(gamma=1.0)


def test_custom_loss_view_reports_checks_and_scorecard():
    panel, analyse = explore.custom_loss_view("log(1 + exp(-beta*((lp_w - ref_w) - (lp_l - ref_l))))")
    result = analyse()
    assert "error" not in result, result["error"]
    assert all(r.ok for r in result["checks"])
    assert result["scorecard"]["force exponent s"] == pytest.approx(-0.9, abs=1e-6)
    # DPO written by hand at beta 0.1 gets the scorecard's own Adam drift number (one computation)
    from gradlab.experiments import named

    dpo = np.median(named.drift_factors(named.length_drift("dpo", "adam")))
    assert result["scorecard"]["length drift factor (Adam, median over seeds)"] == pytest.approx(dpo, rel=1e-9)
    assert _is_png(result["png"])
    panel.children[0].children[0].value = "__import__('os')"
    assert "error" in analyse()
    assert "Not accepted" in panel.children[2].value


def test_custom_loss_view_builds_a_control_per_hyperparameter_and_asks_for_missing_values():
    panel, analyse = explore.custom_loss_view("-logsigmoid(beta*(lp_w - lp_l) - simpo_gamma)")
    result = analyse()
    assert "error" not in result, result
    fields = {f.description.split("(")[-1].rstrip(")"): f for f in panel.children[1].children}
    assert set(fields) == {"beta", "simpo_gamma"}
    assert result["values"] == {"beta": 0.1, "simpo_gamma": float(LOSSES["simpo"].defaults["simpo_gamma"])}
    fields["simpo_gamma"].value = ""
    result = analyse()
    assert result["needs"] == ["beta", "simpo_gamma"] and "Enter a value for" in panel.children[2].value
    fields["simpo_gamma"].value = "-3"
    assert "error" in analyse() and "outside its range" in panel.children[2].value
    fields["simpo_gamma"].value = "0.7"
    first = analyse()
    assert first["values"]["simpo_gamma"] == 0.7


def test_custom_loss_view_escapes_what_it_displays():
    """A field value, and an error message quoting the formula, are shown as text, never as markup."""
    panel, analyse = explore.custom_loss_view("-logsigmoid(beta*(lp_w - lp_l) - simpo_gamma)")
    analyse()  # builds a control per hyperparameter
    fields = {f.description.split("(")[-1].rstrip(")"): f for f in panel.children[1].children}
    fields["simpo_gamma"].value = "<img src=x onerror=alert(1)>"
    assert "error" in analyse()
    shown = panel.children[2].value
    assert "&lt;img src=x onerror=alert(1)&gt;" in shown and "<img" not in shown
    assert shown.startswith("<b>Not accepted:</b>")  # the widget's own markup stays
    panel.children[0].children[0].value = "lp_w <b>"
    assert "error" in analyse()
    assert "<b>" not in panel.children[2].value.removeprefix("<b>Not accepted:</b>")


def test_custom_loss_view_shows_any_failure_as_a_message(monkeypatch):
    from gradlab import losses

    panel, analyse = explore.custom_loss_view("softplus(-beta*(lp_w - lp_l))")
    monkeypatch.setattr(losses, "custom", lambda *a, **k: 1 / 0)
    result = analyse()
    assert "ZeroDivisionError" in result["error"] and "could not analyse" in panel.children[2].value
