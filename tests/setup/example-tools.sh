#!/usr/bin/env bash
# What tests/test_example.py needs beyond the project's test extra, on a fresh
# Debian machine (run as root):
#   - the PostgreSQL server binaries (Debian package `postgresql`), and
#   - the psycopg2-binary and setuptools wheels, in the wheelhouse the test
#     environments install from (the test downloads psycopg2-binary itself if
#     it is missing, but CI fetches everything in its install step).
#
# Usage: bash tests/setup/example-tools.sh WHEELHOUSE
# Uses `python` from PATH (activate the project's virtualenv first), or $PYTHON:
# the wheels must match the interpreter the tests run with.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 WHEELHOUSE" >&2
    exit 2
fi
wheelhouse=$1
python=${PYTHON:-python}

have_postgres() {
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null
}

if ! have_postgres; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "PostgreSQL server binaries are missing: install the Debian package postgresql (as root)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql
    have_postgres || { echo "postgresql installed, but no initdb found" >&2; exit 1; }
fi

mkdir -p "$wheelhouse"
"$python" -m pip download --quiet --dest "$wheelhouse" psycopg2-binary setuptools wheel
