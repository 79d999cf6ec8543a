#!/usr/bin/env bash
# Bake a node image: a boot disk with the release installed and the pipelines'
# environments built, so that a node the autoscaler starts from zero skips
# both (see "Cold start budget" in deploy/README.md).
#
# Run it after deploy/gcloud/create.sh (it uses the deployment's network, node
# service account and bucket). It uploads the release like create.sh, creates
# a temporary VM from the node's base image with the metadata
# poltergust-role=bake, whose node-init.sh installs the release, builds the
# environments into the node's cache and powers the VM off; then it makes an
# image of the VM's disk in an image family and deletes the VM (also when
# anything fails). Point the nodes at the family with
# POLTERGUST_IMAGE_FAMILY=FAMILY POLTERGUST_IMAGE_PROJECT=PROJECT create.sh
# (Terraform: node_image = "projects/PROJECT/global/images/family/FAMILY").
set -euo pipefail
shopt -s inherit_errexit

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=gcloud/lib.sh
source "$HERE/gcloud/lib.sh"

INIT_SCRIPT="$HERE/node-init.sh"
RELEASE=${POLTERGUST_RELEASE:-}
FAMILY=${POLTERGUST_BAKE_FAMILY:-poltergust-node}
BASE_FAMILY=${POLTERGUST_BAKE_BASE_FAMILY:-debian-12}
BASE_PROJECT=${POLTERGUST_BAKE_BASE_PROJECT:-debian-cloud}
MACHINE_TYPE=${POLTERGUST_NODE_MACHINE_TYPE:-e2-standard-4}
DISK_SIZE=${POLTERGUST_NODE_DISK_SIZE:-50GB}
TIMEOUT=${POLTERGUST_BAKE_TIMEOUT:-1800}
# Seconds between looks at the VM's state.
POLL=${POLTERGUST_BAKE_POLL:-15}
KEEP_VM=0
ENVIRONMENTS=()

usage() {
    cat <<EOF
Usage: ${0##*/} [options]

Makes a Poltergust node image: a temporary VM installs the release and builds
the given environments into the node's environment cache, powers off, and its
disk becomes an image in a family; the VM is then deleted. Run it after
deploy/gcloud/create.sh, with the same --project/--region/--name/--bucket.
Requires: gcloud, python3 (and uv, to build the release unless --release).

$COMMON_HELP

Settings of this script:
  --release FILE        POLTERGUST_RELEASE  release.json made by deploy/build-release.sh
                        (default: build one from this checkout now)
  --environment URL     an environment file, gs://BUCKET/OBJECT, whose environment
                        the image carries ready; repeatable
  --family NAME         POLTERGUST_BAKE_FAMILY  image family (default: poltergust-node)
  --base-family NAME    POLTERGUST_BAKE_BASE_FAMILY  image family the VM boots from (default: debian-12)
  --base-project ID     POLTERGUST_BAKE_BASE_PROJECT  its project (default: debian-cloud)
  --machine-type T      POLTERGUST_NODE_MACHINE_TYPE  (default: e2-standard-4)
  --disk-size SIZE      POLTERGUST_NODE_DISK_SIZE  the image's size, at most the
                        nodes' disk size (default: 50GB)
  --timeout SECONDS     POLTERGUST_BAKE_TIMEOUT  longest wait for the VM to power off (default: 1800)
  --keep-vm             leave the VM for inspection when baking fails
  -h, --help            this text

Then: POLTERGUST_IMAGE_FAMILY=FAMILY POLTERGUST_IMAGE_PROJECT=PROJECT deploy/gcloud/create.sh ...
EOF
}

parse_args() {
    while (($#)); do
        common_flag "$@"
        if ((SHIFT)); then
            shift "$SHIFT"
            continue
        fi
        case "${1%%=*}" in
            -h|--help) usage; exit 0 ;;
            --keep-vm) KEEP_VM=1; shift; continue ;;
            --release|--environment|--family|--base-family|--base-project|--machine-type|--disk-size|--timeout)
                flag_arg "$@" ;;
            *) die "unknown argument: $1 (see --help)" ;;
        esac
        case "${1%%=*}" in
            --release) RELEASE=$VALUE ;;
            --environment) ENVIRONMENTS+=("$VALUE") ;;
            --family) FAMILY=$VALUE ;;
            --base-family) BASE_FAMILY=$VALUE ;;
            --base-project) BASE_PROJECT=$VALUE ;;
            --machine-type) MACHINE_TYPE=$VALUE ;;
            --disk-size) DISK_SIZE=$VALUE ;;
            --timeout) TIMEOUT=$VALUE ;;
        esac
        shift "$SHIFT"
    done
}

