#!/usr/bin/env bash
# Writes tests/constraints.txt from the environment of the last `bash tests/run.sh --latest`
# (run that first, and pin only when it was green).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-latest/bin/python ] || { echo "tests/pin.sh: run 'bash tests/run.sh --latest' first" >&2; exit 1; }
PIP=(.venv-latest/bin/python -m pip --disable-pip-version-check)
setuptools=$("${PIP[@]}" index versions setuptools 2>/dev/null | sed -n 's/^setuptools (\(.*\))$/\1/p')
{
    sed -n '/^#/p' tests/constraints.txt
    [ -n "$setuptools" ] && echo "setuptools==$setuptools"
    "${PIP[@]}" freeze --exclude-editable
} > tests/constraints.txt.new
mv tests/constraints.txt.new tests/constraints.txt
echo "tests/pin.sh: $(grep -vc '^#' tests/constraints.txt) pins written to tests/constraints.txt"
