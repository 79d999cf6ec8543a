#!/usr/bin/env bash
# Poltergust VM init script: turns a fresh Debian/Ubuntu VM into a Poltergust
# node or into the fleet's luigi central scheduler (luigid).
#
# It is the startup script of the Terraform instance template and of the VMs
# made by deploy/gcloud/create.sh, and clusters/dataproc-init.sh runs it on
# DataProc. GCE runs startup scripts on every boot, so every step is
# idempotent: a reboot re-reads the metadata, finds the release installed,
# rewrites the unit and restarts it. A reboot never changes the version: that
# takes new metadata (a new instance template).
#
# Usage:
#   node-init.sh                       configure this VM (as root)
#   node-init.sh --root DIR            the same, but every file it writes is
#                                      under DIR; creates no system user and
#                                      installs no Debian package (systemctl is
#                                      still called: put a stand-in first on PATH)
#   node-init.sh --dry-run [--root DIR]  write the unit files only: downloads and
#                                      installs nothing, never calls systemctl
#   node-init.sh --help
#
# Settings come from GCE instance metadata (attributes), read from the
# metadata server (GCE_METADATA_HOST, default metadata.google.internal):
#   poltergust-role           required: "node", "scheduler" or "bake"
#   poltergust-wheel-url      required: the Poltergust wheel, gs://BUCKET/OBJECT
#                             (read with the VM's service account) or https://
#   poltergust-wheel-sha256   required: its sha256; any other file is refused
#   poltergust-lock-url       required: requirements.lock of that release (the
#                             runtime dependencies, each pinned with its hashes)
#   poltergust-lock-sha256    required: its sha256
#   (deploy/build-release.sh makes both files; the deploy uploads them to
#   gs://BUCKET/_poltergust/dist/VERSION/ and sets these four attributes.)
#   poltergust-path           gs://BUCKET/PREFIX to watch; several may be given
#                             separated by spaces (each becomes a --path).
#                             Required for a node; on the scheduler it is what
#                             the dashboard shows (without it: no dashboard)
#   node role only:
#   poltergust-scheduler-url  required: http(s)://HOST:PORT of luigid
#   poltergust-topic          the bucket's notification topic (default,
#                             decided by the node: poltergust-BUCKET of the first path)
#   poltergust-project        project of the topic and subscriptions
#                             (default: the project/project-id metadata value)
#   poltergust-max-concurrent optional: pipelines one node runs at once
#   poltergust-backlog-subscription
#                             optional: the backlog subscription all nodes share
#                             (its undelivered count drives the autoscaler)
#   poltergust-retire-after   optional: seconds without a run after which the
#                             node removes itself from its managed instance
#                             group (poltergust-retire.service); unset or 0: never
#   poltergust-min-nodes      optional: it never shrinks the group below this
#   poltergust-allowed-environment-prefix
#                             optional: gs:// prefixes environment files may come
#                             from (default, decided by the node: the path's buckets)
#   poltergust-secrets        optional: NAME=SECRET ..., Secret Manager secrets
#                             (SECRET is an id in poltergust-project, or
#                             projects/P/secrets/S[/versions/V]) written to
#                             /etc/poltergust/node.secrets (root, mode 0600) as
#                             NAME=value for {{NAME}} in environment files; the
#                             unit hands it over with LoadCredential= (never in
#                             the node's environment) and names each as
#                             --secret-env NAME. Secret values never go into metadata.
#   poltergust-pipeline-service-account
#                             optional: EMAIL of the service account whose
#                             tokens runs get (--pipeline-service-account; the
#                             node's account needs roles/iam.serviceAccountTokenCreator
#                             on it); without it runs have no Google credentials
#   poltergust-env-cache-size, poltergust-min-free-disk
#                             optional: override what is derived from the disk
#                             size (half of it; 5% of it, 1G to 5G)
#   poltergust-run-as         optional: the unprivileged users pipelines and
#                             builds run as are USER-1 ... USER-4 (--run-as USER
#                             --run-as-pool 4; created if missing; default
#                             poltergust-run). "none" or an empty value runs
#                             them as the node's own user "poltergust", with the
#                             node itself unprivileged, as before --run-as
#
#   scheduler role only:
#   poltergust-luigid-config  optional: a luigi configuration fragment for luigid
#                             ([scheduler], [resources], [task_history], ...),
#                             checked by the release (python -m
#                             poltergust.luigid.configuration: a key luigid
#                             would not read, or that Poltergust sets itself, is
#                             refused by name, exit status 2) and merged with the
#                             fleet's settings into /etc/poltergust/luigi.cfg
#
#   bake role only (deploy/bake-image.sh):
#   poltergust-bake-environments
#                             optional: gs:// environment files whose
#                             environments are built into the node's cache
#
# Metadata from a directory instead of the server: if POLTERGUST_METADATA_DIR
# is set, the value of metadata key K is the content of the file
# "$POLTERGUST_METADATA_DIR/K", e.g. .../instance/attributes/poltergust-path and
# .../project/project-id (a missing file is a missing key); the access token
# still comes from the metadata server. clusters/dataproc-init.sh uses this to
# hand over settings computed from DataProc's own metadata. STORAGE_EMULATOR_HOST
# and POLTERGUST_SECRET_MANAGER_URL replace the Cloud Storage and Secret Manager
# endpoints (for tests against emulators).
#
# What it makes:
#   /opt/poltergust/releases/ID/  the verified wheel and lock file and a venv
#              with exactly them installed (ID: digest of both hashes)
#   node:      /etc/systemd/system/poltergust-node.service, running
#              venv/bin/python -P -m poltergust.async_worker as root, confined
#              by systemd, with --run-as poltergust-run --run-as-pool 4 (system
#              users poltergust-run-1 ... -4 without login or home, each run
#              and build in a bubblewrap sandbox); or, with poltergust-run-as=none, as the user
#              "poltergust" (state in /var/lib/poltergust either way)
#   scheduler: /etc/systemd/system/poltergust-luigid.service (a dynamic user,
#              state in /var/lib/poltergust-luigid) and /etc/poltergust/luigi.cfg;
#              with poltergust-path also poltergust-dashboard.service (a dynamic
#              user, read-only, on 127.0.0.1:8090); no node unit
#   bake:      the release and the user "poltergust", the environments of
#              poltergust-bake-environments built in /var/lib/poltergust/environments,
#              no unit and no secrets; then the VM powers off, to become an image
#
# Checks: the role and the release before anything else; all other metadata
# after the release is installed, by the release itself (python -m
# poltergust.deploy check-metadata, with the node's own flag declarations),
# before any unit, user or secret is written. The scheduler's luigi.cfg comes
# from the release too (python -m poltergust.luigid.configuration merge, with
# poltergust-luigid-config). A dry run installs no release, so it uses
# $POLTERGUST_DRY_RUN_PYTHON (default python3) for the check, which must
# import poltergust, and only says which luigi.cfg it would write.
#
# Exit status: 0 on success, 2 for bad or missing metadata (the message names
# the attribute), 1 for any other failure (a download, a hash mismatch, pip).
set -euo pipefail
# Make failures inside $(...) stop the script too (a failed metadata read).
shopt -s inherit_errexit
umask 022

