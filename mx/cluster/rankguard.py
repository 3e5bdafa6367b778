"""A guard around one MPI rank that says how the rank ended when it ended badly.

``python -m mx.cluster.rankguard ENDS -- COMMAND...``: mx's mpiexec launcher starts each rank
this way. A rank killed outright (SIGKILL from the OOM killer, a segfault) cannot say so
itself, and mpiexec's own report cannot tell it from the ranks it kills next: its cleanup
SIGKILLs the others, and the PID it names is not the dead rank's. The guard is the rank's
parent, so ``waitpid`` tells it at once; it appends one line to ``ENDS``, such as "rank 2 of 4
was killed by SIGKILL (out of memory?)", before it ends the same way, which is only then
what mpiexec sees (and acts on). The first line in ``ENDS`` is therefore the rank that died
first.

The rank runs in a process group of its own and SIGINT and SIGTERM are passed on to it once
(mpiexec may signal the guard's group), and it dies with the guard (a guard SIGKILLed by
mpiexec's cleanup leaves no rank running on). Standard library only: it starts before, and
beside, every rank.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def describe(status: int, rank: str, size: str) -> str:
    """How a rank ended, in words, from its ``returncode`` (negative: the signal)."""
    who = f"rank {rank} of {size}"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {-status}"
        hint = " (out of memory?)" if -status == signal.SIGKILL else ""
        return f"{who} was killed by {name}{hint}"
    return f"{who} exited with code {status}"


def _own_group_dying_with_parent() -> None:
    os.setpgid(0, 0)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a killed guard may leave its rank running
        pass


def _first(names: tuple[str, ...]) -> str:
    return next((os.environ[n] for n in names if n in os.environ), "?")


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m mx.cluster.rankguard ENDS -- COMMAND...", file=sys.stderr)
        return 2
    ends, command = argv[0], argv[2:]
    # the rank inherits every descriptor: MPI's process manager talks to it through them
    child = subprocess.Popen(command, close_fds=False, preexec_fn=_own_group_dying_with_parent)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    status = child.wait()
    if status != 0:
        with open(ends, "a") as f:
            f.write(describe(status, _first(RANK_VARS), _first(SIZE_VARS)) + "\n")
    if status < 0:  # end as the rank did, so mpiexec reports what it would have
        if -status != signal.SIGKILL:
            signal.signal(-status, signal.SIG_DFL)  # Python's own handlers (SIGINT, SIGPIPE)
        os.kill(os.getpid(), -status)
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
