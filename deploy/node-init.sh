#!/usr/bin/env bash
# Poltergust VM init script: turns a fresh Debian/Ubuntu VM into a Poltergust
# node or into the fleet's luigi central scheduler (luigid).
#
# It is the startup script of the Terraform instance template and of the VMs
# made by deploy/gcloud/create.sh, and clusters/dataproc-init.sh runs it on
# DataProc. GCE runs startup scripts on every boot, so every step is
# idempotent: a reboot re-reads the metadata, rewrites the unit and restarts it.
#
# Usage:
#   node-init.sh                       configure this VM (as root)
#   node-init.sh --dry-run --root DIR  write the files under DIR only: installs
#                                      nothing and never calls systemctl
#   node-init.sh --help
#
# Settings come from GCE instance metadata (attributes), read from the
# metadata server at http://metadata.google.internal/computeMetadata/v1/:
#   poltergust-role           required: "node" or "scheduler"
#   poltergust-package        pip install spec of Poltergust (default: poltergust);
#                             e.g. poltergust==1.2.0, a git+https URL or a wheel URL
#   node role only:
#   poltergust-path           required: gs://BUCKET/PREFIX to watch; several may be
#                             given separated by spaces (each becomes a --path)
#   poltergust-scheduler-url  required: http(s)://HOST:PORT of luigid
#   poltergust-topic          the bucket's notification topic
#                             (default: poltergust-BUCKET of the first path)
#   poltergust-project        project of the topic and subscriptions
#                             (default: the project/project-id metadata value)
#   poltergust-max-concurrent optional: pipelines one node runs at once
#   poltergust-allowed-environment-prefix
#                             optional: gs:// prefixes environment files may come
#                             from (default, decided by the node: the path's buckets)
#
# Metadata from a directory instead of the server: if POLTERGUST_METADATA_DIR
# is set, the value of metadata key K is the content of the file
# "$POLTERGUST_METADATA_DIR/K", e.g. .../instance/attributes/poltergust-path and
# .../project/project-id (a missing file is a missing key). The tests use this
# with --dry-run, and clusters/dataproc-init.sh uses it to hand over settings
# computed from DataProc's own metadata.
#
# What it makes:
#   node:      /etc/systemd/system/poltergust-node.service, running
#              /opt/poltergust/venv/bin/python -m poltergust.async_worker
#              as the unprivileged user "poltergust" (state in /var/lib/poltergust)
#   scheduler: /etc/systemd/system/poltergust-luigid.service and
#              /etc/poltergust/luigi.cfg; no node unit (the scheduler VM runs no
#              pipelines, which keeps it small and its service account role-less)
#
# Exit status: 0 on success, 2 for bad or missing metadata (the message names
# the attribute), 1 for any other failure.
set -euo pipefail
# Make failures inside $(...) stop the script too (a failed metadata read).
shopt -s inherit_errexit

readonly METADATA_URL="http://metadata.google.internal/computeMetadata/v1"
readonly INSTALL_DIR="/opt/poltergust"
readonly VENV="$INSTALL_DIR/venv"
readonly SERVICE_USER="poltergust"
readonly STATE_DIR="/var/lib/poltergust"
readonly NODE_UNIT="poltergust-node.service"
readonly LUIGID_UNIT="poltergust-luigid.service"
readonly LUIGID_PORT=8082
# The node's health server: GCE health checks come from outside the VM, so
# it must listen on all interfaces; the firewall only lets the checkers in.
readonly HEALTH_HOST="0.0.0.0"
readonly HEALTH_PORT=8080

DRY_RUN=0
ROOT=""

usage() {
    sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

log() { printf 'poltergust-init: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
# Bad metadata is the operator's to fix, so say exactly which attribute.
bad_metadata() { log "error: metadata attribute $1: $2"; exit 2; }

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
    if [[ -n "${POLTERGUST_METADATA_DIR:-}" ]]; then
        [[ -f "$POLTERGUST_METADATA_DIR/$key" ]] || return 1
        # Values set through files often end with a newline: drop trailing ones.
        local value
        value=$(<"$POLTERGUST_METADATA_DIR/$key")
        printf '%s' "$value"
        return 0
    fi
    local body status
    body=$(mktemp)
    # Retries cover the first seconds of boot when the network is not up yet.
    status=$(curl --silent --show-error --retry 5 --retry-connrefused --max-time 10 \
        -H "Metadata-Flavor: Google" -o "$body" -w '%{http_code}' \
        "$METADATA_URL/$key") || status="000"
    case "$status" in
        200) cat "$body"; rm -f "$body"; return 0 ;;
        404) rm -f "$body"; return 1 ;;
        *) rm -f "$body"
           die "cannot read $key from the metadata server $METADATA_URL (HTTP status $status);" \
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
    cat >"$target"
    chmod "$mode" "$target"
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
    if [[ -n "$ROOT" ]] && ! ((DRY_RUN)); then
        die "--root is only for --dry-run: a real run configures this machine"
    fi
    if ((DRY_RUN)) && [[ -z "$ROOT" ]]; then
        ROOT=$(mktemp -d)
        log "dry-run: writing files under $ROOT"
    fi
    if [[ -n "$ROOT" ]]; then
        mkdir -p "$ROOT"
        ROOT=$(cd "$ROOT" && pwd)
    fi
    if ! ((DRY_RUN)) && [[ $EUID -ne 0 ]]; then
        die "must run as root (or use --dry-run --root DIR)"
    fi
}

