"""README.md is executable: every command of its ```bash blocks runs, in order, as written.

A user's session is mimicked: a working directory with the repository's files (so
``events/...`` and ``template.yaml`` resolve as from a checkout), the venv's ``cachevault``
first on PATH, a fresh ``CACHEVAULT_HOME``, no AWS variables of ours. Each command runs in
bash with the exported environment the commands before it left (so ``eval "$(cachevault
local env)"`` in the README is what gives later commands the endpoint, its credentials and
``$SNAPSHOT_BUCKET``, as in a user's shell). Only ports change: the embedded AWS gets a free
one through ``CACHEVAULT_LOCAL_PORT`` and the README's own Redis port (``USER_REDIS_PORT``)
is replaced by a free one, because other tests run at the same time. The input a reader is
assumed to have (``dump.rdb``) is made with a real redis-server. Every command that fails is
reported, with its output. Daemons the README starts write a pid file in the working
directory; whatever of them is still alive at the end is stopped.
"""

from __future__ import annotations

import contextlib
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
# Not run, with the reason: make targets that would run this suite again, or start their own
# embedded AWS and data sets for minutes (the README's other blocks cover the same operations).
NOT_RUN = {
    "make test": "runs the test suite, this test included",
    "make demo": "the whole demo with its own embedded AWS and dataset, minutes on a shared machine",
    "make bench": "generates GB-sized data sets for minutes; not part of make test",
}
# The port of the Redis the README starts as "your own" cache (replaced by a free one).
USER_REDIS_PORT = "6390"


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


def test_a_command_gets_what_the_commands_before_it_exported(tmp_path: Path) -> None:
    work = tmp_path / "checkout"
    work.mkdir()
    shell = Session(cwd=work, env={"PATH": os.environ["PATH"]}, ports={"6390": "41234"})
    assert shell.run('eval "$(echo export GREETING=\\"a b\\")"').returncode == 0
    assert shell.run("false").returncode == 1
    shown = shell.run(shell.with_free_ports('echo "$GREETING" --port 6390 63900'))
    assert shown.stdout == "a b --port 41234 63900\n"


@dataclass
class Session:
    cwd: Path
    env: dict[str, str]
    ports: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        """``command`` in bash, in its own process group (all stopped on a timeout); the
        environment it exports is the next command's, as in one interactive shell."""
        state = self.cwd.parent / "exported.env"
        script = f"{command}\n__rc=$?\nexport -p > {shlex.quote(str(state))}\nexit $__rc\n"
        proc = subprocess.Popen(
            ["bash", "-c", script],
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
        if state.exists():
            self.env = _exported(state.read_text())
            state.unlink()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def with_free_ports(self, command: str) -> str:
        for written, free in self.ports.items():
            command = re.sub(rf"\b{written}\b", free, command)
        return command

    def stop_daemons(self) -> None:
        """Stop what the README started in the background and left running (a failed run)."""
        for pid_file in self.cwd.glob("*.pid"):
            pid = pid_file.read_text().strip()
            with contextlib.suppress(OSError, ValueError):  # gone already
                cmdline = Path(f"/proc/{pid}/cmdline").read_text()
                if any(port in cmdline for port in self.ports.values()):  # still ours, not a reused pid
                    os.kill(int(pid), signal.SIGTERM)


def _exported(declarations: str) -> dict[str, str]:
    """The variables of ``export -p`` output (bash quotes each value as ``declare -x K="V"``)."""
    probe = subprocess.run(
        ["bash", "-c", f"{declarations}\nenv -0"], env={}, capture_output=True, text=True, check=True
    )
    pairs = (entry.partition("=") for entry in probe.stdout.split("\0") if "=" in entry)
    return {k: v for k, _, v in pairs if k not in ("PWD", "OLDPWD", "SHLVL", "_")}


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    # The venv up to date here first: a command in the linked checkout must find nothing to
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
    # A new user's aws CLI: no profile or credentials of this machine's ~/.aws.
    env["AWS_CONFIG_FILE"] = str(tmp_path / "aws" / "config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "aws" / "credentials")
    env["CACHEVAULT_HOME"] = str(tmp_path / "home")
    env["CACHEVAULT_LOCAL_PORT"] = str(free_port())
    state = Session(cwd=work, env=env, ports={USER_REDIS_PORT: str(free_port())})
    try:
        yield state
    finally:
        state.run("cachevault local down")
        state.stop_daemons()


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


def test_every_readme_command_works_as_written(session: Session) -> None:
    blocks = bash_blocks(README.read_text())
    assert blocks, "README.md has no ```bash block"
    ran = 0
    for block in blocks:
        for written in block:
            if _without_comment(written) in NOT_RUN:
                continue
            proc = session.run(session.with_free_ports(written))
            ran += 1
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                session.failures.append(f"$ {written}\n  exit {proc.returncode}\n{tail}")
    assert ran > 0
    assert not session.failures, f"{len(session.failures)} README command(s) fail as written:\n\n" + "\n\n".join(
        session.failures
    )
