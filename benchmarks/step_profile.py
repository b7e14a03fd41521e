"""python -m benchmarks.step_profile [--steps N] [--seeds S] [--devices D] [FAMILY ...]

Where the warm training step's time goes: milliseconds per step of gradlab's DPO sweep
(``gradlab.experiments``, seeds x eight betas, equal-length data; the whole call, host set-up
included) against hand-written JAX programs that do the same arithmetic, each one lever
further:

- ``gather_table``: log_softmax of the parameter table once per step, then a gather per token;
- ``counts``: no gather: ``log pi(y) = n(y) . log_softmax(table)``, with ``n(y)`` the
  precomputed counts of each (state, token) transition of y, masked by its length (what
  gradlab's runner does since issue 17);
- ``count_difference``: the DPO margin as one contraction with ``n(y_w) - n(y_l)``, the run axis
  explicit instead of vmapped;
- ``shared_counts``: the counts of each seed once, contracted with the tables of all its betas
  (one ``(pairs, cells) x (cells, betas)`` product per seed and side, instead of one
  matrix-vector product per run: what gradlab's runner does for runs that share a dataset,
  ``_engine.layout``).

Times are best-of-3 wall-clock milliseconds per step and, under ``*_cpu_ms``, the process's CPU
time per step (steadier than wall-clock time on a machine shared with other work). gradlab runs
on the devices an entry point gives it (one CPU device per core; ``--devices`` sets the count,
``devices`` in the output says what it was): the lean programs run on one device.

Each lean program's final parameters are compared with gradlab's (they must agree), so the
speed-ups are for the same computation. Chain families only (unigram, bigram)."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

BETAS = [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]


def _best(fn, repeats: int = 3, clock=time.perf_counter) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def profile(family: str, steps: int, seeds: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from benchmarks.suite import sweep_experiment, sweep_torch_inputs
    from gradlab.experiments import runner
    from gradlab.policies import all_sequences

    out: dict = {"family": family, "runs": seeds * len(BETAS), "steps": steps, "devices": jax.device_count()}
    for every in (steps // 10, steps):
        raw = sweep_experiment(family, steps, seeds, BETAS, every)

        def run(raw=raw):
            return runner.run(raw)

        run()
        runner.optimise(raw)  # the warm program, as the training benchmark times it
        run()
        out[f"gradlab_record_every_{every}_ms"] = 1e3 * _best(run) / steps
        out[f"gradlab_record_every_{every}_cpu_ms"] = 1e3 * _best(run, clock=time.process_time) / steps
    raw["train"]["metrics"] = ["params"]
    sim = runner.run(raw)
    fam, inits, rows = sweep_torch_inputs(raw, seeds)
    jax.config.update("jax_enable_x64", True)  # the lean programs below, in float64 as gradlab
    seqs, lengths = all_sequences(fam.vocab, fam.max_len)
    name = "theta" if family == "unigram" else "W"
    points = [(b, s) for b in BETAS for s in range(seeds)]  # gradlab's (setting, seed) order
    p0 = jnp.asarray(np.stack([np.asarray(inits[s][name]) for _, s in points]))
    w = np.stack([rows[s][0] for _, s in points])
    l = np.stack([rows[s][1] for _, s in points])
    beta = jnp.asarray([b for b, _ in points])
    mask = np.arange(fam.max_len) < lengths[:, None]
    if family == "unigram":
        index = seqs
    else:  # row of the previous token (V at the start), column of this token
        index = np.concatenate([np.full_like(seqs[:, :1], fam.vocab), seqs[:, :-1]], -1) * fam.vocab + seqs
    table_size = int(np.prod(p0.shape[1:]))
    counts = (np.eye(table_size)[index] * mask[..., None]).sum(-2)  # (sequences, table entries)
    opt = optax.adam(0.05)
    lsm = lambda p: jax.nn.log_softmax(p, -1).reshape(p.shape[0], -1)  # noqa: E731

    def train(margin):  # margin(p) -> (R, P) policy log-ratio differences; Adam on the summed DPO loss
        def run(p_init):
            h0 = margin(p_init)
            loss = lambda p: -jax.nn.log_sigmoid(beta[:, None] * (margin(p) - h0)).mean(-1).sum()  # noqa: E731

            def body(state, _):
                p, s = state
                u, s = opt.update(jax.grad(loss)(p), s, p)
                return (optax.apply_updates(p, u), s), None

            return jax.lax.scan(body, (p_init, opt.init(p_init)), None, length=steps)[0][0]

        return run

    iw, il = jnp.asarray(index[w]), jnp.asarray(index[l])
    mw, ml = jnp.asarray(mask[w], dtype=p0.dtype), jnp.asarray(mask[l], dtype=p0.dtype)
    cw, cl = jnp.asarray(counts[w]), jnp.asarray(counts[l])
    diff = cw - cl
    # each seed's counts once: (seeds, pairs, cells), contracted with the (betas, seeds) tables
    seed_w = jnp.asarray(np.stack([counts[rows[s][0]] for s in range(seeds)]))
    seed_l = jnp.asarray(np.stack([counts[rows[s][1]] for s in range(seeds)]))

    def shared(p):
        t = lsm(p).reshape(len(BETAS), seeds, -1)  # points are (beta, seed), beta outer
        side = lambda c: jnp.einsum("spk,bsk->bsp", c, t).reshape(len(points), -1)  # noqa: E731
        return side(seed_w) - side(seed_l)

    def gathered(p):
        t = lsm(p)
        take = jax.vmap(lambda row, idx: row[idx])
        return (take(t, iw) * mw).sum(-1) - (take(t, il) * ml).sum(-1)

    variants = {
        "gather_table": gathered,
        "counts": lambda p: jnp.einsum("rpk,rk->rp", cw, lsm(p)) - jnp.einsum("rpk,rk->rp", cl, lsm(p)),
        "count_difference": lambda p: jnp.einsum("rpk,rk->rp", diff, lsm(p)),
        "shared_counts": shared,
    }
    final = np.stack([r.metrics[f"params.{name}"][-1] for r in sim.runs])
    for label, margin in variants.items():
        start = time.perf_counter()
        compiled = jax.jit(train(margin)).lower(p0).compile()
        out[f"{label}_compile_s"] = time.perf_counter() - start
        params = compiled(p0)
        out[f"{label}_ms"] = 1e3 * _best(lambda compiled=compiled: compiled(p0).block_until_ready()) / steps
        out[f"{label}_cpu_ms"] = 1e3 * _best(lambda compiled=compiled: compiled(p0).block_until_ready(),
                                             clock=time.process_time) / steps
        out[f"{label}_max_param_difference"] = float(np.max(np.abs(np.asarray(params) - final)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("families", nargs="*", help="unigram and/or bigram (default both)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--devices", type=int, default=None, help="JAX CPU devices (default: one per core)")
    args = p.parse_args(argv)
    families = args.families or ["unigram", "bigram"]
    if unknown := sorted(set(families) - {"unigram", "bigram"}):
        p.error(f"unknown families {unknown}; the chain families profiled are: unigram, bigram")
    if args.devices is not None and args.devices < 1:
        p.error(f"--devices must be a whole number >= 1, not {args.devices}")
    import jax

    from gradlab import runtime

    if args.devices is not None:
        jax.config.update("jax_num_cpu_devices", args.devices)
    runtime.configure()  # an entry point: float64, the caches, one CPU device per core unless set above
    print(json.dumps([profile(f, args.steps, args.seeds) for f in families], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
