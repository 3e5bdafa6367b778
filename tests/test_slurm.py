"""The Slurm recipes in deploy/ under a real Slurm: a one-node cluster (munged, slurmctld,
slurmd from Debian's slurm-wlm) started in a temporary folder on free ports for this module,
and stopped after it. Jobs go in with `sbatch` as a user's would: the MPI script's ranks are
launched by the real `srun --mpi=pmi2`, the Ray script starts a Ray head in the allocation.

The node says it has at least 4 CPUs (SlurmdParameters=config_overrides) so that a 3-rank
job fits on a 2-core machine; everything else about it is what `slurmd -C` finds.

Job ids start at a random number (FirstJobId). MPICH names its shared-memory segment after
the PMI job id that srun gives it (`<job>.<step>`); a rank killed outright (MPI_Abort) leaves
the segment in /dev/shm, and a later job with the same id, say job 3 of the next fresh
cluster, would open it and spin in MPI_Init forever. After each test its jobs' segments are
removed."""

import ctypes
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import leftovers, mx_cli, read_dense, rel_error, write_dense
from mx.cluster.head import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
# job states after which Slurm runs nothing more for the job
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "PREEMPTED", "BOOT_FAIL", "DEADLINE")

EXES = {name: shutil.which(name, path=SEARCH) for name in DAEMONS + CLIENTS}
MISSING = [name for name, path in EXES.items() if path is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"no Slurm here (missing {', '.join(MISSING)}); "
                       f"Debian: apt-get install slurm-wlm munge (.ci/run does)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="slurmd runs jobs as their users: it needs root"),
]


def fnv1a(text: str) -> int:
    """MPICH's world id: the 32-bit FNV-1a hash of the PMI job id (HASH_FNV in uthash)."""
    h = 0x811C9DC5
    for byte in text.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def die_with_parent():
    """In a daemon's child before exec: SIGTERM it when pytest dies without tearing down."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Cluster:
    """A running one-node Slurm; `run` calls its client commands."""

    def __init__(self, folder):
        self.folder = folder
        self.conf = os.path.join(folder, "slurm.conf")
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.node = None
        self.jobs: list[str] = []  # ids of the jobs submitted

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "RAY_", "MX_RAY_"))}
        return {**env, "SLURM_CONF": self.conf, "PATH": f"{BIN}{os.pathsep}{SEARCH}", **extra}

    def run(self, *args, timeout=60, check=True, env=None):
        proc = subprocess.run([EXES.get(args[0], args[0]), *map(str, args[1:])], capture_output=True,
                              text=True, timeout=timeout, env=env or self.env())
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}:\n"
                                 f"{proc.stdout}{proc.stderr}\n{self.logs()}")
        return proc

    def logs(self) -> str:
        out = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = os.path.join(self.folder, name)
            if os.path.exists(path):
                out.append(f"--- {name} (end)\n" + "".join(open(path, errors="replace").readlines()[-30:]))
        return "\n".join(out)

    def start(self, name, *args):
        log = open(os.path.join(self.folder, f"{name}.out"), "ab")
        proc = subprocess.Popen([EXES[name], *args], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, env=self.env(), cwd=self.folder, preexec_fn=die_with_parent)
        self.procs.append((name, proc))
        return proc

    def wait(self, predicate, what, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited {proc.returncode} while waiting for "
                                         f"{what}\n{self.logs()}")
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")

    def up(self):
        f = self.folder
        # munge: a key of our own, its socket named in slurm.conf (AuthInfo)
        key = os.path.join(f, "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            out.write(os.urandom(1024))
        sock = os.path.join(f, "munge.socket")
        self.start("munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                   f"--log-file={f}/munged.log", f"--pid-file={f}/munged.pid",
                   f"--seed-file={f}/munged.seed")
        self.wait(lambda: os.path.exists(sock), "munged's socket")
        # the node as slurmd finds it (name, memory), with at least 4 CPUs
        found = dict(kv.split("=", 1) for kv in self.run("slurmd", "-C").stdout.split()
                     if "=" in kv and not kv.startswith("UpTime"))
        self.node = found["NodeName"]
        cpus = max(4, int(found["CPUs"]))
        for d in ("state", "spool"):
            os.makedirs(os.path.join(f, d), exist_ok=True)
        with open(self.conf, "w") as out:
            out.write(f"""ClusterName=mxtest
