"""The suite runs as on CI whatever the user's shell points at (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cachevault.core.settings import Settings

REPO = Path(__file__).resolve().parents[2]
USERS_HOME = "/nonexistent/users-cachevault-home"


def test_what_the_users_shell_set_is_gone() -> None:
    """Run by the test below in a shell set as a user's; passes trivially in a clean one."""
    assert not [n for n in os.environ if n.startswith("AWS_") and n not in ("AWS_CONFIG_FILE",
                                                                            "AWS_SHARED_CREDENTIALS_FILE")]  # fmt: skip
    assert os.environ["AWS_CONFIG_FILE"] == os.environ["AWS_SHARED_CREDENTIALS_FILE"] == os.devnull
    assert "SNAPSHOT_BUCKET" not in os.environ and "CACHEVAULT_PARAMETER_OVERRIDES" not in os.environ
    assert str(Settings.from_env().state_dir) != USERS_HOME


def test_a_shell_pointed_at_a_local_stack_does_not_steer_the_suite(tmp_path: Path) -> None:
    # What `eval "$(cachevault local env)"` exports, for a stack that is down (nothing listens on
    # port 9), and an AWS config whose default profile names that endpoint too.
    config = tmp_path / "config"
    config.write_text("[default]\nendpoint_url = http://127.0.0.1:9\nregion = eu-west-3\n")
    shell = {
        **os.environ,
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "AKIAUSERSOWNSTACK000",
        "AWS_SECRET_ACCESS_KEY": "not-the-suites",
        "AWS_DEFAULT_REGION": "eu-west-3",
        "AWS_CONFIG_FILE": str(config),
        "SNAPSHOT_BUCKET": "users-own-bucket",
        "CACHEVAULT_HOME": USERS_HOME,
        "CACHEVAULT_PARAMETER_OVERRIDES": "ExportBucketAllowList=my-exports",
    }
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/unit/test_storage.py::test_exact_multiple_of_part_size",
         "tests/unit/test_suite_environment.py::test_what_the_users_shell_set_is_gone"],
        cwd=REPO, env=shell, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "2 passed" in run.stdout
