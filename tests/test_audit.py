"""gradlab.audit: known truth recovered, every weight equal to an independent evaluation, bad input refused."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import mpmath
import numpy as np
import pytest
import sympy

import gradlab
from gradlab import audit
from gradlab.audit import io as audit_io
from gradlab.audit import stats
from gradlab.budgets import raised as budgets_raised
from gradlab.audit.gradients import weights
from gradlab.cli import main
from gradlab.figures import FORMATS
from gradlab.symbols import CANONICAL, EXTRA

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "audit_pairs.jsonl"
PAIR_LOSSES = [n for n, loss in gradlab.LOSSES.items() if loss.kind == "pair"]


def _file(tmp_path: Path, name: str, **kwargs) -> Path:
    return audit.write(tmp_path / name, audit.generate(**kwargs))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------
# Known truth from the generator
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_length_difference_is_reported_as_none(seed):
    cols = audit.generate(3000, length_bias=0.0, seed=seed)
    pairs = audit.pairs_from_arrays(len_w=cols["chosen_length"], len_l=cols["rejected_length"],
                                    ref_w=cols["ref_chosen_logps"], ref_l=cols["ref_rejected_logps"])
    report = audit.audit(pairs, losses=["dpo"])
    assert report.dataset["length_difference"] is None
    assert report.dataset["length_test"]["p_value"] >= stats.ALPHA
    assert "no length difference" in report.dataset["summary"]


@pytest.mark.parametrize("seed", [0, 1])
def test_built_in_length_difference_is_reported(seed):
    cols = audit.generate(3000, length_bias=0.2, seed=seed)
    pairs = audit.pairs_from_arrays(len_w=cols["chosen_length"], len_l=cols["rejected_length"],
                                    ref_w=cols["ref_chosen_logps"], ref_l=cols["ref_rejected_logps"])
    ds = audit.audit(pairs, losses=["dpo"]).dataset
    assert ds["length_difference"] == "chosen longer"
    assert ds["length_test"]["p_value"] < 1e-6 and ds["length_test"]["rank_biserial"] > 0
    assert ds["chosen_length_mean"] > ds["rejected_length_mean"]


def test_reversed_pairs_report_chosen_shorter():
    cols = audit.generate(2000, length_bias=0.2, seed=3)
    pairs = audit.pairs_from_arrays(len_w=cols["rejected_length"], len_l=cols["chosen_length"],
                                    ref_w=cols["ref_rejected_logps"], ref_l=cols["ref_chosen_logps"])
    assert audit.audit(pairs, losses=["dpo"]).dataset["length_difference"] == "chosen shorter"


def test_length_test_matches_the_normal_approximation_written_out():
    # Wilcoxon's T+ and its z by hand (no ties: lengths perturbed), against the library's p-value
    rng = np.random.default_rng(4)
    lw, ll = rng.uniform(1, 50, 500), rng.uniform(1, 52, 500)
    d = lw - ll
    ranks = np.argsort(np.argsort(np.abs(d))) + 1.0
    t_plus = ranks[d > 0].sum()
    n = d.size
    z = (t_plus - n * (n + 1) / 4) / math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    p = math.erfc(abs(z) / math.sqrt(2))
    got = stats.length_test(lw, ll)
    assert got["p_value"] == pytest.approx(p, rel=1e-9)
    assert min(t_plus, n * (n + 1) / 2 - t_plus) == pytest.approx(got["statistic"])


@pytest.mark.parametrize("n", [30, 3000])
def test_length_test_agrees_with_scipy_with_ties_and_zeros(n):
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(n)
    lw, ll = rng.integers(1, 40, n).astype(float), rng.integers(1, 44, n).astype(float)
    got = stats.length_test(lw, ll)
    want = wilcoxon(lw - ll, zero_method="wilcox", correction=False, method="approx")
    assert got["p_value"] == pytest.approx(want.pvalue, rel=1e-9)
    assert got["statistic"] == pytest.approx(want.statistic, rel=1e-12)


def test_average_ranks_by_counting_equals_by_sorting():
    from scipy.stats import rankdata

    rng = np.random.default_rng(3)
    for x in (rng.integers(-50, 50, 1000).astype(float), rng.normal(size=500), np.array([2.0, 2.0, 2.0])):
        assert np.array_equal(stats.average_ranks(x), rankdata(x))


def test_at_initialisation_dpo_pushes_every_pair_equally_with_a_lever_proportional_to_length():
    # policy = reference: h = 0, DPO's weight is beta sigma(0) for every pair, and d loss/d m = beta L / 2
    report = audit.audit(_pairs_at_init(length_bias=0.2), losses=["dpo", "r_dpo", "simpo"])
    dpo = report.losses["dpo"]
    assert dpo["constant_weight"] and dpo["corr_weight_length_difference"] is None
    assert dpo["top10_share"] == pytest.approx(0.1, abs=1e-3)
    assert dpo["lever_exponent"] == pytest.approx(1.0, abs=1e-12)
    assert "long responses harder" in dpo["verdict"]
    # R-DPO's margin is beta h + alpha (len_w - len_l), so at h = 0 its weight is 2 beta sigma(-alpha d):
    # strictly decreasing in the length difference d, a rank correlation of exactly -1
    assert report.losses["r_dpo"]["corr_weight_length_difference"] == pytest.approx(-1.0, abs=1e-12)
    # SimPO normalises by length: no factor of L in its lever
    assert abs(report.losses["simpo"]["lever_exponent"]) < 0.5
    assert "length-neutral" in report.losses["simpo"]["verdict"]


def _pairs_at_init(length_bias: float = 0.0, n: int = 2000, seed: int = 0) -> audit.Pairs:
    cols = audit.generate(n, length_bias=length_bias, seed=seed, policy=False)
    return audit.pairs_from_arrays(len_w=cols["chosen_length"], len_l=cols["rejected_length"],
                                   ref_w=cols["ref_chosen_logps"], ref_l=cols["ref_rejected_logps"])


def test_generator_log_probs_are_exact_for_the_unigram_with_eos(tmp_path):
    cols = audit.generate(5, text=True, seed=7, tilt=0.0)
    from gradlab.audit.generate import TOKEN_PROBS, WORDS

    q = dict(zip(WORDS, TOKEN_PROBS, strict=True))
    for text, lp, length in zip(cols["chosen"], cols["ref_chosen_logps"], cols["chosen_length"], strict=True):
        words = text.split()
        assert words[-1] == "</s>" and len(words) == length
        expected = sum(math.log(q[w]) for w in words[:-1]) + (len(words) - 1) * math.log(0.95) + math.log(0.05)
        assert lp == pytest.approx(expected, rel=1e-12)
    # tilt = 0: the policy is the reference
    assert np.array_equal(cols["chosen_logps"], cols["ref_chosen_logps"])


# --------------------------------------------------------------------------------------------
# Every weight equals the closed form evaluated independently
# --------------------------------------------------------------------------------------------


def _data(n: int = 64, seed: int = 5) -> dict[str, np.ndarray]:
    cols = audit.generate(n, length_bias=0.1, seed=seed)
    return {"lp_w": cols["chosen_logps"], "lp_l": cols["rejected_logps"], "ref_w": cols["ref_chosen_logps"],
            "ref_l": cols["ref_rejected_logps"], "len_w": cols["chosen_length"],
            "len_l": cols["rejected_length"]}


def test_dpo_weights_equal_the_hand_written_sigma_formula():
    data = _data(500)
    beta = 0.3
    w = weights(gradlab.get_loss("dpo"), data, {"beta": beta})
    for i in range(500):
        h = (data["lp_w"][i] - data["ref_w"][i]) - (data["lp_l"][i] - data["ref_l"][i])
        s = 1.0 / (1.0 + math.exp(beta * h))  # sigma(-beta h)
        assert w.g_w[i] == pytest.approx(-beta * s, rel=1e-12)
        assert w.g_l[i] == pytest.approx(beta * s, rel=1e-12)
        assert w.lever_w[i] == pytest.approx(-beta * s * data["len_w"][i], rel=1e-12)
        assert w.lever_l[i] == pytest.approx(beta * s * data["len_l"][i], rel=1e-12)


def _loss_function(loss):
    """The loss itself (not a derivative) in mpmath, of every canonical and tail variable."""
    args = [*CANONICAL, *EXTRA]
    params = gradlab.parameter_values(loss)
    return sympy.lambdify(args, gradlab.standard(loss.expr.xreplace(params)), modules="mpmath")


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_every_weight_equals_mpmath_differentiation_of_the_loss(name):
    loss = gradlab.get_loss(name)
    data = _data(64)
    w = weights(loss, data)
    f = _loss_function(loss)
    mpmath.mp.dps = 40
    for i in (0, 17, 41):
        x = {k: mpmath.mpf(float(v[i])) for k, v in data.items()}
        short = min(x["len_w"], x["len_l"])
        # tails (LD-DPO) at the response's mean per-token log-prob, written out here independently
        tail = {s: (x[f"len_{s}"] - short) * x[f"lp_{s}"] / x[f"len_{s}"] for s in "wl"}
        ref_tail = {s: (x[f"len_{s}"] - short) * x[f"ref_{s}"] / x[f"len_{s}"] for s in "wl"}

        def at(lp_w=None, lp_l=None, tail_w=None, tail_l=None, x=x, tail=tail, ref_tail=ref_tail):
            return f(x["lp_w"] if lp_w is None else lp_w, x["lp_l"] if lp_l is None else lp_l, x["ref_w"],
                     x["ref_l"], x["len_w"], x["len_l"], tail["w"] if tail_w is None else tail_w,
                     tail["l"] if tail_l is None else tail_l, ref_tail["w"], ref_tail["l"])

        g_w = mpmath.diff(lambda t, at=at: at(lp_w=t), x["lp_w"])
        g_l = mpmath.diff(lambda t, at=at: at(lp_l=t), x["lp_l"])
        # per-token lever: lp = len * m moves with m, and so does the tail, (len - shorter) * m
        lev = {}
        for s in "wl":
            step_lp, step_tail = x[f"len_{s}"], x[f"len_{s}"] - short
            lp0, tail0 = x[f"lp_{s}"], tail[s]
            lev[s] = mpmath.diff(lambda t, s=s, a=step_lp, b=step_tail, lp0=lp0, tail0=tail0, at=at: at(
                **{f"lp_{s}": lp0 + a * t, f"tail_{s}": tail0 + b * t}), 0)
        lev_w, lev_l = lev["w"], lev["l"]
        for got, want in ((w.g_w, g_w), (w.g_l, g_l), (w.lever_w, lev_w), (w.lever_l, lev_l)):
            assert got[i] == pytest.approx(float(want), rel=1e-9, abs=1e-300), (name, i)


def test_a_weighted_combination_is_audited_as_the_sum_of_its_parts():
    data = _data(200, seed=8)
    combo = weights(gradlab.get_loss("sigmoid:0.8,sft:1"), data)
    parts = [weights(gradlab.get_loss(n), data) for n in ("dpo", "sft")]
    for key in ("g_w", "g_l", "lever_w", "lever_l"):
        want = 0.8 * getattr(parts[0], key) + getattr(parts[1], key)
        assert np.allclose(getattr(combo, key), want, rtol=1e-12, atol=0), key
    report = audit.audit(audit.pairs_from_arrays(**data), losses=["sigmoid:0.8,sft:1"])
    assert len(report.losses) == 1


def test_custom_losses_and_combination_objects_are_audited():
    data = _data(200, seed=9)
    pairs = audit.pairs_from_arrays(**data)
    mine = gradlab.custom("-logsigmoid(beta*((lp_w - ref_w) - (lp_l - ref_l)))", name="my_dpo", defaults={"beta": 0.1})
    combo = gradlab.losses.combine([(gradlab.get_loss("dpo"), 0.8), (gradlab.get_loss("sft"), 1)])
    report = audit.audit(pairs, losses=["dpo", mine, combo, "sigmoid:0.8,sft:1"])
    assert list(report.losses) == ["dpo", "my_dpo", combo.name]  # the combination by name is the same loss
    for key in ("weight", "g_w", "g_l", "lever_exponent", "corr_weight_length_difference"):
        assert report.losses["my_dpo"][key] == report.losses["dpo"][key], key
    want = np.abs(0.8 * weights(gradlab.get_loss("dpo"), data).g_w + weights(gradlab.get_loss("sft"), data).g_w)
    want += 0.8 * np.abs(weights(gradlab.get_loss("dpo"), data).g_l)
    assert report.losses[combo.name]["total_weight"] == pytest.approx(float(want.sum()), rel=1e-12)
    twin = gradlab.custom("lp_l - lp_w", name="my_dpo")
    with pytest.raises(gradlab.GradlabError, match="both called 'my_dpo'"):
        audit.audit(pairs, losses=[mine, twin])


def test_cli_audit_expr(capsys):
    formula = "-logsigmoid(beta*((lp_w - ref_w) - (lp_l - ref_l)))"
    assert main(["audit", str(EXAMPLE), "--expr", formula, "--set", "beta=0.1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["losses"]) == ["custom"]
    assert main(["audit", str(EXAMPLE), "--loss", "dpo", "--json"]) == 0
    dpo = json.loads(capsys.readouterr().out)["losses"]["dpo"]
    assert out["losses"]["custom"]["weight"] == dpo["weight"]
    assert main(["audit", str(EXAMPLE), "--expr", formula]) == 2  # beta has no default: say how to give it
    assert "--set" in capsys.readouterr().err
    assert main(["audit", str(EXAMPLE), "--expr", "lp_w +"]) == 2


def test_simulate_takes_expr_as_it_takes_a_name(capsys):
    common = ["--steps", "3", "--seeds", "1", "--set", "beta=0.3", "--json"]
    assert main(["simulate", "--expr", "-logsigmoid(beta*((lp_w - ref_w) - (lp_l - ref_l)))", *common]) == 0
    custom = json.loads(capsys.readouterr().out)
    assert main(["simulate", "dpo", *common]) == 0
    dpo = json.loads(capsys.readouterr().out)
    assert np.allclose(custom["metrics"]["lp_w"], dpo["metrics"]["lp_w"], rtol=1e-12, atol=0)
    assert custom["metrics"]["lp_w"] != custom["metrics"]["lp_w"][:1] * len(custom["metrics"]["lp_w"])  # it moved
    assert main(["simulate", "--steps", "3"]) == 2 and "--expr" in capsys.readouterr().err


def test_missing_policy_means_policy_equals_reference(tmp_path):
    path = _file(tmp_path, "init.jsonl", n_pairs=300, seed=2, policy=False)
    report = audit.audit(path, losses=["ipo"])
    assert "initialisation" in report.policy
    cols = audit.generate(300, seed=2, policy=False)
    data = {"lp_w": cols["ref_chosen_logps"], "lp_l": cols["ref_rejected_logps"], "ref_w": cols["ref_chosen_logps"],
            "ref_l": cols["ref_rejected_logps"], "len_w": cols["chosen_length"], "len_l": cols["rejected_length"]}
    w = weights(gradlab.get_loss("ipo"), data)
    assert report.losses["ipo"]["total_weight"] == pytest.approx(float(w.weight.sum()), rel=1e-12)


def test_top_shares_and_ranks_against_direct_computation():
    data = _data(1000, seed=9)
    report = audit.audit(audit.pairs_from_arrays(**data), losses=["ipo"])
    w = weights(gradlab.get_loss("ipo"), data).weight
    s = np.sort(w)[::-1]
    got = report.losses["ipo"]
    assert got["top10_share"] == pytest.approx(s[:100].sum() / s.sum(), rel=1e-12)
    assert got["top1_share"] == pytest.approx(s[:10].sum() / s.sum(), rel=1e-12)
    from scipy.stats import spearmanr

    d = data["len_w"] - data["len_l"]
    # weights within 1e-10 of the largest are ranked as ties (float64 rounding): a tiny difference
    assert got["corr_weight_length_difference"] == pytest.approx(spearmanr(w, d).statistic, abs=1e-5)
    assert got["corr_weight_chosen_length"] == pytest.approx(spearmanr(w, data["len_w"]).statistic, abs=1e-5)
    assert [r["row"] for r in got["top_pairs"]] == list(np.argsort(-w, kind="stable")[:10])
    longer = d > 0
    assert got["share_from_chosen_longer"] == pytest.approx(w[longer].sum() / w.sum(), rel=1e-12)


def test_figure_data_against_direct_computation():
    data = _data(3000, seed=10)
    got = audit.audit(audit.pairs_from_arrays(**data), losses=["ipo"]).losses["ipo"]
    w = weights(gradlab.get_loss("ipo"), data).weight
    d = data["len_w"] - data["len_l"]
    b = got["by_length_difference"]
    lo, hi = np.quantile(d, [0.01, 0.99])
    edges = np.linspace(lo, hi, stats.BINS + 1)
    for centre, q25, med, q75, count in zip(b["length_difference"], b["q25"], b["median"], b["q75"], b["count"],
                                            strict=True):
        k = int(np.argmin(np.abs((edges[:-1] + edges[1:]) / 2 - centre)))
        inside = (d >= edges[k]) & ((d < edges[k + 1]) | ((k == stats.BINS - 1) & (d <= hi)))
        v = w[inside] / w.mean()
        assert count == v.size
        assert [q25, med, q75] == pytest.approx(list(np.quantile(v, [0.25, 0.5, 0.75])), rel=1e-12)
    h = got["histogram"]
    edges = h["log10_relative_edges"]
    x = np.clip(np.log10(w / w.mean()), edges[0], edges[-1])  # the extremes sit on the outer edges
    counts, _ = np.histogram(x, bins=edges)
    assert h["counts"] == counts.tolist()


# --------------------------------------------------------------------------------------------
# Reading: formats, lengths, streaming
# --------------------------------------------------------------------------------------------


def test_formats_give_the_same_report(tmp_path):
    cols = audit.generate(700, length_bias=0.1, seed=11, text=True)
    reports = [audit.audit(audit.write(tmp_path / f"d.{ext}", cols), losses=["dpo", "simpo"]).as_dict()
               for ext in ("jsonl", "csv", "parquet")]
    for r in reports:
        r.pop("source")
    assert reports[0] == reports[1] == reports[2]


def save_to_disk(folder: Path, table, rows_per_file: int = 5) -> Path:
    """What datasets' Dataset.save_to_disk writes: Arrow stream files and a state.json naming them."""
    import pyarrow.ipc as ipc

    folder.mkdir()
    files = []
    for k, start in enumerate(range(0, table.num_rows, rows_per_file)):
        name = f"data-{k:05d}-of-{math.ceil(table.num_rows / rows_per_file):05d}.arrow"
        with ipc.new_stream(folder / name, table.schema) as w:
            for batch in table.slice(start, rows_per_file).to_batches(max_chunksize=2):
                w.write_batch(batch)
        files.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": files, "_fingerprint": "0", "_split": None}))
    (folder / "dataset_info.json").write_text("{}")
    return folder