FirstJobId={random.randrange(1_000_000, 60_000_000)}
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd.pid
SlurmctldLogFile={f}/slurmctld.log
SlurmdLogFile={f}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
SlurmdParameters=config_overrides
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={found.get("RealMemory", 1)} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self.start("slurmctld", "-D", "-f", self.conf)
        self.wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, "slurmctld")
        self.start("slurmd", "-D", "-f", self.conf)
        self.wait(lambda: self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip() == "idle",
                  "the node to be idle")

    def processes(self) -> list[str]:
        """What runs with this cluster's slurm.conf in its environment: its daemons (and
        slurmscriptd, slurmstepd), and whatever its jobs started."""
        mark = f"SLURM_CONF={self.conf}".encode()
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if mark not in f.read().split(b"\0"):
                        continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{pid} {cmd}")
            except OSError:
                continue
        return found

    def clear(self):
        """Cancel every job still queued or running; remove what killed MPICH ranks left."""
        self.run("scancel", "--user", "root", check=False)
        deadline = time.monotonic() + 30
        while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.2)
        for job in self.jobs:
            for step in range(4):
                for kind in ("shm", "vci"):
                    for node in range(2):
                        path = f"/dev/shm/mpich_{kind}_{fnv1a(f'{job}.{step}'):x}_{node}"
                        if os.path.exists(path):
                            os.remove(path)
        self.jobs.clear()

    def down(self):
        try:
            if any(name == "slurmctld" and proc.poll() is None for name, proc in self.procs):
                self.clear()
        finally:
            for name, proc in reversed(self.procs):  # slurmd, slurmctld, munged
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        c.up()
        yield c
    finally:
        c.down()
    # nothing of the cluster outlives it: no daemons, no job steps, nothing a job started
    deadline = time.monotonic() + 10
    while c.processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not c.processes(), f"left running: {c.processes()}"


@pytest.fixture(autouse=True)
def cleared(cluster):
    """A test's jobs end with it, even when it fails (the next test finds an idle node)."""
    yield
    cluster.clear()


def submit(cluster, folder, script, *args, options=(), env=None, timeout=180):
    """sbatch SCRIPT ARGS; wait for the job to end (polling: `sbatch --wait` polls every
    2, 8, then 32 s); returns its state, exit code and output."""
    out = os.path.join(folder, "slurm-%j.out")
    job = cluster.run("sbatch", "--parsable", "--time=10", f"--chdir={folder}", f"--output={out}",
                      *options, script, *args, env=env).stdout.strip().split(";")[0]
    cluster.jobs.append(job)
    deadline = time.monotonic() + timeout
    while True:
        info = cluster.run("scontrol", "show", "job", "-o", job).stdout
        state = re.search(r"JobState=(\S+)", info).group(1)
        if state in ENDED:
            break
        if time.monotonic() > deadline:
            cluster.run("scancel", job, check=False)
            raise AssertionError(f"job {job} still {state} after {timeout} s:\n{info}")
        time.sleep(0.2)
    code = re.search(r"ExitCode=(\d+):(\d+)", info).groups()
    text = open(out.replace("%j", job)).read()
    return state, tuple(map(int, code)), text


def gemm_job(folder, rng, workers, backend=None):
    """A gemm of awkward shapes; returns the job file and NumPy's product."""
    a, b = rng.standard_normal((130, 90)), rng.standard_normal((90, 70))
    write_dense(folder / "A.zarr", a)
    write_dense(folder / "B.zarr", b)
    (folder / "job.yaml").write_text((f"backend: {backend}\n" if backend else "") +
                                     f"resources: {{workers: {workers}}}\nsteps:\n"
                                     "  - {id: c, op: gemm, inputs: {a: A.zarr, b: B.zarr}, output: C.zarr}\n")
    return str(folder / "job.yaml"), a @ b


def job_env(cluster, **extra):
    """The submitter's environment: mx in this virtualenv (MX_VENV, as the scripts expect)."""
    venv = {"MX_VENV": sys.prefix} if os.path.exists(os.path.join(sys.prefix, "bin", "activate")) else {}
    return cluster.env(**venv, **extra)


def job_state(output):
    job_id = re.search(r"job (job-\S+): running", output).group(1)
    return re.search(r"^state\s+(\S+)", mx_cli("status", job_id, check=True).stdout, re.M).group(1)


