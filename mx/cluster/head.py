"""The persistent local Ray head that ``mx cluster up`` starts and ``mx cluster down`` stops.

For users who want to watch jobs: the head serves Ray's dashboard on 127.0.0.1 (port 8265 by
default) and takes jobs through Ray's Jobs API. Token authentication stays on: ``up`` makes a
token for this head (``$MX_HOME/cluster/auth_token``, mode 600), and mx's own commands use it
when they talk to this head. The head runs as ``ray start --head --block`` in a session of its
own, so ``down`` stops exactly its processes and nothing else of Ray on the machine.
``$MX_HOME/cluster/head.json`` says where it is.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from mx.errors import UserError
from mx.tasks import record

START_TIMEOUT_S = 90.0


def folder() -> str:
    return os.path.join(record.home(), "cluster")


def _state_file() -> str:
    return os.path.join(folder(), "head.json")


def info() -> dict | None:
    """The running head's description (addresses, pid, token path), or None."""
    try:
        with open(_state_file()) as f:
            head = json.load(f)
    except FileNotFoundError:
        return None
    return head if record.alive(head["pid"]) else None


def up(num_cpus: int | None = None, num_gpus: int | None = None, dashboard_port: int = 8265,
       log=lambda line: None) -> dict:
    """Start the head and wait until its Jobs API answers; returns its description."""
    head = info()
    if head is not None:
        raise UserError(f"a cluster is already up at {head['dashboard']} (pid {head['pid']}); "
                        f"`mx cluster down` stops it")
    if _port_busy(dashboard_port):
        raise UserError(f"port {dashboard_port} on 127.0.0.1 is taken; stop what uses it or "
                        f"give --dashboard-port")
    os.makedirs(folder(), exist_ok=True)
    token = os.path.join(folder(), "auth_token")
    with open(os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    port = free_port()
    # Ray's CLI through this Python: works where the `ray` script is not on the PATH
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
           "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", "--include-dashboard=true", "--disable-usage-stats",
           # the job agent's fixed default port (52365) belongs to whichever Ray took it first
           f"--dashboard-agent-listen-port={free_port()}"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    # Jobs run `python -m mx.cli.main`; put this Python first on the head's PATH so they find mx
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           # no Serve replicas to drain: stop at once when asked
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    out = open(os.path.join(folder(), "head.out"), "ab")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                            start_new_session=True)
    head = {"pid": proc.pid, "address": f"{_host_ip()}:{port}",
            "dashboard": f"http://127.0.0.1:{dashboard_port}", "token": token,
            "started": record.now(), "log": out.name}
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers(head["dashboard"]):
        if proc.poll() is not None or time.monotonic() > deadline:
            _terminate(proc.pid, 10.0)
            raise UserError(f"the Ray head did not start (see {out.name})")
        time.sleep(0.5)
    with open(_state_file() + ".tmp", "w") as f:
        json.dump(head, f, indent=1)
    os.replace(_state_file() + ".tmp", _state_file())
    log(f"cluster up: Ray head pid {proc.pid}, GCS {head['address']}, dashboard {head['dashboard']}")
    return head


def down(timeout: float = 30.0) -> dict:
    """Stop the head (every process it started); returns what was stopped."""
    head = info()
    if head is None:
        raise UserError(f"no cluster is up (MX_HOME={record.home()}); `mx cluster up` starts one")
    _terminate(head["pid"], timeout)
    os.remove(_state_file())
    return head


def auth_env(address: str | None) -> dict[str, str]:
    """The environment that lets a client authenticate to ``address`` when it names this
    head (by its dashboard URL or GCS address); empty for other clusters, whose tokens are
    their operators' business, and when the caller already gave a token."""
    head = info()
    if head is None or not address or os.environ.get("RAY_AUTH_TOKEN") or \
            os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return {}
    port = lambda a: a.rstrip("/").rsplit(":", 1)[-1]  # noqa: E731
    ours = {port(head["dashboard"]): True, port(head["address"]): True}
    if port(address) not in ours:
        return {}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": head["token"]}


def use_auth(address: str | None) -> None:
    """Set this process's token environment for ``address``, and make Ray read it again
    (Ray reads its authentication mode into its config once, when it is imported)."""
    env = auth_env(address)
    if not env or all(os.environ.get(k) == v for k, v in env.items()):
        return
    os.environ.update(env)
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM the head's process group (Ray shuts down gracefully), SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _group_alive(pid):
                return
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/api/version", timeout=2) as reply:
            return reply.status == 200
    except urllib.error.HTTPError:
        return True  # it answered, if only to ask for the token
    except (urllib.error.URLError, OSError):
        return False


def free_port() -> int:
    """A TCP port no one listens on now (for Ray's ports, and tests' servers)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _host_ip() -> str:
    import ray.util

    return ray.util.get_node_ip_address()
