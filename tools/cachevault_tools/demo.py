"""``make demo``: the whole product on the embedded default, with progress and a summary.

It runs the way a user would: the embedded AWS as a background service (``local up``
on a free loopback port, its own state dir), real redis-server caches, the real state
machines and handlers. Everything it started is stopped at the end unless ``--keep``.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import time
from collections.abc import Callable
from typing import Any, TypeVar

from cachevault.catalog import caches
from cachevault.core import stack as stack_info
from cachevault.core.settings import Settings
from cachevault.restore.verify import cache_digest, combined_digest

from cachevault_tools import datagen
from cachevault_tools.cli import context, shapes
from cachevault_tools.cli.cache_cmd import _describe_text
from cachevault_tools.cli.output import human_bytes, table
from cachevault_tools.cli.restore_cmd import restore_summary
from cachevault_tools.cli.snapshot_cmd import wait_with_progress
from cachevault_tools.local.redis_process import free_port, process_alive

T = TypeVar("T")
SUMMARY_WIDTH = 80  # the summary fits a standard terminal
SOURCE, RESTORED = "demo-orders", "demo-orders-sharded"
MANUAL, FINAL = "demo-orders-manual", "demo-orders-final"


class Story:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.steps: list[dict[str, Any]] = []

    def step(
        self,
        title: str,
        action: Callable[[], T],
        detail: Callable[[T], str] | None = None,
        result: Callable[[T], str] | None = None,
    ) -> T:
        """Run one step; ``detail`` is printed now, ``result`` (one short phrase) goes to the summary."""
        self.say(f"\n== {title}")
        started = time.monotonic()
        value = action()
        seconds = time.monotonic() - started
        note = detail(value) if detail else ""
        first = note.strip().splitlines()[0].strip() if note.strip() else "ok"
        self.steps.append(
            {"Step": title.split(" (")[0], "Seconds": round(seconds, 2), "Result": result(value) if result else first}
        )
        if note:
            self.say(note)
        self.say(f"   ({seconds:.1f} s)")
        return value

    def say(self, text: str) -> None:
        if not self.as_json:
            print(text, flush=True)


def run_demo(*, size_mb: int, keep: bool, as_json: bool) -> int:
    base = Settings.from_env().state_dir
    os.environ["CACHEVAULT_HOME"] = str(base / "demo")
    running = stack_info.load_local()
    if running is None or not process_alive(running.pid):
        # Each demo starts afresh: `local down` keeps cache data for the next `local up`, so what
        # a previous demo left (its restored cache, snapshots) goes first; the demo dir is its own.
        context.local_down()  # nodes a killed demo server left behind stop too
        shutil.rmtree(base / "demo", ignore_errors=True)
    context.quiet_libraries()
    story = Story(as_json)
    try:
        story.step(
            "start the embedded AWS and deploy template.yaml",
            lambda: context.local_up(free_port()),
            lambda i: f"   embedded AWS on {i.endpoint_url}",
            lambda i: f"on {i.endpoint_url}",
        )
        control = context.control_plane()
        source = story.step(
            "create a cache: cluster mode disabled, 1 primary + 2 replicas",
            lambda: caches.create_local_cache(SOURCE, replicas=2, settings=control.settings),
            lambda c: _describe_text(caches.describe_cache(c["CacheName"], control.settings)),
            lambda c: f"{c['CacheName']}: {c['Engine']} {c['EngineVersion']}, {c['CacheNodeType']}",
        )
        host, port = caches.parse_endpoint(source["Endpoints"][0])
        stats = story.step(
            f"write {size_mb} MB of mixed data (strings with TTLs, hashes, lists, sets, zsets, streams, functions)",
            lambda: datagen.generate(host, port, size_mb, seed=42),
            lambda s: f"   {s.keys:,} keys, {human_bytes(s.payload_bytes)}, by type: {_counts(s.by_type)}",
            lambda s: f"{s.keys:,} keys, {human_bytes(s.payload_bytes)}",
        )
        source_digest = cache_digest([(host, port)])[0]

        def snapshot() -> dict[str, Any]:
            # The demo waits for the execution itself, however long its preflight is queued.
            return wait_with_progress(control, control.create_snapshot(SOURCE, MANUAL, accept_timeout_s=None))

        record = story.step(
            "snapshot it (taken from a replica, streamed to S3)",
            snapshot,
            _snapshot_text,
            lambda r: f"{r['SnapshotName']}: {r['SnapshotStatus']}, {human_bytes(shapes.snapshot_bytes(r))}",
        )
        story.step(
            "list snapshots",
            lambda: control.list_snapshots(cache=SOURCE)["Snapshots"],
            lambda rows: (
                f"   {len(rows)} snapshot(s) of {SOURCE}\n"
                + table(
                    [{**r, "Size": human_bytes(shapes.snapshot_bytes(r))} for r in rows],
                    ["SnapshotName", "SnapshotStatus", "SnapshotSource", "Size", "SnapshotCreateTime"],
                )
            ),
            lambda rows: f"{len(rows)} snapshot(s) of {SOURCE}",
        )

        def restore() -> dict[str, Any]:
            arn, target = control.restore(
                RESTORED, snapshot=MANUAL, num_shards=3, replicas=1, cluster_mode="enabled", accept_timeout_s=None
            )
            return control.wait_restore(arn, target)

        restored = story.step(
            "restore into a NEW cache with 3 shards (cluster mode enabled)",
            restore,
            restore_summary,
            lambda r: f"{r['ReplicationGroupId']}: {r['Status']}, {r['NumNodeGroups']} shards",
        )

        def compare() -> dict[str, Any]:
            cache = caches.describe_cache(RESTORED, control.settings)
            primaries = [caches.parse_endpoint(g["Primary"]) for g in cache["NodeGroups"]]
            combined = combined_digest(cache_digest(primaries))
            return {"SourceDigest": source_digest, "RestoredDigest": combined, "Equal": combined == source_digest}

        digests = story.step(
            "verify: DEBUG DIGEST of the source vs the union of the 3 new shards",
            compare,
            lambda d: f"   equal: {d['Equal']}\n   source   {d['SourceDigest']}\n   restored {d['RestoredDigest']}",
            lambda d: "digests equal" if d["Equal"] else "digests DIFFER",
        )
        deleted = story.step(
            "delete the original cache with a final snapshot (taken from the primary)",
            lambda: control.delete_cache(SOURCE, final_snapshot=FINAL),
            lambda r: (
                f"   final snapshot {r['FinalSnapshot']['SnapshotName']}: {r['FinalSnapshot']['SnapshotStatus']}, "
                f"{human_bytes(shapes.snapshot_bytes(r['FinalSnapshot']))}; cache {r['CacheName']} deleted"
            ),
            lambda r: f"final snapshot {r['FinalSnapshot']['SnapshotName']}; {r['CacheName']} deleted",
        )
        summary = {
            "Steps": story.steps,
            "Dataset": stats.to_dict(),
            "Snapshot": {"SnapshotName": record["SnapshotName"], "CacheSize": record.get("CacheSize")},
            "Restore": {
                "ReplicationGroupId": restored["ReplicationGroupId"],
                "NumNodeGroups": restored["NumNodeGroups"],
            },
            "DigestsEqual": digests["Equal"],
            "FinalSnapshot": deleted["FinalSnapshot"]["SnapshotName"],
        }
        if as_json:
            print(json.dumps(summary, indent=2, default=str))
        else:
            print("\n== summary")
            print(summary_text(story.steps))
            print(f"\nsource and restored data identical (DEBUG DIGEST): {digests['Equal']}")
        return 0 if digests["Equal"] else 1
    finally:
        if keep:
            story.say(
                f"\nkept running; state in {os.environ['CACHEVAULT_HOME']} — stop with: "
                f"CACHEVAULT_HOME={os.environ['CACHEVAULT_HOME']} cachevault local down"
            )
        else:
            stopped = context.local_down()
            story.say(f"\nstopped: {', '.join(stopped) or 'nothing'}")


def _snapshot_text(record: dict[str, Any]) -> str:
    lines = [
        f"   {record['SnapshotName']}: {record['SnapshotStatus']}, {human_bytes(int(record.get('CacheSize') or 0))}"
    ]
    for node in record.get("NodeSnapshots", []):
        lines.append(
            f"   shard {node['NodeGroupId']} from {node.get('CacheNodeId')} ({node.get('SourceRole')}) -> "
            f"s3://…/{node.get('S3Key')}  sha256 {str(node.get('Sha256'))[:16]}…"
        )
    return "\n".join(lines)


def _counts(by_type: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n:,}" for kind, n in sorted(by_type.items(), key=lambda kv: -kv[1]))


def summary_text(steps: list[dict[str, Any]], width: int = SUMMARY_WIDTH) -> str:
    """One block per step, wrapped at word boundaries to ``width`` columns (nothing cut)."""
    lines = []
    for number, step in enumerate(steps, start=1):
        seconds = f"{step['Seconds']:.1f} s"
        head = textwrap.wrap(
            f"{number}. {step['Step']}", width=width - len(seconds) - 2, subsequent_indent="   ", break_long_words=False
        )
        lines.append(head[0].ljust(width - len(seconds)) + seconds)
        lines.extend(head[1:])
        lines.extend(
            textwrap.wrap(str(step["Result"]), width=width, initial_indent="   ", subsequent_indent="   ",
                          break_long_words=False, break_on_hyphens=False)
        )  # fmt: skip
    return "\n".join(lines)
