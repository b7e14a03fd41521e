"""The machinery that turns runs into compiled programs (private): what fixes a program
(``Static``), the host inputs of each run and their caches, the grouping of runs into programs,
the program itself (``jit(vmap(...))`` of the steps of :mod:`~gradlab.experiments.objective`),
its compile tiers (``Tiered``) and the blocks of runs spread across devices (and processes,
under ``jax.distributed``).

Runs whose static structure agrees (the family, the loss's kind, the optimiser and its arguments,
steps, batch size, metrics, and the shapes of every input array) are stacked and executed as one
program. What differs between the runs of one program are arrays: initial and reference
parameters, the data, the loss's hyperparameter values, the learning rate and the minibatch
sampler's key. Every loss of a sweep over losses is in the one program, chosen by an index.
Runs with equal datasets (a seed's, in each setting of a sweep) train in groups that read one
copy of it (``layout``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradlab import caches, runtime
from gradlab.experiments import _export, datasets, objective
from gradlab.experiments.config import Experiment, settings
from gradlab.experiments.validate import build_family, hyper_values, metric_names, resolve_loss
from gradlab.policies import has_logit_table

# XLA:CPU compile options (measured back to back on 2 cores). LLVM's expensive passes, XLA's
# newer MLIR fusion emitters and the split of code generation into parallel modules cost compile
# time and gain nothing measurable on these programs. XLA's backend optimisation makes the
# training step ~3x faster but its compile ~1.5-4x slower (length_drift program: 1.3 s at level 0,
# 2.4 s optimised; 36 losses in one program: 2.3 s against 7.5-11 s), so a training program runs
# at level 0 first and is compiled optimised only once it has proved long-running (``Tiered``).
COMPILE_OPTIONS = {"xla_llvm_disable_expensive_passes": True, "xla_cpu_use_fusion_emitters": False,
                   "xla_cpu_parallel_codegen_split_count": 1}
RUN_ONCE_OPTIONS = {**COMPILE_OPTIONS, "xla_backend_optimization_level": 0}

# How long a program must have run in the experiments after its first, as a multiple of the
# time it took in its first (compilation included), before it is compiled optimised: the optimised
# compile costs about 1.5-4x the fast one and saves ~2/3 of every later step.
TIER_UP = 1.0

Data = datasets.PairData | datasets.RolloutData  # a run's dataset: pairs, or the rollouts' reward


class Static(NamedTuple):
    """Everything that fixes the compiled program (hashable)."""

    fam: Any
    losses: tuple[tuple[str | None, str | None], ...]  # (name, expr) of each loss the program can train
    kind: str  # the losses' kind, which picks the objective's unit: "pair", or "expectation" (the proper loss)
    optimizer: str
    optimizer_args: tuple[tuple[str, Any], ...]
    steps: int
    record_every: int
    batch_size: int | None
    metrics: tuple[str, ...]
    on_policy: bool
    soft: bool
    tempered: bool = False  # a sequence-level tempered reference (temperature != 1): log Z is computed
    lean: bool = True  # the family's fast path where it has one (False: the per-position form)
    closed_form: bool = True  # the closed-form cotangent (False: jax.grad of the objective's value)


def record_steps(steps: int, record_every: int) -> list[int]:
    """0, r, 2r, ... and always ``steps`` itself."""
    out = list(range(0, steps + 1, record_every))
    return out if out[-1] == steps else out + [steps]


# --------------------------------------------------------------------------------------------
# Compile tiers and sharding
# --------------------------------------------------------------------------------------------


class Tiered:
    """A training program as a JIT tiers code: compiled fast (XLA level 0) at first, so a one-off
    experiment or a figure pays the short compile; recompiled with XLA's optimisations once the
    experiments after its first have spent more than ``TIER_UP`` times as long in it as the first
    did (a repeated sweep, a benchmark's warm runs), and optimised from then on. The tier changes
    only between experiments (``account``), never within one, so every run of one ``run`` or
    ``run_many`` call is computed by the same code. Both tiers compute the same arithmetic, but
    the optimised code contracts a * b + c into fused multiply-adds, so a repeated experiment may
    part from the first by rounding (~1e-12 relative). A compile option this jaxlib does not know
    is dropped and the program compiled again (the options never change results).

    With a ``name`` that fixes what ``fn`` computes, the compiled program outlives the process
    (``_export.jit``: traced, lowered and compiled once, kept in the disk cache), each tier under
    its own key. A program whose optimised tier an earlier process compiled for these inputs
    starts optimised: reading either tier back costs the same. With ``ahead``, a first call at
    level 0 that finds no optimised tier on disk has it compiled on a background thread and
    stored (``_export.jit``'s ``ahead``), so the next process starts optimised; this process
    keeps the tier it started with, and a tier-up here reads that executable back instead of
    compiling again."""

    def __init__(self, fn, *, name: str | None = None, in_specs: tuple | None = None, ahead: bool = False):
        self.fn, self.name, self.in_specs, self.ahead = fn, name, in_specs, ahead
        self.dropped: set[str] = set()
        self._compile()
        self.first: float | None = None
        self.since = 0.0
        self.tiered = False
        self.proven = False  # optimised because it proved long-running in this process (not read from disk)
        self.looked = False  # whether the first call has looked for a stored optimised tier

    def _options(self, optimised: bool) -> dict[str, Any]:
        """The compile options of a tier, less those this jaxlib does not know."""
        return {k: v for k, v in (COMPILE_OPTIONS if optimised else RUN_ONCE_OPTIONS).items() if k not in self.dropped}

    def _compile(self) -> None:
        fast, optimised = self._options(False), self._options(True)
        self.fast: Callable
        self.optimised: Callable
        if self.name is None:
            self.fast, self.optimised = (jax.jit(self.fn, compiler_options=o) for o in (fast, optimised))
        else:
            self.fast = _export.jit(self.fn, self.name, compiler_options=fast, ahead=optimised if self.ahead else None)
            self.optimised = _export.jit(self.fn, self.name, compiler_options=optimised)
        self._spread: dict[tuple, Callable] = {}  # (mesh, tier) -> fn spread over the mesh, compiled

    def _over(self, mesh) -> Callable:
        """``fn`` on every device of ``mesh`` at once (``shard_map`` with ``in_specs``, every
        output split along the mesh's axis), compiled in the current tier. Each device runs ``fn``
        on its own rows: the same per-device program as ``fn`` on one device."""
        from jax.sharding import PartitionSpec

        tier = (mesh, self.tiered)
        if tier not in self._spread:
            # check_vma off: fn is written per device (its loop's carry starts as zeros on each)
            spread = jax.shard_map(self.fn, mesh=mesh, in_specs=self.in_specs,
                                   out_specs=PartitionSpec(*mesh.axis_names), check_vma=False)
            self._spread[tier] = jax.jit(spread, compiler_options=self._options(self.tiered))
        return self._spread[tier]

    def __call__(self, *args, mesh=None):
        """``fn(*args)`` in the current tier; with a ``mesh``, each device runs ``fn`` on its rows
        of ``args`` (placed by :func:`shard`)."""
        if not self.looked:  # the first call decides the first experiment's tier, for all its calls
            self.looked = True
            self.tiered = self.tiered or (isinstance(self.optimised, _export.jit) and self.optimised.stored(*args))
        while True:
            try:
                if mesh is not None:
                    return self._over(mesh)(*args)
                return (self.optimised if self.tiered else self.fast)(*args)
            except jax.errors.JaxRuntimeError as exc:  # an option this jaxlib does not have: without it
                unknown = runtime.unknown_compile_option(exc)
                if unknown is None or unknown in self.dropped or unknown not in RUN_ONCE_OPTIONS:
                    raise
                self.dropped.add(unknown)
                self._compile()

    def account(self, seconds: float) -> None:
        """One experiment's time in this program (its calls, compilation included)."""
        if self.tiered:
            return
        if self.first is None:
            self.first = seconds
        else:
            self.since += seconds
            self.tiered = self.proven = self.since > TIER_UP * self.first

    def optimise(self) -> None:
        """Optimised from the next call on, as if it had proved long-running here."""
        self.tiered = self.proven = True


# Runs per block at most. The run axis is cut into blocks whose size depends on the runs alone
# (their count and their data, :func:`layout`; never on the devices), and each block is trained
# by the same compiled computation (a vmap over one block's groups of runs), one block after
# another on each device: so a run's records are the same bits on one device or several, in one
# process or several. XLA:CPU's code for a vmapped batch depends on the batch's size (a sweep of
# 128 runs split 43 + 43 + 42 across three devices differed from one device's in the 16th
# digit). Measured on 2 cores (CPU time of the benchmark's 500-step DPO sweep): a vmapped batch
# costs a few microseconds a step of its own, eight sweeps of 16 runs took ~12% more than one of
# 128, and blocks of 64 keep that small while a sweep of 128 runs or more feeds two cores or
# more.
BLOCK = 64


def blocking(groups: int, per: int = 1) -> tuple[int, int]:
    """(blocks, groups per block) for ``groups`` groups of ``per`` runs (:func:`layout`): as few
    blocks of at most ``BLOCK`` runs as hold them, of equal size (the last padded)."""
    count = -(-groups // (BLOCK // per))
    return count, -(-groups // count)


class Layout(NamedTuple):
    """Where each run of a call sits in the program's blocks: the runs in group order
    (``order``), ``per`` runs to a group, ``size`` groups to a block, ``blocks`` blocks."""

    order: np.ndarray
    per: int
    blocks: int
    size: int


def layout(classes: Sequence[int]) -> Layout:
    """The blocks of runs whose datasets fall in ``classes`` (a class index per run, numbered in
    order of first appearance: equal datasets, equal index). Runs of one class are trained as
    groups of ``per`` runs that read one copy of the dataset: the seeds of a sweep share their
    data across its settings, and a group's count matrices are then contracted with the tables of
    all its runs at once, one matrix product instead of ``per`` matrix-vector products, each
    reading the matrices again. ``per`` is the largest group size that cuts every class into
    whole groups (the classes' greatest common divisor, at most ``BLOCK``): 1 where runs share
    no data. Like the blocks, the groups depend on the runs alone (their count and their data),
    never on the devices."""
    index = np.asarray(classes)
    per = int(np.gcd.reduce(np.bincount(index)))
    per = max(d for d in range(1, min(per, BLOCK) + 1) if per % d == 0)
    return Layout(np.argsort(index, kind="stable"), per, *blocking(len(index) // per, per))


def mesh():
    """The mesh of the run axis over every device (of every process under ``jax.distributed``),
    or None when there is one device in all."""
    devices = jax.devices()
    if len(devices) < 2:
        return None
    from jax.sharding import Mesh

    return Mesh(np.array(devices), ("runs",))


def _padded(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` with copies of its last row appended up to ``rows`` rows."""
    pad = rows - len(x)
    return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x


def shard(tree, over=None):
    """Split the leading axis of every leaf of ``tree`` (host arrays) across the devices of the
    mesh ``over`` (default :func:`mesh`): a global array on the mesh, each process placing its
    own devices' rows of the same host inputs. The axis is padded with copies of its last row to
    a multiple of the device count; the padding's results are rows no caller reads. With one
    device, ``tree`` is returned as it is."""
    over = mesh() if over is None else over
    leaves = jax.tree_util.tree_leaves(tree)
    if over is None or not leaves:
        return tree
    from jax.sharding import NamedSharding, PartitionSpec

    pad = -leaves[0].shape[0] % over.size
    sharding = NamedSharding(over, PartitionSpec(*over.axis_names))

    def place(x):
        x = _padded(np.asarray(x), len(x) + pad)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(place, tree)


def host(tree):
    """A program's outputs as numpy arrays, every run's: gathered from every process under
    ``jax.distributed``."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree_util.tree_map(np.asarray, tree)


# --------------------------------------------------------------------------------------------
# The inputs of a run, on the host, cached
# --------------------------------------------------------------------------------------------


@caches.memo(maxsize=64)
def _init_program(fam):
    """One compiled program for the random draws of several seeds at once: ``seeds, scale ->
    (policy inits, seeded reference inits, minibatch keys)``, one row per seed, each row the same
    bits as the eager calls ``fam.init(PRNGKey(seed), scale)``, ``fam.init(fold_in(PRNGKey(seed),
    1), scale)`` and ``fold_in(PRNGKey(seed), 2)`` to one ulp (XLA fuses the scale into the normal
    draw), and the same bits whatever the other rows (the draws are elementwise; tested): without
    compiling a dozen tiny eager programs (key, fold_in, normal, multiply, ...) in a cold process,
    and in one call for a sweep's seeds rather than one call each."""

    def draws(seed, scale):
        key = jax.random.PRNGKey(seed)
        return fam.init(key, scale), fam.init(jax.random.fold_in(key, 1), scale), jax.random.fold_in(key, 2)

    # never accounted: it stays at level 0 (and drops options jaxlib lacks)
    return Tiered(jax.vmap(draws, in_axes=(0, None)), name=f"draws of seeds {fam!r}")


# (family, scale, seed) -> that seed's draws on the host: (policy init, reference init, key)
_DRAWN: dict[tuple, tuple] = caches.Bounded(4096)


def _draws(fam, seed: int, scale: float, seeds: Sequence[int] = ()) -> tuple[Any, Any, np.ndarray]:
    """The draws of ``seed`` (the caller's own arrays), drawn together with those of ``seeds``
    not drawn yet (the other seeds of its experiment): one call of :func:`_init_program` for all
    of them, its seed axis padded to a power of two (so a few compiled programs serve every seed
    count), kept for the next call."""
    if (fam, scale, seed) not in _DRAWN:
        todo = [s for s in dict.fromkeys((seed, *seeds)) if (fam, scale, s) not in _DRAWN]
        padded = _padded(np.array(todo, np.int64), 1 << (len(todo) - 1).bit_length())
        with jax.enable_x64(True):
            drawn = jax.tree_util.tree_map(np.asarray, _init_program(fam)(padded, np.float64(scale)))
        for i, s in enumerate(todo):
            _DRAWN[(fam, scale, s)] = jax.tree_util.tree_map(lambda x, i=i: x[i], drawn)
    return jax.tree_util.tree_map(np.array, _DRAWN[(fam, scale, seed)])  # the caller's own copy


def initial_params(exp: Experiment, fam, seed: int) -> tuple[Any, Any]:
    """(policy, reference) parameters of one seed. Seeded parameters use PRNGKey(seed) for the
    policy and a key folded from it for a seeded reference, so the two differ."""
    return _initial_params(exp, fam, seed)[:2]


def _initial_params(exp: Experiment, fam, seed: int) -> tuple[Any, Any, np.ndarray]:
    explicit = lambda table: {k: np.asarray(v, dtype=np.float64) for k, v in table.items()}  # noqa: E731
    seeded, seeded_ref, key = _draws(fam, seed, exp.policy.scale, exp.train.seeds)
    pol, ref = exp.policy.init, exp.reference.params
    ref_params: Any = None  # a parameter tree (None: the reference is the policy)
    if isinstance(ref, Mapping):
        ref_params = explicit(ref)
    elif ref == "seed":
        ref_params = seeded_ref
    if isinstance(pol, Mapping):
        params = explicit(pol)
    elif pol == "reference":
        params = ref_params
    else:
        params = seeded
    return params, (params if ref == "policy" else ref_params), key


# A seed's draws and data are a deterministic function of the policy, reference and data tables
# and the seed: kept (read-only) for the other settings of a sweep that share them and for the
# next call, so a beta sweep builds each seed's dataset once and a repeated sweep not again.
_SEED_INPUTS: dict[tuple, tuple] = caches.Bounded(4096)


def _frozen(tree):
    def freeze(a):
        a = np.array(a, copy=True)
        a.flags.writeable = False
        return a

    return jax.tree_util.tree_map(freeze, tree)


def _tables(exp: Experiment) -> tuple[str, str, str]:
    """What a seed's draws and data depend on besides the seed: the policy, reference and data
    tables, as text (their ``repr``; ~10 us each, so a sweep takes them once per setting)."""
    return repr(exp.policy), repr(exp.reference), repr(exp.data)


def _seed_inputs(exp: Experiment, fam, seed: int, tables: tuple) -> tuple[Any, Any, np.ndarray, Data]:
    shared = (*tables, seed)
    if shared not in _SEED_INPUTS:
        params, ref_params, key = _initial_params(exp, fam, seed)
        data = datasets.build(exp.data, fam, seed, params, ref_params)
        _SEED_INPUTS[shared] = (_frozen(params), _frozen(ref_params), key, data)
    return _SEED_INPUTS[shared]


def inputs(exp: Experiment, fam, seed: int, *, tables: tuple | None = None,
           setting: dict[str, Any] | None = None) -> tuple[dict[str, Any], Data, tuple]:
    """Every array one run needs, on the host (numpy), and the key of their shapes and dtypes
    (runs with equal keys stack into one program). The compiled program computes the rest (count
    matrices, the reference's values) once per call, so no eager JAX work runs here. ``tables``
    and ``setting`` (:func:`_tables`, :func:`setting_inputs`) are what the seeds of one sweep
    setting share, taken once for all of them."""
    base, data, base_key = _run_arrays(exp, fam, seed, _tables(exp) if tables is None else tables)
    inp = {**base, **(setting_inputs(exp) if setting is None else setting)}
    return inp, data, base_key  # hvals are padded to the program's widest loss when runs are stacked


def setting_inputs(exp: Experiment) -> dict[str, Any]:
    """The arrays of a run that depend on its sweep setting alone, not on its seed: the loss's
    hyperparameter values, the reference's temperature, the learning rate (and what the loss
    adds, :func:`objective.loss_inputs`)."""
    hvals = np.array(list(hyper_values(exp.loss, resolve_loss(exp.loss)).values()), dtype=np.float64)
    return {"tau": np.float64(exp.reference.temperature), "hvals": hvals, "lr": np.float64(exp.train.lr),
            **objective.loss_inputs(exp)}


_RUN_ARRAYS: dict[tuple, tuple] = caches.Bounded(4096)


def _run_arrays(exp: Experiment, fam, seed: int, tables: tuple) -> tuple[dict[str, Any], Data, tuple]:
    """The arrays of a run that depend on the seed's draws and data and on which metrics are
    recorded (not on the loss's hyperparameters or the learning rate), with their shape key:
    kept, so the settings of a sweep that share a seed share them (the host work of a 128-run
    call was ~30 ms, about as long as its 500 steps)."""
    names = metric_names(exp)
    shared = (*tables, seed, names)
    if shared in _RUN_ARRAYS:
        return _RUN_ARRAYS[shared]
    params, ref_params, key, data = _seed_inputs(exp, fam, seed, tables)
    base = {
        "params": params,
        "ref_params": ref_params,
        "data": _frozen(data.arrays()),
        "key": key,
    }
    if fam.enumerable and set(objective.ENUMERATING) & set(names):
        reward = datasets.token_reward(exp.data, fam)
        items_all, lengths_all = datasets.enumeration(fam)
        assert isinstance(data, datasets.PairData)  # rollouts record no metric over the response table
        base["support"] = np.asarray(datasets.support(fam, data), dtype=np.float64)
        base["enum_reward"] = (datasets.item_rewards(reward, items_all, lengths_all) if reward is not None
                               else np.zeros(len(items_all)))
        if has_logit_table(fam):
            base["enum"] = (items_all, lengths_all)
    elif "expected_reward" in names and datasets.token_reward(exp.data, fam) is not None:
        base["token_reward"] = np.asarray(datasets.token_reward(exp.data, fam), dtype=np.float64)
    _RUN_ARRAYS[shared] = (base, data, _shape_key(base))
    return _RUN_ARRAYS[shared]


def _shape_key(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef, tuple((np.shape(x), np.result_type(x)) for x in leaves))


def static_of(exp: Experiment, fam, on_policy: bool, *, lean: bool = True, closed_form: bool = True) -> Static:
    t = exp.train
    return Static(fam, ((exp.loss.name, exp.loss.expr),), resolve_loss(exp.loss).kind, t.optimizer,
                  tuple(sorted(t.optimizer_args.items())),
                  t.steps, t.record_every, t.batch_size, metric_names(exp), on_policy, exp.data.labels == "soft",
                  exp.reference.temperature != 1.0, lean, closed_form)


# --------------------------------------------------------------------------------------------
# Runs grouped into programs
# --------------------------------------------------------------------------------------------


class Job(NamedTuple):
    """One run: its experiment's index, its sweep setting and seed, its program's static
    structure, its host inputs and the key of their shapes, and the two tables its inputs were
    merged from: its seed's arrays (kept by ``_run_arrays``, the same object in every call while
    kept) and its setting's (:func:`setting_inputs`)."""

    experiment: int
    setting: dict[str, Any]
    seed: int
    static: Static
    inputs: dict[str, Any]
    shapes: tuple
    sources: tuple[dict[str, Any], dict[str, Any]]


def jobs(exps: list[Experiment], *, lean: bool = True, closed_form: bool = True) -> list[Job]:
    """Every run of every (checked) experiment."""
    out = []
    for e, exp in enumerate(exps):
        for setting, point in settings(exp):
            fam, tables, shared, statics = _point(point)
            for seed in point.train.seeds:
                base, data, shapes = _run_arrays(point, fam, seed, tables)
                kind = (data.on_policy, lean, closed_form)
                if kind not in statics:
                    statics[kind] = static_of(point, fam, data.on_policy, lean=lean, closed_form=closed_form)
                out.append(Job(e, setting, seed, statics[kind], {**base, **shared}, shapes, (base, shared)))
    return out


# What the runs of a sweep point share: its family, the text of its tables (``_tables``), its
# setting's arrays (``setting_inputs``) and its programs' static structures (by whether the data
# are on-policy, ``lean`` and ``closed_form``), kept by the point's identity (``config.settings``
# hands a repeated experiment the points it expanded before); an entry holds its point, so that
# no other object takes its id while it is kept.
_POINTS: dict[int, tuple] = caches.Bounded(1024)


def _point(point: Experiment) -> tuple[Any, tuple, dict[str, Any], dict[tuple, Static]]:
    entry = _POINTS.get(id(point))
    if entry is None or entry[0] is not point:
        entry = _POINTS[id(point)] = (point, build_family(point.policy), _tables(point), setting_inputs(point), {})
    return entry[1:]


def groups(all_jobs: list[Job]) -> list[tuple[Static, list[int]]]:
    """(program, job indices): jobs that differ only in their loss share a program, whose
    ``losses`` are theirs in first-seen order. Jobs with other input shapes are called apart
    (the same program may serve them: jit compiles it once per shape)."""
    # each distinct static (without its losses) and shape key hashed once, looked up by the
    # identity of the object that holds it (the seeds of a setting share one static, the settings
    # of a seed one shape key), and the jobs grouped by the pair of their numbers
    statics: dict[Static, int] = {}
    shapes: dict[tuple, int] = {}
    numbers: dict[int, int] = {}  # id of a job's static or shape key -> its number in statics or shapes
    by_key: dict[tuple[int, int], list[int]] = {}
    for i, job in enumerate(all_jobs):
        if id(job.static) not in numbers:
            numbers[id(job.static)] = statics.setdefault(job.static._replace(losses=()), len(statics))
        if id(job.shapes) not in numbers:
            numbers[id(job.shapes)] = shapes.setdefault(job.shapes, len(shapes))
        by_key.setdefault((numbers[id(job.static)], numbers[id(job.shapes)]), []).append(i)
    bare = list(statics)
    return [(bare[s]._replace(losses=tuple(dict.fromkeys(all_jobs[i].static.losses[0] for i in members))), members)
            for (s, _), members in by_key.items()]


def call(program: Tiered, static: Static, members: list[Job], *,
         steps_per_call: int | None = None) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Run the jobs ``members`` of one group, one call sequence per loss (its index is the same
    for every run of a call); for each, its records, metric by metric in ``static.metrics``'
    order, and its guard (``(records, 2)``: the objective's value and the largest parameter
    magnitude at every record, which the runner reads for divergence).

    The steps run in calls of the program short enough for a pending signal (Ctrl-C, SIGTERM)
    to be handled between two of them (``Calls``); ``steps_per_call`` fixes their length in
    steps instead (None: as ``Calls`` plans)."""
    width = max(len(job.inputs["hvals"]) for job in members)
    results: list[tuple[dict[str, np.ndarray], np.ndarray] | None] = [None] * len(members)
    for k, loss in enumerate(static.losses):
        chosen = [j for j, job in enumerate(members) if job.static.losses[0] == loss]
        inputs = _stacked([members[j] for j in chosen], width)
        records, guard = Calls(program, static, inputs.stacked, steps_per_call, inputs.classes,
                               placed=inputs.placed).run(np.int32(k))
        order = [key for m in static.metrics for key in records
                 if key == m or (m == "params" and key.startswith("params."))]
        for r, j in enumerate(chosen):
            results[j] = ({key: records[key][r] for key in order}, guard[r])
    return results  # type: ignore[return-value]


class Stacked(NamedTuple):
    """The inputs of the runs of one call sequence, stacked (:func:`_stack`), the class of each
    run's dataset (:func:`_classes`), and the blocked inputs placed on the devices, by mesh (None:
    one device), as ``Calls.run`` has placed them; ``sources`` holds the seeds' tables whose
    identities key it (``_STACKED``), so that none of them is freed and its id reused while it is
    kept."""

    sources: tuple
    stacked: dict[str, Any]
    classes: list[int]
    placed: dict


# The stacked and placed inputs of the last call sequences, by what fixes them: each run's seed
# tables (by identity: ``_run_arrays`` hands the same read-only arrays to every call while it
# keeps them) and setting values (by content: rebuilt in every call, and small). A repeated sweep
# then neither stacks its runs' inputs again nor copies them to the devices (~1.5 ms of the
# ~25 ms of a warm 128-run bigram sweep on 2 cores).
# Inputs larger than ``KEEP_BYTES`` on the host are not kept (their calls' steps dwarf stacking them).
_STACKED: dict[tuple, Stacked] = caches.Bounded(8)
KEEP_BYTES = 1 << 24


def _content(tree) -> tuple:
    """``tree``'s structure and the dtype, shape and bytes of each leaf (a key for small trees)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((np.result_type(x).str, np.shape(x), np.asarray(x).tobytes()) for x in leaves)


def _stacked(members: list[Job], width: int, *, keep_bytes: int = KEEP_BYTES) -> Stacked:
    """The :class:`Stacked` inputs of ``members`` (one call sequence), their loss's values padded
    with zeros to ``width`` (the program's widest loss): kept for a later call with the same runs
    where they take at most ``keep_bytes`` on the host."""
    settings: dict[int, tuple] = {}  # id -> content of each setting table (the seeds of a setting share one)
    for job in members:
        if id(job.sources[1]) not in settings:
            settings[id(job.sources[1])] = _content(job.sources[1])
    key = (width, tuple((id(job.sources[0]), settings[id(job.sources[1])]) for job in members))
    if key in _STACKED:
        return _STACKED[key]
    padded = lambda h: h if len(h) == width else np.concatenate([h, np.zeros(width - len(h))])  # noqa: E731
    inps = [{**job.inputs, "hvals": padded(job.inputs["hvals"])} for job in members]
    stacked = Stacked(tuple(job.sources[0] for job in members), _stack(inps),
                      _classes([inp["data"] for inp in inps]), {})
    if sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(stacked.stacked)) <= keep_bytes:
        _STACKED[key] = stacked
    return stacked


def _stack(inps: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs' inputs stacked entry by entry along a new leading axis. An entry that several
    runs hold (a seed's parameters and data in each setting of a sweep, a setting's values in
    each seed) is stacked once and repeated by index."""
    out = {}
    for key in inps[0]:
        column = [inp[key] for inp in inps]
        first: dict[int, int] = {}
        index = [first.setdefault(id(x), len(first)) for x in column]
        distinct = list({id(x): x for x in column}.values())  # in order of first appearance
        stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *distinct)
        if len(distinct) < len(column):
            rows = np.asarray(index)
            stacked = jax.tree_util.tree_map(lambda x, rows=rows: x[rows], stacked)
        out[key] = stacked
    return out


def _classes(datasets: list[Any]) -> list[int]:
    """A class index per run, equal for runs with equal datasets (``datasets``: their trees of
    arrays, of one shape), numbered in order of first appearance. The seeds of a sweep hand the
    same arrays to each of its settings (``_run_arrays``), so the contents are compared once per
    distinct array."""
    by_id: dict[int, int] = {}
    by_content: dict[bytes, int] = {}
    out = []
    for d in datasets:
        if id(d) not in by_id:
            content = b"".join(np.ascontiguousarray(x).tobytes() for x in jax.tree_util.tree_leaves(d))
            by_id[id(d)] = by_content.setdefault(content, len(by_content))
        out.append(by_id[id(d)])
    return out


# A run's steps are split into calls of the program so that Python regains control, and handles
# a pending signal, at least every ``CALL_S`` seconds: the compiled steps cannot be interrupted.
# A program measured (in this process) to finish within ``ONE_CALL_S`` runs in one call, as a
# figure's, a test's or a benchmark's sweep does once its program has run before.
CALL_S = 0.2
ONE_CALL_S = 0.5
SPREAD_S = 2.0  # seconds of steps left past which a first-tier program spreads its blocks (``Calls.spreads``)
SEGMENTS = 64  # segments per call at most
UNUSED = -1  # the gap of a segment a call does not run (its records are zeros, never kept)

# seconds per (run x step) of each program (static structure, input shapes), measured in its
# calls that did not compile; and which (program, tier, input shapes) have compiled
_SPEED: dict[tuple, float] = caches.Bounded(1024)
_COMPILED: dict[tuple, bool] = caches.Bounded(4096)
_INITIAL_CARRY: dict[tuple, Any] = caches.Bounded(256)


class Calls:
    """The calls of one program that train the stacked runs ``stacked`` from step 0 to the
    end. Every call has the same shapes (one compiled program): it takes the carry (parameters
    and optimiser state) and a list of *segments* (as many as the records, at most
    ``SEGMENTS``), each a number of steps followed by the metrics, and returns the carry and the
    segments' records. One call holds every segment of a short run, each ending at a record; a
    long one is cut into calls of about ``CALL_S`` seconds, at a record or between two steps,
    and the records of a segment that ends between two steps are dropped. A call runs only the
    segments it uses: the rest of its list is marked ``UNUSED``, and a conditional skips their
    metrics (their records read zeros). Computing them made every call cost as much as a whole
    run's records, and a program with costly metrics, such as a group loss on an unbounded
    chain, then measured its steps as slow, cut its calls shorter and spent ever more of its
    time on records it dropped. The arithmetic of every step and record is the same whichever
    the cut: the results are equal bit for bit.

    The length of a call comes from the program's speed, measured by every call that did not
    compile. A program not yet measured first runs one step (its call compiles), then 8 (timed),
    and then calls sized from the time of the one before."""

    def __init__(self, program: Tiered, static: Static, stacked: dict[str, Any], steps_per_call: int | None,
                 classes: Sequence[int] | None = None, *, placed: dict | None = None):
        self.program, self.static, self.stacked = program, static, stacked
        self.placed = {} if placed is None else placed  # mesh (None: one device) -> the inputs placed there
        self.runs = len(stacked["lr"])
        self.layout = layout(range(self.runs) if classes is None else classes)
        self.marks = record_steps(static.steps, static.record_every)
        self.key = (static, _shape_key(stacked), self.layout[1:])  # the program's input shapes
        self.speed = _SPEED.get(self.key)
        # calls timed in this sequence; a speed measured by earlier calls counts as settled (the
        # first timed call, of 8 steps, still pays one-off costs: ~30x a later call's step)
        self.timed = 0 if self.speed is None else 2
        # several processes must make the same calls, which timings cannot promise: one call each
        self.fixed = steps_per_call if jax.process_count() == 1 or steps_per_call else static.steps

    def first(self) -> int:
        """Steps of the first call."""
        if self.fixed is not None:
            return max(1, self.fixed)
        if self.speed is None:
            return 1  # it compiles, and so says nothing of the speed
        if self.speed * self.runs * self.static.steps <= ONE_CALL_S:
            return self.static.steps
        return self._fit()

    def next(self, steps: int, seconds: float, compiled: bool) -> int:
        """Steps of the next call, after one of ``steps`` steps that took ``seconds``."""
        if self.fixed is not None:
            return max(1, self.fixed)
        if compiled or steps == 0:  # its time is the compiler's
            return steps * 8 if self.speed is None else max(1, steps)
        self.speed = _SPEED[self.key] = seconds / (self.runs * steps)
        self.timed += 1
        return self._fit()

    def _fit(self) -> int:
        assert self.speed is not None
        return max(1, int(CALL_S / (self.speed * self.runs)))

    def segments(self, t: int, r: int, budget: int) -> tuple[np.ndarray, np.ndarray]:
        """(gaps, keep) of the call that starts at step ``t`` before record ``r`` and runs at
        most ``budget`` steps: whole gaps to the next records while they fit, then part of one."""
        n = len(self.marks)
        gaps, keep = np.full(min(n, SEGMENTS), UNUSED, np.int64), np.zeros(min(n, SEGMENTS), bool)
        for s in range(len(gaps)):
            if r == n:
                break
            need = self.marks[r] - t
            gaps[s], keep[s] = min(need, budget), need <= budget
            if not keep[s]:
                break
            t, budget, r = self.marks[r], budget - need, r + 1
        return gaps, keep

    def run(self, k) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The records and guards of every run (see :func:`call`). The runs are cut into groups
        that share a dataset and blocks of groups (:func:`layout`), the blocks spread across the
        devices once that pays (``spreads``; from the start under ``jax.distributed``), and the
        segments' outputs put back in run order."""
        t, r = 0, 0
        count, size, over = self.layout.blocks, self.layout.size, None
        carry = None  # the initial placeholder
        parts: list[tuple[dict[str, np.ndarray], np.ndarray]] = []
        budget = self.first()
        while r < len(self.marks):
            if over is None and self.spreads(count, self.static.steps - t):
                over = mesh()  # each device its share of the blocks (_placed)
                carry = None if carry is None else shard(host(carry), over)  # the same values, spread
            stacked, todo = self._placed(over)
            if carry is None:
                carry = self._initial_carry(count, size, over)
            gaps, keep = self.segments(t, r, budget)
            tier = (self.key, self.program.tiered, over)
            compiled = tier not in _COMPILED
            start = time.perf_counter()
            carry, *out = self.program(*stacked, k, carry, np.int64(t), gaps, todo, mesh=over)
            parts.append(jax.tree_util.tree_map(lambda x, keep=keep: self.unblocked(x)[:, keep], host(tuple(out))))
            seconds = time.perf_counter() - start  # the records are on the host: the call has ended
            _COMPILED[tier] = True
            steps = int(gaps[gaps > 0].sum())
            t, r = t + steps, r + int(keep.sum())
            budget = self.next(steps, seconds, compiled)
        if len(parts) == 1:
            return parts[0]
        records = {key: np.concatenate([p[0][key] for p in parts], axis=1) for key in parts[0][0]}
        return records, np.concatenate([p[1] for p in parts], axis=1)

    def _placed(self, over) -> tuple[Any, Any]:
        """(inputs, blocks to run) of the program on the mesh ``over`` (None: one device): the
        stacked inputs in blocks of groups (:func:`layout`; a group's dataset once), placed on
        the devices once and kept in ``placed`` for the later calls (of this sequence or of a
        repeated one, ``_stacked``)."""
        if over not in self.placed:
            order, per, count, size = self.layout

            def blocked(x, shared: bool):  # (runs, ...) -> (count, size, per, ...), a group's data once
                x = np.asarray(x)[order].reshape(len(order) // per, per, *np.shape(x)[1:])  # (an entry may be empty)
                x = _padded(x[:, 0] if shared else x, count * size)  # padded with copies of the last group
                return x.reshape(count, size, *x.shape[1:])

            data = jax.tree_util.tree_map(functools.partial(blocked, shared=True), self.stacked["data"])
            rest = jax.tree_util.tree_map(functools.partial(blocked, shared=False),
                                          {k: v for k, v in self.stacked.items() if k != "data"})
            if over is None:
                self.placed[over] = jax.device_put(((data, rest), np.array([count], np.int64)))
            else:  # each device its share of the blocks (shard's order), the padding's not run
                share = -(-count // over.size)
                todo = np.clip(count - share * np.arange(over.size), 0, share).astype(np.int64)
                self.placed[over] = shard((data, rest), over), shard(todo, over)
        return self.placed[over]

    def spreads(self, blocks: int, steps_left: int) -> bool:
        """Whether the blocks should now be spread across the devices. Never for one block or one
        device; always under ``jax.distributed`` (every process must place them alike, which
        timings cannot promise). Otherwise when it pays for tracing the spread program (the
        one-device program is served traced from the disk cache, ``_export``; the spread one is
        traced in each process, ~1 s): for a program that has proved long-running in this
        process (``Tiered.proven``: an optimised tier read from the disk cache proves nothing of
        this run), or once the steps left are measured (by two timed calls, or earlier ones) to
        take more than ``SPREAD_S``. Where the blocks run never changes a result (:data:`BLOCK`)."""
        if jax.process_count() > 1:
            return True
        if blocks < 2 or mesh() is None:
            return False
        if self.program.proven:
            return True
        return self.timed >= 2 and self.speed is not None and self.speed * self.runs * steps_left > SPREAD_S

    def unblocked(self, x: np.ndarray) -> np.ndarray:
        """An output in blocks, ``(blocks, size, per, ...)``, as ``(runs, ...)`` in run order: the
        padding dropped."""
        x = x.reshape(x.shape[0] * x.shape[1] * x.shape[2], *x.shape[3:])[: self.runs]
        out = np.empty_like(x)
        out[self.layout.order] = x
        return out

    def _initial_carry(self, count: int, size: int, over):
        """Zeros in the shape of the carry (the leaves of the parameters and optimiser state, in
        blocks): the program starts from the runs' own initial state at step 0 and ignores these
        values."""
        key = (self.key, over)
        if key not in _INITIAL_CARRY:
            per = self.layout.per
            zeros = [np.zeros((count, size, per, *shape), dtype) for shape, dtype in self._carry_leaves()]
            # on the device(s), as the carry a call returns (one entry in jit's dispatch cache)
            _INITIAL_CARRY[key] = jax.device_put(zeros) if over is None else shard(zeros, over)
        return _INITIAL_CARRY[key]

    def _carry_leaves(self) -> list[tuple[tuple[int, ...], np.dtype]]:
        """(shape, dtype) of each leaf of one run's carry: its parameters and its optimiser's
        state. Learning them traces the optimiser's ``init``, which imports optax (~0.05 s), so
        they are kept in the disk cache under the program's static structure and input shapes
        (``_export.remembered``) and read back by a later process, which then never imports optax."""

        def derive() -> list:
            shapes = jax.eval_shape(jax.vmap(functools.partial(_start, self.static)), self.stacked)
            return [[list(x.shape[1:]), np.dtype(x.dtype).name] for x in jax.tree_util.tree_leaves(shapes)]

        sig = _export.signature((self.stacked,))
        leaves = derive() if sig is None else _export.remembered(
            _export.key(f"carry of {self.static!r}", sig, {}), derive, _is_carry)
        return [(tuple(shape), np.dtype(dtype)) for shape, dtype in leaves]


_PLAIN_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                 "float32", "float64")


def _is_carry(value: Any) -> bool:
    """Whether a carry's leaves read back are ``[[shape, dtype name], ...]`` (any other dtype,
    bfloat16 among them, is derived each time)."""
    return isinstance(value, list) and all(
        isinstance(leaf, list) and len(leaf) == 2 and isinstance(leaf[0], list) and leaf[1] in _PLAIN_DTYPES
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in leaf[0]) for leaf in value)


# --------------------------------------------------------------------------------------------
# The compiled program
# --------------------------------------------------------------------------------------------


def _chosen(fns: Sequence[Any], k, make):
    """``make(fns[j])`` for the loss the run trains: ``lax.switch`` on its index ``k`` when the
    program holds several losses (``k`` is the same for every run of a call, so only one branch
    runs), the function itself when it holds one."""
    branches = [make(f) for f in fns]
    if len(branches) == 1:
        return branches[0]
    return lambda *a: jax.lax.switch(k, branches, *a)


def _optimizer(static: Static, lr):
    import optax

    return getattr(optax, static.optimizer)(learning_rate=lr, **dict(static.optimizer_args))


def _start(static: Static, inp):
    """A run's state at step 0: its initial parameters and its optimiser's initial state."""
    return inp["params"], _optimizer(static, inp["lr"]).init(inp["params"])


@caches.memo(maxsize=64)
def program(static: Static) -> Tiered:
    """``jit`` of a loop over blocks of a ``vmap`` over groups of a ``vmap`` over the runs of a
    group (``Calls.run`` cuts the runs into groups sharing a dataset and the groups into blocks,
    :func:`layout`; the program's inputs are the groups' datasets, the runs' other inputs, the
    loss's index, the carry, the step, the gaps and the number of blocks to run): train each run
    from ``inp`` with
    the loss ``static.losses[k]``, from the state ``carry`` (its leaves) at step ``t`` (at step 0
    the run's own initial state), through the segments ``gaps`` (steps) each followed by the metrics;
    returns the state after them and the records (see ``Calls``). The steps between two records
    are a ``fori_loop`` of the gradient step alone. Every loss of ``static.losses`` is in the one
    program, chosen by the index ``k`` (data, not a recompilation), so a comparison across losses
    compiles once."""
    fns = [objective.loss_fns(name, expr) for name, expr in static.losses]

    def one(inp, k, carry, t, gaps):
        import optax  # here, not above: a program served from the disk cache is never traced

        opt = _optimizer(static, inp["lr"])
        pre = objective.prepare(static, inp)  # once per call, outside the steps
        value = _chosen(fns, k, lambda f: functools.partial(objective.value, static, f))
        gradient: Callable[..., Any]
        if static.closed_form:
            cotangent = _chosen(fns, k, lambda f: functools.partial(objective.cotangent, static, f))
            gradient = functools.partial(objective.gradient, static, cotangent)
        else:
            def gradient(params, inp, pre, idx):
                return jax.grad(lambda p: value(objective.values(static, p, inp, pre, idx), inp, idx))(params)

        def batch(t):
            if static.batch_size is None:
                return None
            n = inp["data"]["w"].shape[0]
            key = jax.random.fold_in(inp["key"], t)
            return jax.random.choice(key, n, (static.batch_size,), replace=False)

        def step(carry):
            params, opt_state, t = carry
            grads = gradient(params, inp, pre, batch(t))
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, t + 1

        def measure(params):
            """The metrics and the divergence guard (J and the largest parameter magnitude),
            J computed once for both."""
            vals = objective.values(static, params, inp, pre)
            loss = value(vals, inp)
            size = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree_util.tree_leaves(params)]))
            return objective.metrics(static, params, inp, pre, vals, loss), jnp.stack([loss, size])

        def segment(carry, n):  # n steps (n varies, so a while loop), then the metrics, if the call uses it
            carry = jax.lax.fori_loop(0, n, lambda _, c: step(c), carry)
            return carry, jax.lax.cond(n != UNUSED, measure, lambda _: unused, carry[0])

        # at step 0 the run starts from its own state (the carry passed in is a placeholder); the
        # carry crosses calls as a list of leaves, so the program's inputs and outputs hold no
        # optimiser type (jax.export serialises plain trees only)
        start, tree = jax.tree_util.tree_flatten(_start(static, inp))
        carry = jax.tree_util.tree_unflatten(tree, [jnp.where(t == 0, a, b) for a, b in zip(start, carry, strict=True)])
        # the records of a segment the call does not use: zeros, their metrics not computed
        unused = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(measure, carry[0]))
        # one copy of the step and of the metrics in the program (a smaller program compiles faster)
        (params, opt_state, _), (records, guard) = jax.lax.scan(segment, (*carry, t), gaps)
        return jax.tree_util.tree_leaves((params, opt_state)), records, guard

    def group(data, inp, k, carry, t, gaps):
        """``one`` on each run of a group (``Layout``), all reading the group's one dataset: the
        dataset is not batched, so its count matrices are built once and each contraction with
        them is one matrix product over the group's runs."""
        return jax.vmap(lambda i, c: one({**i, "data": data}, k, c, t, gaps))(inp, carry)

    block = jax.vmap(group, in_axes=(0, 0, None, 0, None, None))

    def blocks(data, inp, k, carry, t, gaps, todo):
        """``block`` on each of the first ``todo[0]`` blocks of the leading axis of ``data``,
        ``inp`` and ``carry``, one after another: a loop whose trip count is an input, so that
        each block is computed by the same code whatever the number of blocks a device holds (XLA
        would inline a loop known to run once, and its fusions could then round differently)."""
        take = lambda tree, i: jax.tree_util.tree_map(  # noqa: E731
            lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), tree)
        traced = jax.jit(block)  # traced once: the shapes below and the loop's body share the trace
        shapes = jax.eval_shape(traced, take(data, 0), take(inp, 0), k, take(carry, 0), t, gaps)
        n = jax.tree_util.tree_leaves(inp)[0].shape[0]
        out = jax.tree_util.tree_map(lambda x: jnp.zeros((n, *x.shape), x.dtype), shapes)

        def body(i, out):
            new = traced(take(data, i), take(inp, i), k, take(carry, i), t, gaps)
            return jax.tree_util.tree_map(lambda o, x: jax.lax.dynamic_update_index_in_dim(o, x, i, 0), out, new)

        return jax.lax.fori_loop(0, todo[0], body, out)

    from jax.sharding import PartitionSpec

    runs, every = PartitionSpec("runs"), PartitionSpec()
    return Tiered(blocks, name=f"train {static!r}", in_specs=(runs, runs, every, runs, every, every, runs),
                  ahead=_export.compiles_ahead())
