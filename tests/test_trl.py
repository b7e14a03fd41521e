"""TRL parity: every TRL loss_type resolves, weighted combinations are losses, variant notices."""

from __future__ import annotations

import json

import pytest
import sympy

import gradlab
from gradlab.cli import main
from gradlab.losses import LOSSES, get_loss
from gradlab.losses import from_trl_config
from gradlab.trl import BATCH_LEVEL, TRL_CONFIGS
from helpers import assert_same

# TRL's loss types, read from the configs' help texts and the trainers' branches at
# huggingface/trl f2cd5771 (v1.9.0-26) and v0.16.0 (23a635ed); kto_pair from v0.8.6.
TRL_LOSS_TYPES = {
    "dpo": ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
            "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "aot_pair", "kto_pair"],
    "cpo": ["sigmoid", "hinge", "ipo", "simpo", "alphapo"],
    "kto": ["kto", "apo_zero_unpaired"],
}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("trainer, loss_type", [(t, n) for t, names in TRL_LOSS_TYPES.items() for n in names])
def test_every_trl_loss_type_resolves_qualified_and_plain(trainer, loss_type):
    for name in (f"{trainer}.{loss_type}", loss_type, loss_type.upper(), f"{trainer.upper()}Trainer.{loss_type}"):
        if loss_type in BATCH_LEVEL:
            with pytest.raises(gradlab.UnknownLossError, match="out of scope"):
                get_loss(name)
        else:
            assert isinstance(get_loss(name), gradlab.Loss), name


def test_trainer_qualified_names_pick_the_trainer_s_formula():
    assert get_loss("cpo.hinge").name == "cpo_hinge" and get_loss("hinge").name == "hinge"
    assert get_loss("cpo.ipo").name == "cpo_ipo" and get_loss("dpo.ipo").name == "ipo_trl"
    assert get_loss("cpo.simpo").name == "simpo_trl" and get_loss("cpo.sigmoid").name == "cpo"
    assert get_loss("kto.apo_zero_unpaired").name == "apo_zero_unpaired"


@pytest.mark.parametrize("spelling, name", [("DPO", "dpo"), ("SimPO", "simpo"), ("R-DPO", "r_dpo"), ("IPO", "ipo"),
                                            ("Sigmoid", "dpo"), ("ORPO", "orpo"), ("AlphaPO", "alphapo")])
def test_names_are_case_and_dash_insensitive(spelling, name):
    assert get_loss(spelling).name == name


def test_close_matches_are_suggested_for_any_case():
    with pytest.raises(gradlab.UnknownLossError, match="Did you mean: simpo"):
        get_loss("SimPOO")


def test_every_trl_row_resolves_and_sets_only_its_hyperparameters():
    for row in TRL_CONFIGS:
        if not row.loss:
            assert row.loss_type in BATCH_LEVEL
            continue
        loss = get_loss(row.loss)
        assert set(row.values) <= set(loss.hyperparameters), row


def test_combination_is_the_weighted_sum():
    mpo = get_loss("sigmoid:0.8,bco_pair:0.2,sft:1")
    want = sympy.Rational(4, 5) * LOSSES["dpo"].expr + LOSSES["bco_pair"].expr / 5 + LOSSES["sft"].expr
    assert_same(mpo.expr, want)
    assert get_loss("sigmoid:0.8,bco_pair:0.2,sft") is mpo  # a missing weight is 1; one object per spelling
    assert get_loss(mpo.name) is mpo  # its name resolves back to it
    assert mpo.hyperparameters == ("beta", "bco_delta")


def test_shared_hyperparameters_merge_and_conflicting_defaults_are_reported():
    combo = get_loss("simpo:1,cpo:0.5")
    assert combo.defaults["beta"] == 2  # the first component's default
    assert "differs" in combo.doc and "beta" in combo.doc
    # one beta for both terms, as TRL's single config
    beta = gradlab.symbol("beta")
    assert beta in LOSSES["simpo"].expr.free_symbols and beta in LOSSES["cpo"].expr.free_symbols


@pytest.mark.parametrize("text, fragment", [
    ("sigmoid:abc", "not a number"), ("sigmoid:-1", "positive"), ("sigmoid:inf", "positive"),
    ("sigmoid,,sft", "empty entry"), ("pdpo,dpo", "expectation"), ("sigmoid:1,nope", "unknown loss 'nope'"),
])
def test_bad_combinations_get_clear_errors(text, fragment):
    with pytest.raises(gradlab.UnknownLossError, match=fragment):
        get_loss(text)


