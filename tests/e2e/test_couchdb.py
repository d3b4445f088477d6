"""The CouchDB pool against a real CouchDB-API server (pouchdb-server on loopback): the same
protocol guarantees as the file pool (exactly once, nothing lost, stale takeover), PiCaS's
views and fields, and clear errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from pilotflow.launcher import CouchPool, open_pool
from tests.conftest import cli, status_json, write_bundle
from tests.daemons.couchdb import PouchServer
from tests.e2e.test_launcher import LAUNCHER

ROOT = Path(__file__).resolve().parent.parent.parent



def _db() -> str:
    return "t" + uuid.uuid4().hex[:12]


def _bundle(url: str, db: str, tasks: str, extra: str = "") -> str:
    return f"""
        [bundle]
        name = "couch"
        lock_timeout = "20s"

        [defaults]
        walltime = "2s"

        [[resource]]
        name = "local"
        scheduler = "local"
        cores_per_node = 2
        pool = "couchdb"
        couchdb_url = "{url}"
        couchdb_database = "{db}"
        {extra}
        {tasks}
        """


def _pool(root: Path, url: str, db: str, n: int, command: str, lock_timeout: float = 300) -> CouchPool:
    pool = CouchPool.create(str(root), {"run": "r", "lock_timeout": lock_timeout,
                                        "couchdb": {"url": url, "database": db}})
    pool.add_defs([{"name": f"t{i:05d}", "command": command, "rank": i} for i in range(n)])
    return pool


def _launch(root: Path, pilot: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(LAUNCHER), "run", str(root), "--pilot", pilot, "--cores", "1",
                             "--poll", "0.2", "--steal-delay", "0.2", *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _ran(work: Path) -> Counter:
    runs: Counter = Counter()
    for f in work.glob("rec.*"):
        runs.update(f.read_text().split())
    return runs


@pytest.mark.couchdb
def test_a_run_on_a_couchdb_pool_from_submit_to_logs(couchdb_server, work):
    db = _db()
    write_bundle(work, _bundle(couchdb_server.url, db, """
        [[task]]
        name = "t-{i}"
        command = "echo out {i}; echo err {i} >&2"
        matrix = { i = "1..20" }

        [[task]]
        name = "last"
        command = "ls ../../work >/dev/null; echo last"
        after = ["t-*"]

        [[task]]
        name = "bad"
        command = "echo why >&2; exit 4"
        """))
    r = cli("submit", "jobs.toml", "--wait", cwd=work, check=1)
    run = r.stdout.strip().splitlines()[0]
    st = status_json(work, run)
    assert st["counts"] == {"todo": 0, "locked": 0, "done": 21, "error": 1}
    assert st["tokens"]["last"]["start"] >= max(st["tokens"][f"t-{i}"]["end"] for i in range(1, 21))
    # the tokens are PiCaS tokens: PiCaS's views count them
    status, ans = couchdb_server.request("GET", f"/{db}/_design/Monitor/_view/overview_total?group=true")
    assert status == 200 and {r["key"]: r["value"] for r in ans["rows"]} == {"done": 21, "error": 1}
    status, doc = couchdb_server.request("GET", f"/{db}/{run}:bad")
    assert (doc["type"], doc["exit_code"], doc["done"] > 0, doc["input"]) == ("token", 4, True, "echo why >&2; exit 4")
    # the output comes from the attachments: the launchers' lane files are gone
    for f in work.glob(".pilotflow/**/logs/p1.*"):
        f.unlink()
    out = cli("logs", run, "t-7", cwd=work, check=0).stdout
    assert "out 7" in out and "err 7" in out
    assert "why" in cli("logs", run, "bad", cwd=work, check=0).stdout
    # retry --failed scrubs it in the database and runs it again
    r = cli("retry", run, "--failed", cwd=work)
    assert r.returncode == 0, r.stderr
    cli("wait", run, cwd=work, check=1)
    assert status_json(work, run)["tokens"]["bad"]["attempts"] == 2


@pytest.mark.couchdb
def test_8_launchers_2000_tokens_each_exactly_once(couchdb_server, tmp_path):
    n = 2000
    pool = _pool(tmp_path, couchdb_server.url, _db(), n, 'echo "$PILOTFLOW_TOKEN" >> "rec.$PILOTFLOW_PILOT"')
    names = [f"t{i:05d}" for i in range(n)]
    for k in range(4):  # four planned pilots, four that only steal
        pool.write_plan(f"p{k + 1}", names[k::4])
    t = time.time()
    procs = [_launch(tmp_path, f"p{k}") for k in range(1, 9)]
    for p in procs:
        assert p.wait(600) == 0, p.stderr.read()
    elapsed = time.time() - t
    runs = _ran(tmp_path / "work")
    assert len(runs) == n and set(runs.values()) == {1}, "a token was lost or ran twice"
    states = open_pool(str(tmp_path)).states()
    assert Counter(d["state"] for d in states.values()) == {"done": n}
    assert {d["attempt"] for d in states.values()} == {1}
    print(f"2,000 tokens, 8 launchers on CouchDB: {elapsed:.1f} s ({n / elapsed:.0f} tokens/s)")


@pytest.mark.couchdb
def test_a_launcher_reads_the_tokens_once_at_its_start(couchdb_server, tmp_path):
    from pilotflow.launcher import COUCH_PAGE, Agent
    n = COUCH_PAGE + 300  # two pages a scan
    _pool(tmp_path, couchdb_server.url, _db(), n, "true")
    pool = open_pool(str(tmp_path))
    pages = []
    view = pool.db.view
    pool.db.view = lambda design, name, query: pages.append(name) or view(design, name, query)
    agent = Agent(pool, "p1", cores=1)
    assert agent.load() == n and len(agent.tokens) == n
    assert pages == ["tokens", "tokens"]  # one scan: definitions and states from the same pages


@pytest.mark.couchdb
def test_a_server_restarted_mid_run_loses_nothing(couchdb_server, tmp_path):
    n = 200
    pool = _pool(tmp_path, couchdb_server.url, _db(), n,
                 'sleep 0.02; echo "$PILOTFLOW_TOKEN" >> "rec.$PILOTFLOW_PILOT"')
    procs = [_launch(tmp_path, f"p{k}") for k in (1, 2)]
    deadline = time.time() + 60
    while len(_ran(tmp_path / "work")) < 40 and time.time() < deadline:
        time.sleep(0.1)
    couchdb_server.restart(down_s=3.0)  # persistent mode: its data survive
    for p in procs:
        assert p.wait(300) == 0, p.stderr.read()
    runs = _ran(tmp_path / "work")
    assert len(runs) == n and set(runs.values()) == {1}
    assert Counter(d["state"] for d in pool.states().values()) == {"done": n}


@pytest.mark.couchdb
def test_a_pilot_killed_mid_token_is_taken_over_once_its_lock_is_stale(couchdb_server, tmp_path):
    pool = CouchPool.create(str(tmp_path), {"run": "r", "lock_timeout": 4,
                                            "couchdb": {"url": couchdb_server.url, "database": _db()}})
    pool.add_defs([{"name": "long", "command": 'echo "$PILOTFLOW_PILOT" >> rec.long; sleep 3'}])
    a = _launch(tmp_path, "pa")
    deadline = time.time() + 30
    while pool.state("long")["state"] != "locked" and time.time() < deadline:
        time.sleep(0.1)
    rec = pool.agents()["pa.0"]
    for pid in (rec["reaper"], a.pid):  # the launcher and its reaper die at once (a node crash)
        os.kill(pid, signal.SIGKILL)
    a.wait()
    time.sleep(2.0)  # its heartbeat is late (a live pilot's tokens are not waited for; a quiet one's are)
    b = _launch(tmp_path, "pb")
    assert b.wait(120) == 0, b.stderr.read()
    doc = pool.state("long")
    assert (doc["state"], doc["attempt"], doc["pilot"], doc["lost"]) == ("done", 2, "pb", 1)
    assert (tmp_path / "work" / "rec.long").read_text().split() == ["pa", "pb"]


@pytest.mark.couchdb
def test_a_node_without_the_run_directory_works_from_the_database_alone(couchdb_server, tmp_path):
    """A grid node sharing no filesystem with the submit host: the launcher gets the database
    on its command line and works in a directory of its own."""
    db = _db()
    _pool(tmp_path / "submit-host", couchdb_server.url, db, 30, 'echo "$PILOTFLOW_TOKEN" >> "rec.$PILOTFLOW_PILOT"')
    node = tmp_path / "node-scratch"
    p = _launch(node, "grid1", "--couchdb", couchdb_server.url, "--database", db, "--run", "r")
    assert p.wait(120) == 0, p.stderr.read()
    assert len(_ran(node / "work")) == 30
    pool = open_pool(str(tmp_path / "submit-host"))
    assert Counter(d["state"] for d in pool.states().values()) == {"done": 30}
    assert pool.output("t00003") == {"out": "", "err": ""}  # nothing printed: empty attachments


@pytest.fixture
def guarded_server(tmp_path):
    """A second server with an admin (no more "admin party"): credentials are checked."""
    srv = PouchServer.start(_prog(), tmp_path / "guarded", in_memory=True)
    status, _ = srv.request("PUT", "/_config/admins/alice", "s3cret")
    assert status == 200
    yield srv
    srv.stop()


def _prog():
    from tests.daemons.couchdb import install
    prog = install()
    if isinstance(prog, str):
        pytest.skip(prog)
    return prog


@pytest.mark.couchdb
def test_wrong_credentials_give_one_clear_error(guarded_server, work):
    cred = work / "couch.cred"
    cred.write_text("alice:wrong\n")
    cred.chmod(0o600)
    write_bundle(work, _bundle(guarded_server.url, "tokens", '[[task]]\nname = "a"\ncommand = "true"',
                               extra=f'couchdb_credentials = "{cred}"'))
    r = cli("submit", "jobs.toml", cwd=work)
    assert r.returncode == 2, r.stderr
    assert "refused the credentials" in r.stderr and "tokens" in r.stderr and "alice" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    cred.chmod(0o644)
    r = cli("submit", "jobs.toml", cwd=work)
    assert r.returncode == 2 and f"chmod 600 {cred}" in r.stderr
    cred.write_text("alice:s3cret\n")
    cred.chmod(0o600)
    r = cli("submit", "jobs.toml", "--wait", cwd=work, check=0)
    assert "s3cret" not in r.stdout + r.stderr
    assert "s3cret" not in "".join(p.read_text(errors="replace") for p in work.glob(".pilotflow/**/*")
                                   if p.is_file())


def test_credentials_in_the_url_are_a_bundle_error(work):
    write_bundle(work, _bundle("http://alice:pw@127.0.0.1:5984", "tokens", '[[task]]\nname = "a"\ncommand = "true"'))
    r = cli("plan", "jobs.toml", cwd=work, check=2)
    assert "credentials never go in the bundle" in r.stderr and "couchdb_credentials" in r.stderr


def _picas(py: Path, url: str, db: str, script: str) -> dict:
    """Run ``script`` with the real picas package (``client`` is picas's CouchDB client on ``db``);
    it prints one JSON object."""
    head = ("import json, picas\nfrom picas.clients import CouchDB\nfrom picas.modifiers import BasicTokenModifier\n"
            f"client = CouchDB(url={url!r}, db={db!r})\n")
    r = subprocess.run([str(py), "-c", head + textwrap.dedent(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


CREATE_VIEWS = """
    # what the picas-tutorial's createViews.py makes
    code = 'function(doc) { if (doc.type == "token") { if (%s) { emit(doc._id, doc._id); } } }'
    conds = {"todo": "doc.lock == 0 && doc.done == 0", "locked": "doc.lock > 0 && doc.done == 0",
             "done": "doc.lock > 0 && doc.done > 0 && parseInt(doc.exit_code) == 0",
             "error": "doc.lock > 0 && doc.done > 0 && parseInt(doc.exit_code) != 0"}
    for name, cond in conds.items():
        client.add_view(name, code % cond)
"""


@pytest.mark.couchdb
def test_tokens_pushed_by_picas_are_run_by_pilotflow_pilots(couchdb_server, picas_python, work):
    db = _db()
    couchdb_server.request("PUT", f"/{db}")
    # pushTokens.py's way: one token per line of a file, PiCaS's fields, saved with picas's client
    _picas(picas_python, couchdb_server.url, db, CREATE_VIEWS + """
    lines = ["echo one", "echo two; exit 3", "echo three", "echo four"]
    docs = [picas.Document({"_id": "token_%d" % i, "type": "token", "lock": 0, "done": 0, "hostname": "",
                            "scrub_count": 0, "input": line, "exit_code": ""}) for i, line in enumerate(lines)]
    print(json.dumps({"saved": client.save_documents(docs)}))
    """)
    write_bundle(work, _bundle(couchdb_server.url, db, """
        [[tasks_from]]
        picas_view = "todo"
        resource = "local"
        walltime = "5s"
        """))
    plan = json.loads(cli("plan", "jobs.toml", "--json", cwd=work, check=0).stdout)
    assert sorted(plan["resources"][0]["pilots"][0]["tasks"]) == ["token_0", "token_1", "token_2", "token_3"]
    r = cli("submit", "jobs.toml", "--wait", cwd=work, check=1)
    run = r.stdout.strip().splitlines()[0]
    assert status_json(work, run)["counts"] == {"todo": 0, "locked": 0, "done": 3, "error": 1}
    seen = _picas(picas_python, couchdb_server.url, db, """
    out = {v: sorted(d.id for d in client.get_from_view(v)) for v in ("todo", "locked", "done", "error")}
    t = client.get("token_1")
    out["token_1"] = [t["input"], t["exit_code"], t["lock"] > 0, t["done"] > 0]
    print(json.dumps(out))
    """)
    assert seen == {"todo": [], "locked": [], "done": ["token_0", "token_2", "token_3"], "error": ["token_1"],
                    "token_1": ["echo two; exit 3", 3, True, True]}
    assert "two" in cli("logs", run, "token_1", cwd=work, check=0).stdout


@pytest.mark.couchdb
def test_a_pilotflow_run_is_counted_and_scrubbed_by_picas_tools(couchdb_server, picas_python, work):
    db = _db()
    write_bundle(work, _bundle(couchdb_server.url, db, """
        [[task]]
        name = "job-{i}"
        command = "test {i} -le 8 || test -e rerun"
        matrix = { i = "1..10" }
        """))
    r = cli("submit", "jobs.toml", "--wait", cwd=work, check=1)
    run = r.stdout.strip().splitlines()[0]
    counts = _picas(picas_python, couchdb_server.url, db, """
    print(json.dumps({r.key: r.value for r in client.view("overview_total", group=True)}))
    """)
    assert counts == {"done": 8, "error": 2}
    # PiCaS's own reset: its Task scrubber (lock and done back to 0) on the error view's tokens
    _picas(picas_python, couchdb_server.url, db, """
    for doc in client.get_from_view("error"):
        client.save(picas.Task(doc.value).scrub())
    print(json.dumps({}))
    """)
    st = status_json(work, run)
    assert st["counts"] == {"todo": 2, "locked": 0, "done": 8, "error": 0}
    assert st["tokens"]["job-9"]["state"] == "todo"
    for w in work.glob(".pilotflow/**/work"):
        (w / "rerun").touch()
    assert cli("retry", run, cwd=work).returncode == 0
    cli("wait", run, cwd=work, check=0)
    counts = _picas(picas_python, couchdb_server.url, db, """
    print(json.dumps({r.key: r.value for r in client.view("overview_total", group=True)}))
    """)
    assert counts == {"done": 10}


@pytest.mark.couchdb
def test_the_picas_quick_workflow_runs_in_one_command(couchdb_server, work):
    ex = work / "picas-quick"
    shutil.copytree(ROOT / "workflows" / "picas-quick", ex)
    toml = ex / "picas-couchdb.toml"
    toml.write_text(toml.read_text().replace("http://127.0.0.1:5984", couchdb_server.url))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ex / "couchdb.py")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'overview_total view: {"done": 6}' in r.stdout


@pytest.mark.couchdb
def test_check_says_whether_the_database_answers(couchdb_server, guarded_server, work):
    write_bundle(work, _bundle(couchdb_server.url, _db(), '[[task]]\nname = "a"\ncommand = "true"'))
    r = cli("check", "jobs.toml", cwd=work)
    assert r.returncode == 0 and "will be created at submit" in r.stdout, r.stdout + r.stderr
    write_bundle(work, _bundle(guarded_server.url, "tokens", '[[task]]\nname = "a"\ncommand = "true"'))
    r = cli("check", "jobs.toml", cwd=work, env={"PILOTFLOW_COUCHDB_USER": "alice",
                                               "PILOTFLOW_COUCHDB_PASSWORD": "nope"})
    assert r.returncode != 0 and "refused the credentials" in r.stdout + r.stderr


def test_the_snakemake_plugin_refuses_a_couchdb_resource_clearly(work):
    (work / "Snakefile").write_text('rule a:\n    output: "a.txt"\n    shell: "touch {output}"\n')
    (work / "cluster.toml").write_text('[[resource]]\nname = "grid"\nscheduler = "local"\ncores_per_node = 1\n'
                                       'pool = "couchdb"\ncouchdb_url = "http://127.0.0.1:1"\ncouchdb_database = "x"\n')
    r = subprocess.run([sys.executable, "-m", "snakemake", "--executor", "pilotflow", "-j", "1",
                        "--pilotflow-resources", "cluster.toml"], cwd=work, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert 'resource grid has pool = "couchdb": the Snakemake plugin runs on file pools only' in r.stdout + r.stderr
