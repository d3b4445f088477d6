"""Bundle rules (SPEC §2) and the exact text of representative errors."""

import os
import textwrap

import pytest

from pilotflow.bundle import DEFAULT_BATCH_MAX_WALLTIME_S, load_bundle
from pilotflow.errors import BundleError


def write(tmp_path, text, name="jobs.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def errors(tmp_path, text):
    p = write(tmp_path, text)
    with pytest.raises(BundleError) as e:
        load_bundle(p)
    return [m.replace(str(p), "F") for m in e.value.problems]


def test_tasks_only_bundle_gets_the_local_resource(tmp_path):
    b = load_bundle(write(tmp_path, """
        [bundle]
        name = "hello"
        [[task]]
        name = "a"
        command = "echo hi"
    """))
    assert [r.name for r in b.resources] == ["local"]
    r = b.resources[0]
    assert (r.scheduler, r.cores_per_node, r.max_nodes, r.max_walltime_s) == ("local", os.cpu_count(), 1, None)
    t = b.tasks[0]
    assert (t.cores, t.walltime_s, t.retries, t.after) == (1, 600, 0, ())


def test_pilots_on_this_machine_run_the_interpreter_pilotflow_runs_on(tmp_path):
    """Not a python3 found on PATH (a shim here: pyenv's costs ~0.1 s a start; or another
    version); a resource that names its python, or one reached over SSH, keeps it."""
    import shlex
    import sys
    b = load_bundle(write(tmp_path, """
        [bundle]
        name = "py"
        [[resource]]
        name = "here"
        scheduler = "local"
        [[resource]]
        name = "named"
        scheduler = "local"
        python = "/opt/py/bin/python3"
        [[resource]]
        name = "there"
        scheduler = "local"
        host = "node7"
        [[resource]]
        name = "cluster"
        scheduler = "slurm"
        cores_per_node = 8
        [[task]]
        name = "a"
        command = "true"
        resource = "here"
    """))
    assert {r.name: r.python for r in b.resources} == {
        "here": shlex.quote(sys.executable), "named": "/opt/py/bin/python3", "there": "python3", "cluster": "python3"}
    implicit = load_bundle(write(tmp_path, '[bundle]\nname = "i"\n[[task]]\nname = "a"\ncommand = "true"\n', "i.toml"))
    assert implicit.resources[0].python == shlex.quote(sys.executable)


def test_defaults_apply_and_tasks_override(tmp_path):
    b = load_bundle(write(tmp_path, """
        [bundle]
        name = "d"
        lock_timeout = "2m"
        [defaults]
        cores = 1
        walltime = "5m"
        memory = "2G"
        retries = 2
        env = { OMP_NUM_THREADS = "1", N = 3 }
        [[task]]
        name = "a"
        command = "x"
        cores = 2
        [[task]]
        name = "b"
        command = "y"
        env = { X = "only" }
    """))
    a, bb = b.tasks
    assert b.lock_timeout_s == 120
    assert (a.cores, a.walltime_s, a.memory_mb, a.retries) == (2, 300, 2048, 2)
    assert a.env == (("OMP_NUM_THREADS", "1"), ("N", "3"))
    assert bb.cores == 1 and bb.env == (("X", "only"),)


def test_matrix_expansion_is_cartesian_in_written_order(tmp_path):
    b = load_bundle(write(tmp_path, """
        [bundle]
        name = "m"
        [[task]]
        name = "r-{i}-{depth}"
        command = "f -o out/{i}_{depth}.png -d {depth}"
        matrix = { i = "1..2", depth = [256, 512] }
        outputs = ["out/{i}_{depth}.png"]
        env = { D = "{depth}" }
    """))
    assert [t.name for t in b.tasks] == ["r-1-256", "r-1-512", "r-2-256", "r-2-512"]
    assert b.tasks[1].command == "f -o out/1_512.png -d 512"
    assert b.tasks[1].outputs == ("out/1_512.png",)
    assert b.tasks[1].env == (("D", "512"),)


def test_only_matrix_variables_are_placeholders(tmp_path):
    b = load_bundle(write(tmp_path, r"""
        [bundle]
        name = "p"
        [[task]]
        name = "t{i}"
        command = "awk '{print $1}' f | sed 's/{x}/{i}/' && echo ${HOME} {i}"
        matrix = { i = [7] }
    """))
    assert b.tasks[0].command == "awk '{print $1}' f | sed 's/{x}/7/' && echo ${HOME} 7"


def test_ranges_keep_zero_padding_and_allow_negatives(tmp_path):
    b = load_bundle(write(tmp_path, """
        [bundle]
        name = "z"
        [[task]]
        name = "a{i}"
        command = "x"
        matrix = { i = "08..10" }
        [[task]]
        name = "b{j}"
        command = "x"
        matrix = { j = "-1..0" }
    """))
    assert [t.name for t in b.tasks] == ["a08", "a09", "a10", "b-1", "b0"]


def test_tasks_from_is_one_token_per_command_line(tmp_path):
    (tmp_path / "quick.txt").write_text("# comment\necho 'this is token A'\n\n  awk '{print $1}' f  \n")
    b = load_bundle(write(tmp_path, """
        [bundle]
        name = "q"
        [[tasks_from]]
        file = "quick.txt"
        name = "quick-{n}"
        walltime = "10s"
    """))
    assert [(t.name, t.command, t.walltime_s) for t in b.tasks] == [
        ("quick-2", "echo 'this is token A'", 10), ("quick-4", "awk '{print $1}' f", 10)]


def test_tasks_from_default_name_uses_the_file_stem(tmp_path):
    (tmp_path / "list.txt").write_text("true\ntrue\n")
    b = load_bundle(write(tmp_path, """
        [bundle]
        name = "q"
        [[tasks_from]]
        file = "list.txt"
    """))
    assert [t.name for t in b.tasks] == ["list-1", "list-2"]


def test_after_resolves_names_and_globs_without_self(tmp_path):
    b = load_bundle(write(tmp_path, """
        [bundle]
        name = "a"
        [[task]]
        name = "prepare"
        command = "x"
        [[task]]
        name = "render-{i}"
        command = "x"
        matrix = { i = "1..3" }
        after = ["prepare"]
        [[task]]
        name = "render-all"
        command = "x"
        after = ["render-*", "prepare", "render-1"]
    """))
    by = {t.name: t for t in b.tasks}
    assert by["render-2"].after == ("prepare",)
    assert by["render-all"].after == ("render-1", "render-2", "render-3", "prepare")


def test_resources_defaults_and_aliases(tmp_path):
    b = load_bundle(write(tmp_path, """
        [bundle]
        name = "r"
        [[resource]]
        name = "grid"
        scheduler = "sge"
        cores_per_node = 8
        queue = "all.q"
        project = "p1"
        memory_per_node = "16G"
        directives = ["-l h_vmem=2G"]
        [[task]]
        name = "a"
        command = "x"
    """))
    r = b.resources[0]
    assert (r.partition, r.account, r.memory_per_node_mb) == ("all.q", "p1", 16384)
    assert r.max_walltime_s == DEFAULT_BATCH_MAX_WALLTIME_S and r.walltime_margin == 0.05


def test_every_error_at_once_with_lines(tmp_path):
    got = errors(tmp_path, """\
        [bundle]
        name = "bad name"

        [defaults]
        wallclock = "5m"
        cores = "two"

        [[resource]]
        name = "c"
        scheduler = "slurm"
        cores_per_node = 16
        max_walltime = "4h"
        partition = "a b"

        [[task]]
        name = "a-{i}"
        command = "x"
        matrix = { i = "3..1" }

        [[task]]
        name = "b"
        command = "y"
        after = ["c", "zz*", "prepar"]
        walltime = "30h"

        [[task]]
        name = "c"
        command = "y"
        cores = 64

        [[task]]
        name = "b"
        command = "z"

        [[task]]
        name = "prepare"
        command = "z"
        memory = "1G"
        resource = "snelius"
    """)
    assert got == [
        "F:2: name = \"bad name\": expected a name of letters, digits, '_', '.' and '-'",
        "F:5: unknown key 'wallclock' in [defaults]; did you mean 'walltime'?",
        "F:6: cores = \"two\": expected a whole number ≥ 1",
        "F:13: partition = \"a b\": expected letters, digits and _.,:+@%=/- only (it goes into a scheduler directive)",
        "F:18: matrix.i = \"3..1\": the range '3..1' is empty: write the smaller number first",
        "F:23: task 'b': after = \"zz*\" matches no task",
        "F:23: task 'b': after = \"prepar\" matches no task; did you mean 'prepare'?",
        "F:24: task 'b': walltime 1d6h is longer than any resource's max_walltime (c: 4h); lower the estimate or raise max_walltime",
        "F:29: task 'c': needs 64 cores on one node but the largest node has 16 (c); lower cores, or use mpi = true to spread ranks over nodes",
        "F:32: duplicate task name 'b' after expansion (also at line 21)",
        "F:39: task 'prepare': resource = \"snelius\" is not a [[resource]] of this bundle; known: c",
    ]


def test_impossible_walltime_and_memory(tmp_path):
    got = errors(tmp_path, """
        [bundle]
        name = "i"
        [[resource]]
        name = "c"
        scheduler = "slurm"
        cores_per_node = 16
        memory_per_node = "8G"
        max_walltime = "4h"
        [[task]]
        name = "long"
        command = "x"
        walltime = "5h"
        [[task]]
        name = "fat"
        command = "x"
        memory = "9G"
    """)
    assert got == [
        "F:13: task 'long': walltime 5h is longer than any resource's max_walltime (c: 4h); lower the estimate or raise max_walltime",
        "F:17: task 'fat': needs 9216M of memory but no node has that much (c: 8192M)",
    ]


def test_cycle_is_reported_with_its_path(tmp_path):
    got = errors(tmp_path, """
        [bundle]
        name = "c"
        [[task]]
        name = "a"
        command = "x"
        after = ["c"]
        [[task]]
        name = "b"
        command = "x"
        after = ["a"]
        [[task]]
        name = "c"
        command = "x"
        after = ["b"]
    """)
    assert got == ["F:7: dependency cycle: a -> c -> b -> a"]


def test_toml_syntax_error_gives_its_line(tmp_path):
    got = errors(tmp_path, '[bundle]\nname = "x"\n[[task]]\nname = "a\ncommand = "x"\n')
    assert len(got) == 1 and got[0].startswith("F:4: invalid TOML: ")


@pytest.mark.parametrize("snippet,message", [
    ('[bundel]\nname = "x"', "F:1: unknown key 'bundel' in [top level]; did you mean 'bundle'?"),
    ('[bundle]\nnam = "x"', "F:2: unknown key 'nam' in [bundle]; did you mean 'name'?"),
    ('[bundle]\n', "F:1: [bundle] needs a name, for example name = \"fractals\""),
])
def test_top_level_and_bundle_keys(tmp_path, snippet, message):
    got = errors(tmp_path, snippet + '\n[[task]]\nname = "a"\ncommand = "x"\n')
    assert message in got


@pytest.mark.parametrize("body,message", [
    ('name = "a"', "F:3: [[task]] needs a command"),
    ('command = "x"', "F:3: [[task]] needs a name"),
    ('name = "a b"\ncommand = "x"', 'F:4: name = "a b": expands to "a b": task names become file names and must be 1-200 of A-Z a-z 0-9 _ . + = -'),
    ('name = "../{i}"\ncommand = "x"\nmatrix = { i = [1] }', 'F:4: name = "../{i}": expands to "../1": task names become file names and must be 1-200 of A-Z a-z 0-9 _ . + = -'),
    ('name = ".."\ncommand = "x"', 'F:4: name = "..": expands to "..": task names become file names and must be 1-200 of A-Z a-z 0-9 _ . + = -'),
    ('name = "a"\ncommand = "x"\nwalltme = 5', "F:6: unknown key 'walltme' in [task]; did you mean 'walltime'?"),
    ('name = "a"\ncommand = "x"\nenv = { "1X" = "y" }', 'F:6: env = {...}: "1X" is not a valid environment variable name'),
    ('name = "a"\ncommand = "x"\nretries = -1', "F:6: retries = -1: expected a whole number from 0 to 1000"),
    ('name = "a"\ncommand = "x"\nmatrix = { i = {} }', "F:6: matrix.i = {...}: matrix values must be strings, numbers or booleans"),
    ('name = "a"\ncommand = "x"\nmatrix = "1..3"', 'F:6: matrix = "1..3": expected a table such as { i = "1..10", depth = [256, 512] }'),
    ('name = "a"\ncommand = "x"\nwalltime = "soon"', 'F:6: walltime = "soon": expected a duration such as "90s", "5m", "1h30m", "1-12:00:00", "01:30:00" or an integer of seconds'),
])
def test_task_errors(tmp_path, body, message):
    got = errors(tmp_path, '[bundle]\nname = "b"\n[[task]]\n' + body + "\n")
    assert message in got, got


@pytest.mark.parametrize("body,message", [
    ('name = "c"', 'F:3: [[resource]] needs a scheduler: "local", "slurm", "pbs" or "sge"'),
    ('name = "c"\nscheduler = "slurm"', 'F:3: [[resource]] with scheduler = "slurm" needs cores_per_node (the cores of one node, for example cores_per_node = 128)'),
    ('name = "c"\nscheduler = "local"\ndirectives = ["--x\\n#SBATCH --y"]', 'F:6: directives = ["--x\\n#SBATCH --y"]: item 1 ("--x\\n#SBATCH --y"): expected a single line'),
    ('name = "c"\nscheduler = "local"\ndirectives = ["x"]', 'F:6: directives = ["x"]: item 1 ("x"): expected a scheduler option starting with "-", for example "--constraint=rome"'),
    ('name = "c"\nscheduler = "local"\nhost = "-oProxyCommand=x"', 'F:6: host = "-oProxyCommand=x": expected "host", "user@host" or an ~/.ssh/config alias'),
    ('name = "c"\nscheduler = "local"\nqueue = "a"\npartition = "b"', "F:6: give either queue or partition, not both (they mean the same)"),
    ('name = "c"\nscheduler = "local"\nport = 70000', "F:6: port = 70000: expected a whole number from 1 to 65535"),
    ('name = "c"\nscheduler = "local"\nwalltime_margin = 2', "F:6: walltime_margin = 2: expected a number from 0 to 1"),
    ('name = "c"\nscheduler = "local"\ncores_per_nodes = 2', "F:6: unknown key 'cores_per_nodes' in [resource]; did you mean 'cores_per_node'?"),
])
def test_resource_errors(tmp_path, body, message):
    got = errors(tmp_path, '[bundle]\nname = "b"\n[[resource]]\n' + body + '\n[[task]]\nname = "a"\ncommand = "x"\n')
    assert message in got, got


def test_duplicate_resource_names(tmp_path):
    got = errors(tmp_path, """
        [bundle]
        name = "b"
        [[resource]]
        name = "c"
        scheduler = "local"
        [[resource]]
        name = "c"
        scheduler = "local"
        [[task]]
        name = "a"
        command = "x"
    """)
    assert got == ["F:8: duplicate resource name 'c' (also resource #1)"]


def test_tasks_from_errors(tmp_path):
    got = errors(tmp_path, """
        [bundle]
        name = "b"
        [[tasks_from]]
        file = "missing.txt"
        [[tasks_from]]
        name = "x"
    """)
    assert got[0].startswith('F:5: file = "missing.txt": cannot read ')
    assert got[0].endswith("missing.txt: No such file or directory")
    assert got[1] == ('F:6: [[tasks_from]] needs either a file, for example file = "tokens.txt", or the PiCaS view '
                      'whose tokens to run, for example picas_view = "todo"')


def test_tasks_from_name_needs_n(tmp_path):
    (tmp_path / "l.txt").write_text("true\n")
    got = errors(tmp_path, '[bundle]\nname = "b"\n[[tasks_from]]\nfile = "l.txt"\nname = "same"\n')
    assert got == ['F:5: name = "same": must contain {n} (the line number) to be unique']


def test_unreadable_files(tmp_path):
    with pytest.raises(BundleError) as e:
        load_bundle(tmp_path / "nope.toml")
    assert e.value.problems == [f"{tmp_path / 'nope.toml'}: no such file; give the path of a job bundle (.toml)"]
    p = tmp_path / "bin.toml"
    p.write_bytes(b'[bundle]\nname = "\xff"\n')
    with pytest.raises(BundleError) as e:
        load_bundle(p)
    assert e.value.problems == [f"{p}:2: the file is not valid UTF-8"]


def test_empty_bundle_says_what_is_missing(tmp_path):
    got = errors(tmp_path, '[bundle]\nname = "e"\n')
    assert got == ["F: the bundle has no tasks: add a [[task]] or [[tasks_from]] table"]


def test_launchers_per_node_takes_tasks_that_fit_one_launchers_share(tmp_path):
    head = """
        [bundle]
        name = "lpn"
        [[resource]]
        name = "c"
        scheduler = "slurm"
        cores_per_node = 8
        memory_per_node = "16G"
        max_nodes = 2
        launchers_per_node = 4
    """
    b = load_bundle(write(tmp_path, head + """
        [[task]]
        name = "ok"
        command = "x"
        cores = 2
        memory = "4G"
    """))
    assert (b.resources[0].launcher_cores, b.resources[0].launcher_memory_mb) == (2, 4096)
    assert errors(tmp_path, head + """
        [[task]]
        name = "wide"
        command = "x"
        cores = 3
        [[task]]
        name = "fat"
        command = "x"
        memory = "5G"
        [[task]]
        name = "gang"
        command = "x"
        nodes = 2
    """) == ["F:15: task 'wide': needs 3 core(s) but c's launchers_per_node = 4 gives each launcher 2 core(s) and "
             "4096M of a node; lower launchers_per_node",
             "F:19: task 'fat': needs 1 core(s) and 5120M but c's launchers_per_node = 4 gives each launcher 2 "
             "core(s) and 4096M of a node; lower launchers_per_node",
             "F:23: task 'gang': needs 2 nodes but c's launchers_per_node = 4 gives each launcher 2 core(s) and "
             "4096M of a node; lower launchers_per_node"]
    assert errors(tmp_path, """
        [bundle]
        name = "lpn"
        [[resource]]
        name = "g"
        scheduler = "slurm"
        cores_per_node = 2
        gpus_per_node = 1
        launchers_per_node = 2
        [[resource]]
        name = "h"
        scheduler = "local"
        cores_per_node = 2
        launchers_per_node = 3
        [[task]]
        name = "t"
        command = "x"
    """) == ["F:9: launchers_per_node = 2 applies to nodes without GPUs (one launcher hands out a node's GPUs); "
             "remove one of the two lines",
             "F:14: launchers_per_node = 3 is more than the node's 2 cores: each launcher needs one"]