# ---------------------------------------------------------------------------
# Settings: read and validate everything before touching the machine, so bad
# metadata never leaves a half-configured VM behind.

read_settings() {
    ROLE=$(attribute poltergust-role)
    case "$ROLE" in
        node|scheduler) ;;
        "") bad_metadata poltergust-role "is missing; set it to 'node' or 'scheduler'" ;;
        *) bad_metadata poltergust-role "must be 'node' or 'scheduler', got '$ROLE'" ;;
    esac

    PACKAGE=$(attribute poltergust-package)
    PACKAGE=${PACKAGE:-poltergust}
    reject_control_chars poltergust-package "$PACKAGE"
    if [[ "$PACKAGE" == -* ]]; then
        bad_metadata poltergust-package "must be a package spec, not a pip option: '$PACKAGE'"
    fi

    [[ "$ROLE" == node ]] || return 0

    local raw path
    raw=$(required_attribute poltergust-path)
    reject_control_chars poltergust-path "$raw"
    # Bucket names: 3-222 characters of lower-case letters, digits, - _ and dots.
    local gs_url='^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/.*)?$'
    read -r -a PATHS <<<"$raw"
    ((${#PATHS[@]})) || bad_metadata poltergust-path "is empty (it is required for poltergust-role=node)"
    for path in "${PATHS[@]}"; do
        [[ "$path" =~ $gs_url ]] ||
            bad_metadata poltergust-path "'$path' is not a gs://BUCKET/PREFIX URL"
    done

    SCHEDULER_URL=$(required_attribute poltergust-scheduler-url)
    reject_control_chars poltergust-scheduler-url "$SCHEDULER_URL"
    [[ "$SCHEDULER_URL" =~ ^https?://[^[:space:]/]+(/[^[:space:]]*)?$ ]] ||
        bad_metadata poltergust-scheduler-url "'$SCHEDULER_URL' is not an http(s)://HOST:PORT URL"

    # Default topic: the same one the node itself would pick.
    local first_bucket=${PATHS[0]#gs://}
    first_bucket=${first_bucket%%/*}
    TOPIC=$(attribute poltergust-topic)
    TOPIC=${TOPIC:-poltergust-$first_bucket}
    reject_control_chars poltergust-topic "$TOPIC"
    local topic_id='[A-Za-z][A-Za-z0-9._~+%-]{2,254}'
    [[ "$TOPIC" =~ ^$topic_id$ || "$TOPIC" =~ ^projects/[a-z][a-z0-9.:-]+/topics/$topic_id$ ]] ||
        bad_metadata poltergust-topic "'$TOPIC' is not a valid Pub/Sub topic name"

    PROJECT=$(attribute poltergust-project)
    if [[ -z "$PROJECT" ]]; then
        PROJECT=$(metadata_get project/project-id || true)
        [[ -n "$PROJECT" ]] ||
            bad_metadata poltergust-project "is missing and project/project-id is not available either"
    fi
    reject_control_chars poltergust-project "$PROJECT"
    [[ "$PROJECT" =~ ^([a-z][a-z0-9.-]*:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$ ]] ||
        bad_metadata poltergust-project "'$PROJECT' is not a valid project id"

    MAX_CONCURRENT=$(attribute poltergust-max-concurrent)
    [[ -z "$MAX_CONCURRENT" || "$MAX_CONCURRENT" =~ ^[1-9][0-9]{0,3}$ ]] ||
        bad_metadata poltergust-max-concurrent "must be a positive integer, got '$MAX_CONCURRENT'"

    ALLOWED_ENV_PREFIXES=$(attribute poltergust-allowed-environment-prefix)
    reject_control_chars poltergust-allowed-environment-prefix "$ALLOWED_ENV_PREFIXES"
    local prefixes prefix
    read -r -a prefixes <<<"$ALLOWED_ENV_PREFIXES"
    for prefix in "${prefixes[@]}"; do
        [[ "$prefix" =~ $gs_url && "$prefix" =~ ^[A-Za-z0-9_@+=:,./-]+$ ]] ||
            bad_metadata poltergust-allowed-environment-prefix "'$prefix' is not a gs://BUCKET/PREFIX URL"
    done
    ALLOWED_ENV_PREFIXES="${prefixes[*]}"
}

# ---------------------------------------------------------------------------
# Installation (in dry-run the commands are only printed).

install_python() {
    # Debian's python3 lacks venv/ensurepip until python3-venv is installed;
    # git lets poltergust-package be a git+https URL, and build tools let
    # pipelines' environments install packages that ship only as sources.
    if ! ((DRY_RUN)) && command -v git >/dev/null && python3 -c 'import ensurepip, venv' 2>/dev/null; then
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    run apt-get update
    run apt-get install -y --no-install-recommends \
        python3 python3-venv python3-pip python3-dev build-essential git ca-certificates curl
}

# pip against the package index right after boot can fail transiently.
pip_install() {
    local attempt
    for attempt in 1 2 3 4 5; do
        if run "$VENV/bin/pip" install --disable-pip-version-check --upgrade "$@"; then
            return 0
        fi
        log "pip install failed (attempt $attempt), retrying"
        sleep $((attempt * 10))
    done
    die "pip install $* failed"
}

install_poltergust() {
    install_python
    if [[ ! -x "$VENV/bin/python" ]] || ((DRY_RUN)); then
        run mkdir -p "$INSTALL_DIR"
        run python3 -m venv "$VENV"
    fi
    pip_install pip
    # --upgrade: a reboot picks up a new release when the spec is not pinned.
    pip_install "$PACKAGE"
}

create_user() {
    if ((DRY_RUN)) || ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
        run useradd --system --home-dir "$STATE_DIR" --create-home \
            --shell /usr/sbin/nologin "$SERVICE_USER"
    fi
}

# ---------------------------------------------------------------------------
# Unit files.

node_exec_start() {
    local words=("$VENV/bin/python" -m poltergust.async_worker) path
    for path in "${PATHS[@]}"; do
        words+=(--path "$path")
    done
    words+=(--scheduler-url "$SCHEDULER_URL" --topic "$TOPIC" --project "$PROJECT"
        --http-host "$HEALTH_HOST" --http-port "$HEALTH_PORT")
    local out="" word
    for word in "${words[@]}"; do
        out+="${out:+ }$(systemd_quote "$word")"
    done
    printf '%s' "$out"
}

write_node_unit() {
    local optional=""
    if [[ -n "$MAX_CONCURRENT" ]]; then
        optional+="Environment=POLTERGUST_MAX_CONCURRENT=$MAX_CONCURRENT"$'\n'
    fi
    if [[ -n "$ALLOWED_ENV_PREFIXES" ]]; then
        optional+="Environment=\"POLTERGUST_ALLOWED_ENVIRONMENT_PREFIX=$ALLOWED_ENV_PREFIXES\""$'\n'
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
User=$SERVICE_USER
Group=$SERVICE_USER
StateDirectory=poltergust poltergust/data poltergust/environments
WorkingDirectory=$STATE_DIR
Environment=HOME=$STATE_DIR
Environment=PYTHONUNBUFFERED=1
Environment=POLTERGUST_DATA_DIR=$STATE_DIR/data
Environment=POLTERGUST_ENV_DIR=$STATE_DIR/environments
${optional}ExecStart=$(node_exec_start)
# SIGTERM goes to the node only (KillMode=mixed): it stops taking work, stops
# its luigi children and exits 0 within seconds. Whatever is left when it has
# exited, or when TimeoutStopSec runs out, gets SIGKILL.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec=60
Restart=on-failure
RestartSec=10
NoNewPrivileges=true
PrivateTmp=true
ProtectSystem=full

[Install]
WantedBy=multi-user.target
EOF
}

write_scheduler_files() {
    write_file /etc/poltergust/luigi.cfg 0644 <<EOF
# luigid settings for the Poltergust fleet, written by node-init.sh.
[scheduler]
# Free the tasks of a node that vanished (scaled in, crashed) after 30 s
# instead of 60 s, so that other nodes take them over sooner; check on every
# request rather than once a minute.
worker_disconnect_delay = 30
prune_on_get_work = true
state_path = $STATE_DIR/luigid/state.pickle
record_task_history = false
EOF
    write_file "/etc/systemd/system/$LUIGID_UNIT" 0644 <<EOF
# Written by poltergust node-init.sh; rewritten on every boot.
[Unit]
Description=Luigi central scheduler (luigid) of the Poltergust fleet
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=$SERVICE_USER
Group=$SERVICE_USER
StateDirectory=poltergust poltergust/luigid
LogsDirectory=poltergust
WorkingDirectory=$STATE_DIR
Environment=HOME=$STATE_DIR
Environment=LUIGI_CONFIG_PATH=/etc/poltergust/luigi.cfg
# Listens on all interfaces: the firewall admits only the nodes.
ExecStart=$VENV/bin/luigid --port $LUIGID_PORT --address 0.0.0.0 --state-path $STATE_DIR/luigid/state.pickle --logdir /var/log/poltergust
KillSignal=SIGTERM
TimeoutStopSec=60
Restart=on-failure
RestartSec=5
NoNewPrivileges=true
PrivateTmp=true
ProtectSystem=full

[Install]
WantedBy=multi-user.target
EOF
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
    log "role=$ROLE package=$PACKAGE"

    # In dry-run these only print what they would do (see run()).
    install_poltergust
    create_user

    if [[ "$ROLE" == scheduler ]]; then
        write_scheduler_files
        start_unit "$LUIGID_UNIT"
    else
        write_node_unit
        start_unit "$NODE_UNIT"
    fi
    log "done: $ROLE configured"
}

main "$@"
