"""Multi-node MPI tasks inside pilots, on the real local Slurm (3 simulated nodes) and on the
real Grid Engine (one host: the ranks share it)."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli, status_json

needs_mpi = pytest.mark.skipif(not shutil.which("mpicc"), reason="Open MPI (mpicc) is not installed")


def copy_example(work: Path) -> None:
    for f in ("reduce.c", "mpi-slurm.toml", "mpi-local.toml"):
        shutil.copy(ROOT / "workflows" / "mpi" / f, work / f)


def rank_records(work: Path):
    ranks, singles = defaultdict(list), []
    for f in next((work / ".pilotflow").glob("mpi*/work/rec")).iterdir():
        parts = f.read_text().split()
        if f.name.endswith(".single"):
            singles.append((parts[0], int(parts[1]), int(parts[2])))
        else:
            rank, size, node, start, end = parts
            ranks[f.name.rsplit(".", 1)[0]].append((int(rank), int(size), node, int(start), int(end)))
    return ranks, singles


@needs_mpi
@pytest.mark.slurm
def test_two_node_mpi_tasks_and_single_core_tasks_share_one_pilot(work, slurm_cluster):
    copy_example(work)
    env = slurm_cluster.env
    cli("submit", "mpi-slurm.toml", "--wait", cwd=work, env=env, check=0, timeout=240)
    st = status_json(work, env=env)
    assert st["counts"]["done"] == 25 and len(st["pilots"]) == 1
    logs = cli("logs", "reduce-1", cwd=work, env=env, check=0).stdout
    assert "4 ranks, sum of ranks 6 (expected 6)" in logs
    ranks, singles = rank_records(work)
    assert len(ranks) == 4 and all(len(r) == 4 for r in ranks.values())
    for token, rs in ranks.items():
        nodes = {node for _, _, node, _, _ in rs}
        assert len(nodes) == 2, (token, nodes)  # really on two different nodes
    # no node double-booked: a gang holds its nodes whole, so on each node no single-core
    # task and no other gang may overlap its span
    spans = defaultdict(list)  # node → (start, end, what)
    for token, rs in ranks.items():
        per_node = defaultdict(list)
        for _, _, node, s, e in rs:
            per_node[node].append((s, e))
        for node, iv in per_node.items():
            spans[node].append((min(s for s, _ in iv), max(e for _, e in iv), token))
    for node, s, e in singles:
        spans[node].append((s, e, "single"))
    for node, iv in spans.items():
        gangs = [x for x in iv if x[2] != "single"]
        for g in gangs:
            for other in iv:
                if other is g:
                    continue
                assert other[1] <= g[0] or other[0] >= g[1], f"{node}: {g} overlaps {other}"


@needs_mpi
@pytest.mark.sge
def test_mpi_on_grid_engine_ranks_on_one_host(work, sge_cluster):
    copy_example(work)
    text = (work / "mpi-local.toml").read_text().replace('name = "mpi-local"', 'name = "mpi-sge"\n\n[[resource]]\n'
                                                          'name = "grid"\nscheduler = "sge"\ncores_per_node = 4\n'
                                                          'max_walltime = "10m"\npe = "smp"')
    (work / "mpi-sge.toml").write_text(text)
    cli("submit", "mpi-sge.toml", "--wait", cwd=work, env=sge_cluster.env, check=0, timeout=240)
    st = status_json(work, env=sge_cluster.env)
    assert st["counts"]["done"] == 7
    logs = cli("logs", "reduce-2", cwd=work, env=sge_cluster.env, check=0).stdout
    assert "2 ranks, sum of ranks 1 (expected 1)" in logs


@needs_mpi
def test_mpi_on_this_machine(work):
    copy_example(work)
    cli("submit", "mpi-local.toml", "--wait", cwd=work, check=0, timeout=300)
    assert "2 ranks, sum of ranks 1" in cli("logs", "reduce-1", cwd=work, check=0).stdout


def test_requests_no_resource_can_hold_are_bundle_errors(work):
    (work / "b.toml").write_text("""
[bundle]
name = "big"
[[resource]]
name = "c"
scheduler = "slurm"
cores_per_node = 4
max_nodes = 2
[[task]]
name = "too-many-nodes"
command = "x"
nodes = 3
mpi = true
[[task]]
name = "too-many-ranks"
command = "x"
mpi = true
cores = 12
""")
    p = cli("plan", "b.toml", cwd=work, check=2)
    assert "task 'too-many-nodes': needs 3 nodes but the most a pilot may have is 2 (c)" in p.stderr
    assert "task 'too-many-ranks': needs 3 nodes but the most a pilot may have is 2 (c)" in p.stderr


MPI_ENV = '{ OMPI_ALLOW_RUN_AS_ROOT = "1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM = "1", OMPI_MCA_btl = "self,tcp" }'


SLURM_RESOURCE = """
[[resource]]
name = "cluster"
scheduler = "slurm"
cores_per_node = 4
max_nodes = 3
max_walltime = "5m"
partition = "debug"
"""


@pytest.mark.slurm
def test_ranks_start_the_sites_way_by_default(work, slurm_cluster):
    # srun with no --mpi (the site's MpiDefault): the ranks are srun's tasks, on two nodes
    ranks = 'mkdir -p rec; echo "$SLURM_PROCID $SLURM_NTASKS $SLURMD_NODENAME" > rec/$PILOTFLOW_TOKEN.$SLURM_PROCID'
    (work / "jobs.toml").write_text(f"""
[bundle]
name = "ranks"
{SLURM_RESOURCE}
[[task]]
name = "spread"
command = '{ranks}'
nodes = 2
mpi = true
ranks_per_node = 2
walltime = "10s"
""")
    cli("plan", "jobs.toml", "--scripts", "s", cwd=work, env=slurm_cluster.env, check=0)
    assert "--mpi" not in next((work / "s").glob("*.sh")).read_text().split("--mpi srun")[1].split("\n")[0]
    cli("submit", "jobs.toml", "--wait", cwd=work, env=slurm_cluster.env, check=0, timeout=240)
    rec = next((work / ".pilotflow").glob("ranks*/work/rec"))
    seen = [f.read_text().split() for f in rec.glob("spread.*")]
    assert sorted(int(r[0]) for r in seen) == [0, 1, 2, 3] and {r[1] for r in seen} == {"4"}
    assert len({r[2] for r in seen}) == 2  # on two nodes


@needs_mpi
@pytest.mark.slurm
def test_an_mpi_program_starts_through_the_plugin_the_resource_names(work, slurm_cluster):
    # one node: PMIx cannot span this test cluster's simulated nodes (they share one host)
    shutil.copy(ROOT / "workflows" / "mpi" / "reduce.c", work / "reduce.c")
    (work / "jobs.toml").write_text(f"""
[bundle]
name = "plugin"
{SLURM_RESOURCE}
mpi_plugin = "pmix"
[defaults]
env = {{ OMPI_ALLOW_RUN_AS_ROOT = "1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM = "1", OMPI_MCA_btl = "self,tcp" }}
[[task]]
name = "build"
command = "mpicc -O2 -o reduce reduce.c"
inputs = ["reduce.c"]
walltime = "30s"
[[task]]
name = "reduce-one-node"
command = "mkdir -p rec && ./reduce rec"
mpi = true
cores = 2
walltime = "10s"
after = ["build"]
""")
    cli("submit", "jobs.toml", "--wait", cwd=work, env=slurm_cluster.env, check=0, timeout=240)
    logs = cli("logs", "reduce-one-node", cwd=work, env=slurm_cluster.env, check=0).stdout
    assert "2 ranks, sum of ranks 1 (expected 1)" in logs
