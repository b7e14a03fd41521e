"""gradlab logps: every log-prob against a direct forward pass written here, on tiny random models.

The models (a 2-layer Llama, whose RoPE is blind to a shift of positions, and a 2-layer GPT-2,
whose absolute positions are not) and the word-level tokenizer are built from configs and a
vocabulary in a temporary folder: nothing is downloaded. The expected token ids are written from
the vocabulary, not from the tokenizer, so the tokenisation (TRL 1.16.0's: BOS from the
tokenizer, EOS appended to standard completions, the chat template for conversations) is checked
too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_audit import save_to_disk

from gradlab.audit import logps as lp

# torch and transformers are imported in the tests, not here: every xdist worker collects this
# module, and only the one that runs it needs them (test_tasks.py's _HEAVY)
_MISSING = [m for m in ("torch", "transformers", "tokenizers") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"gradlab logps needs {', '.join(_MISSING)}")

WORDS = [f"w{i}" for i in range(48)]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB = {w: i for i, w in enumerate(SPECIAL + WORDS + ["user", "assistant", ":"])}
BOS, EOS = VOCAB["<s>"], VOCAB["</s>"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")
TOL = 1e-5
F64 = {"device": "cpu", "dtype": "float64"}  # float64 end to end: a 1e-5 difference is then a bug, not rounding


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: torch's thread pool only contends with the other tests for the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("models")
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = TEMPLATE
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(VOCAB), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                      bos_token_id=BOS, eos_token_id=EOS))
    out = {}
    for name, model in (("llama", llama), ("gpt2", gpt2)):
        model.save_pretrained(root / name)
        fast.save_pretrained(root / name)
        out[name] = root / name
    return out


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _standard(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": _words(rng, 1, 14), "chosen": " " + _words(rng, 1, 16), "rejected": " " + _words(rng, 1, 16)}
            for _ in range(n)]


def _conversational(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)

    def msg(role: str, lo: int, hi: int) -> list[dict]:
        return [{"role": role, "content": _words(rng, lo, hi)}]

    return [{"prompt": msg("user", 1, 12), "chosen": msg("assistant", 1, 16), "rejected": msg("assistant", 1, 16)}
            for _ in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ids(text: str) -> list[int]:
    return [VOCAB[w] for w in text.split()]


def _expected_ids(example: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token ids, written from the vocabulary."""
    if isinstance(example["prompt"], str):  # standard: BOS + prompt; completion + the EOS TRL appends
        return [BOS, *_ids(example["prompt"])], [*_ids(example["chosen"]), EOS], [*_ids(example["rejected"]), EOS]
    user = example["prompt"][0]["content"]
    prompt = [VOCAB["user"], VOCAB[":"], *_ids(user), EOS, VOCAB["assistant"], VOCAB[":"]]
    return prompt, [*_ids(example["chosen"][0]["content"]), EOS], [*_ids(example["rejected"][0]["content"]), EOS]


def _direct(model, prompt: list[int], completion: list[int], max_length: int | None = None,
            mode: str = "keep_start") -> tuple[float, int]:
    """Summed log pi(token | everything before it) over the completion's tokens, one unpadded
    sequence, with TRL's truncation written out; and the number of tokens summed."""
    import torch

    seq, mask = prompt + completion, [0] * len(prompt) + [1] * len(completion)
    if max_length is not None:
        sl = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
        seq, mask = seq[sl], mask[sl]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0], dim=-1)
    picked = [float(logp[t - 1, seq[t]]) for t in range(1, len(seq)) if mask[t]]
    return sum(picked), len(picked)


