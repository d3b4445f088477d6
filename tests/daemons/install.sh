#!/usr/bin/env bash
# Install the real daemons the integration tests and benchmarks run against
# (Slurm + munge, Son of Grid Engine, OpenSSH server, Open MPI, Chromium, Node/npm).
#
# Why a script: whatever is installed by hand on a machine does not survive a
# move to a new machine, so CI and every session call this. It is idempotent
# (skips installed packages) and harmless where it cannot act: when not root or
# without apt-get it prints why and exits 0, so the daemon tests just skip.
#
# Usage: bash tests/daemons/install.sh [PACKAGE ...]   (default: all below)
set -u

PACKAGES=(slurmctld slurmd slurm-client munge
          gridengine-master gridengine-exec gridengine-client
          openssh-server openmpi-bin libopenmpi-dev chromium faketime strace)
# Node and npm for the CouchDB tier's pouchdb-server: Debian's unless the machine has them
# already (a NodeSource nodejs carries its own npm and conflicts with Debian's npm package)
command -v npm >/dev/null 2>&1 || PACKAGES+=(nodejs npm)
if [ "$#" -gt 0 ]; then PACKAGES=("$@"); fi

if [ "${EUID:-$(id -u)}" -ne 0 ]; then
    echo "install.sh: not root: skipping the daemon package install"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: apt-get not found: skipping the daemon package install"
    exit 0
fi

installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

missing=()
for p in "${PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "install.sh: all ${#PACKAGES[@]} packages already installed"
    exit 0
fi
echo "install.sh: installing: ${missing[*]}"

export DEBIAN_FRONTEND=noninteractive
# Grid Engine's postinst asks three questions; without these answers a
# non-interactive install leaves the cell unconfigured.
if command -v debconf-set-selections >/dev/null 2>&1; then
    host="$(hostname)"
    for p in gridengine-master gridengine-exec gridengine-client gridengine-common; do
        printf '%s shared/gridengineconfig boolean true\n' "$p"
        printf '%s shared/gridenginecell string default\n' "$p"
        printf '%s shared/gridenginemaster string %s\n' "$p" "$host"
    done | debconf-set-selections
fi

# Only refresh the package lists when they are empty or an install fails:
# `apt-get update` is the slow part and usually unnecessary.
lists_empty() {
    ! ls /var/lib/apt/lists/ 2>/dev/null | grep -q '_Packages'
}
APT_OPTS=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confdef
          -o Dpkg::Options::=--force-confold)
if lists_empty; then
    echo "install.sh: package lists empty: apt-get update"
    apt-get update -q || true
fi
if ! apt-get install "${APT_OPTS[@]}" "${missing[@]}"; then
    echo "install.sh: install failed: apt-get update and retry"
    apt-get update -q || true
    if ! apt-get install "${APT_OPTS[@]}" "${missing[@]}"; then
        echo "install.sh: apt-get install failed" >&2
        exit 1
    fi
fi

# Package installs do not start services here (policy-rc.d): the fixtures in
# tests/daemons/*.py start their own private daemons.
echo "install.sh: done"