check_settings() {
    local url
    for url in "${ENVIRONMENTS[@]}"; do
        [[ "$url" =~ ^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]/[A-Za-z0-9._~/+%=-]+$ ]] ||
            die "--environment $url: expected gs://BUCKET/OBJECT (the VM reads it with the node's account)"
    done
    [[ "$FAMILY" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
        die "--family $FAMILY: lower-case letters, digits and dashes, starting with a letter"
    [[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "--timeout $TIMEOUT: a number of seconds"
    [[ "$POLL" =~ ^[0-9]+$ ]] || die "POLTERGUST_BAKE_POLL=$POLL: a number of seconds"
}

# The VM, deleted whatever happens (unless kept for inspection after a failure).
delete_vm() {
    local status=$?
    if ((status != 0 && KEEP_VM)); then
        log "keeping $VM for inspection: gcloud compute instances delete $VM --zone=$ZONE --project=$PROJECT"
        return
    fi
    log "deleting the bake VM $VM"
    gc compute instances delete "$VM" --zone="$ZONE" >/dev/null ||
        log "could not delete $VM: delete it by hand (gcloud compute instances delete $VM --zone=$ZONE)"
}

create_vm() {
    local metadata
    metadata="^|^poltergust-role=bake|$(release_metadata)"
    metadata+="|poltergust-bake-environments=${ENVIRONMENTS[*]}|enable-oslogin=TRUE|block-project-ssh-keys=TRUE"
    log "creating: bake VM $VM (release $RELEASE_VERSION, ${#ENVIRONMENTS[@]} environment(s))"
    gc compute instances create "$VM" --zone="$ZONE" \
        --machine-type="$MACHINE_TYPE" \
        --subnet="$SUBNET" --no-address \
        --service-account="$NODE_SA" --scopes=cloud-platform \
        --image-family="$BASE_FAMILY" --image-project="$BASE_PROJECT" \
        --boot-disk-size="$DISK_SIZE" \
        --shielded-secure-boot --shielded-vtpm --shielded-integrity-monitoring \
        --metadata-from-file="startup-script=$INIT_SCRIPT" \
        --metadata="$metadata" >/dev/null
    trap delete_vm EXIT
}

# Wait until node-init.sh powered the VM off, then check it said it was done.
wait_for_bake() {
    local waited=0 status
    while :; do
        status=$(gc compute instances describe "$VM" --zone="$ZONE" --format='value(status)')
        [[ "$status" != TERMINATED ]] || break
        ((waited < TIMEOUT)) || fail_bake "$VM did not power off within ${TIMEOUT}s (status $status)"
        sleep "$POLL"
        waited=$((waited + (POLL > 0 ? POLL : 1)))
    done
    SERIAL=$(gc compute instances get-serial-port-output "$VM" --zone="$ZONE" 2>/dev/null || true)
    grep -q 'poltergust-init: bake done' <<<"$SERIAL" ||
        fail_bake "$VM powered off without node-init.sh saying 'bake done'"
}

fail_bake() {
    log "error: $*; its last init lines:"
    SERIAL=${SERIAL:-$(gc compute instances get-serial-port-output "$VM" --zone="$ZONE" 2>/dev/null || true)}
    grep 'poltergust-init' <<<"$SERIAL" | tail -n 30 >&2 || true
    exit 1
}

main() {
    parse_args "$@"
    derive_names
    check_settings
    prepare_release "$RELEASE"
    local stamp
    stamp=$(date -u +%Y%m%d-%H%M%S)
    VM="$NAME-bake-$stamp"
    IMAGE="$NAME-node-$stamp"
    log "project $PROJECT, zone $ZONE, bucket $BUCKET_URL, release $RELEASE_VERSION, image family $FAMILY"

    upload_release "$BUCKET_URL"
    create_vm
    wait_for_bake
    log "creating: image $IMAGE in family $FAMILY"
    gc compute images create "$IMAGE" --source-disk="$VM" --source-disk-zone="$ZONE" --family="$FAMILY" \
        --description="Poltergust node: release $RELEASE_VERSION, ${#ENVIRONMENTS[@]} environment(s) built" >/dev/null
    cat <<EOF

Image $IMAGE (family $FAMILY) is ready. Start nodes from it:
  POLTERGUST_IMAGE_FAMILY=$FAMILY POLTERGUST_IMAGE_PROJECT=$PROJECT $HERE/gcloud/create.sh --project=$PROJECT ...
EOF
}

main "$@"
