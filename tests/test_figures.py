"""Figures: computed (not typed in), deterministic, and written atomically."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradlab import figures
from gradlab.figures import force_vs_length


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
    u, v = np.asarray(q.U), np.asarray(q.V)
    np.testing.assert_allclose(u, -v, rtol=1e-12)


def test_save_all_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    figures.save_all(a)
    figures.save_all(b)
    for path in a.iterdir():
        assert path.read_bytes() == (b / path.name).read_bytes(), path.name
    assert {p.name for p in a.iterdir()} == {f"{n}.{fmt}" for n in figures.FIGURES for fmt in figures.FORMATS} | {"README.md"}


def test_gallery_lists_every_figure(tmp_path):
    figures.save_all(tmp_path)
    text = (tmp_path / "README.md").read_text()
    for name in figures.FIGURES:
        assert f"({name}.png)" in text and figures.caption(name)[0] in text


def test_failed_run_leaves_previous_figures_intact(tmp_path, monkeypatch):
    figures.save_all(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    original = force_vs_length.make

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(force_vs_length, "make", broken)
    with pytest.raises(KeyboardInterrupt):
        figures.save_all(tmp_path)
    monkeypatch.setattr(force_vs_length, "make", original)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # nothing partial, nothing left over


def test_unknown_figure_name_is_refused_before_writing(tmp_path):
    from gradlab.errors import GradlabError

    with pytest.raises(GradlabError, match="the figures are"):
        figures.save_all(tmp_path, names=["gradient_field", "nope"])
    assert not list(tmp_path.iterdir())
