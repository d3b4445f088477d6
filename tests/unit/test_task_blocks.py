"""A bundle's tasks as blocks: a matrix or token list held as one template and its values,
its tasks made only when asked for (planning, records and token definitions without them)."""

from tests.unit.test_bundle import errors, load_bundle, write


def _tasks_alive() -> int:
    import gc
    from pilotflow.bundle import Task
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Task))


def test_a_matrix_stays_one_template_through_planning_and_makes_its_tasks_on_demand(tmp_path):
    import itertools
    import random
    from pilotflow.planning.plan import make_plan
    before = _tasks_alive()
    b = load_bundle(write(tmp_path, """
        [bundle]
        name = "lazy"
        [[task]]
        name = "r{i}-{d}-{k}"
        command = "f {i} {d} > out/{i}_{d}_{k}"
        matrix = { i = "001..500", d = ["a", "b"], k = "1..100" }
        outputs = ["out/{i}_{d}_{k}"]
        env = { K = "{k}", FIXED = "1" }
        [[task]]
        name = "last"
        command = "true"
    """))
    plan = make_plan(b)
    assert len(b.tasks) == 100_001 and plan.resources[0].tasks == list(range(100_001))
    assert _tasks_alive() - before < 10  # the template and the plain task; not one per matrix value
    combos = list(itertools.product([f"{i:03}" for i in range(1, 501)], "ab", [str(k) for k in range(1, 101)]))
    assert b.tasks.names()[:2] == ["r001-a-1", "r001-a-2"] and b.tasks.names()[-1] == "last"
    for n in random.Random(7).sample(range(100_000), 50) + [0, 99_999]:
        i, d, k = combos[n]
        t = b.tasks[n]
        assert (t.name, t.command, t.outputs, t.env) == (
            f"r{i}-{d}-{k}", f"f {i} {d} > out/{i}_{d}_{k}", (f"out/{i}_{d}_{k}",), (("K", k), ("FIXED", "1")))
        assert b.tasks.names()[n] == t.name
    assert b.tasks[-1].name == "last" and b.tasks[100_000].command == "true"
    made = list(b.tasks)
    assert made[12_345] == b.tasks[12_345] and [t.name for t in made] == b.tasks.names()


def test_a_token_list_is_one_block_too_and_names_stay_checked(tmp_path):
    (tmp_path / "cmds.txt").write_text("# header\necho a\n\necho {n} b\n")
    b = load_bundle(write(tmp_path, """
        [bundle]
        name = "tl"
        [[tasks_from]]
        file = "cmds.txt"
    """))
    assert [(t.name, t.command) for t in b.tasks] == [("cmds-2", "echo a"), ("cmds-4", "echo {n} b")]
    assert b.tasks[1] == list(b.tasks)[1]
    assert errors(tmp_path, """
        [bundle]
        name = "bad"
        [[task]]
        name = "t/{i}"
        command = "x"
        matrix = { i = "1..3" }
    """) == ['F:5: name = "t/{i}": expands to "t/1": task names become file names and must be 1-200 of '
             'A-Z a-z 0-9 _ . + = -']


def test_a_blocks_records_are_its_tasks_records(tmp_path):
    from pilotflow.run.records import task_to_dict
    b = load_bundle(write(tmp_path, """
        [bundle]
        name = "rows"
        [[task]]
        name = "a{i}-{j}"
        command = "run {i} {j}"
        matrix = { i = "1..3", j = ["x", "y"] }
        env = { J = "{j}" }
        inputs = ["in/{i}.txt"]
        [[task]]
        name = "b"
        command = "true"
    """))
    from pilotflow.bundle import Task
    from pilotflow.bundle.tasks import TaskBlock, Tasks
    assert [type(p) for p in b.tasks.parts] == [TaskBlock, TaskBlock]
    tasks = Tasks(b.tasks.parts + [[Task(name="z", command="x", cores=2)]])  # and a list, as Python callers give
    rows = list(tasks.field_dicts(task_to_dict))
    assert rows == [task_to_dict(t) for t in tasks] and len(rows) == 8 and rows[-1]["cores"] == 2
    assert rows[1]["name"] == "a1-y" and rows[1]["env"] == (("J", "y"),) and rows[1]["inputs"] == ("in/1.txt",)


def test_a_blocks_token_definitions_are_its_tasks_without_making_them(tmp_path):
    from pilotflow.bundle import Task
    from pilotflow.bundle.tasks import Tasks
    from pilotflow.run.submit import token_def, token_defs
    b = load_bundle(write(tmp_path, """
        [bundle]
        name = "defs"
        [[resource]]
        name = "r"
        scheduler = "slurm"
        cores_per_node = 8
        max_nodes = 4
        gpus_per_node = 2
        [[task]]
        name = "a{i}-{j}"
        command = "run {i} {j}"
        matrix = { i = "1..3", j = ["x", "y"] }
        env = { J = "{j}", K = "k" }
        outputs = ["out/{i}.txt"]
        cores = 2
        memory = "1G"
        gpus = 1
        retries = 2
        [[task]]
        name = "m{n}"
        command = "mpi {n}"
        matrix = { n = "1..2" }
        mpi = true
        cores = 12
        [[task]]
        name = "plain"
        command = "true"
    """))
    res = b.resources[0]
    tasks = Tasks(b.tasks.parts + [[Task(name="z", command="x", cores=3, shell="bash")]])  # (as Snakemake's jobs)
    order = list(range(len(tasks)))[::-1]  # (any order: a plan's rank order)
    rank = {i: 100 + i for i in order}
    made = [token_def(tasks[i], rank[i], res) for i in order]
    assert token_defs(tasks, order, rank, res) == made
    assert made[-2]["command"] == "run 1 y" and made[-2]["env"] == [["J", "y"], ["K", "k"]] and made[-2]["gpus"] == 1
    assert made[-7]["ranks"] == 12 and made[-7]["nodes"] == 2  # MPI ranks spread over nodes, from the template
