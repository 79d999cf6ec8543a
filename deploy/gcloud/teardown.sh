#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Remove a Poltergust deployment made by create.sh (same settings, same names).
#
# Every delete is guarded by a describe, so running it again deletes nothing
# and it can finish a teardown that stopped half-way. The bucket, which holds
# the users' pipelines, results and logs, is kept unless --delete-bucket.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

DELETE_BUCKET=0
YES=0

usage() {
    cat <<EOF
Usage: ${0##*/} [options]

Deletes what create.sh made: the nodes, their template and health check, the
luigid VM, the network, firewall rules and Cloud NAT, the topic with its
notification and subscriptions, the IAM grants, custom role and service
accounts. The bucket keeps the uploaded releases (_poltergust/dist/) unless
--delete-bucket. Pass the same settings as to create.sh.

$COMMON_HELP

Settings of this script:
  --delete-bucket   also delete the bucket with everything in it
  --yes             do not ask for confirmation (needed without a terminal)
  -h, --help        this text
EOF
}

parse_args() {
    while (($#)); do
        common_flag "$@"
        if ((SHIFT)); then
            shift "$SHIFT"
            continue
        fi
        case "$1" in
            -h|--help) usage; exit 0 ;;
            --delete-bucket) DELETE_BUCKET=1 ;;
            --yes|-y) YES=1 ;;
            *) die "unknown argument: $1 (see --help)" ;;
        esac
        shift
    done
}

confirm() {
    ((YES)) && return 0
    [[ -t 0 ]] || die "not a terminal: pass --yes to delete without confirmation"
    local what="the Poltergust deployment '$NAME' in project $PROJECT"
    ((DELETE_BUCKET)) && what+=" AND the bucket $BUCKET_URL with all its objects"
    local answer
    read -r -p "Delete $what? [y/N] " answer
    [[ "$answer" == [yY]* ]] || die "nothing deleted"
}

# "gone WHAT describe-command...": true if it does not exist (nothing to do);
# otherwise logs that it is being deleted and returns false. Used as:
# gone ... || gc ... delete
gone() {
    local what=$1
    shift
    if exists "$@"; then
        log "deleting: $what"
        return 1
    fi
    log "absent:   $what"
    return 0
}

delete_nodes() {
    # Deleting the group deletes its VMs (each stops its node gracefully:
    # SIGTERM, unfinished configs stay in the bucket) and its autoscaler.
    gone "managed instance group $MIG" compute instance-groups managed describe "$MIG" --region="$REGION" ||
        gc compute instance-groups managed delete "$MIG" --region="$REGION"
    # create.sh names templates $TEMPLATE_PREFIX<checksum>; remove them all.
    local templates template
    templates=$(gc compute instance-templates list --filter="name ~ ^$TEMPLATE_PREFIX" --format='value(name)')
    for template in $templates; do
        [[ "$template" == "$TEMPLATE_PREFIX"* ]] || continue
        log "deleting: instance template $template"
        gc compute instance-templates delete "$template"
    done
    gone "health check $HEALTH_CHECK" compute health-checks describe "$HEALTH_CHECK" --global ||
        gc compute health-checks delete "$HEALTH_CHECK" --global
}

delete_scheduler() {
    gone "luigid VM $SCHEDULER_VM" compute instances describe "$SCHEDULER_VM" --zone="$ZONE" ||
        gc compute instances delete "$SCHEDULER_VM" --zone="$ZONE"
    gone "address $SCHEDULER_ADDRESS" compute addresses describe "$SCHEDULER_ADDRESS" --region="$REGION" ||
        gc compute addresses delete "$SCHEDULER_ADDRESS" --region="$REGION"
}

delete_network() {
    local rule
    for rule in "$FW_LUIGID" "$FW_HEALTH" "$FW_IAP"; do
        gone "firewall rule $rule" compute firewall-rules describe "$rule" ||
            gc compute firewall-rules delete "$rule"
    done
    gone "Cloud NAT $NAT" compute routers nats describe "$NAT" --router="$ROUTER" --region="$REGION" ||
        gc compute routers nats delete "$NAT" --router="$ROUTER" --region="$REGION"
    gone "router $ROUTER" compute routers describe "$ROUTER" --region="$REGION" ||
        gc compute routers delete "$ROUTER" --region="$REGION"
    gone "subnet $SUBNET" compute networks subnets describe "$SUBNET" --region="$REGION" ||
        gc compute networks subnets delete "$SUBNET" --region="$REGION"
    gone "network $NETWORK" compute networks describe "$NETWORK" ||
        gc compute networks delete "$NETWORK"
}

