"""The PyTorch loop a researcher would write: same policy, data, loss and optimiser as
``gradlab.dynamics.simulate`` for DPO, eager mode, one sweep point at a time."""

from __future__ import annotations

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
