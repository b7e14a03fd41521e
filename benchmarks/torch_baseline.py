"""The PyTorch loops a researcher would write for the training benchmark: same policy, data, loss
and optimiser as gradlab's experiment runner for DPO (``benchmarks.suite.sweep_experiment``), in
three forms:

- :func:`train_dpo`: eager mode, one sweep point at a time (the naive loop);
- :func:`train_dpo_batched`: eager mode, every sweep point at once on a leading run axis (what a
  competent PyTorch user writes for a sweep: one Adam over a ``(runs, ...)`` parameter tensor,
  the sum of the per-run losses; Adam is elementwise, so each run's slice is updated exactly as
  by its own optimiser);
- the same batched step under ``torch.compile`` (``compile=True``), its compile time reported
  apart from its run time.

Policies: ``unigram`` (theta of shape ``(V,)``, every token i.i.d. from softmax(theta)) and
``bigram`` (W of shape ``(V + 1, V)``, the row chosen by the previous token, row ``V`` at the
start). A sequence's log-probability is the sum of its first ``length`` token log-probs."""

from __future__ import annotations

import time

import numpy as np


def train_dpo(family: str, vocab: int, max_len: int, init: dict, seqs: np.ndarray, lengths: np.ndarray,
              w: np.ndarray, l: np.ndarray, beta: float, steps: int, lr: float, record_at: int) -> dict:
    """Full-batch Adam on the mean DPO loss over the pairs; the policy starts at its reference.

    Returns the loss and the expected length (by enumeration) at the start of step
    ``record_at``, to compare with the row gradlab records there."""
    import torch
    import torch.nn.functional as F

    torch.set_default_dtype(torch.float64)
    name = "theta" if family == "unigram" else "W"
    param = torch.tensor(np.asarray(init[name]), requires_grad=True)
    ref = param.detach().clone()
    tok_all, len_all = torch.tensor(seqs), torch.tensor(lengths)
    pos = torch.arange(max_len)

    def logprob(p, tok, length):
        if family == "unigram":
            lps = F.log_softmax(p, dim=-1)[tok]
        else:
            prev = torch.cat([torch.full_like(tok[:, :1], vocab), tok[:, :-1]], dim=1)
            lps = torch.gather(F.log_softmax(p[prev], dim=-1), -1, tok[..., None])[..., 0]
        return (lps * (pos < length[:, None])).sum(-1)

    tw, lw_, tl, ll_ = tok_all[w], len_all[w], tok_all[l], len_all[l]
    with torch.no_grad():
        ref_w, ref_l = logprob(ref, tw, lw_), logprob(ref, tl, ll_)
    opt = torch.optim.Adam([param], lr=lr)
    for step in range(steps):
        opt.zero_grad()
        h = (logprob(param, tw, lw_) - ref_w) - (logprob(param, tl, ll_) - ref_l)
        loss = -F.logsigmoid(beta * h).mean()
        if step == record_at:
            recorded_loss, recorded_params = loss.item(), param.detach().clone()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p = torch.exp(logprob(recorded_params, tok_all, len_all))
        # the table holds every response, stopped ones (length max_len) included: p sums to 1
        expected_length = float((p * len_all).sum())
    return {"loss": recorded_loss, "expected_length": expected_length}


def _batched_logprob(family: str, vocab: int, max_len: int):
    """``logprob(param, tok, length)``: param ``(R, ...)``, tok ``(R, P, L)``, length ``(R, P)``
    -> ``(R, P)`` sequence log-probs, one gather per token over the flattened table."""
    import torch
    import torch.nn.functional as F

    pos = torch.arange(max_len)

    def logprob(param, tok, length):
        runs = param.shape[0]
        table = F.log_softmax(param, dim=-1).reshape(runs, -1)  # (R, V) or (R, (V+1) V)
        if family == "unigram":
            idx = tok
        else:  # row of the previous token (V at the start), column of this token
            prev = torch.cat([torch.full_like(tok[..., :1], vocab), tok[..., :-1]], dim=-1)
            idx = prev * vocab + tok
        lps = torch.gather(table, 1, idx.reshape(runs, -1)).reshape(tok.shape)
        return (lps * (pos < length[..., None])).sum(-1)

    return logprob


