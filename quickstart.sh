#!/usr/bin/env bash
# Sets up pilotflow in ./.venv and runs the main example on this machine (the embedded
# `local` resource): 16 Mandelbrot renders and a gallery, as tokens in one pilot.
#   bash quickstart.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "quickstart.sh: pilotflow needs Python >= 3.11 ($("$PY" --version 2>&1) found; set PYTHON=...)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e . --config-settings editable_mode=compat
cd workflows/fractals
../../.venv/bin/pilotflow plan fractals.toml
../../.venv/bin/pilotflow submit fractals.toml --wait
../../.venv/bin/pilotflow status
echo "outputs: $(pwd)/out/ (open out/index.html)"
