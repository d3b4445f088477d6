"""Task output packed into per-launcher lane files (issue: a million tokens): what users see
is what they saw with a file per stream, and a launcher killed mid-write loses nothing."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pilotflow.launcher import Pool
from pilotflow.run.sync import CUT, packed_output
from pilotflow.transport.local import LocalTransport
from tests.conftest import cli, write_bundle
from tests.e2e.test_launcher import launch, make_pool

TALK = ("printf 'out of {i}\\nsecond line \\303\\274\\n'; printf 'err of {i}\\n' >&2; "
        "if [ {i} = 3 ]; then printf 'no newline'; exit 4; fi")


def bundle(work: Path, name: str, logs: str) -> None:
    write_bundle(work, f"""
[bundle]
name = "{name}"
[[resource]]
name = "here"
scheduler = "local"
cores_per_node = 3
logs = "{logs}"
[[task]]
name = "t{{i}}"
command = '''{TALK}'''
matrix = {{ i = "1..12" }}
""", name=f"{name}.toml")


def test_logs_read_the_same_packed_or_per_token(work):
    shown = {}
    for logs in ("packed", "per-token"):
        bundle(work, logs.replace("-", ""), logs)
        run = cli("submit", f"{logs.replace('-', '')}.toml", "--wait", cwd=work, check=1).stdout.strip()
        shown[logs] = {i: cli("logs", run, f"t{i}", cwd=work, check=0).stdout for i in range(1, 13)}
        pool = next(p for p in (work / ".pilotflow").iterdir() if p.name == run)
        files = os.listdir(pool / "logs")
        if logs == "packed":
            assert len(files) <= 2 * 3 + 2, files  # two lanes' files per core at most, not one per task
        else:
            assert len(files) == 24
    assert shown["packed"] == shown["per-token"]
    assert "out of 7\nsecond line ü\n-- stderr --\nerr of 7\n" in shown["packed"][7]
    assert "no newline" in shown["packed"][3] and "exit code 4" in shown["packed"][3]


WRITER = 'for i in $(seq 1 300); do echo "$PILOTFLOW_TOKEN line $i"; sleep 0.005; done'
FULL = "".join(f"{{t}} line {i}\n" for i in range(1, 301))


def test_a_launcher_killed_while_its_tasks_write_leaves_each_output_intact_or_marked_cut(tmp_path):
    n = 6
    pool = make_pool(tmp_path, n, WRITER, {"p1": [f"t{i:05d}" for i in range(n)]}, lock_timeout=2)
    p = launch(tmp_path, "p1", 3)
    end = time.time() + 10
    while time.time() < end and sum(1 for d in pool.states().values() if d.get("state") == "locked") < 3:
        time.sleep(0.05)
    time.sleep(0.5)  # mid-write
    os.kill(p.pid, signal.SIGKILL)  # the launcher alone; its reaper kills the tasks and hands them back
    p.wait(5)
    end = time.time() + 10
    while time.time() < end and any(d.get("state") == "locked" for d in pool.states().values()):
        time.sleep(0.05)
    cut = {name: d for name, d in pool.states().items() if d.get("state") == "todo" and d.get("log")}
    assert len(cut) == 3
    t = LocalTransport()
    for name, d in cut.items():
        text = packed_output(t, pool.root, d["log"], "out", running=False)
        assert text.endswith(CUT)
        body = text[: -len(CUT)]
        assert FULL.format(t=name).startswith(body) and body  # a clean prefix of its output
    # a new pilot finishes everything; every completed output is whole
    q = launch(tmp_path, "p2", 3)
    q.wait(60)
    states = Pool(str(tmp_path)).states()
    assert all(d["state"] == "done" for d in states.values()) and len(states) == n
    for name, d in states.items():
        assert packed_output(t, pool.root, d["log"], "out", running=False) == FULL.format(t=name)
