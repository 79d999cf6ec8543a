#!/usr/bin/env bash
# DataProc initialisation action for Poltergust, run as root on every VM of
# the cluster made by dataproc-create-cluster.sh:
#   master  -> luigid, the central scheduler
#   workers -> a Poltergust node talking to the master's luigid
#
# It translates DataProc's metadata into the poltergust-* settings of
# deploy/node-init.sh and runs that script, so that DataProc and plain
# Compute Engine VMs are set up by the same code. Cluster metadata it reads
# (set by dataproc-create-cluster.sh):
#   dataproc-role, dataproc-master        (set by DataProc itself)
#   poltergust-path, poltergust-topic, poltergust-project,
#   poltergust-wheel-url, poltergust-wheel-sha256, poltergust-lock-url,
#   poltergust-lock-sha256                (the release, see node-init.sh)
#   poltergust-init-url, poltergust-init-sha256
#                                         gs:// URL of node-init.sh and its digest
#
# For tests: POLTERGUST_GET_METADATA replaces DataProc's get_metadata_value
# command, POLTERGUST_NODE_INIT names a local node-init.sh to use instead of
# downloading it, and arguments (e.g. --dry-run --root DIR) are passed on to
# node-init.sh.
set -euo pipefail
shopt -s inherit_errexit

GET_METADATA=${POLTERGUST_GET_METADATA:-/usr/share/google/get_metadata_value}
LUIGID_PORT=8082

die() { printf 'poltergust dataproc-init: error: %s\n' "$*" >&2; exit 1; }

# Instance attribute $1, empty if unset.
attribute() {
    "$GET_METADATA" "attributes/$1" 2>/dev/null || true
}

role=$(attribute dataproc-role)
case "$role" in
    Master) poltergust_role=scheduler ;;
    Worker) poltergust_role=node ;;
    *) die "metadata attribute dataproc-role: expected Master or Worker, got '$role'" ;;
esac
master=$(attribute dataproc-master)
[[ -n "$master" ]] || die "metadata attribute dataproc-master is missing"

# Settings for node-init.sh, as a metadata directory (see its header).
metadata_dir=$(mktemp -d)
trap 'rm -rf "$metadata_dir"' EXIT
mkdir -p "$metadata_dir/instance/attributes"
put() { printf '%s' "$2" >"$metadata_dir/instance/attributes/$1"; }
put poltergust-role "$poltergust_role"
names=(poltergust-path poltergust-wheel-url poltergust-wheel-sha256 poltergust-lock-url poltergust-lock-sha256)
# Only a node reads these (tests/test_deploy_consistency.py).
if [[ "$poltergust_role" == node ]]; then
    put poltergust-scheduler-url "http://$master:$LUIGID_PORT"
    names+=(poltergust-topic poltergust-project)
else
    names+=(poltergust-luigid-config)
fi
for name in "${names[@]}"; do
    value=$(attribute "$name")
    # Left out when empty, so that node-init.sh applies its own default or
    # names the missing attribute.
    [[ -z "$value" ]] || put "$name" "$value"
done

node_init=${POLTERGUST_NODE_INIT:-}
if [[ -z "$node_init" ]]; then
    url=$(attribute poltergust-init-url)
    [[ "$url" == gs://* ]] || die "metadata attribute poltergust-init-url: expected a gs:// URL, got '$url'"
    node_init="$metadata_dir/node-init.sh"
    gcloud storage cp "$url" "$node_init"
    expected=$(attribute poltergust-init-sha256)
    actual=$(sha256sum "$node_init" | cut -d' ' -f1)
    [[ "$actual" == "$expected" ]] ||
        die "$url has sha256 $actual, but metadata attribute poltergust-init-sha256 says '$expected'"
fi

POLTERGUST_METADATA_DIR=$metadata_dir bash "$node_init" "$@"
