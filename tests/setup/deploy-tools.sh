#!/usr/bin/env bash
# Installs the tools tests/test_deploy.py needs, on a fresh Debian machine
# (as root):
#   - shellcheck, with apt-get (only if missing);
#   - checkov, into its own virtualenv at
#     ${CHECKOV_VENV:-$HOME/.cache/poltergust-checkov} (only if missing), so
#     that its many dependencies never meet the project's test environment.
#     The version is ${CHECKOV_SPEC:-checkov==3.3.30}: a pinned version keeps
#     new upstream checks from failing CI unannounced.
#
# Contract for callers:
#   source tests/setup/deploy-tools.sh   installs, then exports CHECKOV=<venv>/bin/checkov
#   bash tests/setup/deploy-tools.sh     installs, then prints "export CHECKOV=...";
#                                set that variable yourself before running pytest
# tests/test_deploy.py finds checkov through $CHECKOV (else on PATH), and
# the shellcheck executable on PATH. Exit/return status is non-zero if an install failed.
# Sourcing changes no shell options of the caller: the work runs in a subshell.

_poltergust_deploy_tools() (
    set -euo pipefail
    venv=$1
    spec=${CHECKOV_SPEC:-checkov==3.3.30}

    apt_updated=0
    apt_install() {
        if ! command -v apt-get >/dev/null; then
            echo "deploy-tools: need $* but there is no apt-get; install it by hand" >&2
            return 1
        fi
        if ((!apt_updated)); then
            apt-get update -qq
            apt_updated=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    }

    if command -v shellcheck >/dev/null; then
        echo "deploy-tools: shellcheck present: $(command -v shellcheck)"
    else
        echo "deploy-tools: installing shellcheck"
        apt_install shellcheck
    fi

    if [[ -x "$venv/bin/checkov" ]] && "$venv/bin/checkov" --version >/dev/null 2>&1; then
        echo "deploy-tools: checkov present: $venv/bin/checkov"
    else
        echo "deploy-tools: installing $spec into $venv"
        rm -rf "$venv"
        mkdir -p "$(dirname "$venv")"
        if ! python3 -m venv "$venv" 2>/dev/null; then
            # Debian's python3 has no venv module without python3-venv.
            rm -rf "$venv"
            apt_install python3-venv
            python3 -m venv "$venv"
        fi
        "$venv/bin/pip" install --quiet --disable-pip-version-check "$spec"
        "$venv/bin/checkov" --version >/dev/null
    fi
)

_poltergust_checkov_venv=${CHECKOV_VENV:-$HOME/.cache/poltergust-checkov}
if _poltergust_deploy_tools "$_poltergust_checkov_venv"; then
    _poltergust_status=0
    export CHECKOV="$_poltergust_checkov_venv/bin/checkov"
    echo "export CHECKOV=$CHECKOV"
else
    _poltergust_status=1
    echo "deploy-tools: installing the deploy check tools failed" >&2
fi
unset -f _poltergust_deploy_tools
unset _poltergust_checkov_venv
# "return" when sourced, "exit" when run.
# shellcheck disable=SC2317
return "$_poltergust_status" 2>/dev/null || exit "$_poltergust_status"
