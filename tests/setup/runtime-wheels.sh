#!/usr/bin/env bash
# Puts the wheels of Poltergust's runtime dependencies (setup.cfg's
# install_requires, binary wheels only) into a wheelhouse, so that
# tests/test_boot.py can build a release and install it on a throwaway root
# without the package index. Does nothing when the wheelhouse has them all.
#
# Usage: bash tests/setup/runtime-wheels.sh WHEELHOUSE
# Uses `python` from PATH (the project's virtualenv), or $PYTHON: the wheels
# must match the interpreter the tests run with.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 WHEELHOUSE" >&2
    exit 2
fi
wheelhouse=$1
python=${PYTHON:-python}
cd "$(dirname "$0")/../.."

mapfile -t requirements < <("$python" - <<'PYEOF'
import configparser
config = configparser.ConfigParser()
config.read("setup.cfg")
for line in config["options"]["install_requires"].splitlines():
    if line.strip():
        print(line.strip())
PYEOF
)
mkdir -p "$wheelhouse"
download() {
    "$python" -m pip download --quiet --disable-pip-version-check --only-binary :all: --dest "$wheelhouse" "$@" \
        "${requirements[@]}"
}
if ! download --no-index --find-links "$wheelhouse" 2>/dev/null; then
    download
fi