def test_combination_works_through_derivation_and_evaluation():
    combo = get_loss("mpo")
    point = {"lp_w": -5.0, "lp_l": -7.0, "ref_w": -5.5, "ref_l": -6.5, "len_w": 10.0}
    got = gradlab.evaluate(combo, point)
    parts = [gradlab.evaluate(n, {k: v for k, v in point.items() if k in LOSSES[n].variables})
             for n in ("dpo", "bco_pair", "sft")]
    for var in ("loss", "lp_w", "lp_l"):
        want = 0.8 * float(parts[0].get(var, 0)) + 0.2 * float(parts[1].get(var, 0)) + float(parts[2].get(var, 0))
        assert abs(float(got[var]) - want) < 1e-12


def test_cli_show_json_of_a_combination_gives_the_weighted_sum(capsys):
    code, out, err = run(capsys, "show", "sigmoid:0.8,bco_pair:0.2,sft:1", "--json")
    assert code == 0, err
    data = json.loads(out)
    local = {n: sympy.Symbol(n) for n in data["variables"]}
    parsed = sympy.sympify(data["expr"], locals=local)
    assert_same(parsed.xreplace({sympy.Symbol(n): gradlab.symbol(n) for n in data["variables"]}),
                get_loss("mpo").expr)
    assert data["components"] == {"dpo": 0.8, "bco_pair": 0.2, "sft": 1.0}


@pytest.mark.parametrize("argv", [["grad", "sigmoid:0.5,sft", "--wrt", "lp_w"],
                                  ["eval", "mpo", "--at", "lp_w=-1,lp_l=-2,ref_w=-1,ref_l=-1,len_w=3"],
                                  ["show", "CPO.hinge"], ["show", "KTO.apo_zero_unpaired"], ["show", "sft"],
                                  ["simulate", "sigmoid:0.8,sft", "--steps", "5", "--seeds", "1", "--json"]])
