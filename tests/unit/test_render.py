"""Rendered batch scripts: golden files per scheduler, shell syntax, the embedded launcher.

Golden files live in tests/data/golden/. If a change to a script is intended, regenerate them:
    PILOTFLOW_REGEN_GOLDEN=1 python -m pytest tests/unit/test_render.py
and review the diff.
"""

import os
import time
import subprocess
from pathlib import Path

import pytest

from pilotflow.bundle import Resource
from pilotflow.planning.plan import PilotPlan
from pilotflow.launcher_text import launcher_hash, launcher_source
from pilotflow.render import render_pilot

GOLDEN = Path(__file__).parent.parent / "data" / "golden"
RUN = "demo-20261122-101500-3f2a"
POOL = "/scratch/alice/my runs/" + RUN  # a space: the shell part must quote it


def resource(scheduler: str) -> Resource:
    return Resource(name="cluster", scheduler=scheduler, cores_per_node=16, max_nodes=4, max_walltime_s=86400,
                    partition="thin" if scheduler != "local" else None,
                    account="proj123" if scheduler != "local" else None,
                    qos="normal" if scheduler == "slurm" else None, memory_per_node_mb=64000 if scheduler == "pbs" else None,
                    directives=("--constraint=rome",) if scheduler == "slurm" else (),
                    setup=("module load 2023", ". ~/venv/bin/activate", "echo \"it's $HOME\""))


def pilot() -> PilotPlan:
    return PilotPlan(id="p3", resource="cluster", nodes=2, cores_per_node=16, walltime_s=1800, makespan_s=1700,
                     tasks=[0, 1], busy_core_s=1000)


def stable(script: str) -> str:
    """The script with the embedded launcher replaced by one line (it has its own test)."""
    start = script.index("<<'PILOTFLOW_LAUNCHER_")
    body_start = script.index("\n", start) + 1
    end = script.index("PILOTFLOW_LAUNCHER_", body_start)
    return script[:body_start] + "<launcher.py embedded here>\n" + script[end:].replace(launcher_hash(), "HASH") \
        .replace(launcher_hash(), "HASH")


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs"])
def test_gpu_pilots_match_golden_files(scheduler):
    from dataclasses import replace
    res = replace(resource(scheduler), gpus_per_node=4, mpi_plugin="pmi2" if scheduler == "slurm" else None)
    p = replace(pilot(), gpus_per_node=4)
    text = stable(render_pilot(p, res, RUN, POOL)).replace(launcher_hash(), "HASH")
    path = GOLDEN / f"{scheduler}-gpu.sh"
    if os.environ.get("PILOTFLOW_REGEN_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), (f"{path} differs from the rendered script; if intended, regenerate with "
                                      "PILOTFLOW_REGEN_GOLDEN=1 python -m pytest tests/unit/test_render.py")
    assert "--gpus 4" in text


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs", "local"])
def test_scripts_match_golden_files(scheduler):
    res = resource(scheduler)
    p = pilot()
    if scheduler == "local":
        p = PilotPlan(id="p3", resource="cluster", nodes=1, cores_per_node=16, walltime_s=1800, makespan_s=1700,
                      tasks=[0], busy_core_s=1)
    text = stable(render_pilot(p, res, RUN, POOL)).replace(launcher_hash(), "HASH")
    path = GOLDEN / f"{scheduler}.sh"
    if os.environ.get("PILOTFLOW_REGEN_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), (f"{path} differs from the rendered script; if intended, regenerate with "
                                      "PILOTFLOW_REGEN_GOLDEN=1 python -m pytest tests/unit/test_render.py")


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs", "local"])
def test_scripts_are_valid_shell_and_carry_the_launcher_verbatim(scheduler, tmp_path):
    script = render_pilot(pilot(), resource(scheduler), RUN, POOL)
    f = tmp_path / "s.sh"
    f.write_text(script)
    assert subprocess.run(["sh", "-n", str(f)]).returncode == 0
    tag = f"PILOTFLOW_LAUNCHER_{launcher_hash()}"
    body = script.split(f"<<'{tag}'")[1].split("\n", 1)[1].split(f"\n{tag}\n")[0] + "\n"
    assert body == launcher_source()


