#!/usr/bin/env python3
"""What one token's claim file costs on this machine's filesystem, against the fork/exec ceiling.

    python benchmarks/claim_cost_bench.py [--tasks 6000] [--dir DIR]

Why: the launcher's throughput target is a fraction of `xargs -P<cores>`, which creates no
file per task, while the pool keeps one state file per token (the token's exclusive claim,
created with O_EXCL before its task starts). This measures, side by side in one run:
  fs ops      per-file cost of create (O_EXCL), rename, link, append to an existing file, unlink
              in DIR (the pool's filesystem), wall and CPU time
  xargs       seq N | xargs -P CORES -n1 sh -c true
  spawn       a bare Python loop keeping CORES `true` processes running (posix_spawn, waitpid,
              SIGCHLD wake-ups): the launcher's loop with nothing else
  spawn+claim the same, each task first claimed by creating its file (O_EXCL) and finished by
              appending its result to it: the least a state file of its own per token costs
  spawn+link  the same, each task claimed by a hard link to a journal (the pool's format 4):
              its lock record and its result appended to the journal, no inode per token
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time


def fs_ops(base: str, n: int) -> dict[str, tuple[float, float]]:
    for i in range(256):
        os.mkdir(os.path.join(base, "%02x" % i))
    path = [os.path.join(base, "%02x" % (i % 256), "t%d" % i) for i in range(n)]
    out = {}

    def timed(name, fn):
        t, c = time.perf_counter(), time.process_time()
        for i in range(n):
            fn(i)
        out[name] = ((time.perf_counter() - t) / n * 1e6, (time.process_time() - c) / n * 1e6)

    timed("create", lambda i: os.close(os.open(path[i] + ".1", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)))
    timed("rename", lambda i: os.rename(path[i] + ".1", path[i] + ".2"))
    timed("link", lambda i: os.link(path[i] + ".2", path[i] + ".3"))

    def append(i):
        fd = os.open(path[i] + ".3", os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"x" * 200)
        os.close(fd)
    timed("append", append)
    timed("unlink", lambda i: os.unlink(path[i] + ".2"))
    one = os.path.join(base, "journal")
    os.close(os.open(one, os.O_WRONLY | os.O_CREAT, 0o644))
    timed("link1", lambda i: os.link(one, path[i] + ".j"))  # every name a link to one file (a journal)
    return out


LOCK = b'{"agent":0,"attempt":1,"host":"node","log":["p1.0.0",123456,7890],"pilot":"p1","start":1764400000.123,' \
    b'"state":"locked","token":"t%d"}\n'
DONE = b'{"agent":0,"attempt":1,"end":1764400001.123,"exit_code":0,"host":"node","log":["p1.0.0",123456,7890,' \
    b'123456,7890],"pilot":"p1","start":1764400000.123,"state":"done","token":"t%d"}\n'


def spawn_loop(base: str, n: int, slots: int, claim: str | None) -> float:
    env = dict(os.environ)
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    old = signal.set_wakeup_fd(w)
    signal.signal(signal.SIGCHLD, lambda s, f: None)
    actions = [(os.POSIX_SPAWN_OPEN, fd, "/dev/null", os.O_RDWR, 0) for fd in (0, 1, 2)]
    true = shutil.which("true")
    running: dict[int, tuple[int, int | None]] = {}
    journal = os.path.join(base, "journal")
    jfd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    nxt = done = 0
    t = time.perf_counter()
    try:
        while done < n:
            while len(running) < slots and nxt < n:
                fd = None
                if claim == "file":
                    fd = os.open(os.path.join(base, "%02x" % (nxt % 256), "c%d.1" % nxt),
                                 os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    os.write(fd, LOCK % nxt)
                elif claim == "link":
                    os.link(journal, os.path.join(base, "%02x" % (nxt % 256), "k%d.1" % nxt))
                    os.write(jfd, LOCK % nxt)
                pid = os.posix_spawn(true, ["true"], env, file_actions=actions, setpgroup=0)
                running[pid] = (nxt, fd)
                nxt += 1
            while running:
                pid, _ = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                i, fd = running.pop(pid)
                if fd is not None:
                    os.write(fd, DONE % i)
                    os.close(fd)
                elif claim == "link":
                    os.write(jfd, DONE % i)
                done += 1
            if len(running) >= slots or nxt >= n:
                select.select([r], [], [], 0.25)
                try:
                    while os.read(r, 4096):
                        pass
                except BlockingIOError:
                    pass
    finally:
        signal.set_wakeup_fd(old)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.close(r)
        os.close(w)
        os.close(jfd)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=6000)
    ap.add_argument("--dir", default=None, help="where to create files (default: a temporary directory)")
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    base = tempfile.mkdtemp(prefix="pf-claim-", dir=a.dir)
    try:
        os.mkdir(os.path.join(base, "ops"))
        ops = fs_ops(os.path.join(base, "ops"), a.tasks)
        os.mkdir(os.path.join(base, "loop"))
        for i in range(256):
            os.mkdir(os.path.join(base, "loop", "%02x" % i))
        rates: dict[str, list[float]] = {"xargs": [], "spawn": [], "spawn+claim": [], "spawn+link": []}
        for _ in range(3):  # interleaved
            t = time.perf_counter()
            subprocess.run(f"seq {a.tasks} | xargs -P {cores} -n1 sh -c true", shell=True, check=True)
            rates["xargs"].append(a.tasks / (time.perf_counter() - t))
            for kind, claim in (("spawn", None), ("spawn+claim", "file"), ("spawn+link", "link")):
                shutil.rmtree(os.path.join(base, "loop"))
                os.mkdir(os.path.join(base, "loop"))
                for i in range(256):
                    os.mkdir(os.path.join(base, "loop", "%02x" % i))
                rates[kind].append(spawn_loop(os.path.join(base, "loop"), a.tasks, cores, claim))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"filesystem of {a.dir or tempfile.gettempdir()}, {a.tasks} files, per file (wall / CPU):")
    for k, (wall, cpu) in ops.items():
        print(f"  {k:<8} {wall:7.1f} us / {cpu:7.1f} us")
    med = {k: sorted(v)[1] for k, v in rates.items()}
    print(f"{a.tasks} null tasks, {cores} cores, median of 3 interleaved runs (tasks/s):")
    for k, v in med.items():
        print(f"  {k:<12} {v:7.0f}  ({v / med['xargs']:.2f} of xargs)   runs: {', '.join(f'{x:.0f}' for x in rates[k])}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
