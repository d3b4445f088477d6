"""Pure pieces of the Snakemake executor: the format fields a shell command uses, the strict-mode
prefix, the shell a node runs, runtime estimates for guessed tokens, and idle-time accounting."""

from __future__ import annotations

import shutil

from pilotflow.bundle import Task
from pilotflow.report.page import Attempt, Row
from pilotflow.run.control import pilot_idle
from pilotflow.snakemake.direct import fields, portable_shell, process_prefix
from pilotflow.snakemake.estimates import Runtimes


def test_fields_name_the_resources_a_command_uses():
    assert fields("echo {resources.mem_mb} {resources[tmpdir]} {resources} {input:q} {{x}} {wildcards.a}") == [
        ("resources", "mem_mb"), ("resources", "tmpdir"), ("resources", None), ("input", None), ("wildcards", "a")]
    assert fields("awk '{{print $1}}' {input}") == [("input", None)]
    assert fields("unbalanced {") == []  # Snakemake's own formatting reports it


class _Shell:
    _process_prefix = None


def test_prefix_is_snakemakes_strict_mode_for_bash_only():
    assert process_prefix(_Shell, "/usr/bin/bash") == "set -euo pipefail; "
    assert process_prefix(_Shell, "/bin/sh") == ""
    custom = type("S", (), {"_process_prefix": "set -e; "})
    assert process_prefix(custom, "/usr/bin/bash") == "set -e; "


def test_the_default_bash_is_found_on_the_node_a_chosen_shell_by_its_path():
    bash = shutil.which("bash")
    assert portable_shell(bash) == "bash"
    assert portable_shell("/opt/zsh/bin/zsh") == "/opt/zsh/bin/zsh"
    assert portable_shell(None) is None


def test_guessed_runtimes_are_estimated_from_similar_finished_tokens():
    rt = Runtimes()
    guessed, given = Task("b-1", "x", walltime_s=600), Task("c-1", "x", walltime_s=600)
    rt.add(guessed, "b", True)
    rt.add(given, "c", False)
    assert rt.estimate(guessed) is guessed  # nothing observed yet: the guess stands
    rt.add(Task("a-1", "x", walltime_s=60), "a", False)
    done = {"a-1": {"state": "done", "start": 100.0, "end": 103.0}}
    rt.observe(["a-1"], lambda n: done[n]["state"], done.__getitem__)
    assert rt.estimate(guessed).walltime_s == 16  # the run's longest (no "b" yet): 2 × 3 s + 10 s
    assert rt.estimate(given) is given  # the user's own estimate is never changed
    rt.add(Task("b-0", "x", walltime_s=600), "b", True)
    done["b-0"] = {"state": "done", "start": 0.0, "end": 400.0}
    rt.observe(["b-0"], lambda n: done[n]["state"], done.__getitem__)
    assert rt.estimate(guessed).walltime_s == 600  # its own rule's runtime, at most the guess
    assert rt.guess("b-1") == 600 and rt.guess("c-1") == 0
    # a guessed token handed back after an attempt: its kind is estimated with the full guess
    rt.add(Task("d-0", "x", walltime_s=600), "d", True)
    rt.add(Task("d-1", "x", walltime_s=600), "d", True)
    done["d-0"] = {"state": "done", "start": 0.0, "end": 1.0}
    rt.observe(["d-0"], lambda n: done[n]["state"], done.__getitem__)
    assert rt.estimate(Task("d-1", "x", walltime_s=600)).walltime_s == 12
    done["d-0"] = {"state": "todo", "attempt": 1}
    rt.observe(["d-0"], lambda n: done[n]["state"], done.__getitem__)
    assert rt.estimate(Task("d-1", "x", walltime_s=600)).walltime_s == 600
    assert rt.estimate(Task("b-1", "x", walltime_s=600)).walltime_s == 600  # other kinds keep theirs


def test_idle_time_of_a_launcher_is_its_life_without_a_running_attempt():
    def at(start, end):
        return Attempt("t", 1, "done", start, end, "p1", 0, "n", 1)
    row = Row("p1", 0, "n", start=0.0, end=100.0, attempts=[at(10, 30), at(20, 40), at(70, 80)])
    assert row.idle_s == 100 - 30 - 10
    assert Row("p1", 0, "n").idle_s is None
    agents = {"p1.0": {"pilot": "p1", "end": {"idle": 4.0}}, "p1.1": {"pilot": "p1", "end": {"idle": 1.5}},
              "p2.0": {"pilot": "p2", "end": {"idle": 2.0}}, "p2.1": {"pilot": "p2"}}
    assert pilot_idle(agents) == {"p1": 5.5, "p2": None}