def _load(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def _check(records: list[dict], rows: list[dict], policy, reference, **trunc) -> int:
    checked = 0
    for rec in records:
        p, c, r = _expected_ids(rows[rec["row"]])
        for side, completion in (("chosen", c), ("rejected", r)):
            want, n = _direct(policy, p, completion, **trunc)
            assert rec[f"{side}_length"] == n
            assert rec[f"{side}_logps"] == pytest.approx(want, abs=TOL, rel=0), (rec["row"], side)
            if reference is not None:
                want_ref, _ = _direct(reference, p, completion, **trunc)
                assert rec[f"ref_{side}_logps"] == pytest.approx(want_ref, abs=TOL, rel=0), (rec["row"], side)
            checked += 1
    return checked


@pytest.mark.parametrize("kind", ["standard", "conversational"])
def test_every_log_prob_equals_a_direct_forward_pass(tmp_path, models, kind):
    rows = _standard(40) if kind == "standard" else _conversational(40)
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    summary = lp.logps(data, str(models["llama"]), ref_model=str(models["gpt2"]), batch_size=5, **F64)
    assert [r["row"] for r in summary.records] == list(range(40))
    assert _check(summary.records, rows, _load(models["llama"]), _load(models["gpt2"])) == 80
    assert summary.tokens == sum(r["chosen_length"] + r["rejected_length"] for r in summary.records)


def test_the_shared_prompt_and_the_full_sequences_agree(tmp_path, models):
    rows = _standard(24, seed=3)
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    a = lp.logps(data, str(models["gpt2"]), batch_size=7, **F64).records
    b = lp.logps(data, str(models["gpt2"]), batch_size=3, **F64, share_prompt=False).records
    for x, y in zip(a, b, strict=True):
        assert x["row"] == y["row"] and x["chosen_length"] == y["chosen_length"]
        assert x["chosen_logps"] == pytest.approx(y["chosen_logps"], abs=TOL)
        assert x["rejected_logps"] == pytest.approx(y["rejected_logps"], abs=TOL)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_as_trl_applies_it(tmp_path, models, mode):
    rows = _standard(30, seed=5)
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    max_length = 12
    summary = lp.logps(data, str(models["llama"]), batch_size=4, **F64, max_length=max_length,
                       truncation_mode=mode)
    long_prompts = {i for i, r in enumerate(rows) if len(_expected_ids(r)[0]) >= max_length}
    if mode == "keep_start":  # TRL drops the pairs whose prompt alone fills max_length
        assert long_prompts and set(summary.skipped) == long_prompts
    else:
        assert not summary.skipped
    assert {r["row"] for r in summary.records} == set(range(30)) - set(summary.skipped)
    assert _check(summary.records, rows, _load(models["llama"]), None, max_length=max_length, mode=mode)
    assert max(r["chosen_length"] for r in summary.records) <= max_length - 1


def test_implicit_prompt_is_extracted_as_trl_does():
    conv_w = [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "It is blue."}]
    conv_l = [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "It is green."}]
    assert lp.extract_prompt(conv_w, conv_l) == (conv_w[:1], conv_w[1:], conv_l[1:])  # TRL's docstring example
    assert lp.extract_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")


def test_resume_keeps_written_rows_and_refuses_a_foreign_file(tmp_path, models):
    rows = _standard(30, seed=7)
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    for ext in ("jsonl", "csv"):
        whole = tmp_path / f"whole.{ext}"
        lp.logps(data, str(models["gpt2"]), out=whole, batch_size=2, **F64)
        part = tmp_path / f"part.{ext}"
        lines = whole.read_text().splitlines(keepends=True)
        keep = 11 if ext == "jsonl" else 12  # CSV: the header and 11 rows
        part.write_text("".join(lines[:keep]) + lines[keep][:9])  # as if killed in the middle of a line
        s = lp.logps(data, str(models["gpt2"]), out=part, batch_size=2, **F64)
        assert s.rows_resumed == 11 and s.rows_written == 19
        assert _same_rows(part, whole)  # batch partners differ after resuming: equal to float64 rounding
        again = lp.logps(data, str(models["gpt2"]), out=part, batch_size=2, **F64)
        assert again.rows_written == 0 and _same_rows(part, whole)
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text('{"mine": 1}\n')
    with pytest.raises(lp.LogpsError, match="left untouched"):
        lp.logps(data, str(models["gpt2"]), out=foreign, **F64)
    assert foreign.read_text() == '{"mine": 1}\n'
    with pytest.raises(lp.LogpsError, match="columns"):  # written without a reference: not resumable with one
        lp.logps(data, str(models["gpt2"]), ref_model=str(models["llama"]), out=tmp_path / "whole.jsonl",
                 **F64)


def _same_rows(a: Path, b: Path) -> bool:
    def rows(p: Path) -> list[list[float]]:
        lines = p.read_text().splitlines()
        if p.suffix == ".csv":
            return [[float(x) for x in line.split(",")] for line in lines[1:]]
        return [list(json.loads(line).values()) for line in lines]

    x, y = np.array(rows(a)), np.array(rows(b))
    return x.shape == y.shape and np.allclose(x, y, rtol=1e-12, atol=0)


def test_formats_give_the_same_rows(tmp_path, models):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = _standard(12, seed=9)
    jsonl = _write_jsonl(tmp_path / "p.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (tmp_path / "p.csv").write_bytes(("\ufeffprompt,chosen,rejected\n" + "".join(
        f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in rows)).encode())  # with a UTF-8 BOM
    conv = _conversational(6)
    pq.write_table(pa.Table.from_pylist(conv), tmp_path / "c.parquet")
    save_to_disk(tmp_path / "p_dataset", pa.Table.from_pylist(rows))
    want = lp.logps(jsonl, str(models["gpt2"]), **F64).records
    for name in ("p.parquet", "p.csv", "p_dataset"):
        assert lp.logps(tmp_path / name, str(models["gpt2"]), **F64).records == want, name
    got = lp.logps(tmp_path / "c.parquet", str(models["gpt2"]), **F64).records
    assert got == lp.logps(_write_jsonl(tmp_path / "c.jsonl", conv), str(models["gpt2"]), **F64).records


