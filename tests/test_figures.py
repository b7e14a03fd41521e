"""Figures: computed (not typed in), deterministic, and written atomically."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from gradlab import figures
from gradlab.figures import (displacement, entropy, force_vs_length, gradient_field, length_drift, proper_loss,
                             scorecard)
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
    # hand-derived reference (docs/background.md): force = beta sigma(0) exp(-L m) when z = 0
    lengths = np.arange(1, 60)
    for m, beta in [(-1.0, 0.1), (-0.5, 1.0)]:
        got = force_vs_length.log10_force(lengths, m, beta)
        expected = np.log10(beta / 2) - lengths * m / math.log(10)
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_force_figure_plots_what_it_computes():
    fig = figures.make("force_vs_length", ms=(-1.0,), betas=(0.1,), max_length=100)
    (line,) = [ln for ln in fig.axes[0].get_lines() if "m = " in ln.get_label()]
    x, y = line.get_data()
    assert y[list(x).index(100)] == pytest.approx(42.0, abs=0.5)  # docs/background.md: about 1e42 at L = 100


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


@pytest.fixture(scope="module")
def drawn_twice(tmp_path_factory):
    """gradient_field at every size and in every format, drawn into a new folder and then again
    into the same folder: ``(first, second)``, each ``{file name: bytes}``. The writer replaces
    every file it is given (gradlab.output), so the second drawing's bytes are what it rendered."""
    folder = tmp_path_factory.mktemp("drawn_twice")
    figures.save_all(folder, names=["gradient_field"])
    first = {p.name: p.read_bytes() for p in folder.iterdir()}
    figures.save_all(folder, names=["gradient_field"])
    return first, {p.name: p.read_bytes() for p in folder.iterdir()}


def test_quick_figures_are_deterministic_in_every_size_and_format(drawn_twice):
    first, second = drawn_twice
    assert second == first
    expected = {f"gradient_field{'' if size == 'page' else '-' + size}.{fmt}"
                for size in figures.SIZES for fmt in figures.FORMATS}
    assert set(first) == expected | {"README.md", figures.MANIFEST}


def test_regenerating_a_figure_leaves_its_svg_and_pdf_byte_identical(drawn_twice):
    # no dates, no producer, and SVG ids from a fixed salt (matplotlib's default salt is random
    # per file, so two renders in one process would differ without it)
    first, second = drawn_twice
    for name in ("gradient_field-column.svg", "gradient_field-column.pdf", "gradient_field.svg",
                 "gradient_field.pdf"):
        assert second[name] == first[name], name
    svg, pdf = first["gradient_field-column.svg"], first["gradient_field-column.pdf"]
    assert b"<dc:date>" not in svg and b"CreationDate" not in pdf and b"ModDate" not in pdf
    fig = figures.make("gradient_field", size="column", n=5)
    figures._render(fig, "png")
    figures._freeze_layout(fig)  # as save_all does: the layout is drawn once, not again per file

    def plain_svg() -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
        return buf.getvalue()

    with matplotlib.rc_context({"svg.hashsalt": None}):
        assert plain_svg() != plain_svg()  # the control: matplotlib's random salt changes the ids
        assert figures._render(fig, "svg") == figures._render(fig, "svg")  # the writer fixes it


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


