"""Stress (marked slow; the test command runs it): many tokens, many launchers, random failures,
and memory that does not grow with the number of tokens done."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pilotflow.launcher import Pool
from tests.e2e.test_launcher import LAUNCHER

pytestmark = pytest.mark.slow


def _pool(root: Path, n: int, command: str, retries: int = 0) -> Pool:
    pool = Pool.create(str(root), {"run": "stress", "lock_timeout": 300})
    pool.add_defs([{"name": f"t{i:06d}", "command": command, "rank": i, "retries": retries} for i in range(n)])
    return pool


def _launch(root: Path, pilot: str, cores: int = 1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(LAUNCHER), "run", str(root), "--pilot", pilot, "--cores", str(cores),
                             "--poll", "0.2", "--steal-delay", "0.2"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_50000_tokens_through_8_launchers_exactly_once(tmp_path):
    n = 50_000
    # every execution appends one line (its token) to a per-launcher file: O_APPEND lines of
    # this size are atomic, and the file per launcher avoids contention
    pool = _pool(tmp_path, n, 'echo "$PILOTFLOW_TOKEN" >> "rec.$PILOTFLOW_PILOT"')
    names = [f"t{i:06d}" for i in range(n)]
    for k in range(4):  # four planned pilots, four that only steal
        pool.write_plan(f"p{k + 1}", names[k::4])
    t = time.time()
    procs = [_launch(tmp_path, f"p{k}") for k in range(1, 9)]
    for p in procs:
        assert p.wait(900) == 0, p.stderr.read()
    elapsed = time.time() - t
    runs = Counter()
    for f in (tmp_path / "work").glob("rec.*"):
        runs.update(f.read_text().split())
    assert len(runs) == n and set(runs.values()) == {1}, "a token was lost or ran twice"
    states = pool.states()
    assert Counter(d["state"] for d in states.values()) == {"done": n}
    print(f"50,000 tokens, 8 launchers: {elapsed:.1f} s ({n / elapsed:.0f} tokens/s)")


def test_2000_tokens_with_20_percent_random_failures_all_retried(tmp_path):
    n = 2000
    # each attempt fails with probability 1/5 (one random byte below 51); 12 retries make a
    # token that never succeeds vanishingly unlikely (0.2^13)
    fail = 'b=$(od -An -N1 -tu1 /dev/urandom); if [ $b -lt 51 ]; then echo "unlucky $b" >&2; exit 9; fi'
    pool = _pool(tmp_path, n, fail, retries=12)
    procs = [_launch(tmp_path, f"p{k}", 1) for k in range(1, 5)]
    for p in procs:
        assert p.wait(600) == 0, p.stderr.read()
    states = pool.states()
    assert Counter(d["state"] for d in states.values()) == {"done": n}
    attempts = Counter(d["attempt"] for d in states.values())
    retried = sum(v for k, v in attempts.items() if k > 1)
    assert 250 < retried < 550, attempts  # about 20 % needed a second try, the rest once
    assert all(d["failures"] == d["attempt"] - 1 for d in states.values())


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_launcher_memory_stays_flat_while_tokens_finish(tmp_path):
    """Memory sampled when 10 % and when 95 % of 20,000 tokens are done: nothing accumulates
    per finished token (the definitions of all tokens are loaded once, at the start)."""
    n = 20000
    pool = _pool(tmp_path, n, "true")
    pool.write_plan("p1", [f"t{i:06d}" for i in range(n)])
    p = _launch(tmp_path, "p1", 2)
    samples = {}
    state = tmp_path / "state"
    while p.poll() is None:
        done = sum(len(os.listdir(d)) for d in state.iterdir()) if state.exists() else 0
        for mark in (0.10, 0.95):
            if mark not in samples and done >= mark * n:
                samples[mark] = _rss_mb(p.pid)
        time.sleep(0.05)
    assert p.returncode == 0
    assert set(samples) == {0.10, 0.95}, samples
    assert samples[0.95] - samples[0.10] < 3.0, samples  # MB, for 17,000 more tokens done
    print(f"launcher RSS: {samples[0.10]:.1f} MB at 10 % done, {samples[0.95]:.1f} MB at 95 % done")


def _peak_rss_mb(argv: list[str], cwd: Path | None = None) -> float:
    p = subprocess.run(["/usr/bin/time", "-f", "%M", *argv], cwd=cwd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return int(p.stderr.strip().splitlines()[-1]) / 1024


def test_status_memory_per_token_done_is_small(tmp_path):
    """`pilotflow status` of runs with 2,000 and 12,000 tokens done (10,000 tokens apart: RSS
    noise of a megabyte is 0.1 kB per token, the budget 0.6)."""
    from tests.conftest import write_bundle, cli
    peaks = {}
    for n in (2000, 12000):
        d = tmp_path / f"n{n}"
        d.mkdir()
        write_bundle(d, f'[bundle]\nname = "m"\n[[task]]\nname = "t{{i}}"\ncommand = "true"\nwalltime = "1s"\n'
                        f'matrix = {{ i = "1..{n}" }}\n')
        cli("submit", "jobs.toml", "--wait", cwd=d, check=0, timeout=300)
        peaks[n] = _peak_rss_mb([sys.executable, "-m", "pilotflow", "status"], cwd=d)
    per_token_kb = (peaks[12000] - peaks[2000]) * 1024 / 10000
    print(f"status peak RSS: {peaks[2000]:.1f} MB with 2,000 tokens done, {peaks[12000]:.1f} MB with 12,000 "
          f"({per_token_kb:.2f} kB per token)")
    assert per_token_kb < 0.6, peaks  # the compact mirror: ~0.35 kB per token measured
