"""Runs across several processes, one per host: ``jax.distributed`` on a global mesh.

    gradlab run sweep.toml --json --distributed        # on every host, the same command

Every process builds the same runs (a run's inputs are a deterministic function of the
experiment), the blocks of runs of each program (``_engine.layout``: sized by the runs alone,
their count and their data) are split across every process's devices (padded to a multiple of the device count with
blocks that are not run), each device trains its blocks, and the records are gathered back to
every process. Each block is computed by the same code as in one process, so the result is the
single-process result byte for byte. Only process 0 prints it.

:func:`initialize` connects the processes. Each of its three settings is taken from its argument,
else JAX's variable, else torchrun's:

- the coordinator, process 0's host:port: ``coordinator_address``, ``JAX_COORDINATOR_ADDRESS``,
  ``MASTER_ADDR`` and ``MASTER_PORT``;
- the number of processes: ``num_processes``, ``JAX_NUM_PROCESSES``, ``WORLD_SIZE``;
- this process's id, 0 to n - 1: ``process_id``, ``JAX_PROCESS_ID``, ``RANK``;

and, for the settings none of those gives, from a cluster environment JAX detects on its own
(SLURM, Open MPI, Kubernetes, Cloud TPU): under ``srun`` nothing needs to be set. A setting that
is malformed, or missing outside such an environment, is a :class:`~gradlab.errors.GradlabError`
(``gradlab run`` exits 2) that names it and where it may be given.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from typing import NamedTuple

from gradlab.errors import GradlabError

__all__ = ["Settings", "settings", "initialize", "is_leader", "joined", "native_output_to_stderr", "SOURCES"]

# Where each setting may come from, after the argument: JAX's variable, then torchrun's.
SOURCES = {
    "coordinator_address": ("JAX_COORDINATOR_ADDRESS", "MASTER_ADDR and MASTER_PORT"),
    "num_processes": ("JAX_NUM_PROCESSES", "WORLD_SIZE"),
    "process_id": ("JAX_PROCESS_ID", "RANK"),
}
_MEANING = {"coordinator_address": "the coordinator's address (process 0's host:port)",
            "num_processes": "the number of processes", "process_id": "this process's id (0, 1, ..., n - 1)"}


class Settings(NamedTuple):
    """What connects this process to the others (None: left to JAX's cluster detection)."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None


def _where(name: str) -> str:
    jax_var, torch_var = SOURCES[name]
    return f"set {jax_var}, or {torch_var} (Python: initialize({name}=...))"


def _whole(text: str, name: str, source: str, lowest: int) -> int:
    value = text.strip()
    if not value.lstrip("-").isdigit() or int(value) < lowest:
        raise GradlabError(f"{source} must be a whole number >= {lowest} ({_MEANING[name]}), not {text!r}")
    return int(value)


def _address(text: str, source: str) -> str:
    host, colon, port = text.strip().rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise GradlabError(f"{source} must be host:port with a port from 1 to 65535 "
                           f"({_MEANING['coordinator_address']}), not {text!r}")
    return text.strip()


def settings(*, coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """The settings from the arguments and the environment (``os.environ`` by default), checked."""
    env = os.environ if environ is None else environ
    address = coordinator_address
    if address is not None:
        address = _address(str(address), "coordinator_address")
    elif env.get("JAX_COORDINATOR_ADDRESS"):
        address = _address(env["JAX_COORDINATOR_ADDRESS"], "JAX_COORDINATOR_ADDRESS")
    elif env.get("MASTER_ADDR") or env.get("MASTER_PORT"):
        if not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
            missing = "MASTER_PORT" if env.get("MASTER_ADDR") else "MASTER_ADDR"
            raise GradlabError(f"MASTER_ADDR and MASTER_PORT go together ({_MEANING['coordinator_address']}); "
                               f"{missing} is not set")
        address = _address(f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}", "MASTER_ADDR:MASTER_PORT")

    def count(given: int | None, name: str, lowest: int) -> int | None:
        jax_var, torch_var = SOURCES[name]
        if given is not None:
            if isinstance(given, bool) or not isinstance(given, int):
                raise GradlabError(f"{name} must be a whole number >= {lowest} ({_MEANING[name]}), not {given!r}")
            return _whole(str(given), name, name, lowest)
        for var in (jax_var, torch_var):
            if env.get(var):
                return _whole(env[var], name, var, lowest)
        return None

    n = count(num_processes, "num_processes", 1)
    i = count(process_id, "process_id", 0)
    if n is not None and i is not None and i >= n:
        raise GradlabError(f"the process id must be below the number of processes (0 to {n - 1}), not {i}")
    return Settings(address, n, i)


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout: int = 300) -> None:
    """Connect this process to the others (``jax.distributed.initialize``), before any JAX
    computation; nothing happens when it is already connected. ``timeout`` is how long, in
    seconds, to wait for the others. On CPU, cross-process collectives use gloo."""
    import jax

    if jax.distributed.is_initialized():
        return
    found = settings(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    try:
        # CPU processes exchange arrays through gloo (the default of newer jax; older ones had none)
        if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(*found, initialization_timeout=timeout)
    except (ValueError, TypeError) as exc:  # a setting neither given nor detected
        missing = [name for name, value in found._asdict().items() if value is None]
        if not missing:
            raise GradlabError(f"jax.distributed could not start: {exc}") from None
        raise GradlabError("a distributed run needs " + "; ".join(f"{_MEANING[m]}: {_where(m)}" for m in missing)
                           + " (or run under a cluster JAX detects: SLURM, Open MPI, Kubernetes, Cloud TPU)") from None
    except RuntimeError as exc:  # jax's own refusal, or the coordinator not reached in time
        if "must be called before" in str(exc):
            raise GradlabError("jax.distributed must start before any JAX computation in this process: run the "
                               "distributed experiment first, or call gradlab.experiments.distributed.initialize() "
                               "at the start") from None
        where = found.coordinator_address or "the detected coordinator"
        raise GradlabError(f"this process could not join the others through {where} within {timeout} s: "
                           f"{exc}") from None


@contextlib.contextmanager
def joined() -> Iterator[None]:
    """This process connected to the others (:func:`initialize`, from the environment, unless
    already connected), native output kept off stdout inside the block."""
    initialize()
    with native_output_to_stderr():
        yield


def is_leader() -> bool:
    """Whether this process writes the output: process 0, or the only process."""
    import jax

    return jax.process_index() == 0


@contextlib.contextmanager
def native_output_to_stderr() -> Iterator[None]:
    """Inside the block, what native code writes to the process's stdout goes to stderr (gloo
    announces its connections on C++'s stdout), so that stdout carries gradlab's output alone.
    Python's ``sys.stdout`` keeps its own target (the command line captures it)."""
    try:
        saved = os.dup(1)
    except OSError:  # no stdout to protect
        yield
        return
    if sys.__stdout__ is not None:
        sys.__stdout__.flush()  # what Python wrote before the block stays on stdout
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
