"""The CLI's surface without a server: help on every option, AWS CLI shapes, units, progress text."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cachevault_tools.cli import build_parser, shapes
from cachevault_tools.cli.progress import (
    Part,
    ProgressView,
    capture_parts,
    describe_part,
    expected_capture_sizes,
    operation_parts,
)
from cachevault_tools.cli.units import iec_bytes
from cachevault_tools.demo import summary_text


def _options_without_help(parser: argparse.ArgumentParser, path: list[str]) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _options_without_help(sub, [*path, name])
        elif not action.help and not isinstance(action, argparse._HelpAction):
            missing.append(f"{' '.join(path)} {action.option_strings or action.dest}")
    return missing


def test_every_option_has_help_text() -> None:
    assert _options_without_help(build_parser(), ["cachevault"]) == []


def test_restore_help_shows_each_usage_on_its_own_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cachevault_tools.cli", "restore", "--help"], capture_output=True, text=True, check=True
    ).stdout
    lines = [line.strip() for line in out.splitlines()]
    assert "cachevault restore SNAPSHOT NEW_CACHE [options]" in lines
    assert "cachevault restore --from-s3 s3://bucket/key.rdb NEW_CACHE [options]" in lines


def test_iec_units() -> None:
    assert iec_bytes(512) == "512 B"
    assert iec_bytes(163.6 * 1024 * 1024) == "163.6 MiB"
    assert iec_bytes(3 << 30) == "3.0 GiB"


SNAPSHOT = {
    "SnapshotName": "nightly",
    "ReplicationGroupId": "orders",
    "SnapshotStatus": "available",
    "SnapshotSource": "manual",
    "CacheNodeType": "cache.r7g.large",
    "Engine": "redis",
    "EngineVersion": "7.0.15",
    "ClusterMode": True,
    "NumNodeGroups": 2,
    "CacheSize": "3000",
    "SnapshotCreateTime": "2026-11-25T00:00:00Z",
    "NodeSnapshots": [
        {
            "NodeGroupId": "0001",
            "CacheNodeId": "orders-0001-002",
            "NodeGroupConfiguration": {"NodeGroupId": "0001", "Slots": "0-8191"},
            "Size": 1000,
            "CacheSize": "1000",
            "CaptureSeconds": 0.5,
            "CaptureStatus": "done",
            "S3Key": "snapshots/nightly/nightly-0001.rdb",
        },
        {
            "NodeGroupId": "0002",
            "CacheNodeId": "orders-0002-002",
            "NodeGroupConfiguration": {"NodeGroupId": "0002", "Slots": "8192-16383"},
            "Size": 2048,
            "CacheSize": "2048",
            "CaptureStatus": "done",
        },
    ],
}


class _Stack:
    state_machines = {"X": "arn:aws:states:eu-west-1:123456789012:stateMachine:x"}


def test_snapshot_shape_reads_like_describe_snapshots() -> None:
    cache = {"SnapshotRetentionLimit": 7, "SnapshotWindow": "05:00-06:00", "ReplicasPerNodeGroup": 1}
    shaped = shapes.snapshot(SNAPSHOT, shapes.ArnBuilder(_Stack()), cache)
    assert shaped["ARN"] == "arn:aws:elasticache:eu-west-1:123456789012:snapshot:nightly"
    assert shaped["ClusterMode"] == "enabled"
    assert shaped["SnapshotRetentionLimit"] == 7 and shaped["SnapshotWindow"] == "05:00-06:00"
    assert shaped["NumNodeGroups"] == 2
    node = shaped["NodeSnapshots"][1]
    assert node["NodeGroupConfiguration"] == {"NodeGroupId": "0002", "Slots": "8192-16383", "ReplicaCount": 1}
    assert node["CacheSize"] == "2.0 KiB"
    assert node["CacheVault"]["SizeBytes"] == 2048
    assert shaped["CacheVault"]["SizeBytes"] == 3000
    json.dumps(shaped)  # plain JSON, no Decimal or objects


def test_replication_group_shape_has_endpoints() -> None:
    record = {
        "CacheName": "orders",
        "Status": "available",
        "ClusterMode": False,
        "Nodes": [
            {"CacheNodeId": "a", "Address": "127.0.0.2:6379", "NodeGroupId": "0001", "Role": "primary"},
            {"CacheNodeId": "b", "Address": "127.0.0.3:6379", "NodeGroupId": "0001", "Role": "replica"},
        ],
    }
    listed = shapes.replication_group(record, shapes.ArnBuilder(_Stack()))
    assert listed["ReplicationGroupId"] == "orders"
    assert listed["NodeGroups"][0]["PrimaryEndpoint"] == {"Address": "127.0.0.2", "Port": 6379}
    assert listed["ClusterMode"] == "disabled" and listed["ClusterEnabled"] is False
    live = dict(record, NodeGroups=[{"NodeGroupId": "0001", "Primary": "127.0.0.2:6379", "Replicas": []}])
    described = shapes.replication_group(live, shapes.ArnBuilder(_Stack()))
    assert described["NodeGroups"][0]["PrimaryEndpoint"]["Port"] == 6379


def test_a_finished_capture_reads_its_size_and_rate() -> None:
    parts = capture_parts(SNAPSHOT)
    assert [(p.done, p.total, p.status) for p in parts] == [(1000, 1000, "done"), (2048, 2048, "done")]
    assert describe_part(parts[0]).startswith("capture shard 0001: done 100% 1000 B of 1000 B, 2.0 KiB/s")


def test_restore_parts_in_order_with_keys() -> None:
    parts = operation_parts(
        {
            "load-0001": {"Phase": "load", "Done": 500, "Total": 1000, "Unit": "keys", "Status": "running"},
            "download-0001": {"Phase": "download", "Done": 10, "Total": 10, "Unit": "bytes", "Status": "done"},
        }
    )
    assert [p.key for p in parts] == ["download-0001", "load-0001"]
    assert describe_part(parts[1]).startswith("load shard 0001:  50% 500 of 1,000 keys")


def test_plain_progress_prints_lines_not_bars() -> None:
    out = io.StringIO()
    view = ProgressView("orders-copy", stream=out, rich=False)
    view.show("creating", [Part("load-0001", "load shard 0001", 10, 100, unit="keys")])
    view.show("creating", [Part("load-0001", "load shard 0001", 100, 100, unit="keys", status="done")])
    view.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "orders-copy: creating"
    assert lines[1].startswith("load shard 0001:  10% 10 of 100 keys")
    assert lines[2].startswith("load shard 0001: done 100% 100 of 100 keys")
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_rich_progress_draws_a_bar_with_percent() -> None:
    out = io.StringIO()
    view = ProgressView("nightly", stream=out, rich=True)
    view.show("creating", [Part("c", "capture shard 0001", 50 << 20, 100 << 20)])
    view.close()
    text = out.getvalue()
    assert "capture shard 0001" in text and "50%" in text and "50.0 MiB / 100.0 MiB" in text


def test_demo_summary_fits_80_columns_and_keeps_words_whole() -> None:
    long_result = "demo-orders-sharded: available, 3 shards, cache.r7g.large " * 3
    steps = [
        {"Step": "write 32 MB of mixed data (strings with TTLs, hashes, lists, sets, zsets, streams)", "Seconds": 9.87,
         "Result": long_result},
    ]  # fmt: skip
    text = summary_text(steps)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert " ".join(text.split()).count("cache.r7g.large") == 3
    assert "{" not in text


def test_a_missing_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from cachevault_tools.cli import extras

    monkeypatch.setitem(extras.EXTRAS, "local", ("moto", "cachevault_no_such_module"))
    with pytest.raises(extras.MissingExtra) as err:
        extras.require("local", "the embedded AWS")
    assert "cachevault_no_such_module" in err.value.message
    assert "pip install 'cachevault[local]'" in err.value.message
    extras.require("bench", "the plot")  # installed by make venv: no error


def test_runtime_dependencies_are_the_lambda_layers() -> None:
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    layer = [
        line.split("==")[0]
        for line in (root / "layers/dependencies/requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert sorted(project["dependencies"]) == sorted(layer)
    assert {"local", "bench", "dev"} <= project["optional-dependencies"].keys()
    assert not any("yaml" in d or "localstack" in d for d in project["dependencies"])


def test_bench_plot_renders_the_recorded_run() -> None:
    from pathlib import Path

    from cachevault_tools.bench.report import plot_png

    root = Path(__file__).resolve().parents[2]
    recorded = json.loads((root / "bench/results/all-2026-11-24T231736Z.json").read_text())
    png = plot_png(recorded["rows"])
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


def test_an_unreachable_endpoint_says_how_to_start_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cachevault.core import aws
    from cachevault_tools.cli import main
    from cachevault_tools.local.redis_process import free_port

    monkeypatch.setenv("CACHEVAULT_HOME", str(tmp_path))  # no local stack here
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    for name, value in {
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(aws, "_RETRIES", aws.Config(retries={"max_attempts": 1}, connect_timeout=2))
    assert main(["snapshot", "list"]) == 254
    err = capsys.readouterr().err
    assert "(EndpointConnectionError)" in err and "cachevault local up" in err


def test_a_running_capture_is_measured_against_the_previous_snapshot() -> None:
    class _Catalog:
        def all_snapshots(self, *, cache: str) -> list[dict[str, object]]:
            assert cache == "orders"
            return [
                {**SNAPSHOT, "SnapshotName": "older", "SnapshotCreateTime": "2026-11-20T00:00:00Z"},
                {**SNAPSHOT, "SnapshotName": "failed-one", "SnapshotStatus": "failed", "NodeSnapshots": []},
            ]

    running = {
        "SnapshotName": "nightly-2",
        "ReplicationGroupId": "orders",
        "SnapshotStatus": "creating",
        "NodeSnapshots": [
            {"NodeGroupId": "0001", "CaptureStatus": "running", "BytesCaptured": 250},
            {"NodeGroupId": "0002", "CaptureStatus": "running", "BytesCaptured": 4096},  # past its estimate
        ],
    }
    expected = expected_capture_sizes(_Catalog(), running)
    assert expected == {"0001": 1000, "0002": 2048}
    first, second = capture_parts(running, expected)
    assert (first.done, first.total) == (250, 1000)
    assert describe_part(first).startswith("capture shard 0001:  25% 250 B of 1000 B")
    assert second.total is not None and second.done < second.total  # never past 100 % while running
    assert capture_parts(running)[0].total is None  # no estimate: bytes and rate only


def test_a_finished_parts_rate_stays_what_it_was_at_the_end() -> None:
    from cachevault_tools.cli import progress

    seen = progress._Observed(0)
    seen.t0 -= 10  # observed from 10 s ago
    done = Part("d", "download shard 0001", 100 << 20, 100 << 20, status="done")
    first = seen.rate(done)
    seen.t0 -= 100  # much later: the rate must not decay
    assert first is not None and seen.rate(done) == first
