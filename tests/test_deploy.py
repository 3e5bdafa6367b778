"""The Slurm recipes in deploy/, run on this machine with `srun`/`scontrol` stand-ins and the
Slurm variables set (no Slurm daemons here): the MPI script launches ranks that compute the
job; the Ray script starts a Ray head with token authentication and submits the job to it."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import read_dense, rel_error, write_dense

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

SRUN = """#!/bin/bash
# srun stand-in: drop Slurm's options; with --mpi, start $SLURM_NTASKS MPI ranks
mpi=0
while [ $# -gt 0 ]; do
  case "$1" in
    --mpi=*) mpi=1; shift;;
    -w|--nodelist|-n|-N) shift 2;;
    --*) shift;;
    *) break;;
  esac
done
if [ $mpi = 1 ]; then exec "{bin}/mpiexec" -n "$SLURM_NTASKS" "$@"; fi
exec "$@"
"""
SCONTROL = """#!/bin/bash
# scontrol stand-in: `scontrol show hostnames LIST` for a one-node allocation
echo "$(hostname)"
"""


@pytest.fixture
def slurm(tmp_path):
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "srun").write_text(SRUN.format(bin=BIN))
    (shims / "scontrol").write_text(SCONTROL)
    for f in shims.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}:{BIN}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1", "SLURM_CPUS_PER_TASK": "2"}
    return env


def inputs(tmp_path, rng):
    a, b = rng.standard_normal((130, 90)), rng.standard_normal((90, 70))
    write_dense(tmp_path / "A.zarr", a)
    write_dense(tmp_path / "B.zarr", b)
    return a @ b


def test_mpi_sbatch(tmp_path, rng, slurm):
    want = inputs(tmp_path, rng)
    (tmp_path / "job.yaml").write_text("backend: mpi\nresources: {workers: 3}\nsteps:\n"
                                       "  - {id: c, op: gemm, inputs: {a: A.zarr, b: B.zarr}, output: C.zarr}\n")
    proc = subprocess.run(["bash", os.path.join(ROOT, "deploy/slurm/mx-mpi.sbatch"), str(tmp_path / "job.yaml")],
                          env={**slurm, "SLURM_NTASKS": "3"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mx-mpi: 3 ranks" in proc.stdout
    assert rel_error(read_dense(tmp_path / "C.zarr"), want) < 1e-12


@pytest.mark.skipif(shutil.which("ray", path=BIN) is None, reason="no ray command")
def test_ray_sbatch(tmp_path, rng, slurm, ray_session):
    want = inputs(tmp_path, rng)
    (tmp_path / "job.yaml").write_text("resources: {workers: 2}\nsteps:\n"
                                       "  - {id: c, op: gemm, inputs: {a: A.zarr, b: B.zarr}, output: C.zarr}\n")
    env = {**slurm, "MX_RAY_PORT": "6391", "MX_RAY_AGENT_PORT": "6392"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "deploy/slurm/mx-ray.sbatch"), str(tmp_path / "job.yaml")],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mx-ray: Ray head" in proc.stdout
    assert rel_error(read_dense(tmp_path / "C.zarr"), want) < 1e-12
    assert not os.path.exists(os.path.join(env["MX_HOME"], "ray-token-4242"))  # cleaned up
    import ray
    assert ray.is_initialized() and ray.cluster_resources()  # another Ray on this node survives
    time_left = 30
    while time_left and subprocess.run(["pgrep", "-f", "port=6391"], capture_output=True).returncode == 0:
        import time
        time.sleep(1)
        time_left -= 1
    assert time_left, "the allocation's Ray processes outlived the script"


def test_srun_without_mpi_plugin(tmp_path, rng):
    """A task of `srun -n 3 mx run` without an MPI plugin (no PMI variables) is refused at
    once, naming `srun --mpi=pmi2`, instead of starting an MPI job of its own."""
    inputs(tmp_path, rng)
    (tmp_path / "job.yaml").write_text("backend: mpi\nresources: {workers: 3}\nsteps:\n"
                                       "  - {id: c, op: gemm, inputs: {a: A.zarr, b: B.zarr}, output: C.zarr}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI", "OMPI_", "MPI_"))}
    proc = subprocess.run([os.path.join(BIN, "mx"), "run", str(tmp_path / "job.yaml")], capture_output=True,
                          text=True, timeout=120,
                          env={**env, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "3", "SLURM_PROCID": "1"})
    assert proc.returncode != 0
    assert "without an MPI plugin" in proc.stderr and "srun --mpi=pmi2" in proc.stderr, proc.stderr
    assert not (tmp_path / "C.zarr").exists() and not os.path.exists(os.path.join(env["MX_HOME"], "jobs"))
