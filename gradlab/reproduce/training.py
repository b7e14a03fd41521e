"""Training claims on sequence policies: the posts' length pathology and the first post's proper
loss. These need the exact, untruncated policy layer (issue 12) and the experiment runner
(issue 13); until both are in gradlab they are registered as pending and never report PASS.
"""

from __future__ import annotations

from gradlab.reproduce import Entry

_NEEDS = ("the exact untruncated policy layer (issue 12: unbounded unigram + EOS, absorbing-chain metrics) "
          "and the experiment runner with plain SGD and Adam (issue 13)")

LENGTH_PATHOLOGY = Entry(
    name="length_pathology",
    title="The posts' length pathology on equal-length data",
    source="Cho 2024, 'Fixing DPO but I have a dinner reservation' (first post, /work/shared/posts.md): "
           "an unreasonable preference for long responses even when chosen and rejected lengths are equally "
           "distributed",
    claim="On preference data whose chosen and rejected lengths follow the same distribution, DPO lengthens the "
          "policy's responses; length-normalised DPO, SimPO and LD-DPO are claimed to remove the drift.",
    setting="Unbounded unigram + EOS policy (no cut-off), equal-length pairs; dpo, sigmoid_norm, simpo, ld_dpo; "
            "plain SGD and Adam.",
    predicate="Reported, not asserted in advance for the fixes: DPO's exact expected length grows on "
              "equal-length data under both optimisers; for each length fix we report whether it grows.",
    experiment=None,
    judge=None,
    plot=None,
    pending=_NEEDS,
)

PROPER_LOSS = Entry(
    name="proper_loss",
    title="The proper loss against offline and on-policy DPO",
    source="Cho 2024, 'Fixing DPO but I have a dinner reservation' (first post, /work/shared/posts.md): "
           "J_PDPO = E_{y,y'~p_theta}[L_dpo] and its product-rule gradient",
    claim="Offline DPO (pairs from p_0) puts no pressure on p_theta to be a distribution worth sampling from; the "
          "proper loss, with pairs drawn from the policy and labelled by an oracle, does.",
    setting="A policy with a forced stop (every pair enumerated, no mass left out), oracle reward; offline DPO, "
            "on-policy DPO and J_PDPO trained exactly.",
    predicate="With no truncation leak (unfinished mass exactly 0), the proper loss raises the policy's expected "
              "oracle reward, and its gradient equals the product-rule closed form.",
    experiment=None,
    judge=None,
    plot=None,
    pending=_NEEDS,
)
