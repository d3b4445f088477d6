"""Complete runs on the local scheduler, as a user runs them (issue: launcher + local runs)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tests.conftest import ROOT, cli, peak_concurrency, status_json, write_bundle


def test_examples_complete(work):
    for example in ("hello", "picas-quick", "fractals"):
        shutil.copytree(ROOT / "workflows" / example, work / example)
    for bundle in ("hello/hello.toml", "picas-quick/picas.toml", "fractals/fractals.toml"):
        run = cli("submit", bundle, "--wait", cwd=work, check=0).stdout.strip()
        st = status_json(work, run)
        assert st["finished"] and st["counts"]["done"] == len(st["tokens"]) and st["counts"]["error"] == 0
    # outputs came back beside the bundle, and the gathering stage saw all 16 renders
    pngs = sorted((work / "fractals" / "out").glob("*.png"))
    assert len(pngs) == 16 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "16 views" in (work / "fractals" / "out" / "index.html").read_text()


def test_env_cwd_and_placeholders_reach_the_task(work):
    write_bundle(work, """
        [bundle]
        name = "envs"
        [[task]]
        name = "t-{x}"
        command = "printf '%s|%s|%s|%s|%s' \\"$PILOTFLOW_TOKEN\\" \\"$PILOTFLOW_CORES\\" \\"$GREETING\\" \\"$(basename $(pwd))\\" '{x}' > t-{x}.txt; awk '{print $1}' /dev/null"
        matrix = { x = ["a"] }
        env = { GREETING = "it's \\"quoted\\" $HOME" }
        outputs = ["t-{x}.txt"]
    """)
    cli("submit", "jobs.toml", "--wait", cwd=work, check=0)
    token, cores, greeting, cwd, x = (work / "t-a.txt").read_text().split("|")
    assert (token, cores, greeting, cwd, x) == ("t-a", "1", "it's \"quoted\" $HOME", "work", "a")


def test_failures_retries_and_dependants(work):
    write_bundle(work, """
        [bundle]
        name = "fails"
        [[task]]
        name = "flaky"
        command = "if [ -f flaky.seen ]; then echo second; else touch flaky.seen; echo first >&2; exit 3; fi"
        retries = 1
        walltime = "5s"
        [[task]]
        name = "broken"
        command = "echo 'cannot work' >&2; exit 7"
        retries = 1
        walltime = "5s"
        [[task]]
        name = "needs-broken"
        command = "echo never"
        after = ["broken"]
        [[task]]
        name = "needs-flaky"
        command = "echo fine"
        after = ["flaky"]
    """)
    p = cli("submit", "jobs.toml", "--wait", cwd=work, check=1)
    assert "finished with 2 token(s) in error" in p.stderr
    st = status_json(work)
    tok = st["tokens"]
    assert (tok["flaky"]["state"], tok["flaky"]["attempts"]) == ("done", 2)
    assert (tok["broken"]["state"], tok["broken"]["attempts"], tok["broken"]["exit_code"]) == ("error", 2, 7)
    assert tok["needs-broken"]["state"] == "error" and tok["needs-flaky"]["state"] == "done"
    run = st["run"]
    from pilotflow.run.mirror import Mirror
    mirror = Mirror(work / ".pilotflow/runs" / run).states()
    assert mirror["needs-broken"]["reason"] == "dependency broken ended in error"
    logs = cli("logs", "broken", cwd=work, check=0).stdout
    assert "cannot work" in logs and "attempt 2" in logs
    assert cli("status", cwd=work).returncode == 1  # a finished run with errors
    # fix the cause and retry the failed tokens: everything ends done
    (work / "jobs.toml").write_text((work / "jobs.toml").read_text())
    pool = next((work / ".pilotflow").glob("fails-*/work"))
    (pool / "fixed").touch()
    cli("retry", "--failed", cwd=work, check=0)
    # the retried token still fails (its command did not change), its dependant too
    cli("wait", cwd=work, check=1)
    st = status_json(work)
    assert st["tokens"]["broken"]["attempts"] == 4


def test_retry_failed_after_fixing_the_input(work):
    write_bundle(work, """
        [bundle]
        name = "fixme"
        [[task]]
        name = "reads"
        command = "cat input.txt"
        walltime = "5s"
        [[task]]
        name = "after-reads"
        command = "echo ok"
        after = ["reads"]
    """)
    cli("submit", "jobs.toml", "--wait", cwd=work, check=1)
    pool = next((work / ".pilotflow").glob("fixme-*/work"))
    (pool / "input.txt").write_text("now it exists\n")
    out = cli("retry", "--failed", cwd=work, check=0).stdout
    assert "2 token(s) scrubbed back to todo" in out
    cli("wait", cwd=work, check=0)
    st = status_json(work)
    assert st["counts"] == {"todo": 0, "locked": 0, "done": 2, "error": 0}


def _pids_of(pattern: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if pattern in (d / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def _wait_for(cond, timeout=30, step=0.1):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError("condition not met in time")


def test_cancel_returns_running_tokens_and_leaves_nothing_running(work):
    write_bundle(work, """
        [bundle]
        name = "long"
        [[task]]
        name = "sleep-{i}"
        command = "sleep 300 # pilotflow-cancel-marker"
        matrix = { i = "1..4" }
        walltime = "5m"
    """)
    run = cli("submit", "jobs.toml", cwd=work, check=0).stdout.strip()
    _wait_for(lambda: status_json(work)["counts"]["locked"] >= 2)
    t = time.time()
    out = cli("cancel", cwd=work, check=0).stdout
    assert time.time() - t < 15
    assert "cancelled 1 pilot(s)" in out
    st = status_json(work)
    assert st["counts"]["locked"] == 0 and st["counts"]["todo"] == 4
    assert st["pilots"]["p1"]["state"] in ("ended", "cancelled")
    assert not _pids_of("pilotflow-cancel-marker")
    p = cli("wait", cwd=work, check=2)
    assert "was cancelled" in p.stderr and f"pilotflow retry {run}" in p.stderr


def test_unknown_run_and_bad_bundle_are_usage_errors(work):
    p = cli("status", "nope", cwd=work, check=2)
    assert "no run 'nope'" in p.stderr
    p = cli("status", cwd=work, check=2)
    assert "no runs in" in p.stderr
    write_bundle(work, '[bundle]\nname = "x"\n[[task]]\nname = "a"\n')
    p = cli("submit", "jobs.toml", cwd=work, check=2)
    assert "jobs.toml:3: [[task]] needs a command" in p.stderr


def test_runs_lists_newest_first(work):
    write_bundle(work, '[bundle]\nname = "one"\n[[task]]\nname = "a"\ncommand = "true"\nwalltime = "2s"\n')
    r1 = cli("submit", "jobs.toml", "--wait", cwd=work, check=0).stdout.strip()
    r2 = cli("submit", "jobs.toml", "--wait", cwd=work, check=0).stdout.strip()
    out = cli("runs", cwd=work, check=0).stdout
    assert out.index(r2) < out.index(r1)


def test_two_launchers_per_node_share_its_cores_and_run_each_token_once(work):
    write_bundle(work, """
        [bundle]
        name = "split"
        [[resource]]
        name = "here"
        scheduler = "local"
        cores_per_node = 2
        launchers_per_node = 2
        [[task]]
        name = "s{i}"
        command = "sleep 0.3"
        matrix = { i = "1..6" }
        walltime = "5s"
        [[task]]
        name = "t{i}"
        command = "true"
        matrix = { i = "1..600" }
        walltime = "5s"
    """)
    run = cli("submit", "jobs.toml", "--wait", cwd=work, check=0).stdout.strip()
    st = status_json(work, run)
    assert st["counts"]["done"] == 606 and {t["attempts"] for t in st["tokens"].values()} == {1}
    pool = next((work / ".pilotflow").glob("split-*"))
    ran = {p.name: json.loads(p.read_text())["ran"] for p in (pool / "agents").glob("p1.*.end")}
    assert sorted(ran) == ["p1.0.end", "p1.1.end"] and min(ran.values()) > 0 and sum(ran.values()) == 606
    assert {json.loads(p.read_text())["cores"] for p in (pool / "agents").glob("p1.*.json")} == {1}
    # both launchers ran tasks at the same time, and never more at once than the node's 2 cores
    assert peak_concurrency(st["tokens"].values()) == 2


def test_wait_wakes_when_a_pilot_on_this_machine_ends_not_at_its_next_look(work):
    """A pilot here is a process: its end (its tokens' last states are written just before)
    cuts the pause between two looks short, once per pilot; `wait` then returns at once."""
    import os
    import pytest
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        pytest.skip("no pidfds here (Linux 5.3 or newer): wait looks at its usual pace instead")
    from pilotflow.bundle import bundle_from_dict
    from pilotflow.run.pilots import nap
    from pilotflow.run.start import new_run
    from pilotflow.run.sync import Session
    bundle = bundle_from_dict({"bundle": {"name": "nap"}, "task": [{"name": "a", "command": "sleep 0.5"}]},
                              path=work / "jobs.toml")
    record, _ = new_run(bundle, cwd=work)
    s = Session(record)
    woken: set[str] = set()
    t = time.time()
    assert nap(s, 30.0, woken)
    assert time.time() - t < 10 and woken == {record.pilots["p1"].job_id}
    t = time.time()
    assert not nap(s, 0.3, woken)  # that pilot does not wake it again
    assert time.time() - t >= 0.29
    cli("wait", record.run, cwd=work, check=0)
    st = status_json(work, record.run)
    assert st["finished"] and st["counts"]["done"] == 1


def test_pilots_on_this_machine_run_the_launchers_bytecode(work):
    """submit leaves this interpreter's cached bytecode of the launcher in the pool (pip
    leaves it cached; compiled here as pip does), and the pilot runs it: no compile of the
    launcher at each pilot start (~40 ms here)."""
    import py_compile
    import pilotflow.launcher_text
    from pilotflow.launcher_text import launcher_bytecode, launcher_hash
    py_compile.compile(str(Path(pilotflow.launcher_text.__file__).with_name("launcher.py")), doraise=True)
    assert launcher_bytecode() is not None
    write_bundle(work, """
        [bundle]
        name = "pyc"
        [[task]]
        name = "who"
        command = "tr '\\\\0' ' ' < /proc/$PPID/cmdline > launcher.txt"
        outputs = ["launcher.txt"]
    """)
    cli("submit", "jobs.toml", "--wait", cwd=work, check=0)
    pool = next((work / ".pilotflow").glob("pyc-*"))
    assert (pool / f".launcher-{launcher_hash()}.pyc").read_bytes() == launcher_bytecode()
    assert f".launcher-{launcher_hash()}.pyc run " in (work / "launcher.txt").read_text()
