#!/usr/bin/env bash
# Install everything the tests need, then run them: `bash tests/run.sh [PYTEST ARGS...]`.
#
# On a fresh Debian machine as root it installs what is missing: Java and the
# gcloud CLI's Pub/Sub emulator (the test stack), PostgreSQL (the Top Artists
# example), shellcheck and checkov (the deploy checks). Not as root, it says
# exactly which Debian packages to install and stops. The project and its test
# extra go into ./.venv; test environments install from ./.wheelhouse, filled
# here, and luigi's source distribution goes into ./.sdists, so no test needs
# the package index.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v java >/dev/null || missing+=(default-jre-headless)
gcloud beta emulators pubsub --help >/dev/null 2>&1 || missing+=(google-cloud-cli-pubsub-emulator)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null || missing+=(postgresql)
command -v shellcheck >/dev/null || missing+=(shellcheck)
command -v chromedriver >/dev/null || missing+=(chromium chromium-driver)  # the dashboard's browser tests
command -v curl >/dev/null || missing+=(curl)                    # the boot test runs deploy/node-init.sh
command -v systemd-analyze >/dev/null || missing+=(systemd)      # ... and scores its units
command -v setpriv >/dev/null || missing+=(util-linux)           # --run-as
command -v bwrap >/dev/null || missing+=(bubblewrap)             # --run-as: each run and build in a sandbox
command -v nft >/dev/null || missing+=(nftables)                # the deploy's rule that keeps runs off the metadata server
command -v git >/dev/null || missing+=(git)                      # git dependencies (tests/test_git_credentials.py)
if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        echo "tests/run.sh: missing Debian packages; install them as root, then run this again:" >&2
        echo "    apt-get install ${missing[*]}" >&2
        echo "(google-cloud-cli-pubsub-emulator comes from Google's Cloud SDK apt repository)" >&2
        exit 1
    fi
    echo "tests/run.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The unprivileged users that --run-as tests start pipelines as: poltergust-run, and the pool of
# --run-as poltergust-run --run-as-pool 4 (tests/test_sandbox.py).
if [ "$(id -u)" -eq 0 ]; then
    for user in poltergust-run poltergust-run-1 poltergust-run-2 poltergust-run-3 poltergust-run-4; do
        id "$user" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$user"
    done
fi

# The project and its test dependencies, in a virtualenv of their own.
[ -x .venv/bin/python ] || python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e '.[test]'

# Wheels the test environments install from, so no test needs the package index.
bash tests/setup/example-tools.sh .wheelhouse
python -m pip download --quiet --dest .wheelhouse luigi
bash tests/setup/runtime-wheels.sh .wheelhouse  # Poltergust's own dependencies, for the release the boot test builds
# luigi for Python 3.8 environments (the warm interpreter's oldest Python), used when python3.8 is installed.
python -m pip download --quiet --python-version 3.8 --only-binary=:all: --dest .wheelhouse/py38 luigi
# luigi's own examples ship only in its source distribution: tests/test_luigi_examples.py runs them on nodes.
luigi_version=$(python -c 'import importlib.metadata as m; print(m.version("luigi"))')
python -m pip download --quiet --no-binary :all: --no-deps --dest .sdists "luigi==$luigi_version"

# checkov, in a virtualenv of its own; exports CHECKOV.
# shellcheck disable=SC1091
source tests/setup/deploy-tools.sh

# Lint and types first: a quick answer (tests/test_lint.py runs them again inside pytest).
python -m ruff check poltergust tests benchmarks
python -m mypy

# shellcheck disable=SC2317  # reached: deploy-tools.sh returns when sourced
python -m pytest -q -rs --durations=25 "$@"
