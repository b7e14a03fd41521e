"""Figures: computed (not typed in), deterministic, and written atomically."""

from __future__ import annotations

import io
import math

import matplotlib
import numpy as np
import pytest

from gradlab import figures
from gradlab.figures import displacement, entropy, force_vs_length, length_drift, proper_loss, scorecard
from gradlab.losses import LOSSES

QUICK = ["gradient_field", "force_vs_length", "length_force", "gradient_atlas"]


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    with matplotlib.rc_context(figures.STYLE):
        fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def test_force_curve_is_the_closed_form():
    # hand-derived reference (posts.md): force = beta sigma(0) exp(-L m) when z = 0
    lengths = np.arange(1, 60)
    for m, beta in [(-1.0, 0.1), (-0.5, 1.0)]:
        got = force_vs_length.log10_force(lengths, m, beta)
        expected = np.log10(beta / 2) - lengths * m / math.log(10)
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_force_figure_plots_what_it_computes():
    fig = figures.make("force_vs_length", ms=(-1.0,), betas=(0.1,), max_length=100)
    (line,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("m =")]
    x, y = line.get_data()
    assert y[list(x).index(100)] == pytest.approx(42.0, abs=0.5)  # posts.md: about 1e42 at L = 100


def test_gradient_field_log_view_arrows_are_diagonal():
    # in the log view the two partials of gdpo are equal and opposite: every arrow is at -45 deg
    fig = figures.make("gradient_field", n=6)
    q = fig.axes[1].collections[0]
    np.testing.assert_allclose(np.asarray(q.U), -np.asarray(q.V), rtol=1e-12)


def test_logit_view_conserves_probability_mass():
    from gradlab.figures.gradient_atlas import logit_velocity

    pw, pl = np.array([0.2, 0.5]), np.array([0.3, 0.1])
    dw, dl = logit_velocity("dpo", pw, pl)
    assert np.all(dw > 0) and np.all(dl < 0)  # DPO raises the chosen and lowers the rejected


def test_length_force_normalised_losses_have_a_flat_per_token_lever():
    from gradlab.figures.length_force import _curve

    lengths = np.arange(1, 50)
    flat = _curve("sigmoid_norm", "m_l", "length", lengths, -1.0)
    rising = _curve("dpo", "m_l", "length", lengths, -1.0)
    assert np.ptp(flat) < 1e-12 and np.all(np.diff(rising) > 0)


def test_quick_figures_are_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    figures.save_all(a, names=QUICK)
    figures.save_all(b, names=QUICK)
    for path in a.iterdir():
        assert path.read_bytes() == (b / path.name).read_bytes(), path.name
    expected = {f"{n}.{fmt}" for n in QUICK for fmt in figures.FORMATS} | {"README.md"}
    assert {p.name for p in a.iterdir()} == expected


@pytest.mark.parametrize(
    "module, kwargs",
    [
        (length_drift, dict(losses=("dpo", "simpo"), families=("unigram",), steps=6, seeds=2)),
        (entropy, dict(steps=20)),
        (displacement, dict(losses=("dpo",), steps=6, seeds=2)),
        (proper_loss, dict(steps=6)),
        (scorecard, dict(steps=6, seeds=1, losses=("dpo", "simpo", "hinge"))),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_simulated_figures_render_deterministically(module, kwargs):
    first = png_bytes(module.make(module.compute(**kwargs)))
    second = png_bytes(module.make(module.compute(**kwargs)))
    assert first == second


def test_scorecard_markdown_reports_the_computed_numbers():
    data = scorecard.compute(steps=6, seeds=1, losses=("dpo", "simpo"))
    text = scorecard.markdown(data)
    for name, (s, drift, dlp, ent) in data.items():
        assert f"| `{name}` | {s:.3f} |" in text and f"{drift:.3f}" in text
    # DPO's force exponent is beta - 1 (posts.md), simpo's is bounded
    assert data["dpo"][0] == pytest.approx(0.1 - 1, abs=1e-6)
    assert data["simpo"][0] >= 0
    assert "| `dpo` | -0.900 | diverges |" in text


def test_scorecard_defaults_to_every_loss(monkeypatch):
    class Stop(Exception):
        pass

    seen = []

    def fake_simulate(name, *args, **kwargs):
        seen.append(name)
        if len(seen) == len(LOSSES):
            raise Stop
        return _tiny_simulation()

    monkeypatch.setattr(scorecard.dynamics, "simulate", fake_simulate)
    monkeypatch.setattr(scorecard, "force_exponent", lambda name: 0.0)
    with pytest.raises(Stop):
        scorecard.compute()
    assert seen == list(LOSSES)


def _tiny_simulation():
    from gradlab import dynamics

    metrics = {k: np.ones((2, 1, 1)) for k in dynamics.METRICS}
    return dynamics.Simulation("x", "unigram", "equal_length", np.arange(2), metrics, [{}], 1)


def test_gallery_lists_every_figure():
    text = figures.gallery()
    for name in figures.FIGURES:
        assert f"({name}.png)" in text and figures.caption(name)[0] in text
    assert "(scorecard.md)" in text


def test_failed_run_leaves_previous_figures_intact(tmp_path, monkeypatch):
    names = ["gradient_field", "force_vs_length"]
    figures.save_all(tmp_path, names=names)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(force_vs_length, "make", broken)
    with pytest.raises(KeyboardInterrupt):
        figures.save_all(tmp_path, names=names)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # nothing partial, nothing left over


def test_unknown_figure_name_is_refused_before_writing(tmp_path):
    from gradlab.errors import GradlabError

    with pytest.raises(GradlabError, match="the figures are"):
        figures.save_all(tmp_path, names=["gradient_field", "nope"])
    assert not list(tmp_path.iterdir())
