"""restore_targets.wait_cluster_ok: a cluster wired without waiting for it to settle (what
ProvisionCache does, restore_targets.wire with settle=False) takes writes once it returns."""

from __future__ import annotations

import contextlib
from pathlib import Path

from cachevault.nodes import restore_targets
from cachevault.nodes.credentials import NONE
from cachevault.nodes.slots import even_split, key_slot
from cachevault_tools.local.redis_process import RedisProcess, start_node


def test_wait_cluster_ok_returns_once_a_fresh_cluster_serves_every_slot(tmp_path: Path) -> None:
    nodes: list[RedisProcess] = []
    try:
        for i in range(3):
            nodes.append(start_node(tmp_path / f"n{i}", cluster_enabled=True, timeout=30))
        conns = [n.client(timeout=10) for n in nodes]
        ranges = even_split(len(nodes))
        for epoch, (conn, (start, end)) in enumerate(zip(conns, ranges, strict=True), start=1):
            conn.execute_command("CLUSTER", "ADDSLOTSRANGE", start, end)
            conn.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for node in nodes[1:]:
            conns[0].execute_command("CLUSTER", "MEET", node.host, node.port)

        restore_targets.wait_cluster_ok([(n.host, n.port) for n in nodes], NONE, timeout=60)

        for conn, (start, end) in zip(conns, ranges, strict=True):
            assert "cluster_state:ok" in str(conn.execute_command("CLUSTER", "INFO"))
            key = next(k for k in (b"k%d" % i for i in range(100_000)) if start <= key_slot(k) <= end)
            assert conn.set(key, b"v")  # the node takes a write to its own slots (no CLUSTERDOWN)
        for conn in conns:
            conn.close()
    finally:
        for node in nodes:
            with contextlib.suppress(Exception):
                node.stop()
