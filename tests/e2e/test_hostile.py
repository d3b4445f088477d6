"""Hostile input: values that try to reach a shell or a directive, paths that try to escape."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import cli, status_json, write_bundle

EVIL = "$(touch PWNED1); `touch PWNED2`; 'q' \"dq\" \\ ünïcødé ${HOME} %s %%"


def test_values_reach_tasks_byte_exact_and_are_never_interpreted(work):
    import tomli_w
    root = "runs with space/it's $(touch PWNED3) `touch PWNED4` ünï"
    doc = {
        "bundle": {"name": "hostile"},
        "resource": [{"name": "local", "scheduler": "local", "root": root,
                      "setup": ["export FROM_SETUP='set up: a  b'"]}],
        "task": [{"name": "t+1=x.y_-{i}",
                  "command": "printf '%s' \"$EVIL\" > 'v-{i}.txt'; printf '%s' \"$FROM_SETUP\" > 's-{i}.txt'; "
                             "printf '%s' '{i}' > 'i-{i}.txt'",
                  "matrix": {"i": ["a b", "$(touch PWNED5)", "ü"]},
                  "env": {"EVIL": EVIL},
                  "outputs": ["v-{i}.txt", "s-{i}.txt", "i-{i}.txt"]}],
    }
    (work / "jobs.toml").write_text(tomli_w.dumps(doc))
    p = cli("submit", "jobs.toml", "--wait", cwd=work)
    assert p.returncode == 2 and "task names become file names" in p.stderr  # "a b" is no name
    # one task per value, each with a valid name
    doc["task"] = [dict(doc["task"][0], name=f"t+1=x.y_-{k}", matrix={"i": [v]})
                   for k, v in enumerate(["a b", "$(touch PWNED5)", "ü"])]
    (work / "jobs.toml").write_text(tomli_w.dumps(doc))
    cli("submit", "jobs.toml", "--wait", cwd=work, check=0)
    for i in ("a b", "$(touch PWNED5)", "ü"):
        assert (work / f"v-{i}.txt").read_text() == EVIL
        assert (work / f"s-{i}.txt").read_text() == "set up: a  b"
        assert (work / f"i-{i}.txt").read_text() == i
    pwned = list(work.rglob("PWNED*")) + list(Path("/tmp").glob("PWNED*")) + list(Path.home().glob("PWNED*"))
    assert not pwned, pwned
    assert list((work / root).glob("hostile-*"))


def test_scheduler_and_shell_contexts_refuse_smuggling(work):
    write_bundle(work, """
[bundle]
name = "smuggle"
[[resource]]
name = "c"
scheduler = "slurm"
cores_per_node = 4
partition = "debug --wrap=touch"
account = "a\\n#SBATCH --uid=0"
python = "python3; touch PWNED"
directives = ["--comment=x\\n#SBATCH --exclusive"]
[[task]]
name = "t"
command = "true"
inputs = ["../../etc/passwd"]
outputs = ["/etc/shadow"]
""")
    p = cli("plan", "jobs.toml", cwd=work, check=2)
    for key in ("partition", "account", "python", "directives", "inputs", "outputs"):
        assert f" {key} = " in p.stderr, (key, p.stderr)


def test_names_and_matrix_values_cannot_escape_the_run_directory(work):
    write_bundle(work, """
[bundle]
name = "escape"
[[task]]
name = "x-{i}"
command = "true"
matrix = { i = ["../../../../tmp/evil", "ok"] }
[[task]]
name = "y-{n}"
command = "true"
matrix = { n = "1..1", j = ["../up"] }
outputs = ["out/{j}"]
""")
    p = cli("plan", "jobs.toml", cwd=work, check=2)
    assert "task names become file names" in p.stderr
    assert "paths must stay inside the bundle's directory" in p.stderr


def test_outputs_are_not_written_through_symlinks_leading_outside(work, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (work / "out").symlink_to(outside)
    write_bundle(work, """
[bundle]
name = "link"
[[task]]
name = "w"
command = "mkdir -p out && echo secret > out/f.txt"
outputs = ["out/f.txt"]
""")
    p = cli("submit", "jobs.toml", "--wait", cwd=work, check=0)
    assert not (outside / "f.txt").exists()
    assert "would land outside" in p.stderr


def test_a_hostile_pool_cannot_make_the_client_write_outside_its_mirror(work):
    """A token name in a state file on the resource that is not a task of the run is ignored
    by the views and never becomes a path on the client."""
    write_bundle(work, '[bundle]\nname = "p"\n[[task]]\nname = "a"\ncommand = "true"\n')
    run = cli("submit", "jobs.toml", "--wait", cwd=work, check=0).stdout.strip()
    pool = next((work / ".pilotflow").glob("p-*"))
    (pool / "state" / "..%2F..%2Fevil.json").write_text('{"token": "../../evil", "state": "done", "attempt": 1}')
    st = status_json(work, run)
    assert set(st["tokens"]) == {"a"}
    assert not list(work.parent.glob("evil*")) and not (work / ".pilotflow" / "evil").exists()
