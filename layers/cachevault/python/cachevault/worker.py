"""Entry point of the ECS worker task: ``python -m cachevault.worker capture|load|seed``.

The capture worker task definition (template.yaml) runs this with the same layer code the
Lambdas use. The state machine's RunTask passes the job's input in the environment:

* ``capture``: ``SNAPSHOT_NAME``, ``CAPTURE_SHARD`` (the shard's JSON from SelectSources).
  Progress goes to the capture progress table exactly as an inline capture writes it.
* ``load``: ``LOAD_EVENT``, the LoadShards Map item (JSON) of a source too big for the
  LoadShard Lambda; the result goes to the restore's S3 result object, which the state
  machine's LoadResult step hands on (``restore_workflow.load_job``/``load_result_step``).
* ``seed``: the node task's seed container: ``SEED_SOURCE`` (the shard's RDB in S3) served to
  the node as its first master's full resync (restore.seed), or ``SEED_CUT`` (a cluster node's
  slots of the sources) written into the FIFO the node loads (restore.seed_cluster), or
  ``SEED_RELAY``: what the restore's cutter sends, relayed into that FIFO (restore.seed_relay);
  none of them, nothing to serve.

The table/bucket names come from the task definition; the exit code tells ECS how it ended.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from cachevault.restore import seed as seeding
from cachevault.restore import seed_cluster, seed_relay

# Each job imports what it uses: a seed starts beside a node that waits for it, and should not
# first load the capture and load code.


def capture() -> int:
    from cachevault.catalog.records import Catalog
    from cachevault.core.aws import client
    from cachevault.core.handler import logger
    from cachevault.core.settings import Settings
    from cachevault.nodes import credentials as creds_mod
    from cachevault.snapshot import capture_runner

    snapshot = os.environ["SNAPSHOT_NAME"]
    shard = json.loads(os.environ["CAPTURE_SHARD"])
    settings = Settings.from_env()
    catalog = Catalog(settings)
    cache = shard.get("ReplicationGroupId") or catalog.get_snapshot(snapshot)["ReplicationGroupId"]
    task = os.environ.get("ECS_TASK_ARN")
    logger.info("capture worker started", snapshot=snapshot, shard=shard["ShardIndex"], task=task)
    try:
        capture_runner.run(
            snapshot,
            shard,
            catalog,
            client("s3"),
            settings.bucket,
            raise_errors=True,
            credentials=creds_mod.for_cache_name(cache, catalog),
            cancelled=capture_runner.snapshot_failed(catalog, snapshot),
        )
    except Exception:  # recorded in the progress table by run(); the exit code tells ECS
        return 1
    return 0


def load() -> int:
    from cachevault.core.handler import logger
    from cachevault.restore import steps as restore_workflow

    event = json.loads(os.environ["LOAD_EVENT"])
    logger.info("load worker started", target=event.get("ReplicationGroupId"), source=event["Task"]["Index"])
    try:
        restore_workflow.load_job(event)
    except Exception:  # the task's exit code fails runTask.sync, which MarkFailed catches
        logger.exception("load failed", target=event.get("ReplicationGroupId"), source=event["Task"]["Index"])
        return 1
    return 0


def seed() -> int:
    if os.environ.get(seed_relay.SEED_RELAY_ENV):
        return _seed_job(_relay_node)
    if os.environ.get(seed_cluster.SEED_CUT_ENV):
        return _seed_job(_cut_node)
    if not os.environ.get(seeding.SEED_SOURCE_ENV):
        print("nothing to seed: the node starts empty", flush=True)
        return 0
    return _seed_job(_serve_node)


def _seed_job(work: Callable[[Any], dict[str, Any]]) -> int:
    """A seed's frame: its progress part (restore.seed ``progress_part``) under the restore's
    execution, ``work(report)`` filling it, and why it failed, in the part and the exit code."""
    # PID 1 of its container on Fargate: without a handler SIGTERM (StopTask) would be ignored.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    from cachevault.catalog.progress_report import RESTORE, PartProgress
    from cachevault.catalog.records import Catalog
    from cachevault.core.handler import logger
    from cachevault.core.settings import Settings

    target, node = os.environ.get(seeding.SEED_TARGET_ENV, ""), os.environ.get(seeding.SEED_NODE_ENV, "")
    report = None
    try:
        report = PartProgress(Catalog(Settings.from_env()), RESTORE, target, seeding.progress_part(node),
                              phase="load", total=None)  # fmt: skip
        report.fields["Execution"] = os.environ.get(seeding.SEED_EXECUTION_ENV, "")
        done = work(report)
    except Exception as exc:  # the restore reads why from the progress part (or the exit code)
        logger.exception("seeding failed", target=target, node=node)
        if report is not None:
            report.fail(f"{type(exc).__name__}: {exc}")
        return 1
    logger.info("seeded", target=target, node=node, **done)
    return 0


def _serve_node(report: Any) -> dict[str, Any]:
    """A standalone node's seed: the shard's RDB served as its first master's full resync (restore.seed)."""
    report.fields["Phase"] = "download"
    source = seeding.parse_source(os.environ[seeding.SEED_SOURCE_ENV])
    with seeding.listen() as server:
        report.fields.update(Total=int(source["Size"]), Port=server.getsockname()[1])
        report.start(strict=True)  # LoadShard reads the port here: unwritten, nobody would come
        with seeding.accept_node(server) as conn:
            sent = seeding.serve(conn, source, on_bytes=report.update)
    report.finish(sent)
    return {"key": source["Key"], "bytes": sent}


def _cut_node(report: Any) -> dict[str, Any]:
    """A cluster node's seed: its slots of the sources, through a FIFO (restore.seed_cluster)."""
    from cachevault.core.aws import client

    plan = seed_cluster.parse_plan(os.environ[seed_cluster.SEED_CUT_ENV])
    auth = json.loads(os.environ.get(seed_cluster.SEED_AUTH_ENV) or "{}")
    report.fields["Total"] = sum(int(s["Size"]) for s in plan["Sources"])
    report.start(strict=True)
    os.chdir(os.environ.get(seed_cluster.SEED_DIR_ENV) or seed_cluster.SEED_DIR)
    openers = seed_cluster.source_openers(client("s3"), plan["Sources"], report.update)
    stats = seed_cluster.load(plan, auth, openers)
    report.fields.update(seed_cluster.cut_fields(plan["Sources"], stats))
    report.finish(report.fields["Total"])
    return {"keys": stats.keys, "bytes": stats.bytes_written}


def _relay_node(report: Any) -> dict[str, Any]:
    """A cluster node's seed fed by the restore's cutter (restore.seed_relay)."""
    token = seed_relay.parse_relay(os.environ[seed_relay.SEED_RELAY_ENV])
    auth = json.loads(os.environ.get(seed_cluster.SEED_AUTH_ENV) or "{}")
    os.chdir(os.environ.get(seed_cluster.SEED_DIR_ENV) or seed_cluster.SEED_DIR)

    def listening(port: int) -> None:
        report.fields["Port"] = port
        report.start(strict=True)  # the cutter connects once it reads the port here

    relayed = seed_relay.relay(token, auth, on_listening=listening, on_bytes=report.update)
    report.finish(relayed)
    return {"bytes": relayed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cachevault.worker", description=__doc__)
    parser.add_argument("job", choices=["capture", "load", "seed"])
    args = parser.parse_args(argv)
    if args.job == "capture":
        return capture()
    if args.job == "load":
        return load()
    if args.job == "seed":
        return seed()
    return 2


if __name__ == "__main__":
    sys.exit(main())