def test_a_datasets_folder_is_read_like_the_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    cols = audit.generate(23, seed=6)
    want = audit.read_pairs(audit.write(tmp_path / "p.jsonl", cols))
    folder = save_to_disk(tmp_path / "ds", pa.table(cols))
    got = audit.read_pairs(folder)
    for k in ("len_w", "len_l", "lp_w", "lp_l", "ref_w", "ref_l"):
        assert np.array_equal(getattr(got, k), getattr(want, k)), k
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(audit.AuditInputError, match="DatasetDict"):
        audit.read_pairs(tmp_path / "dd")


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_standard_library_reader_in_small_chunks_gives_the_same_numbers(tmp_path, monkeypatch, ext):
    # pyarrow's streaming reader (when installed) against the standard library's, chunk by chunk
    path = audit.write(tmp_path / f"d.{ext}", audit.generate(500, seed=12, text=True))
    whole = audit.audit(path, losses=["ipo"]).as_dict()
    monkeypatch.setattr(audit_io, "_has_pyarrow", lambda: False)
    monkeypatch.setattr(audit_io, "CHUNK", 7)
    assert audit.audit(path, losses=["ipo"]).as_dict() == whole
    del_len = {k: v for k, v in audit.generate(500, seed=12, text=True).items() if not k.endswith("_length")}
    path = audit.write(tmp_path / f"t.{ext}", del_len)
    slow = audit.read_pairs(path)
    monkeypatch.undo()
    fast = audit.read_pairs(path)
    assert np.array_equal(slow.len_w, fast.len_w) and np.array_equal(slow.lp_l, fast.lp_l)


