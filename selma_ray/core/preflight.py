"""Checks at job start that the run directory is the same place on every node.

On a cluster whose nodes share no disk, a local ``run.dir`` silently splits a run: each node
writes its part to its own disk and the driver on the head finds nothing. So when the cluster
has more than one node and ``run.dir`` is a local path, the driver writes a marker file there
and one task pinned to each node (``NodeAffinitySchedulingStrategy(soft=False)``) looks for
it; if any node cannot see it, the job stops before any work, naming the nodes.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from selma_ray.core.rundir import RunDir
from selma_ray.core.storage import StorageError

log = logging.getLogger(__name__)


def _sees(path: str, token: str) -> bool:
    try:
        with open(path) as f:
            return f.read() == token
    except OSError:
        return False


def node_label(node: dict[str, Any]) -> str:
    """A node as people know it: its address and its custom resources (``node_a``...)."""
    custom = sorted(
        k
        for k in node.get("Resources", {})
        if k not in ("CPU", "GPU", "memory", "object_store_memory")
        and not k.startswith(("node:", "accelerator_type:"))
    )
    where = node.get("NodeManagerAddress", "?")
    return f"{node['NodeID'][:8]} ({where}{', ' + ', '.join(custom) if custom else ''})"


def check_shared_run_dir(run: RunDir, timeout_s: float = 120.0) -> None:
    """Raise ``StorageError`` if some alive node cannot see the local run directory."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not run.local or not ray.is_initialized():
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    token = uuid.uuid4().hex
    marker = f".selma-preflight-{token[:12]}"
    run.write_text(token, marker)
    try:
        sees = ray.remote(num_cpus=0, max_retries=0)(_sees)
        refs = {
            node["NodeID"]: sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(run.path(marker)), token)
            for node in nodes
        }
        answers = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s), strict=True))
    finally:
        run.delete(marker)
    blind = [node_label(n) for n in nodes if not answers[n["NodeID"]]]
    if blind:
        raise StorageError(
            f"run.dir={run.uri} is a local path, and {len(blind)} of the cluster's "
            f"{len(nodes)} nodes cannot see it: {', '.join(blind)}. The nodes share no disk "
            "there, so each would write its own part of the run. Use object storage "
            "(run.dir=s3://bucket/prefix) or a path that every node mounts (EFS, NFS)."
        )
    log.info("preflight: all %d nodes see run.dir=%s", len(nodes), run.uri)
