"""Figures: computed (not typed in), deterministic, and written atomically."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from gradlab import figures
from gradlab.figures import displacement, entropy, force_vs_length, length_drift, proper_loss, scorecard
from gradlab.errors import GradlabError
from gradlab.losses import LOSSES

QUICK = ["gradient_field", "force_vs_length", "length_force", "gradient_atlas"]
ROOT = Path(__file__).resolve().parents[1]


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
    (line,) = [ln for ln in fig.axes[0].get_lines() if "m = " in ln.get_label()]
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


def test_quick_figures_are_deterministic_in_every_size_and_format(tmp_path):
    names = ["gradient_field"]
    a, b = tmp_path / "a", tmp_path / "b"
    figures.save_all(a, names=names)
    figures.save_all(b, names=names)
    for path in a.iterdir():
        assert path.read_bytes() == (b / path.name).read_bytes(), path.name
    expected = {f"{n}{'' if size == 'page' else '-' + size}.{fmt}"
                for n in names for size in figures.SIZES for fmt in figures.FORMATS}
    assert {p.name for p in a.iterdir()} == expected | {"README.md", figures.MANIFEST}


def test_sizes_are_a_column_and_a_page_wide():
    from gradlab.figures import style

    for size, width in (("column", 3.3), ("page", 6.8)):
        fig = figures.make("gradient_field", size=size, n=5)
        assert fig.get_size_inches()[0] == pytest.approx(width) == style.SIZES[size]
    with pytest.raises(GradlabError, match="sizes are"):
        figures.save_all("unused-folder", names=["gradient_field"], sizes=["poster"])


def test_svg_keeps_text_as_text_and_pdf_embeds_its_fonts():
    fig = figures.make("gradient_field", n=5)
    with figures._style().use("page"):
        svg = figures._render(fig, "svg").decode()
        pdf = figures._render(fig, "pdf")
    assert "<text" in svg and "where the loss pushes" in svg  # a searchable, editable title
    assert "<dc:date>" not in svg
    assert b"/FontFile2" in pdf  # TrueType fonts embedded (pdf.fonttype 42), no Type 3 glyphs
    assert b"/CreationDate" not in pdf and b"/Producer" not in pdf


def test_probability_panels_stop_at_the_simplex_and_colourbars_span_whole_decades():
    fig = figures.make("gradient_field", n=9)
    q = fig.axes[0].collections[0]
    xy = np.asarray(q.get_offsets())
    drawn = np.isfinite(xy).all(axis=1)
    assert (~drawn).any() and np.all(xy[drawn].sum(axis=1) <= 1 + 1e-12)  # nothing where pi_w + pi_l > 1
    lo, hi = q.get_clim()
    assert hi - lo >= 1 and (2 * lo).is_integer() and (2 * hi).is_integer()


def test_no_float_noise_in_numbers():
    from gradlab.figures import style

    assert style.number(0.1) == "0.1" and style.number(2.0) == "2" and style.number(0.1 + 0.2) == "0.3"
    assert style.number(5.6e-16) == "5.6e-16"


def test_display_names_and_mathtext_labels():
    from gradlab.figures import style

    assert style.display_name("dpo") == "DPO" and style.display_name("ipo_trl") == "IPO (TRL)"
    assert style.display_name("simpo") == "SimPO"
    assert style.hyper_label("beta") == r"$\beta$" and style.hyper_label("label_smoothing") == r"$\epsilon$"
    fig = figures.make("gradient_atlas", losses=("dpo",), n=5)
    titles = [ax.get_title() for ax in fig.axes]
    assert any(t.startswith("DPO") for t in titles) and not any("dpo" in t for t in titles)
    assert any(r"\pi(y_w)" in ax.get_xlabel() for ax in fig.axes)


def test_a_figure_redraws_for_user_chosen_losses_and_hyperparameters():
    default = figures.make("gradient_atlas", losses=("simpo",), n=5)
    changed = figures.make("gradient_atlas", losses=("simpo",), n=5, values={"simpo_gamma": 2.0})
    # arrows are unit vectors; the colour (log10 speed) carries the hyperparameter's effect
    c0 = np.ma.filled(default.axes[0].collections[0].get_array(), np.nan)
    c1 = np.ma.filled(changed.axes[0].collections[0].get_array(), np.nan)
    assert not np.allclose(np.nan_to_num(c0), np.nan_to_num(c1))  # the hyperparameter reached the figure
    with pytest.raises(GradlabError, match="no drawn loss has"):
        figures.make("gradient_atlas", losses=("dpo",), n=5, values={"simpo_gamma": 2.0})


def test_cli_redraws_a_figure_for_a_chosen_loss(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "mine"
    run = subprocess.run([sys.executable, "-m", "gradlab", "figures", "gradient_field", "--loss", "dpo",
                          "--set", "beta=0.5", "--size", "column", "--format", "png", "--out", str(out), "--quiet"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(["gradient_field-column.png", "README.md", figures.MANIFEST])
    run = subprocess.run([sys.executable, "-m", "gradlab", "figures", "entropy", "--loss", "dpo", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "draws fixed losses" in run.stderr


def test_output_folder_safety(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad, why in (("", "empty"), (".", "current directory"), ("./", "current directory")):
        with pytest.raises(GradlabError, match=why):
            figures.save_all(bad, names=["gradient_field"])
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text("[project]\n")
    with pytest.raises(GradlabError, match="project root"):
        figures.save_all(project, names=["gradient_field"])
    foreign = tmp_path / "mixed"
    foreign.mkdir()
    (foreign / "README.md").write_text("my own readme\n")
    with pytest.raises(GradlabError, match="did not write.*README.md"):
        figures.save_all(foreign, names=["gradient_field"])
    assert (foreign / "README.md").read_text() == "my own readme\n"  # untouched
    not_folder = tmp_path / "file.txt"
    not_folder.write_text("x")
    with pytest.raises(GradlabError, match="not a folder"):
        figures.save_all(not_folder, names=["gradient_field"])


def test_gradlab_rewrites_its_own_folder_and_refuses_a_planted_file(tmp_path):
    out = tmp_path / "figs"
    figures.save_all(out, names=["gradient_field"], sizes=["column"], formats=["png"])
    figures.save_all(out, names=["gradient_field"], sizes=["column"], formats=["png"])  # its own files: fine
    (out / "notes.txt").write_text("mine")
    with pytest.raises(GradlabError, match="notes.txt"):
        figures.save_all(out, names=["gradient_field"], sizes=["column"], formats=["png"])
    (out / "notes.txt").unlink()
    (out / figures.MANIFEST).write_text("{not json")
    with pytest.raises(GradlabError, match="not a gradlab manifest"):
        figures.save_all(out, names=["gradient_field"], sizes=["column"], formats=["png"])


def test_gallery_links_only_to_files_that_exist(tmp_path):
    import re

    figures.save_all(tmp_path, names=["gradient_field"], sizes=["page"], formats=["png", "pdf"])
    text = (tmp_path / "README.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links and all((tmp_path / link).exists() for link in links), links
    assert "force_vs_length" not in text


def test_committed_figures_folder_is_owned_by_gradlab():
    folder, owned = figures.check_output_folder(ROOT / "figures")
    assert "README.md" in owned


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
    for name, (s, drift, _dlp, _ent) in data.items():
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


def test_gallery_lists_every_figure_when_not_restricted_to_a_folder():
    text = figures.gallery()
    for name in figures.FIGURES:
        assert f"({name}.png)" in text and figures.caption(name)[0] in text
    assert "(scorecard.md)" in text


def test_failed_run_leaves_previous_figures_intact(tmp_path, monkeypatch):
    names = ["gradient_field", "force_vs_length"]
    quick = dict(sizes=["column"], formats=["png", "svg"])
    figures.save_all(tmp_path, names=names, **quick)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(force_vs_length, "make", broken)
    with pytest.raises(KeyboardInterrupt):
        figures.save_all(tmp_path, names=names, **quick)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # nothing partial, nothing left over


def test_unknown_figure_name_is_refused_before_writing(tmp_path):
    from gradlab.errors import GradlabError

    with pytest.raises(GradlabError, match="the figures are"):
        figures.save_all(tmp_path, names=["gradient_field", "nope"])
    assert not list(tmp_path.iterdir())


def test_figures_rendered_in_processes_are_the_same_files(tmp_path):
    from gradlab.errors import GradlabError

    names = ["gradient_field", "force_vs_length"]
    quick = dict(sizes=["column"], formats=["png", "svg"])
    one, two = tmp_path / "one", tmp_path / "two"
    figures.save_all(one, names=names, **quick)
    figures.save_all(two, names=names, jobs=2, **quick)
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()}
    for path in one.iterdir():
        assert path.read_bytes() == (two / path.name).read_bytes(), path.name
    for bad in (0, 1.5, True):
        with pytest.raises(GradlabError, match="jobs"):
            figures.save_all(tmp_path / "bad", names=names, jobs=bad, **quick)
    assert not (tmp_path / "bad").exists()