delete_events() {
    if exists pubsub topics describe "$TOPIC"; then
        # The nodes' own subscriptions would expire by themselves; a
        # teardown removes them now.
        local subscriptions subscription
        subscriptions=$(gc pubsub topics list-subscriptions "$TOPIC" --format='value(.)')
        for subscription in $subscriptions; do
            # Only this project's: another project may subscribe to the topic too.
            [[ "$subscription" == "projects/$PROJECT/subscriptions/"* ]] || continue
            log "deleting: subscription $subscription"
            gc pubsub subscriptions delete "$subscription"
        done
    fi

    if exists storage buckets describe "$BUCKET_URL"; then
        local ids id
        ids=$(gc storage buckets notifications list "$BUCKET_URL" \
            --filter="\"Notification Configuration\".topic=\"//pubsub.googleapis.com/$TOPIC_PATH\"" \
            --format='value("Notification Configuration".id)')
        for id in $ids; do
            log "deleting: notification $id of $BUCKET_URL"
            gc storage buckets notifications delete "projects/_/buckets/$BUCKET/notificationConfigs/$id"
        done
    fi

    gone "topic $TOPIC" pubsub topics describe "$TOPIC" ||
        gc pubsub topics delete "$TOPIC"
}

delete_iam() {
    if binding_exists "$ROLE" "$NODE_MEMBER" "$PROJECT" projects; then
        log "deleting: $ROLE grant on project $PROJECT"
        gc projects remove-iam-policy-binding "$PROJECT" --member="$NODE_MEMBER" \
            --role="$ROLE" --condition=None >/dev/null
    fi
    if binding_exists "$RETIRE_ROLE" "$NODE_MEMBER" "$PROJECT" projects; then
        log "deleting: $RETIRE_ROLE grant on project $PROJECT"
        gc projects remove-iam-policy-binding "$PROJECT" --member="$NODE_MEMBER" --role="$RETIRE_ROLE" \
            --all >/dev/null
    fi
    local grant role member
    for grant in "roles/storage.objectUser $NODE_MEMBER" "roles/storage.objectViewer $NODE_MEMBER" \
        "roles/storage.objectViewer serviceAccount:$SCHEDULER_SA"; do
        read -r role member <<<"$grant"
        if ! ((DELETE_BUCKET)) && binding_exists "$role" "$member" "$BUCKET_URL" storage buckets; then
            log "deleting: $role grant for ${member#*:} on $BUCKET_URL (the bucket stays)"
            # --all: also the grants with a condition.
            gc storage buckets remove-iam-policy-binding "$BUCKET_URL" --member="$member" --role="$role" \
                --all >/dev/null
        fi
    done

    local deleted id
    for id in "$ROLE_ID" "$RETIRE_ROLE_ID"; do
        if deleted=$(gc iam roles describe "$id" --format='value(deleted)' 2>/dev/null) &&
            [[ "$deleted" != [Tt]rue ]]; then
            log "deleting: custom role projects/$PROJECT/roles/$id"
            gc iam roles delete "$id" >/dev/null
        else
            log "absent:   custom role projects/$PROJECT/roles/$id"
        fi
    done

    local account
    for account in "$NODE_SA" "$SCHEDULER_SA"; do
        gone "service account $account" iam service-accounts describe "$account" ||
            gc iam service-accounts delete "$account"
    done
}

delete_bucket() {
    if ((DELETE_BUCKET)); then
        gone "bucket $BUCKET_URL and all its objects" storage buckets describe "$BUCKET_URL" ||
            gc storage rm --recursive "$BUCKET_URL"
    elif exists storage buckets describe "$BUCKET_URL"; then
        log "kept:     bucket $BUCKET_URL (pass --delete-bucket to delete it)"
    fi
}

main() {
    parse_args "$@"
    derive_names
    confirm
    # Dependents first: the group uses the template, the VMs use the network
    # and service accounts, the notification uses the topic.
    delete_nodes
    delete_scheduler
    delete_network
    delete_events
    delete_iam
    delete_bucket
    log "done"
}

main "$@"
