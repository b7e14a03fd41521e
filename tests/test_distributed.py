"""A sweep across processes (``jax.distributed``, gloo on CPU): two local processes of two
devices each give the single-process result byte for byte, padding a run count the devices do
not divide, and spreading a sweep of several blocks of runs; a missing or malformed setting is
refused with exit status 2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli

from gradlab.errors import GradlabError
from gradlab.experiments import distributed

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180  # seconds for both processes (a few under load; the coordinator waits up to 300)

# Two losses x three betas, 17 steps (a program no other test compiles, so its compile tier is
# this file's). seeds = 2: six runs per loss, which two devices divide; seeds = 1: three, padded;
# seeds = 22: 66 runs per loss, two blocks of 33 (``_engine.blocking``) on four devices, in 13
# steps (a program of its own: its first call, in each process, is in the first tier).
SWEEP = """
[policy]
family = "softmax"
vocab = 3

[reference]
params = "seed"

[data]
kind = "population"
reward = [1.0, 0.0, -1.0]

[loss]
name = "dpo"

[train]
optimizer = "adam"
lr = 0.05
steps = {steps}
seeds = {seeds}
record_every = 8
metrics = ["probabilities", "sequence_entropy", "loss"]

[sweep]
"loss.name" = ["dpo", "ipo"]
"loss.beta" = [0.1, 0.5, 1.0]
"""

# Each process: ``gradlab run FILE --json --distributed`` for every file (the command line's own
# code), then a probe of the engine's placement: a 3-row array split over the global mesh and
# gathered back.
DRIVER = """
import json, sys
import numpy as np
from gradlab.cli import main
codes = [main(["run", path, "--json", "--distributed"]) for path in sys.argv[1:]]
import jax
from gradlab.experiments import _engine
probe = _engine.shard({"x": np.arange(3.0)})["x"]
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
                  "codes": codes, "local_rows": [s.data.shape[0] for s in probe.addressable_shards],
                  "global_rows": probe.shape[0], "gathered": _engine.host(probe).tolist()}))
