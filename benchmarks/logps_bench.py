"""``gradlab logps`` throughput against the loop a user would write, in one process.

Both sides score the same pairs with the same model, tokenisation (TRL 1.16.0's, from
``gradlab.audit.logps.tokenize_pair``), batch size, dtype and torch threads. The plain loop is
what TRL's collator and a hand-written script do: each batch of pairs in file order becomes
``prompt + chosen`` and ``prompt + rejected`` right-padded into one forward pass, and the masked
log-softmax is summed. ``gradlab logps`` sorts a window of pairs by length (less padding) and runs
each prompt once, its key-value cache serving both completions. Tokens per second count the
scored completion tokens (the same for both). The model is a random Llama built from a config and
a word-level tokenizer built from a vocabulary (no download); its size, not its weights, sets the
speed. Two datasets: long prompts (as in chat preference data, where sharing the prompt pays) and
short prompts (where it cannot: the two should then be close)."""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

SIZES = {
    "tiny": dict(rows=8, hidden=32, layers=2, heads=2, vocab=256, batch=4, repeats=1),
    "quick": dict(rows=128, hidden=256, layers=4, heads=4, vocab=4096, batch=8, repeats=2),
    "full": dict(rows=512, hidden=256, layers=4, heads=4, vocab=4096, batch=8, repeats=3),
}
DATASETS = {"long_prompt": ((96, 320), (16, 96)), "short_prompt": ((4, 24), (16, 96))}  # token ranges


def _build(folder: Path, cfg: dict):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(cfg["vocab"] - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=4 * cfg["hidden"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
        max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return words[4:]


def _rows(words: list[str], n: int, prompt: tuple[int, int], completion: tuple[int, int], seed: int) -> list:
    rng = random.Random(seed)

    def text(lo_hi: tuple[int, int]) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(*lo_hi)))

    return [(i, {"prompt": text(prompt), "chosen": " " + text(completion), "rejected": " " + text(completion)})
            for i in range(n)]


def plain_loop(rows: list, tokenizer, model, batch: int) -> list[tuple[float, float]]:
    """What a user writes: per batch, prompt + chosen and prompt + rejected right-padded into one
    forward pass; the masked log-softmax of the next token, summed over the completion."""
    import torch

    out = []
    pad = tokenizer.pad_token_id
    from gradlab.audit.logps import tokenize_pair

    for i in range(0, len(rows), batch):
        seqs, masks = [], []
        for _, example in rows[i:i + batch]:
            p, c, r = tokenize_pair(tokenizer, example)
            for completion in (c, r):
                seqs.append(p + completion)
                masks.append([0] * len(p) + [1] * len(completion))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        scored = torch.zeros((len(seqs), width))
        for k, (s, m) in enumerate(zip(seqs, masks, strict=True)):
            ids[k, :len(s)] = torch.tensor(s)
            attention[k, :len(s)] = 1
            scored[k, :len(s)] = torch.tensor(m, dtype=torch.float)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=attention).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            sums = (logp * scored[:, 1:]).sum(-1).double()
        out += [tuple(x) for x in sums.view(-1, 2).tolist()]
    return out


def logps_throughput(size: str = "quick") -> dict:
    """Tokens per second of ``gradlab logps`` and of the plain loop, per dataset, best of
    ``repeats``; with the largest difference between their log-probs (they must agree)."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        return {"logps_note": "torch and transformers are not installed: pip install 'gradlab[model]'"}
    from gradlab.audit import logps

    cfg = SIZES[size]
    out: dict = {"logps_model": f"random Llama, hidden {cfg['hidden']}, {cfg['layers']} layers, vocab {cfg['vocab']}",
                 "logps_batch_size": cfg["batch"], "logps_torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as folder:
        words = _build(Path(folder), cfg)
        model, tokenizer = logps.load(folder, device="cpu", dtype="float32")
        scorer = logps.Scorer(model, tokenizer.pad_token_id)
        for name, (prompt, completion) in DATASETS.items():
            rows = _rows(words, cfg["rows"], prompt, completion, seed=len(name))
            warm = rows[: cfg["batch"]]
            list(logps.compute(iter(warm), tokenizer, [scorer], batch_size=cfg["batch"]))
            plain_loop(warm, tokenizer, model, cfg["batch"])
            best_g = best_p = float("inf")
            for _ in range(cfg["repeats"]):  # alternated, so that a busy moment hits both sides
                start = time.perf_counter()
                records = [r for recs, _, _ in logps.compute(iter(rows), tokenizer, [scorer], batch_size=cfg["batch"])
                           for r in recs]
                best_g = min(best_g, time.perf_counter() - start)
                start = time.perf_counter()
                plain = plain_loop(rows, tokenizer, model, cfg["batch"])
                best_p = min(best_p, time.perf_counter() - start)
            tokens = sum(r["chosen_length"] + r["rejected_length"] for r in records)
            diff = max(max(abs(r["chosen_logps"] - w), abs(r["rejected_logps"] - l))
                       for r, (w, l) in zip(records, plain, strict=True))
            out[f"logps_{name}_tokens"] = tokens
            out[f"logps_{name}_tokens_per_s"] = tokens / best_g
            out[f"logps_{name}_plain_loop_tokens_per_s"] = tokens / best_p
            out[f"logps_{name}_speedup_vs_plain_loop"] = best_p / best_g
            out[f"logps_{name}_max_abs_difference"] = diff
    out["logps_speedup_vs_plain_loop"] = min(out[f"logps_{n}_speedup_vs_plain_loop"] for n in DATASETS)
    return out
