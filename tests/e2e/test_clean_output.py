"""Machine-readable output is exactly that, whatever the solver or a library prints
(issue: it works on a fresh machine — highspy 1.16 printed a banner into `plan --json`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

from tests.conftest import ROOT, cli, write_bundle

SOLVERS = ["highs", "cbc"]

# A resource with a walltime limit, so planning goes through the MILP (the local default does not).
BUNDLE = """
    [bundle]
    name = "quiet"
    [[resource]]
    name = "here"
    scheduler = "local"
    cores_per_node = 2
    max_walltime = "10m"
    [[task]]
    name = "t-{i}"
    command = "true"
    matrix = { i = "1..40" }
    walltime = "1m"
"""


def _noise_free(text: str) -> None:
    for word in ("HiGHS", "Copyright", "THIRD_PARTY", "CBC", "Welcome", "NOISE"):
        assert word not in text, text


@pytest.mark.parametrize("solver", SOLVERS)
def test_plan_json_is_pure_json_with_each_solver(work, solver):
    write_bundle(work, BUNDLE)
    p = cli("plan", "jobs.toml", "--json", cwd=work, env={"PILOTFLOW_SOLVER": solver}, check=0)
    plan = json.loads(p.stdout)
    assert plan["tasks"] == 40 and plan["resources"][0]["pilots"]
    _noise_free(p.stdout)
    _noise_free(p.stderr)
    human = cli("plan", "jobs.toml", cwd=work, env={"PILOTFLOW_SOLVER": solver}, check=0)
    assert ("HiGHS" if solver == "highs" else "CBC") in human.stdout  # the plan says which solver


@pytest.mark.parametrize("solver", SOLVERS)
def test_submit_prints_exactly_the_run_id_with_each_solver(work, solver):
    write_bundle(work, BUNDLE)
    p = cli("submit", "jobs.toml", "--wait", cwd=work, env={"PILOTFLOW_SOLVER": solver}, check=0)
    lines = p.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("quiet-"), p.stdout
    assert (work / ".pilotflow" / "runs" / lines[0]).is_dir()
    _noise_free(p.stderr)
    st = cli("status", lines[0], "--json", cwd=work, check=0)
    assert json.loads(st.stdout)["counts"]["done"] == 40


# Injected fault: the solver writes to descriptors 1 and 2 directly, once unbuffered and once
# through C stdio's buffer (which would otherwise reach stdout at exit, after any restore).
_NOISY = r"""
import ctypes, os, sys, pulp
real = pulp.LpProblem.solve
def noisy(self, *a, **k):
    os.write(1, b"NOISE on fd 1\n"); os.write(2, b"NOISE on fd 2\n")
    ctypes.CDLL(None).printf(b"NOISE in a C stdio buffer")
    return real(self, *a, **k)
pulp.LpProblem.solve = noisy
from pilotflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_library_printing_during_planning_never_reaches_stdout(work, solver):
    write_bundle(work, BUNDLE)
    for args in (["plan", "jobs.toml", "--json"], ["submit", "jobs.toml"]):
        p = subprocess.run([sys.executable, "-c", _NOISY, *args], cwd=work, capture_output=True, text=True,
                           env={**os.environ, "PILOTFLOW_SOLVER": solver}, timeout=120)
        assert p.returncode == 0, p.stderr
        _noise_free(p.stdout)
        _noise_free(p.stderr)
        if args[0] == "plan":
            json.loads(p.stdout)
        else:
            assert len(p.stdout.splitlines()) == 1
    # and with --debug the swallowed output is there for whoever looks
    p = subprocess.run([sys.executable, "-c", _NOISY + "\n", "--debug", "plan", "jobs.toml", "--json"], cwd=work,
                       capture_output=True, text=True, env={**os.environ, "PILOTFLOW_SOLVER": solver}, timeout=120)
    json.loads(p.stdout)
    assert "NOISE on fd 1" in p.stderr and "solver output" in p.stderr


_STRAY = r"""
import os, sys
from pilotflow.cli import own_stdout
with own_stdout():
    os.write(1, b"stray bytes from a library\n")
    print("our own line")
print("after the command")
"""


def test_stray_writes_to_descriptor_1_go_to_stderr_not_stdout():
    p = subprocess.run([sys.executable, "-c", _STRAY], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.stdout == "our own line\nafter the command\n"
    assert "stray bytes from a library" in p.stderr


def test_quiet_stdio_restores_the_descriptors_when_the_solve_raises(capfd):
    from pilotflow.planning.solver import quiet_stdio
    with pytest.raises(RuntimeError):
        with quiet_stdio():
            os.write(1, b"swallowed\n")
            raise RuntimeError("solver crashed")
    os.write(1, b"visible\n")
    out, err = capfd.readouterr()
    assert out == "visible\n" and "swallowed" not in err


@pytest.mark.parametrize("solver", SOLVERS)
def test_planning_raises_no_deprecation_warning(work, monkeypatch, solver):
    from pilotflow.bundle import load_bundle
    from pilotflow.planning.plan import make_plan
    monkeypatch.setenv("PILOTFLOW_SOLVER", solver)
    bundle = load_bundle(write_bundle(work, BUNDLE))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = make_plan(bundle)
    assert plan.solver == ("HiGHS" if solver == "highs" else "CBC")
    assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning,
                                                               FutureWarning))], [str(w.message) for w in caught]


def test_an_unknown_solver_choice_is_a_clear_error(work):
    write_bundle(work, BUNDLE)
    p = cli("plan", "jobs.toml", cwd=work, env={"PILOTFLOW_SOLVER": "gurobi"}, check=2)
    assert "PILOTFLOW_SOLVER='gurobi'" in p.stderr and "highs or cbc" in p.stderr and not p.stdout