def test_the_script_writes_the_launcher_into_the_pool(tmp_path):
    """Run the script's own first lines (up to the setup) against a real directory."""
    pool = tmp_path / "pool with space"
    script = render_pilot(pilot(), resource("slurm"), RUN, str(pool))
    head = script.split("# setup (from the bundle")[0]
    (tmp_path / "head.sh").write_text(head + 'cat "$LAUNCHER"')  # larger than one argument may be
    r = subprocess.run(["sh", str(tmp_path / "head.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == launcher_source()
    assert (pool / f".launcher-{launcher_hash()}.py").read_text() == launcher_source()


def test_slurm_directives_in_order():
    script = render_pilot(pilot(), resource("slurm"), RUN, POOL)
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=pf-p3-demo-20261122-101500-3f2a", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=16", "#SBATCH --time=00:30:00", "#SBATCH --output=p3.%j.out",
        "#SBATCH --partition=thin", "#SBATCH --account=proj123",
        "#SBATCH --qos=normal", "#SBATCH --constraint=rome"]
    assert "POOL='/scratch/alice/my runs/demo-20261122-101500-3f2a'" in script


def test_home_relative_pool_is_left_to_the_remote_shell():
    script = render_pilot(pilot(), resource("slurm"), RUN, "~/.pilotflow/" + RUN)
    assert f'POOL="$HOME"/.pilotflow/{RUN}' in script


@pytest.mark.parametrize("scheduler", ["slurm", "sge", "pbs", "local"])
def test_the_follow_up_script_takes_its_identity_from_the_environment(scheduler, tmp_path):
    import subprocess
    from pilotflow.render import RENEW_VARS, render_renewal
    res = Resource(name="c", scheduler=scheduler, cores_per_node=4, max_nodes=2, max_walltime_s=600)
    script = render_renewal(res, RUN, POOL)
    assert "PILOT=\"$PILOTFLOW_RENEW_PILOT\"" in script
    # the lines that use them run in dash as they will on a node
    lines = [ln for ln in script.splitlines() if ln.startswith(("DEADLINE=", "PILOT=")) or "-gt 1 ]" in ln]
    probe = "\n".join(ln.replace("; then", "; then :; fi") for ln in lines) + '\necho "$PILOT ${DEADLINE:-none}"\n'
    env = {**dict(zip(RENEW_VARS, ("r2p1", "90", "2"))), "PATH": "/usr/bin:/bin"}
    p = subprocess.run(["/bin/sh", "-c", probe], env=env, capture_output=True, text=True)
    assert p.returncode == 0 and not p.stderr, p.stderr
    pilot, deadline = p.stdout.split()
    assert pilot == "r2p1" and (deadline == "none" if scheduler == "local" else abs(int(deadline) - time.time() - 90) < 5)


@pytest.mark.parametrize("scheduler", ["local", "slurm", "sge", "pbs"])
def test_launchers_per_node_reaches_every_launch_line_and_follow_ups(scheduler):
    from dataclasses import replace
    from pilotflow.render import render_renewal
    res = replace(resource(scheduler), launchers_per_node=4)
    for text in (render_pilot(pilot(), res, RUN, POOL), render_renewal(res, RUN, POOL)):
        runs = [ln for ln in text.splitlines() if '"$LAUNCHER" run' in ln]
        assert runs and all(ln.rstrip(" &").endswith("--launchers 4") for ln in runs), runs
    assert "--launchers" not in render_pilot(pilot(), resource(scheduler), RUN, POOL).split("PILOTFLOW_LAUNCHER_")[0]


def test_cached_bytecode_is_used_only_while_it_is_that_of_its_source(tmp_path):
    import py_compile
    import time as _time
    from pilotflow.launcher_text import bytecode_for
    src = tmp_path / "mod.py"
    src.write_text("X = 1\n")
    assert bytecode_for(src) is None  # nothing cached
    py_compile.compile(str(src), doraise=True)
    code = bytecode_for(src)
    assert code is not None and code[:4] == __import__("importlib.util").util.MAGIC_NUMBER
    src.write_text("X = 22\n")  # changed since: its size (and mtime) differ
    assert bytecode_for(src) is None
    py_compile.compile(str(src), doraise=True, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    assert bytecode_for(src) is not None
    src.write_text("X = 33\n")  # same size, other content: the hash says so
    os.utime(src, (_time.time() + 10, _time.time() + 10))
    assert bytecode_for(src) is None