def test_mpi_sbatch(cluster, tmp_path, rng):
    job, want = gemm_job(tmp_path, rng, 3, backend="mpi")
    state, code, out = submit(cluster, tmp_path, os.path.join(ROOT, "deploy/slurm/mx-mpi.sbatch"), job,
                              options=["--ntasks=3", "--cpus-per-task=1"], env=job_env(cluster))
    assert (state, code) == ("COMPLETED", (0, 0)), out
    assert f"mx-mpi: 3 ranks on {cluster.node}" in out
    # the ranks are srun's tasks, joined by Slurm's PMI-2 into one MPI job
    assert "mpi: 3 ranks" in out and "rank 2: pid" in out, out
    assert rel_error(read_dense(tmp_path / "C.zarr"), want) < 1e-12
    assert job_state(out) == "succeeded"


@pytest.mark.parametrize("broken", ["missing input", "corrupt chunk"])
def test_mpi_sbatch_fails(cluster, tmp_path, rng, broken):
    """A failing job ends FAILED with a nonzero exit (`sbatch --wait` passes it on) and no
    output. A chunk that cannot be read fails rank 1 mid-step: MPI_Abort through Slurm's
    PMI-2 ends every rank, and the step's temporary output is removed."""
    job, _ = gemm_job(tmp_path, rng, 3, backend="mpi")
    if broken == "missing input":
        shutil.rmtree(tmp_path / "B.zarr")
    else:
        (tmp_path / "A.zarr" / "c" / "1" / "0").write_bytes(os.urandom(300))  # rows 44..87: rank 1's
    out = tmp_path / "slurm.out"
    proc = subprocess.Popen([EXES["sbatch"], "--wait", "--time=10", "--ntasks=3", "--cpus-per-task=1",
                             f"--chdir={tmp_path}", f"--output={out}",
                             os.path.join(ROOT, "deploy/slurm/mx-mpi.sbatch"), job],
                            env=job_env(cluster), stdout=subprocess.PIPE, text=True)
    job_id = re.search(r"Submitted batch job (\d+)", proc.stdout.readline()).group(1)
    cluster.jobs.append(job_id)
    try:
        proc.wait(180)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    text = out.read_text()
    assert proc.returncode != 0, text
    info = cluster.run("scontrol", "show", "job", "-o", job_id).stdout
    assert "JobState=FAILED" in info, info
    assert not (tmp_path / "C.zarr").exists() and not leftovers(tmp_path), os.listdir(tmp_path)
    if broken == "missing input":
        assert "B.zarr" in text, text
    else:
        assert "MPI_Abort" in text, text
        assert job_state(text) == "failed"


def test_srun_without_mpi_plugin(cluster, tmp_path, rng):
    """`srun mx run` where the site has no MpiDefault: every task would be an MPI job of its
    own (each starting mpiexec); mx stops at once and names `srun --mpi=pmi2`."""
    job, _ = gemm_job(tmp_path, rng, 3, backend="mpi")
    state, code, out = submit(cluster, tmp_path, "--wrap", f"srun mx run {job}",
                              options=["--ntasks=3", "--cpus-per-task=1"], env=job_env(cluster),
                              timeout=120)
    assert state == "FAILED" and code[0] != 0, out
    assert out.count("without an MPI plugin") == 3 and "srun --mpi=pmi2" in out, out
    assert not (tmp_path / "C.zarr").exists() and not leftovers(tmp_path)
    assert "no jobs" in mx_cli("list", check=True).stderr  # nothing recorded


@pytest.mark.skipif(shutil.which("ray", path=BIN) is None, reason="no ray command")
def test_ray_sbatch(cluster, tmp_path, rng):
    job, want = gemm_job(tmp_path, rng, 2)
    port = free_port()
    env = job_env(cluster, MX_RAY_PORT=str(port), MX_RAY_AGENT_PORT=str(free_port()),
                  MX_RAY_DASHBOARD_PORT=str(free_port()))
    state, code, out = submit(cluster, tmp_path, os.path.join(ROOT, "deploy/slurm/mx-ray.sbatch"), job,
                              options=["--nodes=1", "--cpus-per-task=2"], env=env, timeout=240)
    assert (state, code) == ("COMPLETED", (0, 0)), out
    assert "mx-ray: Ray head" in out and "1 node(s)" in out, out
    assert "submitted to the Ray cluster" in out, out
    assert rel_error(read_dense(tmp_path / "C.zarr"), want) < 1e-12
    assert job_state(out) == "succeeded"
    assert not [f for f in os.listdir(os.environ["MX_HOME"]) if f.startswith("ray-token-")]
    # the allocation's Ray is gone with the job
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-f", f"port={port}"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the allocation's Ray processes outlived the job"
        time.sleep(0.5)
