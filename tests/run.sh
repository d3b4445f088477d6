#!/usr/bin/env bash
# Sets up and runs the whole pilotflow test suite (the README's test command; .ci/run calls it).
#   bash tests/run.sh [pytest args]
# As root with apt-get, it first installs what the real-daemon tests need (Slurm, Grid Engine,
# OpenSSH server, Open MPI, Chromium); otherwise those tiers skip and say why.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    bash tests/daemons/install.sh || { echo "tests/run.sh: installing the daemons' packages failed" >&2; exit 1; }
else
    echo "tests/run.sh: not root or no apt-get: the slurm, sge and ssh tests will be skipped (with reasons)"
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "tests/run.sh: pilotflow needs Python >= 3.11 on the client; $("$PY" --version 2>&1) found (set PYTHON=...)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -m venv .venv 2>/dev/null; then
        rm -rf .venv
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null
        fi
        "$PY" -m venv .venv || { echo "tests/run.sh: cannot create a virtual environment" >&2; exit 1; }
    fi
fi
# compat mode: Snakemake finds executor plugins only as real packages on sys.path
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat \
    || { echo "tests/run.sh: installing pilotflow and its test dependencies failed" >&2; exit 1; }

.venv/bin/python -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then
    echo "tests/run.sh: pytest collected no tests: that is a failure, not a pass" >&2
    exit 1
fi
exit $rc
