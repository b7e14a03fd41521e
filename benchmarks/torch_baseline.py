"""The PyTorch loops a researcher would write for the training benchmark: same policy, data, loss
and optimiser as gradlab's experiment runner for DPO (``benchmarks.suite.sweep_experiment``), in
three forms:

- :func:`train_dpo`: eager mode, one sweep point at a time (the naive loop);
- :func:`train_dpo_batched`: eager mode, every sweep point at once on a leading run axis (what a
  competent PyTorch user writes for a sweep: one Adam over a ``(runs, ...)`` parameter tensor,
  the sum of the per-run losses; Adam is elementwise, so each run's slice is updated exactly as
  by its own optimiser);
- the same batched step under ``torch.compile`` (``compile=True``), its compile time reported
  apart from its run time;
- :func:`train_dpo_fast`: the batched loop as a competent user writes it (loop invariants
  hoisted, one gather, or count matrices and one contraction), with any of torch's Adam
  implementations, eager or compiled; the benchmark's batched baseline is its fastest form, and
  ``python -m benchmarks.torch_baseline`` runs it as a fresh process.

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


# --------------------------------------------------------------------------------------------
# The best batched eager loops (issue 17: "benchmark against the best peer")
# --------------------------------------------------------------------------------------------

# How a competent user writes the batched DPO step, beyond :func:`train_dpo_batched`:
# - ``gather``: the loop-invariant data (flat table indices, float length masks, the reference's
#   margin) built once before the loop; chosen and rejected in ONE gather of the flattened
#   ``log_softmax`` table, summed with a signed mask (+ for y_w, - for y_l), so the step's margin
#   is ``sum_t s_t log pi(y_t | row_t)`` in three kernels;
# - ``counts``: ``log pi(y) = n(y) . vec(log_softmax(table))`` with ``n(y)`` the counts of the
#   (row, token) cells y visits (unigram: tokens, ``K = V``; bigram: (previous token, token),
#   ``K = (V + 1) V``), so the DPO margin is one batched matrix-vector product with the count
#   difference ``D = n(y_w) - n(y_l)`` (``(R, P, K)``, built once) less the reference's margin;
# - ``counts_mul``: the same contraction as a broadcast multiply and sum over K (on these tiny
#   shapes the faster kernel is the machine's call, so both are timed).
BATCHED_VARIANTS = ("gather", "counts", "counts_mul")
# torch.optim.Adam's three implementations (one for-loop kernel chain, multi-tensor, one fused
# kernel); all compute the same update
ADAMS = {"plain": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
# torch.compile forms of the fast step: ``loss`` compiles the per-run loss (AOTAutograd: forward
# and backward graphs; Adam eager), ``loss_autotune`` the same in mode max-autotune-no-cudagraphs,
# ``step`` the whole step (zero_grad, loss, backward, Adam) as one compiled function
COMPILE_FORMS = ("loss", "loss_autotune", "step")


def _cells(family: str, vocab: int, tok):
    """Flat index ``row * V + token`` of each position's cell in the ``(rows, V)`` logit table:
    unigram's one row, or bigram's row of the previous token (``V`` at the start)."""
    import torch

    if family == "unigram":
        return tok
    prev = torch.cat([torch.full_like(tok[..., :1], vocab), tok[..., :-1]], dim=-1)
    return prev * vocab + tok


def _counts(cells, mask, size: int):
    """``n(y)``: per sequence, how often each of the ``size`` table cells is visited in the
    first ``length`` positions (``mask``), ``cells.shape[:-1] + (size,)``."""
    import torch

    out = torch.zeros(*cells.shape[:-1], size, dtype=mask.dtype)
    return out.scatter_add_(-1, cells, mask)


def train_dpo_fast(family: str, vocab: int, max_len: int, inits: np.ndarray, seqs: np.ndarray, lengths: np.ndarray,
                   w: np.ndarray, l: np.ndarray, betas: np.ndarray, steps: int, lr: float, record_every: int,
                   variant: str = "counts", adam: str = "plain", compile: str | None = None) -> dict:
    """:func:`train_dpo_batched`'s work (same runs, loss, optimiser and records) in the form
    ``variant`` (:data:`BATCHED_VARIANTS`) with Adam ``adam`` (:data:`ADAMS`), eager or under
    ``torch.compile`` in the form ``compile`` (:data:`COMPILE_FORMS`).

    ``run_s`` includes building the loop-invariant tensors (indices, masks or counts, the
    reference's margin; a few milliseconds), since gradlab's timed program builds its own.
    With ``compile``, ``compile_s`` is the first step less one steady step (as in
    :func:`train_dpo_batched`); the timed run restarts from ``inits``. Each compile is cold:
    dynamo reset, and Inductor's caches (on disk and in memory) fresh, so a form compiled after
    another does not reuse its kernels."""
    if variant not in BATCHED_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {BATCHED_VARIANTS}")
    if adam not in ADAMS:
        raise ValueError(f"unknown Adam {adam!r}; choose one of {tuple(ADAMS)}")
    if compile is not None and compile not in COMPILE_FORMS:
        raise ValueError(f"unknown compile form {compile!r}; choose one of {COMPILE_FORMS} or None")
    if compile == "step" and adam == "fused":  # the fused kernel is compiler-disabled (a graph break):
        adam = "foreach"  # Dynamo traces the multi-tensor Adam and Inductor fuses it
    args = (family, vocab, max_len, inits, seqs, lengths, w, l, betas, steps, lr, record_every, variant, adam)
    if compile is None:
        return _train_dpo_fast(*args, None)
    import torch
    from torch._inductor.utils import fresh_cache

    torch._dynamo.reset()
    with fresh_cache():  # a temporary Inductor cache folder, in-memory code caches cleared
        return _train_dpo_fast(*args, compile)


def _train_dpo_fast(family, vocab, max_len, inits, seqs, lengths, w, l, betas, steps, lr, record_every, variant,
                    adam, compile) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_default_dtype(torch.float64)
    start_all = time.perf_counter()
    param = torch.tensor(np.asarray(inits, dtype=np.float64), requires_grad=True)
    runs = param.shape[0]
    size = param[0].numel()  # table cells: V or (V + 1) V
    tok_all, len_all = torch.as_tensor(seqs), torch.as_tensor(lengths)
    w_t, l_t = torch.as_tensor(w), torch.as_tensor(l)
    beta = torch.as_tensor(np.asarray(betas, dtype=np.float64))[:, None]
    pos = torch.arange(max_len)
    mask_all = (pos < len_all[:, None]).to(torch.float64)  # (N, L)
    cells_all = _cells(family, vocab, tok_all)  # (N, L)
    len_f = len_all.to(torch.float64)

    def table_of(p):  # (R, K): one log-softmax of each run's table
        return F.log_softmax(p, dim=-1).reshape(runs, size)

    if variant == "gather":
        # (R, 2, P, L): y_w then y_l, one flat index tensor and a signed mask
        idx = torch.stack([cells_all[w_t], cells_all[l_t]], dim=1)
        sign = torch.stack([mask_all[w_t], -mask_all[l_t]], dim=1)
        flat_idx = idx.reshape(runs, -1)

        def margin_of(table):  # (R, P): log pi(y_w) - log pi(y_l)
            return (torch.gather(table, 1, flat_idx).reshape(sign.shape) * sign).sum((1, 3))

        def all_logprobs(table):  # (R, N)
            return (table[:, cells_all] * mask_all).sum(-1)
    else:
        counts_all = _counts(cells_all, mask_all, size)  # (N, K)
        diff = counts_all[w_t] - counts_all[l_t]  # (R, P, K): n(y_w) - n(y_l)

        if variant == "counts":
            def margin_of(table):  # one batched matrix-vector product
                return torch.bmm(diff, table[:, :, None])[..., 0]
        else:
            def margin_of(table):  # broadcast multiply and sum (one fused CPU kernel pair)
                return (diff * table[:, None, :]).sum(-1)

        def all_logprobs(table):
            return table @ counts_all.T

    with torch.no_grad():
        ref_margin = margin_of(table_of(param))

    def per_run_loss(p):
        return -F.logsigmoid(beta * (margin_of(table_of(p)) - ref_margin)).mean(-1)  # (R,)

    def expected_length(p):  # enumeration: the table holds every response, stopped ones included
        with torch.no_grad():
            return (torch.exp(all_logprobs(table_of(p))) * len_f).sum(-1).numpy().copy()

    opt = torch.optim.Adam([param], lr=lr, **ADAMS[adam])

    def eager_step():
        opt.zero_grad()
        per_run = loss_fn(param)
        per_run.sum().backward()
        opt.step()
        return per_run.detach()

    loss_fn, step_fn = per_run_loss, eager_step
    compile_s = None
    if compile is not None:
        if compile == "step":
            step_fn = torch.compile(eager_step)
        else:
            loss_fn = torch.compile(per_run_loss, mode="max-autotune-no-cudagraphs" if compile == "loss_autotune"
                                    else None)
    losses, lengths_rec = [], []

    def one_step(step):
        if step % record_every == 0:
            lengths_rec.append(expected_length(param))  # before the update, as the loss
            losses.append(step_fn().numpy().copy())
        else:
            step_fn()

    if compile is not None:  # the first step compiles, a second one is steady; then restart
        saved = param.detach().clone()
        start = time.perf_counter()
        step_fn()
        first = time.perf_counter() - start
        start = time.perf_counter()
        step_fn()
        compile_s = first - (time.perf_counter() - start)
        with torch.no_grad():  # restart in place (new objects would fail dynamo's guards: a recompile)
            param.copy_(saved)
            for state in opt.state.values():  # step 0, zero moments: a fresh Adam
                for value in state.values():
                    if torch.is_tensor(value):
                        value.zero_()
        start_all = time.perf_counter()
    for step in range(steps):
        one_step(step)
    run_s = time.perf_counter() - start_all
    return {"loss": np.stack(losses), "expected_length": np.stack(lengths_rec), "run_s": run_s,
            "compile_s": compile_s, "adam": adam}


def _main(argv: list[str]) -> int:
    """``python -m benchmarks.torch_baseline INPUTS.npz RECORDS.npz``: the fresh-process run of
    :func:`train_dpo_fast` that ``benchmarks.suite`` times from outside (like-for-like with
    gradlab's cold sweep). INPUTS holds its arguments, ``variant``, ``adam`` and ``threads``;
    the records go to RECORDS; prints the seconds from before ``import torch`` to the end, and
    those of the import alone."""
    if len(argv) != 2:
        raise SystemExit("usage: python -m benchmarks.torch_baseline INPUTS.npz RECORDS.npz")
    start = time.perf_counter()
    import torch

    imported = time.perf_counter() - start
    with np.load(argv[0]) as f:
        a = {k: f[k] for k in f.files}
    torch.set_num_threads(int(a["threads"]))
    res = train_dpo_fast(str(a["family"]), int(a["vocab"]), int(a["max_len"]), a["inits"], a["seqs"], a["lengths"],
                         a["w"], a["l"], a["betas"], int(a["steps"]), float(a["lr"]), int(a["record_every"]),
                         variant=str(a["variant"]), adam=str(a["adam"]))
    np.savez(argv[1], loss=res["loss"], expected_length=res["expected_length"])
    print(time.perf_counter() - start, imported)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
