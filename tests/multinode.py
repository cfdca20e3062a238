"""A real multi-node Ray cluster on one machine, with no shared filesystem between nodes.

The head starts with ``--num-cpus=0`` (it runs drivers only, as Ray recommends for real
clusters). Each worker node starts with ``ray start --address ...`` inside its own Linux mount
namespace (``unshare --mount --propagation private``) with a private tmpfs over the run path,
and its own ``HOME``, ``SELMA_CACHE``, ``--temp-dir`` and custom resources (``{"node_a": 1}``),
so a file one node writes there is invisible to the others, as on a cloud cluster, and tests
can pin work to a node. Every node runs ``ray start --block`` in its own process group; stop
and ``kill_node`` end them by process id, never with ``ray stop`` (which would stop every Ray
cluster on the machine). Needs root (CI runs as root). Reusable by benches:
``sys.path.insert(0, "tests"); from multinode import MultiNodeCluster``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
HEAD_PORTS = (
    "port",
    "dashboard-port",
    "node-manager-port",
    "object-manager-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(**extra: str) -> dict[str, str]:
    """This environment with the virtualenv first on PATH, token auth on, and no RAY_ADDRESS
    pointing our commands at another cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {
        **env,
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        **extra,
    }


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp_dir: Path
    home: Path | None = None
    resources: dict[str, float] = field(default_factory=dict)
    node_id: str | None = None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class MultiNodeCluster:
    """``workers``: name -> logical CPUs of that worker node; each also gets the custom
    resource ``{name: 1}`` plus ``extra_resources[name]``. ``private``: the path each worker
    mounts a private tmpfs over (created if missing)."""

    def __init__(
        self,
        workers: dict[str, float],
        private: str | Path,
        extra_resources: dict[str, dict[str, float]] | None = None,
        env: dict[str, str] | None = None,
        cache: str | Path | None = None,
    ):
        self.workers = workers
        self.private = Path(private)
        self.extra = extra_resources or {}
        self.env = env or {}
        self.cache = Path(cache) if cache else None
        # Short: Ray's unix sockets live under the temp dirs (108-byte path limit).
        self.root = Path(tempfile.mkdtemp(prefix="selma-mn-", dir="/tmp"))
        self.ports = {name: free_port() for name in HEAD_PORTS}
        self.gcs = f"127.0.0.1:{self.ports['port']}"
        self.dashboard = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.nodes: dict[str, Node] = {}

    # ---- start --------------------------------------------------------------------------
    def __enter__(self) -> MultiNodeCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, timeout: float = 240) -> None:
        self.private.mkdir(parents=True, exist_ok=True)
        head_tmp = self.root / "head"
        cmd = [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus=0",
            f"--temp-dir={head_tmp}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--include-dashboard=true",
            "--disable-usage-stats",
            *(f"--{name}={port}" for name, port in self.ports.items()),
        ]
        self.nodes["head"] = Node("head", self._popen(cmd, ray_env(**self.env)), head_tmp)
        self._wait_for(lambda: self._status_ok(), timeout, "the head's GCS")
        for name, cpus in self.workers.items():
            self._start_worker(name, cpus)
        self.wait_for_nodes(len(self.workers) + 1, timeout)
        self._wait_for(self._dashboard_ok, timeout, "the head's dashboard (jobs API)")
        self._record_node_ids()

    def add_node(
        self,
        name: str,
        cpus: float,
        resources: dict[str, float] | None = None,
        timeout: float = 240,
    ) -> None:
        """Start one more worker node, as an autoscaler brings one in for a lost node, and
        wait until Ray counts it alive."""
        if name in self.nodes:
            raise ValueError(f"node {name} already exists")
        self.extra[name] = resources or {}
        self._start_worker(name, cpus)

        def alive() -> bool:
            if not self.nodes[name].alive:
                raise RuntimeError(f"node {name} exited: {self.log(name)}")
            return any(n.get("resources_total", {}).get(name) for n in self.alive_nodes())

        self._wait_for(alive, timeout, f"node {name}")
        self._record_node_ids()

    def _start_worker(self, name: str, cpus: float) -> None:
        home = self.root / f"home-{name}"
        (home / ".ray").mkdir(parents=True)
        token = Path.home() / ".ray" / "auth_token"
        if token.is_file():  # token auth: a node with another HOME needs the head's token
            shutil.copy2(token, home / ".ray" / "auth_token")
        cache = self.root / f"cache-{name}"
        if self.cache and self.cache.is_dir():  # its own copy, so no build races between nodes
            shutil.copytree(self.cache, cache, symlinks=True)
        temp = self.root / name
        resources = {name: 1.0, **self.extra.get(name, {})}
        start = [
            str(BIN / "ray"),
            "start",
            f"--address={self.gcs}",
            "--block",
            f"--num-cpus={cpus}",
            f"--resources={json.dumps(resources)}",
            f"--temp-dir={temp}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
        ]
        script = f"mount -t tmpfs tmpfs {shlex.quote(str(self.private))} && exec " + " ".join(
            shlex.quote(a) for a in start
        )
        cmd = ["unshare", "--mount", "--propagation", "private", "bash", "-c", script]
        env = ray_env(HOME=str(home), SELMA_CACHE=str(cache), **self.env)
        node = Node(name, self._popen(cmd, env), temp, home, resources)
        self.nodes[name] = node

    def _popen(self, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.root / f"{len(self.nodes)}.log", "w")  # noqa: SIM115 (closed with the node)
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def _status_ok(self) -> bool:
        head = self.nodes["head"]
        if not head.alive:
            raise RuntimeError(f"the head exited: {self.log('head')}")
        out = subprocess.run(
            [str(BIN / "ray"), "status", f"--address={self.gcs}"],
            capture_output=True,
            text=True,
            env=ray_env(),
            timeout=60,
        )
        return out.returncode == 0

    def _dashboard_ok(self) -> bool:
        import requests

        try:
            return requests.get(f"{self.dashboard}/api/version", timeout=10).status_code < 500
        except requests.ConnectionError:
            return False

    def _wait_for(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            time.sleep(1)
        raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")

    def state(self, kind: str) -> list[dict[str, Any]]:
        """Ray's state API (``nodes``, ``actors``...) through the head's dashboard; dead
        actors and nodes are included (check ``state``)."""
        import requests

        resp = requests.get(
            f"{self.dashboard}/api/v0/{kind}",
            params={"limit": 10000, "detail": "true"},
            headers=self.auth_headers(),
            timeout=60,
        )
        resp.raise_for_status()
        return resp.json()["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.state("nodes") if n["state"] == "ALIVE"]

    def auth_headers(self) -> dict[str, str]:
        token = Path.home() / ".ray" / "auth_token"
        return {"Authorization": f"Bearer {token.read_text().strip()}"} if token.is_file() else {}

    def wait_for_nodes(self, count: int, timeout: float = 240) -> None:
        for name, node in self.nodes.items():
            if not node.alive:
                raise RuntimeError(f"node {name} exited: {self.log(name)}")

        def enough() -> bool:
            try:
                return len(self.alive_nodes()) >= count
            except Exception:
                return False

        self._wait_for(enough, timeout, f"{count} alive nodes")

    def _record_node_ids(self) -> None:
        for n in self.alive_nodes():
            res = n.get("resources_total", {})
            for name, node in self.nodes.items():
                if (name == "head" and n.get("is_head_node")) or res.get(name):
                    node.node_id = n["node_id"]

    def node_of(self, node_id: str) -> str | None:
        """Our name of the node with Ray id ``node_id``."""
        return next((n for n, node in self.nodes.items() if node.node_id == node_id), None)

    def log(self, name: str) -> str:
        index = list(self.nodes).index(name)
        path = self.root / f"{index}.log"
        return path.read_text()[-4000:] if path.is_file() else ""

    # ---- stop ---------------------------------------------------------------------------
    def kill_node(self, name: str) -> float:
        """Lose a worker node at once: SIGKILL to every process of its mount namespace (its
        raylet and everything it started); returns when (``time.monotonic()``)."""
        node = self.nodes[name]
        members = _namespace_members(node.proc.pid)
        when = time.monotonic()
        _killpg(node.proc, signal.SIGKILL)
        for pid in members:  # Ray's workers may sit in process groups of their own
            _kill(pid, signal.SIGKILL)
        node.proc.wait(timeout=30)
        return when

    def stop(self) -> None:
        """Workers first, each lost at once like ``kill_node`` (nothing on them needs a clean
        shutdown; their tmpfs goes with their namespace); then the head, given a moment to
        stop its own processes before SIGKILL ends any that are left."""
        for name, node in reversed(list(self.nodes.items())):
            if name != "head" and node.alive:
                self.kill_node(name)
        head = self.nodes.get("head")
        if head is not None:
            if head.alive:
                _killpg(head.proc, signal.SIGTERM)
                try:
                    head.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass
            _killpg(head.proc, signal.SIGKILL)
            try:
                head.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(
    workers: dict[str, float], private: Path, extra_resources: dict[str, dict[str, float]]
) -> MultiNodeCluster:
    """A cluster for the tests: the nodes get this process's AWS credentials (a local S3
    server's) and a copy of its model cache. Fails (never skips) without root."""
    if os.geteuid() != 0:
        raise RuntimeError("the multi-node tests need root for mount namespaces (CI runs as root)")
    from selma_ray.testing import TEST_CREDENTIALS

    cache = Path(os.environ.get("SELMA_CACHE", Path.home() / ".cache" / "selma_ray"))
    env = {k: os.environ[k] for k in TEST_CREDENTIALS}  # the nodes' AWS credential chain
    return MultiNodeCluster(workers, private, extra_resources, env=env, cache=cache)


def _namespace_members(pid: int) -> list[int]:
    """Every process in the mount namespace of worker node ``pid``: the node's whole process
    tree, whatever process groups Ray gave its workers. Empty for a process in this one's
    namespace (the head), so nothing outside a worker node is ever listed."""
    try:
        ns = os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return []
    if ns == os.readlink("/proc/self/ns/mnt"):
        return []
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                    members.append(int(entry))
            except OSError:  # exited meanwhile
                pass
    return members


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(os.getpgid(proc.pid), sig)
    except (ProcessLookupError, PermissionError):
        pass