def test_audit_runs_on_the_result_and_in_one_command(tmp_path, models, capsys):
    from gradlab import cli

    data = _write_jsonl(tmp_path / "pairs.jsonl", _standard(40, seed=11))
    out = tmp_path / "logps.jsonl"
    argv = ["logps", str(data), "--model", str(models["llama"]), "--ref-model", str(models["gpt2"]),
            "--device", "cpu", "--dtype", "float64", "--out", str(out), "--json"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_written"] == 40 and summary["tokenisation"] == f"TRL {lp.TRL_VERSION} DPOTrainer"
    assert cli.main(["audit", str(out), "--loss", "dpo", "simpo", "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert cli.main(["audit", str(data), "--model", str(models["llama"]), "--ref-model", str(models["gpt2"]),
                     "--device", "cpu", "--dtype", "float64", "--loss", "dpo", "simpo", "--json"]) == 0
    one_step = json.loads(capsys.readouterr().out)
    assert one_step["losses"]["dpo"]["weight"] == from_file["losses"]["dpo"]["weight"]
    assert one_step["dataset"]["n_pairs"] == 40


def test_without_torch_the_command_says_how_to_install(tmp_path, monkeypatch, capsys):
    from gradlab import cli

    data = _write_jsonl(tmp_path / "pairs.jsonl", _standard(3))
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    assert cli.main(["logps", str(data), "--model", "anything"]) == 2
    assert "pip install 'gradlab[model]'" in capsys.readouterr().err


def test_bad_options_exit_2(tmp_path, models, capsys):
    from gradlab import cli

    data = _write_jsonl(tmp_path / "pairs.jsonl", _standard(3))
    for extra, message in ((["--batch-size", "0"], "--batch-size"), (["--max-length", "1"], "--max-length"),
                           (["--dtype", "float7"], "--dtype"), (["--device", "tpu"], "--device"),
                           (["--out", str(tmp_path / "x.parquet")], "JSON Lines")):
        assert cli.main(["logps", str(data), "--model", str(models["gpt2"]), *extra]) == 2, extra
        assert message in capsys.readouterr().err
    assert cli.main(["logps", str(data), "--model", str(tmp_path / "no-such-model")]) == 2
    assert "cannot load" in capsys.readouterr().err
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "w1", "chosen": 3, "rejected": "w2"}])
    assert cli.main(["logps", str(bad), "--model", str(models["gpt2"])]) == 2
    assert "row 0" in capsys.readouterr().err


def test_cli_piped_has_no_progress_bar_and_writes_the_file(tmp_path, models):
    data = _write_jsonl(tmp_path / "pairs.jsonl", _conversational(10))
    out = tmp_path / "o.csv"
    proc = subprocess.run([sys.executable, "-m", "gradlab", "logps", str(data), "--model", str(models["gpt2"]),
                           "--device", "cpu", "--dtype", "float64", "--out", str(out)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "pair/s" not in proc.stderr and "%|" not in proc.stderr
    header, *lines = out.read_text().splitlines()
    assert header == "row,chosen_logps,rejected_logps,chosen_length,rejected_length" and len(lines) == 10
    assert np.isfinite([float(x) for x in lines[0].split(",")]).all()


def test_float32_agrees_with_float64_to_float32_rounding(tmp_path, models):
    data = _write_jsonl(tmp_path / "pairs.jsonl", _standard(16, seed=13))
    a = lp.logps(data, str(models["llama"]), batch_size=4, device="cpu", dtype="float32").records
    b = lp.logps(data, str(models["llama"]), batch_size=4, **F64).records
    for x, y in zip(a, b, strict=True):
        # float32 per-token log-probs carry ~1e-7 relative error each; a sum of L of them ~ L * 1e-7 * |mean|
        assert x["chosen_logps"] == pytest.approx(y["chosen_logps"], rel=1e-5)
        assert x["rejected_logps"] == pytest.approx(y["rejected_logps"], rel=1e-5)


def test_an_interrupt_keeps_the_windows_written(tmp_path, models, monkeypatch):
    rows = _standard(60, seed=17)
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "o.jsonl"
    calls = {"n": 0}
    real = lp.Scorer.__call__

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 6:  # the third window's second batch (windows of 2 batches of 2 pairs)
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(lp.Scorer, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lp.logps(data, str(models["gpt2"]), out=out, batch_size=2, window_batches=2, **F64)
    kept = [json.loads(line)["row"] for line in out.read_text().splitlines()]
    assert kept == [0, 1, 2, 3, 4, 5, 6, 7]  # two whole windows of 4 pairs, nothing of the third
    monkeypatch.setattr(lp.Scorer, "__call__", real)
    s = lp.logps(data, str(models["gpt2"]), out=out, batch_size=2, **F64)
    assert s.rows_resumed == 8 and s.rows_written == 52
    assert [json.loads(line)["row"] for line in out.read_text().splitlines()] == list(range(60))