def test_lengths_from_text_fall_back_to_labelled_whitespace_words(tmp_path):
    cols = audit.generate(200, seed=13, text=True)
    with_len = audit.read_pairs(audit.write(tmp_path / "a.jsonl", cols))
    del cols["chosen_length"], cols["rejected_length"]
    pairs = audit.read_pairs(audit.write(tmp_path / "b.jsonl", cols))
    assert pairs.length_source == audit_io.WHITESPACE
    assert np.array_equal(pairs.len_w, with_len.len_w)  # the generator writes one word per token
    report = audit.audit(pairs, losses=["dpo"])
    assert "whitespace words" in audit.render(report)


def test_conversational_text_and_token_ids(tmp_path):
    rows = [{"chosen": [{"role": "assistant", "content": "a b c"}], "rejected": [{"role": "assistant", "content": "d"}],
             "ref_chosen_logps": -3.0, "ref_rejected_logps": -1.0},
            {"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "x y"}],
             "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}]
    pairs = audit.read_pairs(_write_rows(tmp_path / "conv.jsonl", rows))
    assert list(pairs.len_w) == [3, 1] and list(pairs.len_l) == [1, 2]
    rows = [{"chosen_ids": [1, 2, 3, 4], "rejected_ids": [5], "ref_chosen_logps": -3.0, "ref_rejected_logps": -1.0}]
    pairs = audit.read_pairs(_write_rows(tmp_path / "ids.jsonl", rows))
    assert list(pairs.len_w) == [4] and list(pairs.len_l) == [1] and "token ids" in pairs.length_source


def test_a_named_tokenizer_counts_the_tokens(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, ",": 2, "world": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # splits punctuation: 'hello,world' is 3 tokens
    tok.save(str(tmp_path / "tokenizer.json"))
    rows = [{"chosen": "hello,world", "rejected": "hello", "ref_chosen_logps": -2.0, "ref_rejected_logps": -1.0},
            {"chosen": "world", "rejected": "hello world", "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}]
    path = _write_rows(tmp_path / "t.jsonl", rows)
    pairs = audit.read_pairs(path, tokenizer=tmp_path)  # a folder holding tokenizer.json
    assert list(pairs.len_w) == [3, 1] and list(pairs.len_l) == [1, 2]
    assert pairs.length_source.startswith("tokenizer")
    assert list(audit.read_pairs(path).len_w) == [1, 1]  # whitespace words
    with pytest.raises(audit.AuditInputError, match="does not exist"):
        audit.read_pairs(path, tokenizer=tmp_path / "nope.json")


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def _example_rows(n: int = 30) -> list[dict]:
    cols = audit.generate(n, seed=21)
    return [{k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in cols.items()} for i in range(n)]


def test_missing_columns_list_found_and_accepted(tmp_path):
    rows = [{"chosen_length": 3, "rejected_length": 4, "score": 1.0}]
    with pytest.raises(audit.AuditInputError) as err:
        audit.read_pairs(_write_rows(tmp_path / "m.jsonl", rows))
    msg = str(err.value)
    assert "no log-prob columns" in msg and "found columns: chosen_length, rejected_length, score" in msg
    assert "ref_chosen_logps" in msg and "chosen_logps" in msg


def test_misnamed_column_is_named_with_its_likely_meaning(tmp_path):
    rows = _example_rows()
    for r in rows:
        r["chosen_logp"] = r.pop("chosen_logps")
    with pytest.raises(audit.AuditInputError, match=r"'chosen_logp'.*'chosen_logps'"):
        audit.read_pairs(_write_rows(tmp_path / "typo.jsonl", rows))


def test_one_sided_log_probs_are_refused(tmp_path):
    rows = _example_rows()
    for r in rows:
        del r["ref_rejected_logps"]
    with pytest.raises(audit.AuditInputError, match="found 'ref_chosen_logps' but not 'ref_rejected_logps'"):
        audit.read_pairs(_write_rows(tmp_path / "half.jsonl", rows))


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("chosen_logps", 0.5, r"must be in \[-1e9, 0\]"),
        ("ref_rejected_logps", float("nan"), r"must be in \[-1e9, 0\]"),
        ("rejected_logps", float("-inf"), r"must be in \[-1e9, 0\]"),
        ("chosen_logps", -1e300, r"must be in \[-1e9, 0\]"),
        ("chosen_length", 0, r"number of tokens in \[0.001, 1e9\]"),
        ("rejected_length", -3, r"number of tokens in \[0.001, 1e9\]"),
        ("chosen_length", 1e-300, r"number of tokens in \[0.001, 1e9\]"),  # issue 27: was exit 1
        ("rejected_length", 1e308, r"number of tokens in \[0.001, 1e9\]"),
        ("chosen_logps", "abc", "not a number"),
        ("ref_chosen_logps", None, "missing"),
    ],
)
@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_invalid_values_name_the_row_and_nothing_is_written(tmp_path, column, value, expected, ext):
    if ext == "parquet" and value == "abc":
        pytest.skip("Parquet columns are typed: a string in a float column cannot be written")
    cols = audit.generate(30, seed=22)
    bad = 17
    cols = {k: list(v.tolist()) for k, v in cols.items()}
    cols[column][bad] = value
    path = audit.write(tmp_path / f"bad.{ext}", cols)
    with pytest.raises(audit.AuditInputError, match=rf"row {bad}\b.*{column}.*{expected}") as err:
        audit.read_pairs(path)
    if ext != "parquet":
        assert f"line {bad + 1 + (ext == 'csv')}" in str(err.value)
    out = tmp_path / "figs"
    code = main(["audit", str(path), "--out", str(out)])
    assert code == 2 and not out.exists()


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_a_400_digit_integer_names_the_field_and_its_range(tmp_path, capsys, ext):
    big = "7" * 400  # issue 27: was exit 1 (an OverflowError inside float())
    rows = [("-1.5", "-2.5", "3", "4"), ("-1.0", "-2.0", big, "4"), ("-1.0", "-3.0", "2", "5")]
    names = ("chosen_logps", "rejected_logps", "chosen_length", "rejected_length")
    path = tmp_path / f"big.{ext}"
    if ext == "csv":
        path.write_text(",".join(names) + "\n" + "".join(",".join(r) + "\n" for r in rows))
    else:
        items = (", ".join(f'"{k}": {v}' for k, v in zip(names, r, strict=True)) for r in rows)
        path.write_text("".join("{" + line + "}\n" for line in items))
    assert main(["audit", str(path), "--loss", "simpo"]) == 2
    err = capsys.readouterr().err
    assert "row 1" in err and "'chosen_length'" in err and "[0.001, 1e9]" in err and "internal error" not in err


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("ext", ["csv", "jsonl"])
def test_a_utf8_byte_order_mark_is_read(tmp_path, monkeypatch, ext, fast):
    path = audit.write(tmp_path / f"p.{ext}", audit.generate(40, seed=4))
    want = audit.read_pairs(path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    if not fast:
        monkeypatch.setattr(audit_io, "_has_pyarrow", lambda: False)
    got = audit.read_pairs(path)
    assert np.array_equal(got.len_w, want.len_w) and np.array_equal(got.ref_l, want.ref_l)


def test_invalid_row_in_a_later_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(audit_io, "CHUNK", 8)
    rows = _example_rows(40)
    rows[33]["rejected_logps"] = 1.0
    with pytest.raises(audit.AuditInputError, match=r"row 33 \(line 34"):
        audit.read_pairs(_write_rows(tmp_path / "late.jsonl", rows))


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.jsonl", b"", "empty"),
        ("array.json", b'[{"chosen_logps": -1}]\n', "one JSON array"),
        ("scalars.jsonl", b"1\n2\n", "not an object"),
        ("binary.csv", bytes(range(256)) * 4, "not UTF-8"),
        ("prose.txt", b"Dear reader, this is a letter.\nIt has lines.\n", "names none of the columns"),
        ("one_field.csv", b"hello\nworld\n", "not a header"),
        ("broken.parquet", b"PAR1 this is not parquet", "could not be read as Parquet"),
        ("header_only.csv", b"chosen_logps,rejected_logps,chosen_length,rejected_length\n", "no rows"),
        ("ragged.csv", b"ref_chosen_logps,ref_rejected_logps,chosen_length,rejected_length\n-1,-2,3\n", "fields"),
    ],
)
def test_a_file_that_is_not_a_table_is_refused(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(audit.AuditInputError, match=expected):
        audit.read_pairs(path)


def test_reference_based_losses_are_refused_without_reference(tmp_path):
    cols = audit.generate(200, seed=23)
    del cols["ref_chosen_logps"], cols["ref_rejected_logps"]
    path = audit.write(tmp_path / "noref.jsonl", cols)
    with pytest.raises(audit.AuditInputError, match="'dpo' needs the reference model's log-probs.*simpo"):
        audit.audit(path, losses=["dpo"])
    report = audit.audit(path)
    assert "simpo" in report.losses and "orpo" in report.losses and "dpo" not in report.losses
    assert "reference" in report.refused["dpo"] and "pdpo" in report.refused
    assert all(not gradlab.get_loss(n).needs_reference for n in report.losses)


def test_unknown_hyperparameter_and_loss(tmp_path):
    path = _file(tmp_path, "d.jsonl", n_pairs=50, seed=24)
    with pytest.raises(gradlab.GradlabError, match="no audited loss has such a hyperparameter"):
        audit.audit(path, losses=["dpo"], values={"simpo_gamma": 1.0})
    with pytest.raises(gradlab.UnknownLossError):
        audit.audit(path, losses=["not_a_loss"])
    with pytest.raises(audit.AuditInputError, match="expectation"):
        audit.audit(path, losses=["pdpo"])
    assert audit.audit(path, losses=["dpo"], values={"beta": 0.5}).losses["dpo"]["hyperparameters"] == {"beta": 0.5}


def test_non_finite_gradient_refuses_that_loss_only():
    # ORPO's odds need lp < 0 strictly: at lp_w = 0 its gradient is infinite
    pairs = audit.pairs_from_arrays(lp_w=[0.0, -1.0, -2.0], lp_l=[-1.0, -2.0, -1.5], len_w=[1, 2, 3], len_l=[2, 2, 2])
    report = audit.audit(pairs, losses=None)
    assert "orpo" in report.refused and "row 0" in report.refused["orpo"]
    assert "simpo" in report.losses


# --------------------------------------------------------------------------------------------
# The command line, the shipped example and the figures
# --------------------------------------------------------------------------------------------


def test_cli_json_on_the_shipped_example(capsys):
    assert main(["audit", str(EXAMPLE), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ds = out["dataset"]
    for key in ("n_pairs", "chosen_length_mean", "rejected_length_mean"):
        assert isinstance(ds[key], int | float)
    assert set(ds["length_test"]) >= {"statistic", "p_value"}
    assert ds["length_difference"] == "chosen longer"  # the example is generated with a length bias
    assert set(out["losses"]) == {n for n in PAIR_LOSSES}
    for s in out["losses"].values():
        for key in ("corr_weight_length_difference", "top10_share", "top1_share", "lever_exponent",
                    "share_from_chosen_longer", "top_pairs", "verdict", "weight", "g_w", "g_l"):
            assert key in s


def test_cli_human_output_has_a_table_and_verdicts(capsys):
    assert main(["audit", str(EXAMPLE), "--loss", "dpo", "simpo", "--set", "beta=0.2"]) == 0
    out = capsys.readouterr().out
    assert "top10%" in out and "verdicts:" in out and "  dpo: " in out and "  simpo: " in out
    assert "length difference: chosen longer" in out


def test_shipped_example_is_what_the_generator_writes(tmp_path):
    cmd = [sys.executable, "-m", "gradlab.audit", str(tmp_path / "e.jsonl"), "--pairs", "400", "--length-bias",
           "0.2", "--text", "--seed", "0"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    assert (tmp_path / "e.jsonl").read_bytes() == EXAMPLE.read_bytes()


@pytest.mark.long(seconds=11)
def test_cli_out_writes_the_figures_deterministically(tmp_path, capsys):
    args = ["audit", str(EXAMPLE), "--loss", "dpo", "r_dpo", "simpo"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name != ".gradlab-manifest.json")
    assert (tmp_path / "a" / ".gradlab-manifest.json").is_file()  # the folder is gradlab's (gradlab.output)
    assert names == sorted(f"{f}.{ext}" for f in ("audit_weight_vs_length_difference", "audit_weight_histogram",
                                                   "audit_loss_comparison") for ext in FORMATS)
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_cli_error_exit_and_message(tmp_path, capsys):
    path = tmp_path / "x.jsonl"
    path.write_text('{"chosen_length": 1, "rejected_length": 2}\n')
    assert main(["audit", str(path)]) == 2
    err = capsys.readouterr()
    assert err.out == "" and "gradlab: error:" in err.err and "accepted:" in err.err


# --------------------------------------------------------------------------------------------
# Memory: the two inputs, under a virtual-memory limit
# --------------------------------------------------------------------------------------------


def _audit_under_ulimit(path: Path, megabytes: int, **env: str) -> subprocess.CompletedProcess:
    import os

    # one malloc arena and one BLAS/OpenMP thread: the virtual size then tracks what is used. The
    # limit is set by the shell (a preexec_fn would fork this process, which JAX warns about)
    base = {**os.environ, "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    command = ["bash", "-c", f'ulimit -v {megabytes * 1024} && exec "$@"', "ulimit", sys.executable, "-m", "gradlab",
               "audit", str(path), "--loss", "simpo"]
    return subprocess.run(command, cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=300)


def test_a_line_past_the_limit_is_refused_without_reading_it_whole(tmp_path):
    small = audit.write(tmp_path / "small.jsonl", audit.generate(50, seed=1))
    assert _audit_under_ulimit(small, 800).returncode == 0  # the control: a normal file fits in the limit
    big = tmp_path / "no_newline.jsonl"
    with open(big, "w") as f:  # 300 MB with no newline: read whole it needs more than the limit
        f.write('{"chosen_logps": -1, "rejected_logps": -2, "chosen_length": 3, "rejected_length": 4, "chosen": "')
        block = "ab " * (1 << 20)
        for _ in range(100):
            f.write(block)
        f.write('"}')
    proc = _audit_under_ulimit(big, 800, GRADLAB_BUDGET_FIELD_BYTES=str(1 << 20))
    assert proc.returncode == 2, proc.stderr
    assert "line 1 (row 0) is longer than the limit of 1,048,576 bytes" in proc.stderr
    assert "GRADLAB_BUDGET_FIELD_BYTES" in proc.stderr and "out of memory" not in proc.stderr


def test_a_dictionary_encoded_16mb_string_is_decoded_once(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    n = 4096  # every row points at one 16 MB dictionary value: decoded per row that is 64 GB
    text = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array(["a b " * (4 << 20)]))
    table = pa.table({"chosen_logps": np.full(n, -1.0), "rejected_logps": np.full(n, -2.0), "chosen": text,
                      "rejected": pa.array(["x y"] * n)})
    path = tmp_path / "dict.parquet"
    pq.write_table(table, path, compression="zstd")
    assert path.stat().st_size < 10_000
    proc = _audit_under_ulimit(path, 2000)  # pyarrow alone reserves ~1.5 GB of address space
    assert proc.returncode == 0, proc.stderr
    pairs = audit.read_pairs(path)
    assert (pairs.len_w == 8 << 20).all() and (pairs.len_l == 2).all()  # 2 words x 4M repeats
    with budgets_raised(field_bytes=1 << 20):
        with pytest.raises(audit.AuditInputError, match=r"row 0: 'chosen' is 16,777,216 bytes"):
            audit.read_pairs(path)
