"""GPU tasks: every task gets its own device indices for its whole run, on this machine and on
the local Slurm with count-only GPU GRES on its simulated nodes (no device files needed)."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli, status_json, write_bundle

# each run records: node, the indices it got (PILOTFLOW_GPUS and CUDA_VISIBLE_DEVICES), start, end
RECORD = ('mkdir -p rec; s=$(date +%s%N); sleep {sleep}; echo "${{SLURMD_NODENAME:-here}}|$PILOTFLOW_GPUS|'
          '$CUDA_VISIBLE_DEVICES|$ROCR_VISIBLE_DEVICES|$ZE_AFFINITY_MASK|$s|$(date +%s%N)" '
          '> rec/$PILOTFLOW_TOKEN.$PILOTFLOW_ATTEMPT')


def gpu_tasks(one: int, two: int, cpu: int) -> str:
    return f"""
[[task]]
name = "one-{{i}}"
command = '{RECORD.format(sleep=1)}'
matrix = {{ i = "1..{one}" }}
gpus = 1
walltime = "2s"
[[task]]
name = "two-{{i}}"
command = '{RECORD.format(sleep=2)}'
matrix = {{ i = "1..{two}" }}
gpus = 2
walltime = "3s"
[[task]]
name = "cpu-{{i}}"
command = '{RECORD.format(sleep=1)}'
matrix = {{ i = "1..{cpu}" }}
walltime = "2s"
"""


def check_records(work: Path, gpus_per_node: int, expected: int) -> dict[str, set[str]]:
    rec = next((work / ".pilotflow").glob("*/work/rec"))
    runs = []
    for f in rec.iterdir():
        node, pf, cuda, rocr, ze, start, end = f.read_text().strip().split("|")
        token = f.name.rsplit(".", 1)[0]
        ids = [x for x in pf.split(",") if x]
        assert cuda == rocr == ze == pf, (token, pf, cuda, rocr, ze)  # every vendor sees the same devices
        want = 1 if token.startswith("one-") else 2 if token.startswith("two-") else 0
        assert len(ids) == len(set(ids)) == want, (token, ids)
        assert all(0 <= int(x) < gpus_per_node for x in ids)
        runs.append((token, node, set(ids), int(start), int(end)))
    assert len({r[0] for r in runs}) == expected
    for a, b in itertools.combinations(runs, 2):
        if a[1] == b[1] and a[3] < b[4] and b[3] < a[4]:  # same node, overlapping in time
            assert not (a[2] & b[2]), f"{a[0]} and {b[0]} shared GPU {a[2] & b[2]} at the same time"
    used: dict[str, set[str]] = {}
    for _, node, ids, _, _ in runs:
        used.setdefault(node, set()).update(ids)
    return used


def test_gpu_tasks_on_this_machine_never_share_a_device(work):
    write_bundle(work, f"""
[bundle]
name = "gpus"
[[resource]]
name = "here"
scheduler = "local"
cores_per_node = 8
gpus_per_node = 4
{gpu_tasks(one=12, two=4, cpu=6)}
""")
    cli("submit", "jobs.toml", "--wait", cwd=work, check=0, timeout=120)
    used = check_records(work, 4, 22)
    assert used["here"] == {"0", "1", "2", "3"}  # the four were all used, concurrently
    rec = next((work / ".pilotflow").glob("*/work/rec"))
    starts = sorted(int(f.read_text().split("|")[5]) for f in rec.glob("one-*"))
    assert starts[3] - starts[0] < 0.8e9  # 4 one-GPU tasks started together, not one by one
    cli("report", "-o", "report.html", cwd=work, check=0)
    page = (work / "report.html").read_text()
    assert 'id="gpu-hours"' in page and "GPU-hours busy / allocated" in page


def test_the_gpu_example_runs_without_gpus(work):
    shutil.copytree(ROOT / "workflows" / "gpu", work / "gpu")
    cli("submit", "gpu/gpu.toml", "--wait", cwd=work, check=0, timeout=120)
    assert "uses GPUs " in cli("logs", "big-1", cwd=work, check=0).stdout
    post = cli("logs", "post-1", cwd=work, check=0).stdout
    assert 'CUDA_VISIBLE_DEVICES="")' in post


@pytest.mark.slurm
def test_gpu_tasks_in_a_multi_node_slurm_pilot_with_gres(work, slurm_cluster):
    env = dict(slurm_cluster.env)
    write_bundle(work, f"""
[bundle]
name = "gpus"
optimize = "makespan"
[[resource]]
name = "cluster"
scheduler = "slurm"
cores_per_node = 4
gpus_per_node = 4
max_nodes = 3
max_walltime = "10m"
partition = "debug"
{gpu_tasks(one=18, two=6, cpu=6)}
""")
    cli("plan", "jobs.toml", "--scripts", "scripts", cwd=work, env=env, check=0)
    script = next((work / "scripts").glob("*.sh")).read_text()
    assert "#SBATCH --gres=gpu:4" in script
    cli("submit", "jobs.toml", "--wait", cwd=work, env=env, check=0, timeout=240)
    st = status_json(work, env=env)
    assert st["counts"]["done"] == 30
    used = check_records(work, 4, 30)
    assert len(used) >= 2  # the pilot's nodes each handed out their own four