"""

# what connects processes, and the cluster environments JAX detects: none may leak in from outside
_SETTINGS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "MASTER_ADDR", "MASTER_PORT",
             "WORLD_SIZE", "RANK", "JAX_LOCAL_DEVICE_IDS", "XLA_FLAGS", "JAX_NUM_CPU_DEVICES")


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _SETTINGS and not k.startswith(("SLURM_", "OMPI_", "PMI_", "KUBERNETES_"))}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], n: int = 2) -> list[tuple[int, str, str]]:
    """``python ARGS`` as processes 0..n-1 of one job on a free localhost port: (exit status,
    stdout, stderr) of each. On a timeout or an error every process is killed (its whole group)."""
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_environment(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(n),
                                               JAX_PROCESS_ID=str(i), JAX_NUM_CPU_DEVICES="2"))
             for i in range(n)]
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("distributed")
    paths = {}
    for name, seeds, steps in (("even", 2, 17), ("odd", 1, 17), ("blocks", 22, 13)):
        paths[name] = folder / f"{name}.toml"
        paths[name].write_text(SWEEP.format(seeds=seeds, steps=steps))
    return paths


@pytest.fixture(scope="module")
def two_processes(sweeps) -> list[tuple[int, str, str]]:
    """The sweeps, in two processes of one job (started once for the tests below)."""
    return _launch(["-c", DRIVER, str(sweeps["even"]), str(sweeps["odd"]), str(sweeps["blocks"])])


def _single(path: Path) -> str:
    code, out, err = run_cli(["run", str(path), "--json"])
    assert code == 0, err
    return out


def test_two_processes_give_the_single_process_json_byte_for_byte(two_processes, sweeps):
    (code0, out0, err0), (code1, out1, err1) = two_processes
    assert code0 == 0 and code1 == 0, err0 + err1
    *docs, probe0 = out0.splitlines(keepends=True)
    *nothing, probe1 = out1.splitlines(keepends=True)
    assert nothing == [], "process 1 printed output"
    assert [json.loads(p)["codes"] for p in (probe0, probe1)] == [[0, 0, 0], [0, 0, 0]]
    assert len(json.loads(docs[0])["runs"]) == 12  # 2 losses x 3 betas x 2 seeds
    assert docs[0] == _single(sweeps["even"])


def test_a_run_count_the_processes_do_not_divide_is_padded(two_processes, sweeps):
    (_, out0, _), (_, out1, _) = two_processes
    docs = out0.splitlines(keepends=True)[:-1]
    assert len(json.loads(docs[1])["runs"]) == 6  # 3 runs per loss: one program call of 3 rows each
    assert docs[1] == _single(sweeps["odd"])
    # the placement behind it: 3 rows padded to 4 on a mesh over both processes' two devices, each
    # device holding 1 row, and every row gathered back to each process
    for i, line in enumerate((out0.splitlines()[-1], out1.splitlines()[-1])):
        probe = json.loads(line)
        assert (probe["process"], probe["processes"], probe["devices"]) == (i, 2, 4)
        assert (probe["global_rows"], probe["local_rows"]) == (4, [1, 1])
        assert probe["gathered"] == [0.0, 1.0, 2.0, 2.0]


def test_blocks_of_runs_spread_over_processes_give_the_single_process_json(two_processes, sweeps):
    (_, out0, _), _ = two_processes
    docs = out0.splitlines(keepends=True)[:-1]
    assert len(json.loads(docs[2])["runs"]) == 132
    assert docs[2] == _single(sweeps["blocks"])


def test_a_later_job_reads_back_the_programs_each_process_stored(two_processes, sweeps):
    """Each process of a job stores its compiled programs under keys of its own (an executable
    is bound to the process's device): a later job, reading them from the disk cache, gives the
    same JSON. With one key for both processes, one of them read the other's executable and
    failed (its device is not local)."""
    (_, out0, _), _ = two_processes
    (code0, again0, err0), (code1, _, err1) = _launch(["-c", DRIVER, str(sweeps["even"])])
    assert code0 == 0 and code1 == 0, err0 + err1
    assert again0.splitlines(keepends=True)[0] == out0.splitlines(keepends=True)[0]


def test_missing_settings_exit_2_naming_them(sweeps):
    done = subprocess.run([sys.executable, "-m", "gradlab", "run", str(sweeps["odd"]), "--distributed"], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT, env=_environment())
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    for name in ("JAX_COORDINATOR_ADDRESS", "MASTER_ADDR", "JAX_NUM_PROCESSES", "WORLD_SIZE", "JAX_PROCESS_ID",
                 "RANK", "SLURM"):
        assert name in done.stderr


@pytest.mark.parametrize(("env", "named"), [
    ({"JAX_COORDINATOR_ADDRESS": "localhost"}, "JAX_COORDINATOR_ADDRESS must be host:port"),
    ({"JAX_COORDINATOR_ADDRESS": "h:99999"}, "port from 1 to 65535"),
    ({"MASTER_ADDR": "h"}, "MASTER_PORT is not set"),
    ({"MASTER_ADDR": "h", "MASTER_PORT": "x"}, "MASTER_ADDR:MASTER_PORT must be host:port"),
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES must be a whole number >= 1"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE must be a whole number >= 1"),
    ({"JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID must be a whole number >= 0"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "below the number of processes (0 to 1), not 2"),
])
def test_malformed_settings_are_refused(env, named):
    with pytest.raises(GradlabError, match=named.replace("(", r"\(").replace(")", r"\)")):
        distributed.settings(environ=env)


def test_settings_come_from_arguments_then_jax_then_torchrun():
    torchrun = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "4", "RANK": "3"}
    assert distributed.settings(environ=torchrun) == ("10.0.0.1:29500", 4, 3)
    jax_env = {**torchrun, "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert distributed.settings(environ=jax_env) == ("h:1", 2, 0)
    assert distributed.settings(coordinator_address="a:2", num_processes=8, process_id=7, environ=jax_env) == \
        ("a:2", 8, 7)
    assert distributed.settings(environ={}) == (None, None, None)  # left to JAX's cluster detection


def test_the_command_line_refuses_a_malformed_setting_with_exit_2(sweeps, monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    code, out, err = run_cli(["run", str(sweeps["odd"]), "--distributed"])
    assert (code, out) == (2, "")
    assert "JAX_NUM_PROCESSES must be a whole number >= 1 (the number of processes), not 'two'" in err