readonly METADATA_URL="http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1"
readonly STORAGE_URL=${STORAGE_EMULATOR_HOST:-https://storage.googleapis.com}
readonly SECRETS_URL=${POLTERGUST_SECRET_MANAGER_URL:-https://secretmanager.googleapis.com}
readonly RELEASES="/opt/poltergust/releases"
readonly SERVICE_USER="poltergust"
readonly DEFAULT_RUN_AS="poltergust-run"
readonly RUN_AS_POOL=4  # pipeline users USER-1 ... USER-4: one per run or build at a time (--run-as-pool)
readonly STATE_DIR="/var/lib/poltergust"
readonly CACHE_DIR="/var/cache/poltergust"
readonly NODE_SECRETS="/etc/poltergust/node.secrets"
readonly OLD_NODE_ENV="/etc/poltergust/node.env"  # where secrets were an environment file before
readonly NODE_UNIT="poltergust-node.service"
readonly RETIRE_UNIT="poltergust-retire.service"
readonly RUN_FIREWALL="/etc/poltergust/runs.nft"
readonly LUIGID_UNIT="poltergust-luigid.service"
readonly LUIGID_PORT=8082
readonly DASHBOARD_UNIT="poltergust-dashboard.service"
# luigid's page and the dashboard are reached through an ssh tunnel over IAP:
# the dashboard listens on loopback only.
readonly DASHBOARD_HOST="127.0.0.1"
readonly DASHBOARD_PORT=8090
# The node's health server: GCE health checks come from outside the VM, so
# it must listen on all interfaces; the firewall only lets the checkers in.
readonly HEALTH_HOST="0.0.0.0"
readonly HEALTH_PORT=8080
readonly SHA256='^[0-9a-f]{64}$'

DRY_RUN=0
ROOT=""
RUN_AS=""  # the user pipelines run as (node role; see read_run_as)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

usage() {
    sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

log() { printf 'poltergust-init: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
# Bad metadata is the operator's to fix, so say exactly which attribute.
bad_metadata() { log "error: metadata attribute $1: ${*:2}"; exit 2; }

# Run a command, or in dry-run only say what would run.
run() {
    if ((DRY_RUN)); then
        log "dry-run, would run: $*"
    else
        "$@"
    fi
}

# Print metadata key $1 (a path below computeMetadata/v1). Returns 1 when the
# key does not exist; exits when the metadata cannot be read at all.
metadata_get() {
    local key=$1
    if [[ -n "${POLTERGUST_METADATA_DIR:-}" && "$key" != instance/service-accounts/* ]]; then
        [[ -f "$POLTERGUST_METADATA_DIR/$key" ]] || return 1
        # Values set through files often end with a newline: drop trailing ones.
        local value
        value=$(<"$POLTERGUST_METADATA_DIR/$key")
        printf '%s' "$value"
        return 0
    fi
    local status
    # Retries cover the first seconds of boot when the network is not up yet.
    status=$(curl --silent --show-error --retry 5 --retry-connrefused --max-time 10 \
        -H "Metadata-Flavor: Google" -o "$TMP/metadata" -w '%{http_code}' \
        "$METADATA_URL/$key") || status="000"
    case "$status" in
        200) cat "$TMP/metadata"; return 0 ;;
        404) return 1 ;;
        *) die "cannot read $key from the metadata server $METADATA_URL (HTTP status $status);" \
               "outside GCE set POLTERGUST_METADATA_DIR" ;;
    esac
}

# Instance attribute $1, or "" if it is not set.
attribute() {
    metadata_get "instance/attributes/$1" || true
}

# Instance attribute $1; a clear error if it is missing or empty.
required_attribute() {
    local value
    value=$(attribute "$1")
    [[ -n "$value" ]] || bad_metadata "$1" "is missing or empty (it is required for poltergust-role=$ROLE)"
    reject_control_chars "$1" "$value"
    printf '%s' "$value"
}

# Metadata values end up on a systemd command line and in pip's argv: refuse
# anything with control characters (newlines would inject unit directives).
reject_control_chars() {
    if [[ "$2" == *[[:cntrl:]]* ]]; then
        bad_metadata "$1" "contains control characters (newline, tab, ...)"
    fi
}

# Quote one argument for an ExecStart= line. Plain values stay as they are,
# anything else is double-quoted with systemd's escapes: backslash and quote
# are backslash-escaped, and "%" / "$" are doubled so systemd neither expands
# specifiers nor environment variables inside them.
systemd_quote() {
    local value=$1
    if [[ "$value" =~ ^[A-Za-z0-9_@+=:,./-]+$ ]]; then
        printf '%s' "$value"
        return
    fi
    value=${value//\\/\\\\}
    value=${value//\"/\\\"}
    value=${value//%/%%}
    value=${value//\$/\$\$}
    printf '"%s"' "$value"
}

# Write file $1 (an absolute system path, placed under ROOT) from stdin.
write_file() {
    local target="$ROOT$1" mode=$2
    mkdir -p "$(dirname "$target")"
    cat >"$target.new"
    chmod "$mode" "$target.new"
    mv -f "$target.new" "$target"
    log "wrote $target"
}

parse_args() {
    while (($#)); do
        case "$1" in
            --dry-run) DRY_RUN=1 ;;
            --root)
                [[ $# -ge 2 && -n "$2" ]] || die "--root needs a directory"
                ROOT=$2
                shift ;;
            --root=*) ROOT=${1#--root=} ;;
            -h|--help) usage; exit 0 ;;
            *) die "unknown argument: $1 (see --help)" ;;
        esac
        shift
    done
    if ((DRY_RUN)) && [[ -z "$ROOT" ]]; then
        ROOT=$(mktemp -d)
        log "dry-run: writing files under $ROOT"
    fi
    if [[ -n "$ROOT" ]]; then
        mkdir -p "$ROOT"
        ROOT=$(cd "$ROOT" && pwd)
    elif [[ $EUID -ne 0 ]]; then
        die "must run as root (or use --root DIR)"
    fi
}

# ---------------------------------------------------------------------------
# Settings: read and validate everything before touching the machine, so bad
# metadata never leaves a half-configured VM behind.

read_release() {
    local name
    for name in wheel lock; do
        local url sha
        url=$(required_attribute "poltergust-$name-url")
        [[ "$url" =~ ^(gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]/|https://)[A-Za-z0-9._~/+%=-]+$ ]] ||
            bad_metadata "poltergust-$name-url" "'$url' is not a gs://BUCKET/OBJECT or https:// URL"
        sha=$(required_attribute "poltergust-$name-sha256")
        [[ "$sha" =~ $SHA256 ]] || bad_metadata "poltergust-$name-sha256" "must be 64 lower-case hex digits"
        printf -v "${name^^}_URL" '%s' "$url"
        printf -v "${name^^}_SHA" '%s' "$sha"
    done
    WHEEL_FILE=${WHEEL_URL##*/}
    [[ "$WHEEL_FILE" =~ ^poltergust-[A-Za-z0-9_.+]+-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+\.whl$ ]] ||
        bad_metadata poltergust-wheel-url "must end in a wheel file name (poltergust-VERSION-py3-none-any.whl)"
    RELEASE_ID=$(printf '%s %s' "$WHEEL_SHA" "$LOCK_SHA" | sha256sum | cut -c1-16)
    RELEASE="$RELEASES/$RELEASE_ID"
    if [[ -n $(attribute poltergust-package) ]]; then
        bad_metadata poltergust-package "is no longer read: VMs install only a verified release" \
            "(poltergust-wheel-url/-sha256 and poltergust-lock-url/-sha256, made by deploy/build-release.sh)"
    fi
}

# PATHS from poltergust-path: required for a node, optional on the scheduler
# (check_metadata checks it).
read_paths() {
    PATHS_RAW=$(attribute poltergust-path)
    read -r -a PATHS <<<"$PATHS_RAW"
}

# RUN_AS: the user pipelines run as, "" to run them as the node's own user.
read_run_as() {
    RUN_AS=$(metadata_get instance/attributes/poltergust-run-as || printf '%s' "$DEFAULT_RUN_AS")
    [[ "$RUN_AS" != none ]] || RUN_AS=""
}

read_node_settings() {
    read_run_as

    # Read as they are: check_metadata checks them, with the node's own declarations.
    SCHEDULER_URL=$(attribute poltergust-scheduler-url)
    # Without poltergust-topic the node picks its default topic itself.
    TOPIC=$(attribute poltergust-topic)
    PROJECT=$(attribute poltergust-project)
    [[ -n "$PROJECT" ]] || PROJECT=$(metadata_get project/project-id || true)
    MAX_CONCURRENT=$(attribute poltergust-max-concurrent)
    BACKLOG=$(attribute poltergust-backlog-subscription)
    RETIRE_AFTER=$(attribute poltergust-retire-after)
    MIN_NODES=$(attribute poltergust-min-nodes)
    [[ "$RETIRE_AFTER" =~ ^[0-9]{0,7}$ ]] ||
        bad_metadata poltergust-retire-after "must be a number of seconds, got '$RETIRE_AFTER'"
    [[ "$MIN_NODES" =~ ^[0-9]{0,4}$ ]] || bad_metadata poltergust-min-nodes "must be 0 or more, got '$MIN_NODES'"

    ALLOWED_ENV_PREFIXES_RAW=$(attribute poltergust-allowed-environment-prefix)
    local prefixes
    read -r -a prefixes <<<"$ALLOWED_ENV_PREFIXES_RAW"
    ALLOWED_ENV_PREFIXES="${prefixes[*]}"
    SECRETS_RAW=$(attribute poltergust-secrets)
    read -r -a SECRETS <<<"$SECRETS_RAW"

    PIPELINE_SA=$(attribute poltergust-pipeline-service-account)
    [[ -z "$PIPELINE_SA" || "$PIPELINE_SA" =~ ^[a-z][a-z0-9-]{4,29}@[a-z0-9.:-]+\.iam\.gserviceaccount\.com$ ]] ||
        bad_metadata poltergust-pipeline-service-account "'$PIPELINE_SA' is not a service account email"
    ENV_CACHE_SIZE=$(attribute poltergust-env-cache-size)
    MIN_FREE_DISK=$(attribute poltergust-min-free-disk)
}

# The release's python; a dry run installs none, so it uses the one named by
# POLTERGUST_DRY_RUN_PYTHON (default python3), which must import poltergust.
release_python() {
    if ((DRY_RUN)); then
        printf '%s' "${POLTERGUST_DRY_RUN_PYTHON:-python3}"
    else
        printf '%s' "$ROOT$RELEASE/venv/bin/python"
    fi
}

# Everything but the role and the release is checked by the installed release
# (python -m poltergust.deploy check-metadata) with the node's own flag
# declarations and the rules of a fleet's VM, as the node would check its flags:
# each value named by its attribute and the node flag (or rule) it is for. Bad
# metadata exits 2 here, after the release is installed and before anything
# is configured.
check_metadata() {
    local python summary status=0
    python=$(release_python)
    local values=(--value poltergust-path path "$PATHS_RAW")
    if [[ "$ROLE" == node ]]; then
        values+=(--value poltergust-scheduler-url scheduler-url "$SCHEDULER_URL"
            --value poltergust-topic topic "$TOPIC"
            --value poltergust-project project "$PROJECT"
            --value poltergust-max-concurrent max-concurrent "$MAX_CONCURRENT"
            --value poltergust-backlog-subscription backlog-subscription "$BACKLOG"
            --value poltergust-allowed-environment-prefix allowed-environment-prefix "$ALLOWED_ENV_PREFIXES_RAW"
            --value poltergust-secrets secrets "$SECRETS_RAW"
            --value poltergust-env-cache-size env-cache-size "$ENV_CACHE_SIZE"
            --value poltergust-min-free-disk min-free-disk "$MIN_FREE_DISK"
            --value poltergust-run-as run-as "$RUN_AS")
    elif [[ "$ROLE" == bake ]]; then
        values+=(--value poltergust-bake-environments bake-environments "$BAKE_ENVIRONMENTS_RAW")
    fi
    summary=$("$python" -P -m poltergust.deploy check-metadata --role "$ROLE" --service-user "$SERVICE_USER" \
        "${values[@]}") || status=$?
    ((status != 2)) || exit 2
    ((status == 0)) || die "could not check the metadata with $python (exit status $status; see above)"
    log "$summary"
}

read_settings() {
    ROLE=$(attribute poltergust-role)
    case "$ROLE" in
        node|scheduler|bake) ;;
        "") bad_metadata poltergust-role "is missing; set it to 'node' or 'scheduler'" ;;
        *) bad_metadata poltergust-role "must be 'node', 'scheduler' or 'bake', got '$ROLE'" ;;
    esac
    read_release
    read_paths
    [[ "$ROLE" != node ]] || read_node_settings
    [[ "$ROLE" != bake ]] || read_bake_settings
}

# Limits from the machine: the service may use all memory but a reserve for
# the system, and a task count that grows with the cores; the node's disk
# budget for environments is half the disk that holds its state, and below 5%
# free (1G to 5G) its health check fails so that autohealing replaces it.
size_from_machine() {
    local mem_mib cores disk_mib
    mem_mib=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
    MEMORY_MAX="$((mem_mib - (mem_mib / 10 > 512 ? mem_mib / 10 : 512)))M"
    cores=$(nproc)
    TASKS_MAX=$((cores * 1024 > 2048 ? cores * 1024 : 2048))
    mkdir -p "$ROOT/var/lib"
    disk_mib=$(($(df -Pk "$ROOT/var/lib" | awk 'NR == 2 {print $2}') / 1024))
    local five_percent=$((disk_mib / 20))
    ENV_CACHE_SIZE=${ENV_CACHE_SIZE:-$((disk_mib / 2))M}
    MIN_FREE_DISK=${MIN_FREE_DISK:-$((five_percent < 1024 ? 1024 : five_percent > 5120 ? 5120 : five_percent))M}
}

# ---------------------------------------------------------------------------
# Installation of the release: verified files, a venv, pip with hashes.

install_system_packages() {
    # Debian's python3 lacks venv/ensurepip until python3-venv is installed;
    # git and the build tools are for the pipelines' environments.
    local ok='import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))'
    if command -v git >/dev/null && command -v nft >/dev/null && python3 -c "$ok" 2>/dev/null &&
        { [[ -z "$RUN_AS" ]] || command -v bwrap >/dev/null; }
    then
        return
    fi
    [[ -z "$ROOT" ]] || die "python3 (3.11 or newer, with venv) and git are needed; --root installs no packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential git ca-certificates curl bubblewrap nftables
    python3 -c "$ok" || die "python3 is older than 3.11: the units run python -P (use Debian 12 or newer)"
}

# A header file with the VM's OAuth token, for Cloud Storage and Secret Manager.
auth_header() {
    if [[ ! -f "$TMP/auth" ]]; then
        metadata_get instance/service-accounts/default/token >"$TMP/token.json" ||
            die "the metadata server has no token for the VM's service account"
        python3 -c 'import json, sys; print("Authorization: Bearer " + json.load(sys.stdin)["access_token"])' \
            <"$TMP/token.json" >"$TMP/auth" || die "the metadata server's token answer is not valid JSON"
    fi
    printf '%s' "$TMP/auth"
}

# Download URL $1 (gs:// or https://) to $2.
download() {
    local url=$1 dest=$2 bucket object status header
    if [[ "$url" == gs://* ]]; then
        bucket=${url#gs://}
        object=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "${bucket#*/}")
        bucket=${bucket%%/*}
        header=$(auth_header)
        status=$(curl --silent --show-error --retry 5 --retry-connrefused --max-time 300 -H @"$header" \
            -o "$dest" -w '%{http_code}' "$STORAGE_URL/storage/v1/b/$bucket/o/$object?alt=media") || status=000
    else
        status=$(curl --silent --show-error --retry 5 --proto '=https' --max-time 300 \
            -o "$dest" -w '%{http_code}' "$url") || status=000
    fi
    [[ "$status" == 200 ]] || die "cannot download $url (HTTP status $status)"
}

# Download URL $1 to file $2, refusing it unless its sha256 is $3.
fetch_verified() {
    local url=$1 dest=$2 expected=$3 actual
    download "$url" "$TMP/download"
    actual=$(sha256sum "$TMP/download" | cut -d' ' -f1)
    if [[ "$actual" != "$expected" ]]; then
        die "$url has sha256 $actual, but the metadata says $expected: it is not the file" \
            "the release was built with; nothing was installed"
    fi
    mv "$TMP/download" "$dest"
}

install_release() {
    local dir="$ROOT$RELEASE"
    if ((DRY_RUN)); then
        log "dry-run, would install $WHEEL_URL (sha256 $WHEEL_SHA) with $LOCK_URL into $RELEASE/venv"
        return
    fi
    if [[ -f "$dir/.installed" ]]; then
        log "release $RELEASE_ID is installed already"
        return
    fi
    install_system_packages
    rm -rf "$dir"
    mkdir -p "$dir"
    fetch_verified "$WHEEL_URL" "$dir/$WHEEL_FILE" "$WHEEL_SHA"
    fetch_verified "$LOCK_URL" "$dir/requirements.lock" "$LOCK_SHA"
    # The wheel itself with its hash, so that pip checks every single file.
    printf '%s --hash=sha256:%s\n' "$dir/$WHEEL_FILE" "$WHEEL_SHA" >"$dir/poltergust.txt"
    python3 -m venv "$dir/venv"
    log "installing release $RELEASE_ID: $WHEEL_FILE and its locked dependencies"
    "$dir/venv/bin/python" -m pip install --disable-pip-version-check --no-input --no-cache-dir --retries 10 \
        --require-hashes --only-binary :all: -r "$dir/requirements.lock" -r "$dir/poltergust.txt" ||
        die "pip could not install release $RELEASE_ID (see above); nothing was started"
    touch "$dir/.installed"
}

# Remove the releases other than the current one (after it started).
prune_releases() {
    local dir
    for dir in "$ROOT$RELEASES"/*; do
        [[ "$dir" == "$ROOT$RELEASE" || ! -d "$dir" ]] || run rm -rf "$dir"
    done
}

# The node's user: "poltergust" (its home the state directory), or with
# --run-as the pipelines' user, which gets no login shell and no home (each
# run's HOME is its private working directory).
create_user() {
    local user=${RUN_AS:-$SERVICE_USER} home=$STATE_DIR
    [[ -z "$RUN_AS" ]] || home=/nonexistent
    if [[ -n "$ROOT" ]]; then
        log "--root: not creating the system user $user"
    else
        local users=("$user") slot
        if [[ -n "$RUN_AS" ]]; then
            users=()
            for slot in $(seq "$RUN_AS_POOL"); do
                users+=("$RUN_AS-$slot")
            done
        fi
        for user in "${users[@]}"; do
            id -u "$user" >/dev/null 2>&1 ||
                useradd --system --home-dir "$home" --no-create-home --shell /usr/sbin/nologin "$user"
            [[ -z "$RUN_AS" || $(id -u "$user") != 0 ]] || die "poltergust-run-as names $user, which has user id 0"
        done
    fi
    if [[ -n "$RUN_AS" && -z "$ROOT" ]]; then
        command -v setpriv >/dev/null || die "--run-as needs setpriv (Debian package util-linux)"
        command -v bwrap >/dev/null || die "--run-as needs bwrap (Debian package bubblewrap)"
    fi
}

# Pipelines never reach the metadata server, whose tokens are the node's
# service account's (every secret, every bucket): a firewall rule for the
# pipelines' user (owner match), loaded on every boot. Runs that need Google
# credentials get a pipeline service account's instead (--pipeline-service-account).
write_run_firewall() {
    if [[ -z "$RUN_AS" ]]; then
        log "poltergust-run-as is none: pipelines run as the node's user and can reach the metadata server"
        rm -f "$ROOT$RUN_FIREWALL"
        return
    fi
    local user uid rules=""
    for user in "$RUN_AS" $(seq -f "$RUN_AS-%g" "$RUN_AS_POOL"); do
        if ! uid=$(id -u "$user" 2>/dev/null); then
            [[ "$user" == "$RUN_AS" ]] || continue  # a pool user not created (--root creates no system user)
            uid="\"$user\""
        fi
        rules+="        meta skuid $uid ip daddr 169.254.169.254 counter reject"$'\n'
        rules+="        meta skuid $uid ip6 daddr fd20:ce::254 counter reject"$'\n'
    done
    write_file "$RUN_FIREWALL" 0644 <<EOF
# Written by poltergust node-init.sh on every boot: processes of the pipelines'
# users ($RUN_AS and its pool, $RUN_AS-1 ... $RUN_AS-$RUN_AS_POOL) cannot reach the
# metadata server (169.254.169.254, also known as metadata.google.internal, and
# its IPv6 address).
table inet poltergust_runs
delete table inet poltergust_runs
table inet poltergust_runs {
    chain output {
        type filter hook output priority filter; policy accept;
${rules%$'\n'}
    }
}
EOF
    if [[ -n "$ROOT" ]]; then
        log "--root: not loading $RUN_FIREWALL"
    else
        run nft -f "$RUN_FIREWALL"
    fi
}

# Secrets named in metadata, from Secret Manager into the node's secrets file
# (root's, 0600): the unit passes it as a systemd credential, which the node
# reads at start (--secrets-file), so no secret is in its environment, where
# a process of its user could read it in /proc/PID/environ.
write_secrets() {
    rm -f "$ROOT$OLD_NODE_ENV"
    if ((!${#SECRETS[@]})); then
        rm -f "$ROOT$NODE_SECRETS"
        return
    fi
    local entry name secret status header
    : >"$TMP/node.secrets"
    for entry in "${SECRETS[@]}"; do
        name=${entry%%=*}
        secret=${entry#*=}
        [[ "$secret" == projects/* ]] || secret="projects/$PROJECT/secrets/$secret"
        [[ "$secret" == */versions/* ]] || secret+="/versions/latest"
        if ((DRY_RUN)); then
            log "dry-run, would read $secret into $NODE_SECRETS as $name"
            continue
        fi
        header=$(auth_header)
        status=$(curl --silent --show-error --retry 5 --max-time 30 -H @"$header" \
            -o "$TMP/secret.json" -w '%{http_code}' "$SECRETS_URL/v1/$secret:access") || status=000
        [[ "$status" == 200 ]] || die "cannot read $secret for $name (HTTP status $status): the node's" \
            "service account needs roles/secretmanager.secretAccessor on it"
        python3 - "$TMP/secret.json" "$name" >>"$TMP/node.secrets" <<'EOF' || die "secret for $name is unusable"
import base64, json, sys
value = base64.b64decode(json.load(open(sys.argv[1]))["payload"]["data"]).decode()
if any(c in value for c in "\n\r\0"):
    sys.exit(f"the value of {sys.argv[2]} has a line break or NUL byte, which a NAME=VALUE line cannot hold")
print(f"{sys.argv[2]}={value}")
EOF
    done
    rm -f "$TMP/secret.json"
    ((DRY_RUN)) || write_file "$NODE_SECRETS" 0600 <"$TMP/node.secrets"
}

# ---------------------------------------------------------------------------
# Unit files.

# What every unit may not do: a read-only system, no devices, kernel or
# namespaces, only the system calls of ordinary services. $1 is the
# capabilities it keeps (none but for the node that switches to --run-as).
# The node runs arbitrary pipeline tools, so it keeps chown and friends (which
# fail without capabilities anyway); luigid and the dashboard get stricter
# filters. Scored with `systemd-analyze security --offline=true` (deploy/README.md).
hardening() {  # CAPABILITIES [NAMESPACES it may create; default none]
    cat <<EOF
MemoryMax=$MEMORY_MAX
TasksMax=$TASKS_MAX
NoNewPrivileges=yes
CapabilityBoundingSet=$1
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectProc=invisible
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=${2:-yes}
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
PrivateMounts=yes
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
EOF
}

# An unprivileged unit: no capabilities, no other users, private files.
unprivileged_hardening() {
    cat <<EOF
UMask=0027
StateDirectoryMode=0750
PrivateUsers=yes
EOF
    hardening ""
}

# The node with --run-as runs as root, for setpriv to start each run as a
# pipelines' user. It keeps exactly the capabilities for that: setuid/setgid
# (setpriv), chown (a run's private directory goes to that user), kill (stop a
# run's process group), dac_override and fowner (remove what a run left in its
# directory, even in sticky or unreadable subdirectories), sys_admin with the
# pid, mnt and ipc namespaces and the mount calls (bubblewrap makes each run's
# and build's sandbox: a PID namespace and its own /proc). No PrivateUsers:
# the pipelines' user must exist in the node's user namespace. Files it makes
# are readable by others (UMask=0022) because the pipelines run the cached
# environments; the state directories are traversable but not listable
# (0711), its logs are 0700 (sandbox.lock_down) and its HOME, with pip's
# cache, is the cache directory (0700). Root may read all files, so the
# system's secrets are hidden from it.
run_as_hardening() {
    cat <<EOF
UMask=0022
StateDirectoryMode=0711
CacheDirectoryMode=0700
InaccessiblePaths=-/etc/shadow -/etc/gshadow -/etc/ssh -/etc/sudoers -/etc/sudoers.d
SystemCallFilter=@mount
EOF
    hardening "CAP_SETUID CAP_SETGID CAP_CHOWN CAP_KILL CAP_DAC_OVERRIDE CAP_FOWNER CAP_SYS_ADMIN" "pid mnt ipc"
}

strict_hardening() {
    unprivileged_hardening
    cat <<EOF
SystemCallFilter=~@privileged @resources
MemoryDenyWriteExecute=yes
EOF
}

# Words as one ExecStart= line, each quoted for systemd.
exec_line() {
    local out="" word
    for word in "$@"; do
        out+="${out:+ }$(systemd_quote "$word")"
    done
    printf '%s' "$out"
}

node_exec_start() {
    local words=("$RELEASE/venv/bin/python" -P -m poltergust.async_worker) path entry
    for path in "${PATHS[@]}"; do
        words+=(--path "$path")
    done
    words+=(--scheduler-url "$SCHEDULER_URL")
    [[ -z "$TOPIC" ]] || words+=(--topic "$TOPIC")
    words+=(--project "$PROJECT" --http-host "$HEALTH_HOST" --http-port "$HEALTH_PORT")
    for entry in "${SECRETS[@]}"; do
        words+=(--secret-env "${entry%%=*}")
    done
    [[ -z "$PIPELINE_SA" ]] || words+=(--pipeline-service-account "$PIPELINE_SA")
    exec_line "${words[@]}"
    # %d: the unit's credentials directory (LoadCredential=), a specifier exec_line would escape.
    ((!${#SECRETS[@]})) || printf ' --secrets-file %%d/node-secrets'
    words=(--env-cache-size "$ENV_CACHE_SIZE" --min-free-disk "$MIN_FREE_DISK")
    [[ -z "$RUN_AS" ]] || words+=(--run-as "$RUN_AS" --run-as-pool "$RUN_AS_POOL")
    printf ' %s' "$(exec_line "${words[@]}")"
}

write_node_unit() {
    local optional=""
    if [[ -n "$MAX_CONCURRENT" ]]; then
        optional+="Environment=POLTERGUST_MAX_CONCURRENT=$MAX_CONCURRENT"$'\n'
    fi
    if [[ -n "$BACKLOG" ]]; then
        optional+="Environment=POLTERGUST_BACKLOG_SUBSCRIPTION=$BACKLOG"$'\n'
    fi
    if [[ -n "$ALLOWED_ENV_PREFIXES" ]]; then
        optional+="Environment=\"POLTERGUST_ALLOWED_ENVIRONMENT_PREFIX=$ALLOWED_ENV_PREFIXES\""$'\n'
    fi
    local identity home=$STATE_DIR confinement credential=""
    if ((${#SECRETS[@]})); then
        credential="# Secrets for {{NAME}} in environment files, from Secret Manager: a file the node"$'\n'
        credential+="# reads at start (--secrets-file), never in its environment."$'\n'
        credential+="LoadCredential=node-secrets:$NODE_SECRETS"$'\n'
    fi
    if [[ -n "$RUN_AS" ]]; then
        identity="# Root, confined below, so that each run starts as $RUN_AS (--run-as)."$'\n'
        identity+="CacheDirectory=poltergust"
        home=$CACHE_DIR
        confinement=$(run_as_hardening)
    else
        identity="User=$SERVICE_USER"$'\n'"Group=$SERVICE_USER"
        confinement=$(unprivileged_hardening)
    fi
    write_file "/etc/systemd/system/$NODE_UNIT" 0644 <<EOF
# Written by poltergust node-init.sh from the instance metadata; rewritten on
# every boot, so change the metadata rather than this file.
[Unit]
Description=Poltergust node (runs the Luigi pipelines submitted to its bucket)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
$identity
StateDirectory=poltergust poltergust/data poltergust/environments
# The release's directory belongs to root: nothing the node or a pipeline
# writes can end up on the node's import path (python -P ignores it anyway).
WorkingDirectory=$RELEASE
Environment=HOME=$home
Environment=PYTHONUNBUFFERED=1
Environment=POLTERGUST_DATA_DIR=$STATE_DIR/data
Environment=POLTERGUST_ENV_DIR=$STATE_DIR/environments
${optional}${credential}ExecStart=$(node_exec_start)
# SIGTERM goes to the node only (KillMode=mixed): it stops taking work, stops
# its luigi children and exits 0 within seconds. Whatever is left when it has
# exited, or when TimeoutStopSec runs out, gets SIGKILL.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec=60
Restart=on-failure
RestartSec=10
$confinement

[Install]
WantedBy=multi-user.target
EOF
}

# luigid's configuration: the fleet's settings (see poltergust.luigid.configuration)
# merged with poltergust-luigid-config, checked by the installed release.
write_luigid_config() {
    local merge=("$ROOT$RELEASE/venv/bin/python" -P -m poltergust.luigid.configuration merge "$TMP/luigid.cfg")
    attribute poltergust-luigid-config >"$TMP/luigid.cfg"
    if ((DRY_RUN)); then
        log "dry-run, would run: ${merge[*]} (and write /etc/poltergust/luigi.cfg)"
        return
    fi
    (cd "$ROOT$RELEASE" && "${merge[@]}" --out "$TMP/luigi.cfg") 2>"$TMP/luigid-config.err" ||
        bad_metadata poltergust-luigid-config "$(sed "s|^$TMP/luigid.cfg: ||" "$TMP/luigid-config.err")"
    write_file /etc/poltergust/luigi.cfg 0644 <"$TMP/luigi.cfg"
}

# The names nodes reach luigid by (--scheduler-url: its internal address, or
# its internal DNS name): luigid refuses any other Host, and any foreign
# Origin, so that no web page can call it through the operator's tunnel.
luigid_exec_start() {
    local words=("$RELEASE/venv/bin/python" -P -m poltergust.luigid --port "$LUIGID_PORT" --address 0.0.0.0
        --state-path /var/lib/poltergust-luigid/state.pickle) name
    for name in "$(metadata_get instance/network-interfaces/0/ip || true)" \
                "$(metadata_get instance/hostname || true)"; do
        [[ "$name" =~ ^[A-Za-z0-9.:-]+$ ]] || continue
        words+=(--allowed-host "$name")
        [[ "$name" != *.* || "$name" =~ ^[0-9.]+$ ]] || words+=(--allowed-host "${name%%.*}")
    done
    exec_line "${words[@]}"
}

write_scheduler_files() {
    write_luigid_config
    write_file "/etc/systemd/system/$LUIGID_UNIT" 0644 <<EOF
# Written by poltergust node-init.sh; rewritten on every boot.
[Unit]
Description=Luigi central scheduler (luigid) of the Poltergust fleet
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
DynamicUser=yes
StateDirectory=poltergust-luigid
WorkingDirectory=$RELEASE
Environment=HOME=/var/lib/poltergust-luigid
Environment=LUIGI_CONFIG_PATH=/etc/poltergust/luigi.cfg
# Listens on all interfaces: the firewall admits only the nodes.
ExecStart=$(luigid_exec_start)
KillSignal=SIGTERM
TimeoutStopSec=60
Restart=on-failure
RestartSec=5
$(strict_hardening)

[Install]
WantedBy=multi-user.target
EOF
}

# ---------------------------------------------------------------------------
# The bake role: a VM that becomes a node image (deploy/bake-image.sh). It
# installs the release and builds environments into the node's cache, as the
# node's user, then powers off; it writes no unit and reads no secret, so
# nothing of it runs or leaks until a node boots from the image (and finds the
# release installed and the environments cached).

read_bake_settings() {
    BAKE_ENVIRONMENTS_RAW=$(attribute poltergust-bake-environments)
    read -r -a BAKE_ENVIRONMENTS <<<"$BAKE_ENVIRONMENTS_RAW"
}

bake() {
    create_user
    local env_dir="$ROOT$STATE_DIR/environments"
    run mkdir -p "$env_dir"
    if ((${#BAKE_ENVIRONMENTS[@]})); then
        local build=("$ROOT$RELEASE/venv/bin/python" -P -m poltergust.prebuild --env-dir "$env_dir"
            "${BAKE_ENVIRONMENTS[@]}")
        if [[ -z "$ROOT" ]]; then
            chown -R "$SERVICE_USER:$SERVICE_USER" "$STATE_DIR"
            build=(runuser -u "$SERVICE_USER" -- "${build[@]}")
        fi
        log "building ${#BAKE_ENVIRONMENTS[@]} environment(s) into $env_dir"
        (cd "$ROOT$RELEASE" && run "${build[@]}") || die "could not build the environments (see above)"
    fi
    # bake-image.sh waits for the VM to stop, then looks for this line.
    log "bake done: release $RELEASE_ID, ${#BAKE_ENVIRONMENTS[@]} environment(s); powering off"
    run systemctl poweroff
}

# The dashboard: read-only, as a dynamic user, on loopback (reached through
# the same ssh tunnel as luigid's page); it reads the bucket with the VM's
# service account, which may only read it.
write_dashboard_unit() {
    local words=("$RELEASE/venv/bin/python" -P -m poltergust.cli dashboard) path
    for path in "${PATHS[@]}"; do
        words+=(--path "$path")
    done
    words+=(--scheduler-url "http://127.0.0.1:$LUIGID_PORT" --host "$DASHBOARD_HOST" --port "$DASHBOARD_PORT")
    write_file "/etc/systemd/system/$DASHBOARD_UNIT" 0644 <<EOF
# Written by poltergust node-init.sh from the instance metadata; rewritten on
# every boot, so change the metadata rather than this file.
[Unit]
Description=Poltergust dashboard (read-only view of the pipelines, runs, logs and nodes)
Wants=network-online.target
After=network-online.target $LUIGID_UNIT

[Service]
Type=simple
DynamicUser=yes
WorkingDirectory=$RELEASE
Environment=PYTHONUNBUFFERED=1
ExecStart=$(exec_line "${words[@]}")
KillSignal=SIGTERM
TimeoutStopSec=30
Restart=on-failure
RestartSec=5
$(strict_hardening)

[Install]
WantedBy=multi-user.target
EOF
}

# Scale-in without taking busy nodes: once the node has had no run for
# poltergust-retire-after seconds, poltergust.node.retire deletes this VM from
# its group (never below poltergust-min-nodes). Without the setting, a unit of
# an earlier boot goes.
write_retire_unit() {
    if [[ -z "$RETIRE_AFTER" || "$RETIRE_AFTER" == 0 ]]; then
        if [[ -f "$ROOT/etc/systemd/system/$RETIRE_UNIT" ]]; then
            run systemctl disable --now "$RETIRE_UNIT"
            rm -f "$ROOT/etc/systemd/system/$RETIRE_UNIT"
        fi
        return
    fi
    local words=("$RELEASE/venv/bin/python" -P -m poltergust.node.retire
        --metrics-url "http://127.0.0.1:$HEALTH_PORT/metrics" --after "$RETIRE_AFTER" --min-nodes "${MIN_NODES:-0}")
    write_file "/etc/systemd/system/$RETIRE_UNIT" 0644 <<EOF
# Written by poltergust node-init.sh from the instance metadata; rewritten on every boot.
[Unit]
Description=Poltergust node retirement (an idle node leaves its managed instance group)
After=$NODE_UNIT

[Service]
Type=simple
DynamicUser=yes
WorkingDirectory=$RELEASE
ExecStart=$(exec_line "${words[@]}")
Restart=on-failure
RestartSec=60
$(strict_hardening)

[Install]
WantedBy=multi-user.target
EOF
    start_unit "$RETIRE_UNIT"
}

# A dashboard from an earlier boot goes when poltergust-path is gone.
remove_dashboard_unit() {
    log "no poltergust-path in the metadata: not running the dashboard"
    if [[ -f "$ROOT/etc/systemd/system/$DASHBOARD_UNIT" ]]; then
        run systemctl disable --now "$DASHBOARD_UNIT"
        rm -f "$ROOT/etc/systemd/system/$DASHBOARD_UNIT"
    fi
}

start_unit() {
    run systemctl daemon-reload
    run systemctl enable "$1"
    # restart, not start: on a reboot with changed metadata the new unit wins.
    run systemctl restart "$1"
}

main() {
    parse_args "$@"
    read_settings
    size_from_machine
    log "role=$ROLE release=$RELEASE_ID wheel=$WHEEL_URL"

    install_release
    check_metadata
    if [[ "$ROLE" == bake ]]; then
        bake
        return
    fi
    if [[ "$ROLE" == scheduler ]]; then
        write_scheduler_files
        start_unit "$LUIGID_UNIT"
        if ((${#PATHS[@]})); then
            write_dashboard_unit
            start_unit "$DASHBOARD_UNIT"
        else
            remove_dashboard_unit
        fi
    else
        create_user
        write_run_firewall
        write_secrets
        write_node_unit
        start_unit "$NODE_UNIT"
        write_retire_unit
    fi
    prune_releases
    log "done: $ROLE configured with release $RELEASE_ID"
}

main "$@"
