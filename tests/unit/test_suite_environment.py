"""The suite runs as on CI whatever the user's shell points at (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_shell_pointed_at_a_local_stack_does_not_steer_the_suite(tmp_path: Path) -> None:
    # What `eval "$(cachevault local env)"` exports, for a stack that is down (nothing listens on port 9).
    shell = {
        **os.environ,
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "AKIAUSERSOWNSTACK000",
        "AWS_SECRET_ACCESS_KEY": "not-the-suites",
        "AWS_DEFAULT_REGION": "eu-west-3",
        "SNAPSHOT_BUCKET": "users-own-bucket",
        "CACHEVAULT_HOME": str(tmp_path / "users-home"),
        "CACHEVAULT_PARAMETER_OVERRIDES": "ExportBucketAllowList=my-exports",
    }
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/unit/test_storage.py::test_exact_multiple_of_part_size"],
        cwd=REPO, env=shell, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "1 passed" in run.stdout
    assert not (tmp_path / "users-home").exists()  # nothing written into the user's state