def train_dpo_batched(family: str, vocab: int, max_len: int, inits: np.ndarray, seqs: np.ndarray,
                      lengths: np.ndarray, w: np.ndarray, l: np.ndarray, betas: np.ndarray, steps: int, lr: float,
                      record_every: int, compile: bool = False) -> dict:
    """Every run at once: ``inits`` ``(R, ...)``, pair indices ``w, l`` ``(R, P)`` into the
    enumerated ``seqs``, ``betas`` ``(R,)``. Full-batch Adam on the sum over runs of each run's
    mean DPO loss. Records each run's loss and expected length (by enumeration) at the start of
    every ``record_every``-th step, as gradlab does.

    Returns ``loss`` and ``expected_length`` (``(records, R)`` arrays), ``run_s`` (the training
    loop) and, with ``compile=True``, ``compile_s``: the first compiled step (tracing and
    Inductor's code generation for the forward and backward graphs) less one steady step."""
    import torch
    import torch.nn.functional as F

    torch.set_default_dtype(torch.float64)
    logprob = _batched_logprob(family, vocab, max_len)
    param = torch.tensor(np.asarray(inits), requires_grad=True)
    runs = param.shape[0]
    tok_all, len_all = torch.tensor(seqs), torch.tensor(lengths)
    w_t, l_t = torch.as_tensor(w), torch.as_tensor(l)
    tw, lw_, tl, ll_ = tok_all[w_t], len_all[w_t], tok_all[l_t], len_all[l_t]
    beta = torch.as_tensor(np.asarray(betas, dtype=np.float64))[:, None]
    with torch.no_grad():
        ref_w, ref_l = logprob(param, tw, lw_), logprob(param, tl, ll_)
    every_tok, every_len = tok_all.expand(runs, *tok_all.shape), len_all.expand(runs, *len_all.shape)

    def per_run_loss(param):
        h = (logprob(param, tw, lw_) - ref_w) - (logprob(param, tl, ll_) - ref_l)
        return -F.logsigmoid(beta * h).mean(-1)  # (R,)

    loss_fn = per_run_loss
    compile_s = None
    if compile:
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = False  # no on-disk graph cache: the compile time is cold
        torch._dynamo.reset()
        loss_fn = torch.compile(per_run_loss)
    opt = torch.optim.Adam([param], lr=lr)
    losses, lengths_rec = [], []

    def one_step(step):
        opt.zero_grad()
        per_run = loss_fn(param)
        if step % record_every == 0:
            with torch.no_grad():
                p = torch.exp(logprob(param, every_tok, every_len))  # (R, N)
                # as in train_dpo: the table holds every response, stopped ones included
                lengths_rec.append((p * len_all).sum(-1).numpy().copy())
                losses.append(per_run.detach().numpy().copy())
        per_run.sum().backward()
        opt.step()

    if compile:  # the first step compiles; a second one (on a copy) gives a steady step to subtract
        saved = param.detach().clone()
        start = time.perf_counter()
        one_step(0)
        first = time.perf_counter() - start
        start = time.perf_counter()
        one_step(1)
        steady = time.perf_counter() - start
        compile_s = first - steady
        with torch.no_grad():
            param.copy_(saved)
        opt = torch.optim.Adam([param], lr=lr)
        losses.clear()
        lengths_rec.clear()
    start = time.perf_counter()
    for step in range(steps):
        one_step(step)
    run_s = time.perf_counter() - start
    return {"loss": np.stack(losses), "expected_length": np.stack(lengths_rec), "run_s": run_s,
            "compile_s": compile_s}
