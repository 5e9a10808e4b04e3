"""README.md is executable: every command of its ```bash blocks runs, in order, as written.

A user's session is mimicked: a working directory with the repository's files (so
``make demo``, ``events/...`` and ``template.yaml`` resolve as from a checkout), the venv's
``cachevault`` first on PATH, a fresh ``CACHEVAULT_HOME``, no AWS variables of ours. The
README's ``cachevault local up`` starts the embedded AWS (on a free port, through
``CACHEVAULT_LOCAL_PORT``); from then on the commands get the environment it tells users to
load (``eval "$(cachevault local env)"``), and placeholders such as ``<snapshot-bucket>``
take the values it printed. Inputs a reader is assumed to have (``dump.rdb``) are made
with a real redis-server. Every command that fails is reported, with its output.

The README run is marked ``readme`` (not in the default run: ``pytest -m readme``).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cachevault_tools.local.redis_process import free_port, start_node

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
COMMAND_TIMEOUT_S = 600
# Not run, with the reason: a command that would run this very test suite again.
NOT_RUN = {"make test": "runs the test suite, this test included"}
PLACEHOLDER = re.compile(r"<([a-z][a-z0-9-]*)>")


def bash_blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block: continuation lines joined, comment-only lines dropped."""
    blocks, current, inside = [], [], False
    for line in text.splitlines():
        stripped = line.strip()
        if not inside and stripped == "```bash":
            inside, current = True, []
        elif inside and stripped == "```":
            inside = False
            blocks.append(_commands(current))
        elif inside:
            current.append(line)
    return blocks


def _commands(lines: list[str]) -> list[str]:
    commands, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def _without_comment(command: str) -> str:
    return " ".join(command.split(" #")[0].split())


def test_bash_blocks_are_parsed_in_order() -> None:
    text = "x\n```bash\na --b \\\n  c   # note\n# only a comment\n\nd\n```\n```\nnot bash\n```\n```bash\ne\n```\n"
    assert bash_blocks(text) == [["a --b    c   # note", "d"], ["e"]]


@dataclass
class Session:
    cwd: Path
    env: dict[str, str]
    values: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        """``bash -c command`` in its own process group, all of which is stopped on a timeout."""
        proc = subprocess.Popen(
            ["bash", "-c", command],
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)  # lets a Python child clean up its own processes
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
            err += f"\n(timed out after {COMMAND_TIMEOUT_S} s)"
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def resolve(self, command: str) -> str:
        def value(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.values:
                raise KeyError(name)
            return shlex.quote(self.values[name])

        return PLACEHOLDER.sub(value, command)

    def after_local_up(self, output: str) -> None:
        """What `cachevault local up` printed: the bucket, the schedules, the environment to load."""
        for line in output.splitlines():
            if line.startswith("snapshot bucket: "):
                self.values["snapshot-bucket"] = line.split(": ", 1)[1].strip()
            elif line.startswith("schedules: "):
                names = [n.strip() for n in line.split(": ", 1)[1].split(",") if n.strip() != "(none)"]
                if names:
                    self.values["rule-name"] = names[0]
        loaded = self.run('eval "$(cachevault local env)" && env')
        assert loaded.returncode == 0, f"cachevault local env failed:\n{loaded.stderr}"
        for line in loaded.stdout.splitlines():
            key, _, val = line.partition("=")
            if key.startswith("AWS_") or key in ("SNAPSHOT_BUCKET", "CACHEVAULT_HOME"):
                self.env[key] = val


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    # The venv up to date here first: `make demo` in the linked checkout must find nothing to
    # install (an install from there would write the checkout's path into the venv's scripts).
    subprocess.run(["make", "venv"], cwd=ROOT, check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S)
    work = tmp_path / "checkout"
    work.mkdir()
    for entry in ROOT.iterdir():  # the repository as a user's checkout, .venv included
        if entry.name not in (".git", ".cachevault", ".pytest_cache", ".ruff_cache"):
            (work / entry.name).symlink_to(entry)
    _make_dump_rdb(tmp_path / "redis", work / "dump.rdb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and not k.startswith("CACHEVAULT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["CACHEVAULT_HOME"] = str(tmp_path / "home")
    env["CACHEVAULT_LOCAL_PORT"] = str(free_port())
    state = Session(cwd=work, env=env)
    try:
        yield state
    finally:
        state.run("cachevault local down")


def _make_dump_rdb(data_dir: Path, out: Path) -> None:
    """An RDB a user would have: a few keys saved by a real redis-server."""
    node = start_node(data_dir)
    try:
        conn = node.client()
        conn.mset({f"readme:{i}": f"value-{i}" for i in range(100)})
        conn.save()
        conn.close()
    finally:
        node.stop()
    out.write_bytes(next(data_dir.rglob("*.rdb")).read_bytes())


@pytest.mark.readme
def test_every_readme_command_works_as_written(session: Session) -> None:
    blocks = bash_blocks(README.read_text())
    assert blocks, "README.md has no ```bash block"
    ran = 0
    for block in blocks:
        for written in block:
            if _without_comment(written) in NOT_RUN:
                continue
            try:
                command = session.resolve(written)
            except KeyError as missing:
                session.failures.append(f"$ {written}\n  placeholder <{missing.args[0]}>: nothing printed names it")
                continue
            proc = session.run(command)
            ran += 1
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                session.failures.append(f"$ {written}\n  exit {proc.returncode}\n{tail}")
            elif _without_comment(written) == "cachevault local up":
                session.after_local_up(proc.stdout)
    assert ran > 0
    assert not session.failures, f"{len(session.failures)} README command(s) fail as written:\n\n" + "\n\n".join(
        session.failures
    )