def test_cli_redraws_a_figure_for_a_chosen_loss(tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "mine"
    run = subprocess.run([sys.executable, "-m", "gradlab", "figures", "gradient_field", "--loss", "dpo",
                          "--set", "beta=0.5", "--size", "column", "--format", "png", "--out", str(out), "--quiet"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(["gradient_field-column.png", "README.md", figures.MANIFEST])
    # the refusal, in process: the same command line, without a second interpreter's imports
    from gradlab.cli import main

    assert main(["figures", "entropy", "--loss", "dpo", "--out", str(out)]) == 2
    assert "draws fixed losses" in capsys.readouterr().err


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


@pytest.mark.parametrize("folder, shared", [("figures", False), ("figures/reproductions", False), ("docs", True)])
def test_committed_output_folders_are_vouched_for_by_their_manifests(folder, shared):
    # every file the manifest lists still has the content whose hash it recorded; if this fails
    # after a merge changed generated files, regenerate them (or output.adopt the merged ones)
    from gradlab import output

    listed = json.loads((ROOT / folder / figures.MANIFEST).read_text())["files"]
    vouched = output.Folder(ROOT / folder, shared=shared).files()
    assert vouched == listed and len(vouched) >= 4


@pytest.mark.parametrize(
    "module, kwargs",
    [
        (length_drift, dict(losses=("dpo", "simpo"), steps=6, seeds=2, controls=False)),
        (entropy, dict(steps=20)),
        (displacement, dict(draws=40, steps=10)),
        (proper_loss, dict(steps=6)),
        (scorecard, dict(steps=6, seeds=1, losses=("dpo", "simpo", "hinge"))),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_simulated_figures_render_deterministically(module, kwargs):
    first = png_bytes(module.make(module.compute(**kwargs)))
    second = png_bytes(module.make(module.compute(**kwargs)))
    assert first == second


# --------------------------------------------------------------------------------------------
# The redrawn figures (issue 14): every claim a caption makes is checked on the computed numbers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drift_data():
    """length_drift at its full setting (300 steps, 8 seeds) for DPO and the controls."""
    return length_drift.compute(losses=("dpo",))


def test_length_drift_is_untruncated_exact_and_starts_at_the_data_mean():
    from gradlab import experiments
    from gradlab.experiments import named

    cfg = named.length_drift_config("dpo", "adam", steps=100, seeds=2)
    assert cfg["policy"]["max_len"] == "none"
    cfg["train"]["metrics"] = [*cfg["train"]["metrics"], "params"]
    result = experiments.run(cfg)
    theta = result.series("params.theta")
    el = result.series("expected_length")
    p_eos = np.exp(theta[..., 0]) / np.exp(theta).sum(-1)
    np.testing.assert_allclose(el, 1.0 / p_eos, rtol=1e-12)  # the geometric mean length, nothing cut off
    np.testing.assert_allclose(el[:, 0], 4.0, rtol=1e-12)  # uniform start over EOS + 3 tokens
    assert el.max() > 6  # past the old figure's cut-off: the ceiling is gone


def test_length_drift_draws_the_computed_medians_ranges_and_factors(drift_data):
    from gradlab.experiments import named

    fig = length_drift.make(drift_data)
    assert len(fig.axes) == 2 and all(ax.get_yscale() == "log" for ax in fig.axes)
    for ax, opt in zip(fig.axes, named.OPTIMIZERS, strict=True):
        assert ("gradient descent" if opt == "sgd" else "Adam") in ax.get_title()
        for label in ("dpo", *length_drift.CONTROLS):
            at, el, factor = drift_data["runs"][(opt, label)]
            np.testing.assert_allclose(factor, el[:, -1] / el[:, 0])
            name = length_drift.CONTROLS.get(label, "DPO")
            (line,) = [ln for ln in ax.get_lines() if ln.get_label().startswith(name + " (")]
            np.testing.assert_allclose(line.get_ydata(), np.median(el, 0))
            assert named.spread_text(factor, seeds=False) in line.get_label()


def test_length_drift_redraws_every_run_at_a_chosen_beta():
    data = length_drift.compute(losses=("dpo",), steps=4, seeds=1, values={"beta": 0.5})
    assert data["beta"] == 0.5
    fig = length_drift.make(data)
    assert all(r"\beta=0.5" in ax.get_legend().get_title().get_text() for ax in fig.axes)
    default = length_drift.compute(losses=("dpo",), steps=4, seeds=1)
    for key in default["runs"]:  # the controls are DPO too: the chosen beta reaches them as well
        assert not np.allclose(default["runs"][key][1], data["runs"][key][1]), key


def test_length_drift_caption_claims_hold(drift_data):
    runs = drift_data["runs"]
    dpo_sgd, dpo_adam = (np.median(runs[(o, "dpo")][2]) for o in ("sgd", "adam"))
    assert dpo_sgd > 1.1 and dpo_adam > 1.1  # DPO lengthens under both optimisers
    assert dpo_adam > 10 * dpo_sgd  # "the optimiser changes the answer by orders of magnitude"
    assert np.median(runs[("adam", "no_preference")][2]) > 2  # "under Adam even the no-preference control drifts"
    assert np.median(runs[("sgd", "same_length")][2]) > 1.1  # equal lengths in every pair: DPO still lengthens


def test_length_drift_experiment_files_are_the_named_setting():
    from gradlab.experiments import load, named, resolved

    for opt in named.OPTIMIZERS:
        cfg = named.length_drift_config("dpo", opt)
        cfg["sweep"] = {"loss.name": list(length_drift.LOSSES)}
        assert resolved(load(ROOT / "experiments" / f"length_pathology_{opt}.toml")) == resolved(load(cfg))
    assert resolved(load(ROOT / "experiments" / "proper_loss.toml")) == resolved(load(named.proper_loss_config()))


def test_scorecard_force_exponent_is_compared_at_equal_beta():
    # closed form (docs/background.md): |dl/dpi(y_l)| ~ pi(y_l)^(beta - 1) for DPO; SimPO at length 1 likewise
    for loss in ("dpo", "simpo"):
        got = scorecard.force_exponents(loss, (0.1, 0.5, 2.0))
        for beta, s in got.items():
            assert s == pytest.approx(beta - 1, abs=1e-6), (loss, beta)
    assert list(scorecard.force_exponents("sft")) == [None]  # no beta: one value


def test_scorecard_reports_spread_legends_and_the_length_drift_computation():
    from gradlab.experiments import named

    data = scorecard.compute(steps=20, seeds=2, losses=("dpo", "sft"), betas=(0.1, 2.0))
    text = scorecard.markdown(data)
    for row in data["rows"].values():
        for opt in named.OPTIMIZERS:
            assert named.spread_text(row["drift"][opt], seeds=False) in text  # median [min, max], not 3 decimals
    # one computation: the scorecard's drift is the length_drift figure's
    same = length_drift.compute(losses=("dpo",), steps=20, seeds=2, controls=False)
    for opt in named.OPTIMIZERS:
        np.testing.assert_array_equal(data["rows"]["dpo"]["drift"][opt], same["runs"][(opt, "dpo")][2])
    fig = scorecard.make(data)
    assert all(ax.get_legend() is not None for ax in fig.axes)  # a legend for every encoding
    meds = [np.median(data["rows"][n]["drift"]["sgd"]) for n in data["rows"]]
    drawn = fig.axes[1].containers[0][0].get_xdata()  # the errorbar's median markers
    np.testing.assert_allclose(drawn, meds)


def test_scorecard_says_diverged_instead_of_drawing_nan():
    from gradlab.experiments import named

    rows = {"dpo": {"force": {0.1: -0.9}, "drift": {o: np.array([2.0, np.nan]) for o in named.OPTIMIZERS},
                    "dlp_w": {o: np.array([-1.0, -2.0]) for o in named.OPTIMIZERS}}}
    data = {"rows": rows, "control": {o: np.array([1.0, 1.2]) for o in named.OPTIMIZERS}, "steps": 5, "seeds": 2}
    text = scorecard.markdown(data)
    assert "diverged in 1 of 2 seeds" in text and "nan" not in text.lower()
    fig = scorecard.make(data)
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert "diverged" in labels


@pytest.fixture(scope="module")
def displacement_data():
    return displacement.compute()


def test_displacement_caption_claims_hold(displacement_data):
    m = displacement.summary(displacement_data)
    assert m["sign_agreement"] >= 0.99 and 0 < m["holds"] < 1  # the condition decides the first step; both cases
    assert m["control_holds"] == 0 and m["control_displaced"] == 0
    assert m["final_below_given_holds"] == 1.0  # where it holds, the chosen keeps falling
    assert 0 < m["final_below_given_fails"] < 0.5  # where it failed, some draws end lower later
    # the tension: mean probability keeps rising while the mean log-prob turns and falls
    mean_p = np.exp(displacement_data["lp_w"]).mean(0)
    assert np.all(np.diff(mean_p) > 0)
    assert m["mean_lp_end"] < m["mean_lp_peak"] and m["peak_step"] < displacement_data["steps"][-1]
    # ... because of a heavy lower tail: the median draw gains more than the mean, some lose tens of nats
    assert m["median_change_end"] > 0 and m["min_change_end"] < -10
    change = displacement_data["lp_w"][:, -1] - displacement_data["lp_w"][:, 0]
    assert np.median(change) > change.mean()
    fig = displacement.make(displacement_data)
    assert f"{m['sign_agreement']:.1%}" in fig.axes[0].get_title()


def test_displacement_trainer_agrees_with_the_experiment_runner():
    """The figure's vmapped trainer (kept beside the runner: one W per draw) against the runner's
    training of the same draws, and the one-step change against a step taken by the runner."""
    from gradlab.experiments.runner import run_many
    from gradlab.reproduce.displacement import razin_config

    d = displacement.razin_draws(3)
    at, lp_w, lp_l = displacement.train(d["W"], d["h"], d["zp"], d["zm"], steps=20, every=5)
    results = run_many([razin_config(d["W"][i], d["h"][i], d["zp"][i], d["zm"][i], steps=20, every=5)
                        for i in range(3)])
    for i, r in enumerate(results):
        assert r.runs[0].steps == at.tolist()
        np.testing.assert_allclose(r.series("lp_w")[0, :, 0], lp_w[i], rtol=1e-10)
        np.testing.assert_allclose(r.series("lp_l")[0, :, 0], lp_l[i], rtol=1e-10)
    one = run_many([razin_config(d["W"][i], d["h"][i], d["zp"][i], d["zm"][i], steps=1, lr=displacement.ETA,
                                 every=1) for i in range(3)])
    runner_d_w = np.array([r.series("lp_w")[0, 1, 0] - r.series("lp_w")[0, 0, 0] for r in one])
    np.testing.assert_allclose(d["d_w"], runner_d_w, rtol=1e-6)  # a difference of two log-probs ~1e-4 apart


@pytest.fixture(scope="module")
def proper_data():
    return proper_loss.compute()


def test_proper_loss_has_no_leak_and_its_claims_hold(proper_data):
    runs = proper_data["runs"]
    assert len(proper_data["reward"]) == 31
    for run in runs.values():
        assert run["final"].sum() == pytest.approx(1.0, abs=1e-12)  # every response, nothing renormalised
    best = int(np.argmax(proper_data["reward"]))
    for name in ("offline_dpo", "on_policy_dpo"):
        assert runs[name]["final"][best] > 0.99  # DPO piles the mass on the best (stopped) response
    assert runs["proper"]["final"].max() < 0.9  # the proper loss keeps a spread
    assert runs["proper"]["expected_reward"][-1] > runs["proper"]["expected_reward"][0]
    fig = proper_loss.make(proper_data)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    for name, run in runs.items():
        assert f"{proper_loss.LABELS[name]}: {run['expected_reward'][-1]:.2f}" in labels


def test_every_image_link_points_to_a_file_the_main_command_produces():
    import importlib.util
    import re

    from gradlab.reproduce import docs as reproduce_docs

    produced = {(ROOT / "figures" / f).resolve() for f in figures.produced_files()}
    produced |= {(ROOT / reproduce_docs.FIGURE_DIR / f).resolve() for f in reproduce_docs.produced_files()}
    pages = [*ROOT.glob("docs/*.md"), ROOT / "figures" / "README.md", ROOT / "README.md"]
    links = 0
    for page in pages:
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text("utf-8")):
            links += 1
            assert (page.parent / target).resolve() in produced, f"{page.name} links {target}"
    assert links > 17
    # the main command (tasks.py figures) runs both writers into those folders
    spec = importlib.util.spec_from_file_location("gradlab_tasks", ROOT / "tasks.py")
    tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tasks)
    commands = [list(map(str, cmd)) for cmd in tasks.FIGURES_AFTER]
    assert any("gradlab.reproduce.docs" in c and reproduce_docs.FIGURE_DIR in c for c in commands)


def test_reproduction_figures_share_the_figures_folder_safely(tmp_path):
    from gradlab.output import write_files

    figures.save_all(tmp_path, names=["gradient_field"], sizes=["column"], formats=["png"])
    write_files(tmp_path / "reproductions", {"x.png": b"1"})
    figures.save_all(tmp_path, names=["gradient_field"], sizes=["column"], formats=["png"])  # not refused
    (tmp_path / "stranger").mkdir()
    with pytest.raises(GradlabError, match="did not write"):
        figures.save_all(tmp_path, names=["gradient_field"], sizes=["column"], formats=["png"])
    with pytest.raises(GradlabError, match="plain file name"):
        write_files(tmp_path / "reproductions", {"../y.png": b"1"})


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


def test_scorecard_defaults_to_every_loss(monkeypatch):
    from gradlab.experiments import named

    class Fake:
        runs = [type("Run", (), {"diverged": None})()] * 2  # two seeds, neither diverged

        def series(self, name):
            return np.ones((2, 3)) if name == "expected_length" else np.ones((2, 3, 4))

    seen = []
    monkeypatch.setattr(named, "length_drift_runs", lambda specs: seen.extend(s["loss"] for s in specs)
                        or [Fake() for _ in specs])
    monkeypatch.setattr(scorecard, "force_exponents", lambda name, betas=(): {None: 0.0})
    data = scorecard.compute()
    assert list(data["rows"]) == list(LOSSES)
    assert seen[: 2 * len(LOSSES)] == [n for n in LOSSES for _ in named.OPTIMIZERS]


@pytest.mark.long(seconds=10)
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



# --------------------------------------------------------------------------------------------
# Paper fixes (issue 29): legends off the data, no hidden lines, captions from what was drawn
# --------------------------------------------------------------------------------------------


def _data_under_legends(fig) -> list[str]:
    """The labels of lines with a drawn vertex under a legend of the same figure (display
    coordinates, after a layout pass)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()  # a bare Figure's canvas does not lay out
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    covered = []
    for legend in legends:
        box = legend.get_window_extent()
        for ax in fig.axes:
            for line in ax.get_lines():
                xy = line.get_transform().transform(np.column_stack(line.get_data()).astype(float))
                xy = xy[np.all(np.isfinite(xy), axis=1)]
                inside = (xy[:, 0] > box.x0) & (xy[:, 0] < box.x1) & (xy[:, 1] > box.y0) & (xy[:, 1] < box.y1)
                if inside.any():
                    covered.append(line.get_label())
    return covered


@pytest.mark.parametrize("size", figures.SIZES)
@pytest.mark.parametrize("name, kwargs", [
    ("force_vs_length", dict(max_length=200)),
    ("length_force", dict(losses=("dpo", "ipo", "sigmoid_norm", "r_dpo"), max_length=60)),
    ("length_drift", dict(losses=("dpo", "simpo"), steps=20, seeds=2)),
    ("group_weights", dict(points=40)),
])
def test_no_legend_covers_data(name, kwargs, size):
    assert _data_under_legends(figures.make(name, size=size, **kwargs)) == []


def test_legend_check_can_fail():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    ax = fig.subplots()
    ax.plot(np.linspace(0, 1, 50), np.full(50, 0.95), label="under the legend")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right")
    assert _data_under_legends(fig) == ["under the legend"]


def test_identical_curves_are_drawn_once_with_every_name():
    from gradlab.figures import length_force, style

    data = length_force.compute(losses=("dpo", "ipo", "r_dpo", "ld_dpo"), max_length=30)
    # at equal lengths R-DPO's length term and LD-DPO's tail are zero: the curves are DPO's
    assert style.coinciding(data["curves"]) == [["dpo", "r_dpo", "ld_dpo"], ["ipo"]]
    fig = length_force.make(data)
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert labels == ["DPO = R-DPO = LD-DPO", "IPO"]
    assert "DPO = R-DPO = LD-DPO" in length_force.caption(data)
    # the grouping follows the numbers, not the names: a curve off by 1e-6 is drawn apart
    force, lever = data["curves"]["dpo"]
    assert style.coinciding({"a": (force, lever), "b": (force * (1 + 1e-6), lever)}) == [["a"], ["b"]]


def test_group_weights_draws_equal_weights_once():
    from gradlab.figures import group_weights

    data = group_weights.compute(points=9)
    labels = [ln.get_label() for ln in group_weights.make(data).axes[0].get_lines()]
    # one-token responses: dapo's group total is grpo's G|o_i|, and dr_grpo's G L_max with L_max = 1
    # is G, so those pairs have one weight and one line each
    assert "grpo, group std = dapo, group std" in labels and "grpo, no std = dr_grpo ($L_{max}=1$)" in labels
    assert sum(" = " in label for label in labels) == 2
    assert len(labels) == len(data["weights"]) - 2 + 1  # every other curve, and maximum likelihood


def test_gradient_field_caption_states_what_its_grid_shows():
    from gradlab.figures import gradient_field

    data = gradient_field.compute()
    facts = gradient_field.facts(data)
    # hand-derived (docs/background.md): |dl/dp_l| = beta sigma(-beta log(p_w/p_l)) / p_l for gdpo at q_w = q_l
    beta, p_w = 0.1, data["probability"][0][0, 0]

    def push(p_l):
        return beta / (1 + np.exp(beta * np.log(p_w / p_l))) / p_l

    assert facts["growth"] == pytest.approx(push(facts["lowest_p_l"]) / push(facts["highest_p_l"]), rel=1e-9)
    assert facts["lowest_p_l"] == pytest.approx(0.05) and facts["log_opposite"]
    text = gradient_field.caption(data)
    assert f"{figures.style.number(facts['growth'], 2)} times larger" in text and "blows up" not in text
    assert "beta = 0.1, gamma = 0.1" in text


def test_figures_expr_redraws_for_a_formula_parsed_in_the_worker(tmp_path):
    # DPO written out as a formula: the custom field equals the registered loss's, and the
    # formula travels to the worker as text (a Formula), never as a live object or code
    dpo = "-log(sigmoid(beta*((lp_w - ref_w) - (lp_l - ref_l))))"
    args = figures._arguments("gradient_field", None, {"beta": 0.1}, figures._formulas([dpo]))
    assert args["loss"] == figures.Formula(dpo, "custom")
    mine = gradient_field.compute(**figures._with_losses(args), n=5)
    theirs = gradient_field.compute(loss="dpo", values={"beta": 0.1}, n=5)
    for view in ("probability", "log"):
        np.testing.assert_allclose(np.nan_to_num(mine[view][2]), np.nan_to_num(theirs[view][2]), rtol=1e-9)
    assert not np.allclose(np.nan_to_num(mine["log"][2]),
                           np.nan_to_num(gradient_field.compute(loss="ipo", n=5)["log"][2]))
    out = tmp_path / "mine"
    figures.save_all(out, names=["gradient_field"], exprs=[dpo], values={"beta": 0.1}, sizes=("column",),
                     formats=("png",), jobs=2)
    assert "`custom`" in (out / "README.md").read_text()
    with pytest.raises(GradlabError):
        figures.save_all(tmp_path / "bad", names=["gradient_field"], exprs=["__import__('os')"])
    with pytest.raises(GradlabError, match="draws fixed losses"):
        figures.save_all(tmp_path / "bad", names=["entropy"], exprs=[dpo])
    assert not (tmp_path / "bad").exists()


def test_captions_follow_the_values_the_figure_was_drawn_with(tmp_path):
    out = tmp_path / "mine"
    figures.save_all(out, names=["gradient_field"], values={"beta": 0.5}, sizes=("column",), formats=("png",))
    readme = (out / "README.md").read_text()
    assert "beta = 0.5, gamma = 0.1" in readme and "beta = 0.1" not in readme
    # a figure without a caption of its own says what it was redrawn for
    figures.save_all(out, names=["gradient_atlas"], losses=("simpo",), values={"simpo_gamma": 2.0},
                     sizes=("column",), formats=("png",))
    readme = (out / "README.md").read_text()
    assert "**Drawn here for** `simpo`: beta = 2, simpo_gamma = 2." in readme
    assert "beta = 0.5, gamma = 0.1" in readme  # the figure not redrawn keeps the caption of its files


def test_set_ticks_on_a_log_axis_are_kept_and_labelled():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.subplots()
    ax.plot([0.25, 2.0], [0, 1])
    ax.set_xscale("log")
    ax.set_xticks(entropy.BETAS)
    figures.style.finish(fig)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.25", "0.5", "1", "2"]


def test_rounding_noise_is_said_not_plotted():
    from gradlab.reproduce import Outcome
    from gradlab.reproduce.displacement import NO_SQUEEZE

    assert figures.style.rounding_noise([1e-15, -2e-15, 0.0]) == pytest.approx(2e-15)
    assert figures.style.rounding_noise([1e-15, 1e-6]) is None  # one real value: it is signal
    fig = figures.style.figure()
    NO_SQUEEZE.plot(fig, Outcome({}, {"top_rel": np.array([1e-15, -1e-15, 4e-16])}))
    (ax,) = fig.axes
    assert not ax.has_data() and "rounding" in ax.texts[0].get_text() and "3 draws" in ax.texts[0].get_text()
    fig = figures.style.figure()
    NO_SQUEEZE.plot(fig, Outcome({}, {"top_rel": np.array([0.1, -0.2, 0.05])}))
    assert fig.axes[0].has_data() and not fig.axes[0].texts


def test_length_drift_panels_have_their_own_ranges_and_whiskers_never_overlap(drift_data):
    fig = length_drift.make(drift_data)
    sgd, adam = fig.axes
    assert sgd.get_ylim()[1] < 1e3 < adam.get_ylim()[1]  # gradient descent is not flattened by Adam's range
    starts = [length_drift._whiskers(31, k) for k in range(6)]
    assert len(set(np.concatenate(starts))) == sum(len(s) for s in starts)


def test_notebook_03_names_its_setting_and_quotes_the_figures_factors(drift_data):
    from gradlab.experiments import named

    text = (ROOT / "notebooks" / "03_length_bias.py").read_text()
    for opt in named.OPTIMIZERS:
        median = float(np.median(drift_data["runs"][(opt, "dpo")][2]))
        assert f"×{figures.style.number(median)} under" in text, opt


@pytest.mark.long(seconds=45, group="redrawn_gallery")  # the session's figure run (conftest), then these
def test_regenerating_committed_figures_leaves_the_checkout_unchanged(redrawn_gallery):
    """The figures job redrawn into a copy of the committed gallery gives the committed bytes,
    every figure at every size and in every format, its README and its manifest: no date, random
    id or run-to-run number reaches a file, and no committed figure is older than the code that
    draws it."""
    import filecmp

    drawn = sorted(p.name for p in redrawn_gallery.iterdir())
    assert len(drawn) >= 6 * len(figures.FIGURES)  # two sizes, three formats each
    assert drawn == sorted(p.name for p in (ROOT / "figures").iterdir() if p.name != "reproductions")
    changed = [name for name in drawn
               if not filecmp.cmp(redrawn_gallery / name, ROOT / "figures" / name, shallow=False)]
    assert not changed, f"regenerated figures differ from the committed ones: {changed}"