def test_cli_accepts_trl_names_and_combinations(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 0, err


@pytest.mark.parametrize("name, other", [("ipo", "ipo_trl"), ("simpo", "simpo_trl"), ("ld_dpo", "ld_dpo_trl"),
                                         ("fdpo_alpha", "fdpo_alpha_trl")])
def test_show_names_the_trl_variant(capsys, name, other):
    code, out, _ = run(capsys, "show", name)
    assert code == 0 and "not what TRL computes" in out and f"gradlab show {other}" in out
    code, out, _ = run(capsys, "show", name, "--json")
    assert json.loads(out)["trl_variant"]["loss"] == other
    code, out, _ = run(capsys, "show", other, "--json")
    assert json.loads(out)["trl_variant"] is None


def test_show_reports_out_of_scope_trl_names_in_any_spelling(capsys):
    for name in ("AOT", "dpo.aot_pair"):
        code, out, _ = run(capsys, "show", name)
        assert code == 0 and "out of scope" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"gradlab {gradlab.__version__}"


def test_expr_values_may_start_with_a_minus(capsys):
    code, out, err = run(capsys, "show", "--expr", "-logsigmoid(beta*(lp_w - lp_l))", "--json")
    assert code == 0, err
    assert json.loads(out)["name"] == "custom"
    code, out, err = run(capsys, "eval", "--expr", "-logsigmoid(beta*(lp_w - lp_l))", "--at", "lp_w=-1,lp_l=-2",
                         "--set", "beta=1")
    assert code == 0, err


def test_custom_hyperparameter_without_default_asks_for_a_value(capsys):
    expr = "-logsigmoid(beta*(lp_w - lp_l) - simpo_gamma)"
    code, _, err = run(capsys, "eval", "--expr", expr, "--at", "lp_w=-1,lp_l=-2")
    assert code == 2 and "no default; give a value" in err and "Traceback" not in err
    for argv in (["show", "--expr", expr], ["grad", "--expr", expr, "--wrt", "simpo_gamma"],
                 ["eval", "--expr", expr, "--at", "lp_w=-1,lp_l=-2", "--set", "beta=0.5,simpo_gamma=0.2"]):
        code, _, err = run(capsys, *argv)
        assert code == 0, err


def test_custom_hyperparameter_without_default_in_checks_and_sliders():
    from gradlab import checks

    loss = gradlab.custom("-logsigmoid(beta*(lp_w - lp_l) - simpo_gamma)")
    for h in loss.hyperparameters:
        lo, hi = checks.hyper_range(loss, h)
        assert loss.domain(h).contains(lo) and loss.domain(h).contains(hi) and lo < hi
        assert lo <= checks.hyper_value(loss, h) <= hi


def test_custom_loss_view_analyses_a_formula_with_an_open_hyperparameter():
    pytest.importorskip("ipywidgets")
    from gradlab import explore

    _, analyse = explore.custom_loss_view("-logsigmoid(beta*(lp_w - lp_l) - simpo_gamma)")
    result = analyse()
    assert "error" not in result and all(r.ok for r in result["checks"]) and "scorecard" in result


@pytest.mark.parametrize("trainer, config, loss, values", [
    ("dpo", {}, "dpo", {"beta": 0.1}),
    ("DPOConfig", {"loss_type": "robust"}, "robust", {"beta": 0.1, "label_smoothing": 0.0}),
    ("dpo", {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
     "dpo:0.8,bco_pair:0.2,sft:1.0", {"beta": 0.1}),
    ("dpo", {"loss_type": "sft", "beta": 0.3}, "sft", {}),
    ("dpo", {"ld_alpha": 0.4, "output_dir": "ignored"}, "ld_dpo_trl", {"beta": 0.1, "ld_alpha": 0.4}),
    ("dpo", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0}, "dpo", {"beta": 0.1}),
    ("cpo", {"loss_type": "alphapo"}, "simpo_trl",
     {"beta": 0.1, "simpo_gamma": 0.5, "label_smoothing": 0.0, "cpo_alpha": 0.0}),
    ("cpo", {"loss_type": "simpo", "alpha": 0.3}, "alphapo",
     {"beta": 0.1, "alpha": 0.3, "simpo_gamma": 0.5, "label_smoothing": 0.0, "cpo_alpha": 1.0}),
    ("KTOTrainer", {"desirable_weight": 2.0}, "kto", {"beta": 0.1, "desirable_weight": 2.0, "undesirable_weight": 1.0}),
    ("orpo", {"beta": 0.2}, "orpo", {"beta": 0.2}),
])
def test_from_config_maps_a_trl_config_with_trl_s_defaults(trainer, config, loss, values):
    assert from_trl_config(trainer, config) == (loss, values)


@pytest.mark.parametrize("trainer, config, fragment", [
    ("dpo", {"loss_type": "bco_pair", "f_divergence_type": "forward_kl"}, "has no gradlab loss"),
    ("dpo", {"loss_type": "hinge", "ld_alpha": 0.5}, "has no gradlab loss"),
    ("dpo", {"use_weighting": True}, "WPO"),
    ("dpo", {"loss_type": "aot"}, "batch-level"),
    ("dpo", {"loss_type": "nope"}, "no loss_type 'nope'"),
    ("dpo", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "1 weights for 2 loss types"),
    ("cpo", {"loss_type": "hinge", "alpha": 0.2}, "has no gradlab loss"),
    ("ppo", {}, "unknown TRL trainer"),
])
def test_from_config_refuses_what_gradlab_cannot_reproduce(trainer, config, fragment):
    with pytest.raises(gradlab.UnknownLossError, match=fragment):
        from_trl_config(trainer, config)


def test_show_flags_defaults_that_differ_from_trl_s(capsys):
    code, out, _ = run(capsys, "show", "robust")
    assert code == 0
    assert "TRL's default differs: label_smoothing = 0 in TRL (DPOConfig.label_smoothing), 0.1 here" in out
    code, out, _ = run(capsys, "show", "robust", "--json")
    assert json.loads(out)["trl_default_differences"] == {
        "label_smoothing": {"trl_field": "DPOConfig.label_smoothing", "trl": 0.0, "gradlab": 0.1}}
    code, out, _ = run(capsys, "show", "dpo", "--json")
    assert json.loads(out)["trl_default_differences"] == {}
    assert get_loss("alphapo").trl_default_differences == {"alpha": ("CPOConfig.alpha", 0.0, 0.25)}
