"""``gradlab run`` on ``data.kind = "rollouts"``: one SGD step at lr = 1 moves the parameters by
exactly the expected gradient of the group loss, checked against the brute force of
``test_groups`` (every group of G responses listed, TRL's advantages and the hand-derived weights
written again there), and the experiment file's refusals.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import run_cli
from test_groups import L_MAX, _contains, _first, brute_force

from gradlab.errors import GradlabError
from gradlab.experiments import load
from gradlab.experiments.runner import run_many
from gradlab.experiments.runner import build_family, initial_params, program_count

TOYS = {  # [policy], the reward's table and the brute force's reward of each response
    "unigram": ({"family": "unigram", "vocab": 2, "max_len": 3}, {"first_token": [1]}, _first([1])),
    "bigram": ({"family": "bigram", "vocab": 2, "max_len": 3}, {"contains": [2]}, _contains([2])),
    "tabular": ({"family": "tabular", "vocab": 2, "max_len": 2}, {"first_token": [2]}, _first([2])),
    "softmax": ({"family": "softmax", "vocab": 4}, {"table": [1, 0, 0, 1]}, lambda s, n: np.array([1.0, 0, 0, 1])),
}
LOSSES = ("grpo", "dr_grpo", "luspo", "sapo")
SCALES = ("none", "group")


def _experiment(toy, name, scale, group_size=3, **train):
    policy, reward, _ = TOYS[toy]
    loss = {"name": name, "scale_rewards": scale, **({"max_completion_length": L_MAX} if name == "dr_grpo" else {})}
    data = {"kind": "rollouts", "group_size": group_size, "reward": reward}
    return {"policy": {**policy, "scale": 0.7}, "data": data,
            "loss": loss, "train": {"optimizer": "sgd", "lr": 1.0, "steps": 1, "seeds": [3], "metrics": ["params"],
                                    **train}}


def _flat(metrics, at):
    return np.concatenate([np.ravel(metrics[k][at]) for k in sorted(metrics) if k.startswith("params.")])


@pytest.mark.parametrize("toy", list(TOYS))
def test_one_sgd_step_is_the_expected_gradient(toy):
    exps = [_experiment(toy, name, scale) for name in LOSSES for scale in SCALES]
    results = run_many(exps)
    fam = build_family(load(exps[0]).policy)
    params, _ = initial_params(load(exps[0]), fam, 3)
    params = jax.tree_util.tree_map(np.asarray, params)
    for exp, result in zip(exps, results, strict=True):
        metrics = result.runs[0].metrics
        step = _flat(metrics, 0) - _flat(metrics, -1)  # theta_0 - theta_1 = lr * gradient
        with jax.enable_x64(True):
            brute = brute_force(exp["loss"]["name"], fam, params, TOYS[toy][2], 3, exp["loss"]["scale_rewards"])
        brute = np.concatenate([np.ravel(brute[k]) for k in sorted(brute)])
        assert np.abs(brute).max() > 1e-4  # a real signal
        np.testing.assert_allclose(step, brute, rtol=0, atol=1e-10 * np.abs(brute).max(), err_msg=str(exp["loss"]))


def test_losses_and_scalings_share_one_program():
    exp = _experiment("unigram", "grpo", "none")
    exp["loss"] = {"name": "grpo"}
    exp["sweep"] = {"loss.name": ["grpo", "luspo", "dapo"], "loss.scale_rewards": ["none", "group", "batch"]}
    assert program_count(load(exp)) == 1


def test_group_total_normaliser_and_unbounded_chain():
    """dapo's sum_j |o_j| (a convolution) on an unbounded unigram: the step is groups.exact_gradient's."""
    from gradlab.experiments import groups
    from gradlab.experiments.runner import run

    exp = _experiment("unigram", "dapo", "group", group_size=4)
    exp["policy"]["max_len"] = "none"
    metrics = run(exp).runs[0].metrics
    step = _flat(metrics, 0) - _flat(metrics, -1)
    loaded = load(exp)
    fam = build_family(loaded.policy)
    params, _ = initial_params(loaded, fam, 3)
    with jax.enable_x64(True):
        exact = groups.exact_gradient("dapo", fam, params, groups.first_token(1), group_size=4)
    ref = np.ravel(exact.grad["theta"])
    np.testing.assert_allclose(step, ref, rtol=0, atol=1e-10 * np.abs(ref).max())


def test_group_metrics():
    from gradlab.experiments.runner import run

    exp = _experiment("softmax", "grpo", "group", group_size=4,
                      metrics=["success", "silent_groups", "length_correct", "sequence_entropy"])
    m = run(exp).runs[0].metrics
    fam = build_family(load(exp).policy)
    params, _ = initial_params(load(exp), fam, 3)
    p = float(np.asarray(jax.nn.softmax(params["logits"])) @ np.array([1.0, 0, 0, 1]))
    assert m["success"][0] == pytest.approx(p, abs=1e-12)
    assert m["silent_groups"][0] == pytest.approx(p**4 + (1 - p) ** 4, abs=1e-12)
    assert m["length_correct"][0] == pytest.approx(1.0)
    assert m["success"][-1] > m["success"][0]  # one step of any of these losses raises success


@pytest.mark.parametrize("change,message", [
    ({"data": {"kind": "equal_length"}}, "needs data.kind = 'rollouts'"),
    ({"loss": {"name": "dpo"}}, "trains a group loss"),
    ({"data": {"reward": [1, 0]}}, "needs a binary data.reward"),
    ({"data": {"reward": {"first_token": [5]}}}, "content tokens 1..2"),
    ({"data": {"reward": {"table": [1, 0]}}}, "reward table of"),
    ({"train": {"expectation": "sample"}}, "not available in gradlab run"),
    ({"train": {"batch_size": 2}}, "must be 'full'"),
    ({"loss": {"name": "grpo", "scale_rewards": "sometimes"}}, "loss.scale_rewards"),
    ({"policy": {"family": "linear_head", "vocab": 2, "max_len": 3}}, "exact expected gradient"),
])
def test_refusals(change, message):
    exp = _experiment("unigram", "grpo", "group")
    for section, table in change.items():
        exp[section] = table if "family" in table or "kind" in table else {**exp[section], **table}
    with pytest.raises(GradlabError, match=message):
        load(exp)


def test_cli_run_exits_2_on_a_group_loss_with_pairs(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[data]\nkind = "equal_length"\n[loss]\nname = "dr_grpo"\n')
    code, _, err = run_cli(["run", str(path)])
    assert code == 2 and "group loss" in err


def test_cli_run_json(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[policy]\nfamily = "unigram"\nvocab = 2\nmax_len = 3\n[data]\nkind = "rollouts"\ngroup_size = 4\n'
                    'reward = { first_token = [1] }\n[loss]\nname = "dr_grpo"\nscale_rewards = "none"\n'
                    '[train]\nsteps = 2\nseeds = [0]\n')
    code, stdout, err = run_cli(["run", str(path), "--json"])
    assert code == 0, err
    out = json.loads(stdout)
    assert out["config"]["loss"]["scale_rewards"] == "none"
    assert set(out["runs"][0]["metrics"]) >= {"success", "length_correct", "length_incorrect", "silent_groups"}


@pytest.mark.parametrize("call", ["evaluate", "gradient", "derivative", "in_view", "parameter_values"])
def test_python_api_refuses_a_group_loss(call):
    import gradlab

    args = {"evaluate": ({"A": 1.0},), "derivative": ("lp_w",)}.get(call, ())
    with pytest.raises(GradlabError, match="group loss"):
        getattr(gradlab, call)("grpo", *args)


def test_list_marks_group_losses():
    proc = subprocess.run([sys.executable, "-m", "gradlab", "list"], capture_output=True, text=True, check=True)
    assert "dr_grpo" in proc.stdout and "[group]" in proc.stdout


def test_simulate_a_group_loss():
    code, out, err = run_cli(["simulate", "dr_grpo", "--policy", "bigram", "--steps", "5", "--seeds", "1",
                              "--set", "loss.scale_rewards=none", "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["dataset"] == "rollouts" and doc["config"]["loss"]["scale_rewards"] == "none"
    success = np.asarray(doc["metrics"]["success"])[:, 0]
    assert success[-1] > success[0]
