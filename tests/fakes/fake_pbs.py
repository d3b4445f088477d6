#!/usr/bin/env python3
"""FAKE PBS Professional: qsub, qstat, qdel and pbsdsh for tests, because no PBS server
exists on this machine (nor in Debian or on PyPI).

It follows the PBS Professional 2022.1 Reference Guide where pilotflow relies on it:
``qsub [-W depend=afterany:ID[:ID]] SCRIPT`` prints ``SEQ.SERVER``; ``#PBS`` directives
(-N, -l select=N:ncpus=C..., -l walltime, -o, -j oe, -q, -A), overridden by the same options on
the command line; ``-v VAR=value,...`` exported to the job; the job starts in $HOME with
PBS_JOBID, PBS_JOBNAME, PBS_O_WORKDIR, PBS_NODEFILE (one line per chunk), NCPUS; the walltime
is enforced (SIGTERM, then SIGKILL); ``qstat -x -f -F json IDS`` gives job_state Q/H/R/F and
Exit_status; ``qdel`` ends a running job with SIGTERM (Exit_status 271 = 256 + 15);
``pbsdsh -- CMD`` runs CMD once per node-file line with PBS_VNODENUM.
State lives in $FAKE_PBS_DIR. Every "node" is this machine (named fake-nodeK).
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

SERVER = "fakepbs"
DIR = os.environ.get("FAKE_PBS_DIR", "/tmp/fake-pbs")


def _path(*p):
    return os.path.join(DIR, *p)


def _load(job):
    try:
        with open(_path("jobs", job + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _save(doc):
    tmp = _path("jobs", doc["id"] + ".json.tmp%d" % os.getpid())
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, _path("jobs", doc["id"] + ".json"))


def _next_id():
    os.makedirs(_path("jobs"), exist_ok=True)
    n = len([f for f in os.listdir(_path("jobs")) if f.endswith(".json")]) + 100
    while os.path.exists(_path("jobs", "%d.%s.json" % (n, SERVER))):
        n += 1
    return "%d.%s" % (n, SERVER)


def _hms(text):
    parts = [int(x) for x in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def qsub(argv):
    after = []
    cli = []  # options given on the command line: they override the script's #PBS directives
    env = {}  # -v VAR=value,...: exported to the job
    i = 0
    while i < len(argv) - 1:
        if argv[i] == "-W" and argv[i + 1].startswith("depend=afterany:"):
            after = argv[i + 1].split(":", 1)[1].split(":")
            i += 2
        elif argv[i] == "-v":
            env.update(kv.split("=", 1) for kv in argv[i + 1].split(",") if "=" in kv)
            i += 2
        elif argv[i] in ("-N", "-l", "-o", "-q", "-A", "-j"):
            cli.append([argv[i], argv[i + 1]])
            i += 2
        else:
            i += 1
    script = os.path.abspath(argv[-1])
    opts = {"N": os.path.basename(script), "nodes": 1, "ncpus": 1, "walltime": 3600, "o": None}
    directives = [shlex.split(line[4:]) for line in open(script) if line.startswith("#PBS")]
    for words in directives + cli:
        if words[:1] == ["-N"]:
            opts["N"] = words[1]
        elif words[:1] == ["-l"] and words[1].startswith("select="):
            m = re.match(r"select=(\d+):ncpus=(\d+)", words[1])
            opts["nodes"], opts["ncpus"] = int(m.group(1)), int(m.group(2))
        elif words[:1] == ["-l"] and words[1].startswith("walltime="):
            opts["walltime"] = _hms(words[1].split("=", 1)[1])
        elif words[:1] == ["-o"]:
            opts["o"] = words[1]
    job = _next_id()
    out = opts["o"] or "%s.o%s" % (opts["N"], job.split(".")[0])
    doc = {"id": job, "name": opts["N"], "script": script, "after": after, "nodes": opts["nodes"],
           "ncpus": opts["ncpus"], "walltime": opts["walltime"], "state": "H" if after else "Q",
           "workdir": os.getcwd(), "output": os.path.join(os.getcwd(), out), "submitted": time.time(), "env": env}
    _save(doc)
    subprocess.Popen([sys.executable, os.path.abspath(__file__), "_run", job], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(job)
    return 0


def _run(job):
    doc = _load(job)
    while doc["after"]:  # afterany: wait until every dependency finished
        if all((_load(a) or {}).get("state") == "F" for a in doc["after"]):
            break
        time.sleep(0.2)
        doc = _load(job)
        if doc["state"] == "F":
            return 0
    doc = _load(job)
    if doc["state"] == "F":  # qdel'ed while queued
        return 0
    nodefile = _path("jobs", job + ".nodes")
    with open(nodefile, "w") as f:
        f.write("".join("fake-node%d\n" % (k + 1) for k in range(doc["nodes"])))
    env = dict(os.environ, **doc.get("env", {}))
    env.update(PBS_JOBID=job, PBS_JOBNAME=doc["name"], PBS_O_WORKDIR=doc["workdir"],
               PBS_NODEFILE=nodefile, NCPUS=str(doc["ncpus"]), PBS_ENVIRONMENT="PBS_BATCH",
               PATH=os.path.dirname(os.path.abspath(sys.argv[0])) + "/pbs_bin:" + os.environ.get("PATH", ""))
    with open(doc["output"], "wb") as out:
        p = subprocess.Popen(["/bin/sh", doc["script"]], cwd=os.path.expanduser("~"), env=env, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
    doc.update(state="R", pgid=p.pid, started=time.time())
    _save(doc)
    code = None
    while code is None:
        try:
            code = p.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            if time.time() - doc["started"] > doc["walltime"]:
                _kill(p.pid)
                code = p.wait()
                doc = _load(job)
                doc["killed"] = "walltime"
                _save(doc)
    doc = _load(job)
    if doc.get("killed") == "qdel":
        exit_status = 271
    elif doc.get("killed") == "walltime":
        exit_status = -29  # JOB_EXEC_KILL_WALLTIME
    else:
        exit_status = code if code >= 0 else 256 - code
    doc.update(state="F", exit_status=exit_status, ended=time.time())
    _save(doc)
    return 0


def _kill(pgid):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except OSError:
            return
        end = time.time() + 5
        while time.time() < end:
            try:
                os.killpg(pgid, 0)
            except OSError:
                return
            time.sleep(0.1)


def qstat(argv):
    if argv[:1] == ["--version"]:
        print("pbs_version = 2022.1.0 (FAKE)")
        return 0
    ids = [a for a in argv if not a.startswith("-") and a != "json"]
    jobs = {}
    for job in ids:
        doc = _load(job)
        if doc is None:
            sys.stderr.write("qstat: Unknown Job Id %s\n" % job)
            continue
        info = {"Job_Name": doc["name"], "job_state": doc["state"], "queue": "workq",
                "Resource_List": {"select": "%d:ncpus=%d:mpiprocs=1" % (doc["nodes"], doc["ncpus"]),
                                  "walltime": "%d" % doc["walltime"]}}
        if doc["state"] == "F":
            info["Exit_status"] = doc.get("exit_status", 0)
        jobs[job] = info
    print(json.dumps({"timestamp": int(time.time()), "pbs_version": "2022.1.0 (FAKE)", "pbs_server": SERVER,
                      "Jobs": jobs}, indent=4))
    return 0


def qdel(argv):
    for job in argv:
        doc = _load(job)
        if doc is None:
            sys.stderr.write("qdel: Unknown Job Id %s\n" % job)
            continue
        if doc["state"] in ("Q", "H"):
            doc.update(state="F", exit_status=271)
            _save(doc)
        elif doc["state"] == "R":
            doc["killed"] = "qdel"
            _save(doc)
            _kill(doc["pgid"])
    return 0


def pbsdsh(argv):
    if "--" in argv:
        argv = argv[argv.index("--") + 1:]
    nodes = open(os.environ["PBS_NODEFILE"]).read().split()
    procs = [subprocess.Popen(argv, env=dict(os.environ, PBS_VNODENUM=str(i), PILOTFLOW_NODE=n))
             for i, n in enumerate(nodes)]
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    cmd = os.path.basename(sys.argv[0])
    args = sys.argv[1:]
    if cmd == "fake_pbs.py":
        cmd, args = args[0], args[1:]
    sys.exit({"qsub": qsub, "qstat": qstat, "qdel": qdel, "pbsdsh": pbsdsh, "_run": lambda a: _run(a[0])}[cmd](args))
