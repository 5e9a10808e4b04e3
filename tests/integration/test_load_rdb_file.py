"""load_rdb_file (the fused RDB -> RESTORE path) and the restore bench, on real redis-server nodes."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import matplotlib.image
import pytest
from cachevault.core.errors import RestoreFailed
from cachevault.nodes.slots import parse_slot_ranges
from cachevault.restore.load import RestoreEntry, TargetShard, load_rdb_file
from cachevault.restore.verify import cache_digest, combined_digest
from cachevault_tools import datagen
from cachevault_tools.bench.report import rows_of, write_results
from cachevault_tools.bench.restore import run_restore_bench
from cachevault_tools.local.fleet import Fleet
from cachevault_tools.local.redis_process import RedisProcess, start_node


def _digest(node: RedisProcess) -> str:
    return cache_digest([node.endpoint])[0]


@pytest.fixture
def nodes() -> Iterator[list[RedisProcess]]:
    started: list[RedisProcess] = []
    yield started
    for node in reversed(started):
        node.stop()


def _source_rdb(tmp_path: Path, nodes: list[RedisProcess], *, multi_db: bool) -> tuple[Path, str]:
    src = start_node(tmp_path / "src")
    nodes.append(src)
    datagen.generate(src.host, src.port, 3, seed=5)  # every type, streams, TTLs, a function
    client = src.client()
    if multi_db:
        client.execute_command("SELECT", 3)
        client.set("db3:key", "in db 3")
        client.hset("db3:hash", mapping={"a": "1", "b": "2"})
    client.save()
    rdb = tmp_path / "src.rdb"
    (src.data_dir / "dump.rdb").rename(rdb)
    return rdb, _digest(src)


def test_standalone_multi_db_digest_functions_samples(tmp_path: Path, nodes: list[RedisProcess]) -> None:
    rdb, digest = _source_rdb(tmp_path, nodes, multi_db=True)
    target = start_node(tmp_path / "dst")
    nodes.append(target)
    samples: list[RestoreEntry] = []
    ticks: list[tuple[int, int]] = []
    result = load_rdb_file(
        rdb,
        [TargetShard(target.host, target.port)],
        cluster_mode=False,
        sample_every=50,
        on_sample=samples.append,
        progress=lambda seen, expired: ticks.append((seen, expired)),
        progress_every=100,
        batch_bytes=64 << 10,  # many batches, and values bigger than a batch go alone
        batch_keys=37,
    )
    assert _digest(target) == digest
    assert result.function_libraries_loaded == 1 and len(result.functions) == 1
    assert b"cvbench" in target.client().function_list()[0]  # flat [name, value, ...] reply
    assert result.keys_loaded == sum(v["keys"] for v in target.client().info("keyspace").values())
    assert result.targets[0].batches > 2
    assert ticks[-1][0] == result.keys_loaded + result.keys_expired_skipped
    # Every sample is exactly what the target now DUMPs (string/listpack types) or restores.
    assert len(samples) == -(-result.keys_loaded // 50)
    check = target.client()
    for s in samples:
        check.execute_command("SELECT", s.db)
        check.restore(b"probe", 0, bytes(s.payload), replace=True)  # CRC and format accepted
        assert check.type(b"probe") == check.type(s.key)
        check.delete(b"probe")


def test_cluster_mode_disabled_to_two_shards(tmp_path: Path, nodes: list[RedisProcess]) -> None:
    rdb, digest = _source_rdb(tmp_path, nodes, multi_db=False)
    fleet = Fleet(tmp_path / "fleet")
    try:
        layout = fleet.create_cache("dst", cluster_mode=True, num_shards=2, replicas_per_shard=0)
        targets = [TargetShard(s.primary.host, s.primary.port, parse_slot_ranges(s.slots or "")) for s in layout.shards]
        result = load_rdb_file(rdb, targets, cluster_mode=True, batch_bytes=32 << 10)
        assert combined_digest(cache_digest(targets)) == digest
        assert all(n > 0 for n in result.keys_per_target)
        assert result.function_libraries_loaded == 2  # the library on every primary
    finally:
        fleet.stop_all()


def test_error_reply_names_the_key(tmp_path: Path, nodes: list[RedisProcess]) -> None:
    rdb, _ = _source_rdb(tmp_path, nodes, multi_db=False)
    target = start_node(tmp_path / "full", config={"maxmemory": "2mb", "maxmemory-policy": "noeviction"})
    nodes.append(target)
    with pytest.raises(RestoreFailed, match=r"RESTORE failed on .* key '.+': OOM") as err:
        load_rdb_file(rdb, [TargetShard(target.host, target.port)], cluster_mode=False, restore_functions=False)
    assert err.value.details["FailedCount"] >= 1
    with pytest.raises(RestoreFailed, match="Cannot connect"):
        load_rdb_file(rdb, [TargetShard("127.0.0.1", 1)], cluster_mode=False)


def test_restore_bench_and_report(tmp_path: Path) -> None:
    result = run_restore_bench(2, tmp_path / "bench", variants=("standalone", "one-replica"))
    row, replicated = result["variants"]
    assert row["digest_equal"] is True and result["anchor_digest_equal"] is True
    assert row["anchor_s"] > 0 and row["restore_s"] > 0 and row["keys"] == result["dataset"]["keys"]
    # The replica followed the load (the product's order): equal digests once it caught up.
    assert replicated["variant"] == "one-replica" and replicated["digest_equal"] is True
    assert replicated["restore_s"] >= replicated["primary_loaded_s"] >= 0
    paths = write_results("restore", [result], tmp_path / "out")
    record = json.loads(paths["json"].read_text())
    assert record["rows"] == rows_of([result])
    assert "| restore | 2 | standalone |" in paths["md"].read_text()
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    pixels = matplotlib.image.imread(paths["png"])  # decodes: a real, complete PNG
    assert pixels.shape[:2] == (height, width) and width > 600
    assert pixels[..., :3].min() < 0.5  # not blank: axes, lines and labels were drawn


