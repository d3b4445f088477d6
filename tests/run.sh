#!/usr/bin/env bash
# Sets up and runs the whole pilotflow test suite (the README's test command; .ci/run calls it).
#   bash tests/run.sh [pytest args]            pinned: the exact versions of tests/constraints.txt, in .venv
#   bash tests/run.sh --latest [pytest args]   the newest versions the ranges in pyproject.toml allow, in .venv-latest
# As root with apt-get, it first installs what the real-daemon tests need (Slurm, Grid Engine,
# OpenSSH server, Open MPI, Chromium); otherwise those tiers skip and say why.
set -uo pipefail
cd "$(dirname "$0")/.."

LATEST=0
if [ "${1:-}" = "--latest" ]; then
    LATEST=1
    shift
fi

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
VENV=.venv
[ $LATEST = 1 ] && VENV=.venv-latest
if [ ! -x $VENV/bin/python ]; then
    if ! "$PY" -m venv $VENV 2>/dev/null; then
        rm -rf $VENV
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null
        fi
        "$PY" -m venv $VENV || { echo "tests/run.sh: cannot create a virtual environment" >&2; exit 1; }
    fi
fi
# compat mode: Snakemake finds executor plugins only as real packages on sys.path
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ $LATEST = 1 ]; then
    "${PIP[@]}" --upgrade --upgrade-strategy eager -e '.[test]' --config-settings editable_mode=compat
else
    # PIP_CONSTRAINT also reaches the isolated build environment (setuptools)
    PIP_CONSTRAINT="$PWD/tests/constraints.txt" "${PIP[@]}" -c tests/constraints.txt -e '.[test]' \
        --config-settings editable_mode=compat
fi || { echo "tests/run.sh: installing pilotflow and its test dependencies failed" >&2; exit 1; }
echo "tests/run.sh: $([ $LATEST = 1 ] && echo "newest versions" || echo "pinned versions (tests/constraints.txt)"):" \
    "$("$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
       | awk 'tolower($1) ~ /^(pulp|highspy|snakemake|paramiko|rich|pytest)$/ {printf "%s%s %s", sep, $1, $2; sep=", "}')"

# the CouchDB tier's server (pouchdb-server, npm ci of a pinned lock) and the real picas client,
# into ~/.cache/pilotflow-tests: set up here, before the suite's clock starts, like the daemons
"$VENV/bin/python" - <<'PY'
from tests.daemons.couchdb import install, picas_venv
for what, got in (("pouchdb-server", install()), ("picas", picas_venv())):
    print(f"tests/run.sh: {what}: " + (f"not available, the couchdb tests will skip: {got}" if isinstance(got, str)
                                       else f"{got}"))
PY

collected_none() {
    echo "tests/run.sh: pytest collected no tests$1: that is a failure, not a pass" >&2
}

if [ $# -gt 0 ] || [ "${PILOTFLOW_TESTS_SERIAL:-0}" = 1 ]; then
    "$VENV/bin/python" -m pytest "$@"
    rc=$?
    [ $rc -eq 5 ] && { collected_none ""; exit 1; }
    exit $rc
fi

# The whole suite: the tests of the batch daemons (Slurm, Grid Engine, sshd) and all the others
# as two pytest processes side by side. Most of the suite's time is tests waiting on walltimes,
# lock timeouts and Slurm's minute, not CPU; within each, tests run one after another.
# PILOTFLOW_TESTS_SERIAL=1 runs them as one process.
TMP=$(mktemp -d -t pilotflow-tests.XXXXXX)
chmod 755 "$TMP"  # the daemons' tests run jobs as a second user in there
echo "tests/run.sh: the batch-daemon tests (shown as they run) and the others (shown when both are done," \
     "log: $TMP/rest.log) run side by side"
"$VENV/bin/python" -m pytest --tier rest --basetemp="$TMP/rest" > "$TMP/rest.log" 2>&1 &
rest=$!
trap 'kill $rest 2>/dev/null' INT TERM
"$VENV/bin/python" -m pytest --tier daemons --basetemp="$TMP/daemons"
rc_daemons=$?
wait $rest
rc_rest=$?
echo
echo "==================== tests/run.sh: the tests without batch daemons ===================="
cat "$TMP/rest.log"
echo "tests/run.sh: batch-daemon tests exit $rc_daemons, the others exit $rc_rest"
[ $rc_daemons -eq 5 ] && { collected_none " in the batch-daemon tier"; exit 1; }
[ $rc_rest -eq 5 ] && { collected_none " in the tier without daemons"; exit 1; }
[ $rc_daemons -ne 0 ] && exit $rc_daemons
[ $rc_rest -ne 0 ] && exit $rc_rest
rm -rf "$TMP/rest" "$TMP/daemons"  # kept for a look after a failure
exit 0
