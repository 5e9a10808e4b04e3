"""Entry point of the ECS worker task: ``python -m cachevault.worker capture``.

The capture worker task definition (template.yaml) runs this with the same layer code the
Lambdas use. The state machine's RunTask passes what to capture in the environment
(``SNAPSHOT_NAME``, ``CAPTURE_SHARD`` = the shard's JSON from SelectSources); the
table/bucket names come from the task definition. Progress goes to the capture progress
table exactly as an inline capture writes it; the exit code tells ECS how it ended.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cachevault import capture_runner
from cachevault import credentials as creds_mod
from cachevault.aws import client
from cachevault.catalog import Catalog
from cachevault.handler import logger
from cachevault.settings import Settings


def capture() -> int:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cachevault.worker", description=__doc__)
    parser.add_argument("job", choices=["capture"])
    args = parser.parse_args(argv)
    if args.job == "capture":
        return capture()
    return 2


if __name__ == "__main__":
    sys.exit(main())
