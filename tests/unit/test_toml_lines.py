from pilotflow.bundle.toml_lines import LineMap

SOURCE = '''[bundle]
name = "x"  # a comment with [brackets
[defaults]
env = { A = "1", B = "{2}" }
[[resource]]
name = "a"
directives = [
  "--x",
  "name = 3",
]
[[task]]
name = "t"
command = """
foo = 1
[bar]
"""
matrix.i = "1..3"
[[task]]
"quoted key" = 1
name = 'u'
[task.matrix]
j = [1, 2]
'''


def test_keys_tables_and_arrays_map_to_lines():
    m = LineMap(SOURCE)
    assert m.line(("bundle", "name")) == 2
    assert m.line(("defaults", "env", "B")) == 4
    assert m.line(("resource", 0, "directives")) == 7
    assert m.line(("task", 0)) == 11
    assert m.line(("task", 0, "command")) == 13
    assert m.line(("task", 0, "matrix", "i")) == 17
    assert m.line(("task", 1, "quoted key")) == 19
    assert m.line(("task", 1, "name")) == 20
    assert m.line(("task", 1, "matrix", "j")) == 22


def test_content_of_strings_and_arrays_is_not_a_key():
    m = LineMap(SOURCE)
    assert m.line(("bar",)) is None
    assert m.line(("task", 0, "foo")) == 11  # falls back to the table header
    assert m.line(("resource", 0, "name")) == 6


def test_unknown_paths_fall_back_to_nearest_parent():
    m = LineMap(SOURCE)
    assert m.line(("task", 1, "cores")) == 18
    assert m.line(("nothing",)) is None
