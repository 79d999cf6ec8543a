#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Delete what dataproc-create-cluster.sh made:
#
#   cd clusters && ./dataproc-delete-cluster.sh mycluster [--delete-bucket]
#
# deletes the DataProc cluster, the bucket's notification, the nodes'
# subscriptions, the topic poltergust-mycluster, the network with its
# firewall rules, router and NAT, the cluster's grants and its service
# account. The bucket gs://mycluster (pipelines, results, logs, releases) is
# kept unless --delete-bucket is given; so is the custom role
# poltergust_dataproc_node, which other clusters of the project share.
# Running it again deletes nothing. Settings: POLTERGUST_PROJECT and
# POLTERGUST_REGION as for dataproc-create-cluster.sh.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../deploy/gcloud/lib.sh
source "$HERE/../deploy/gcloud/lib.sh"
# shellcheck source=dataproc-names.sh
source "$HERE/dataproc-names.sh"

usage() {
    sed -n '3,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

cluster=""
DELETE_BUCKET=0
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        --delete-bucket) DELETE_BUCKET=1 ;;
        -*) die "unknown option $arg (see --help)" ;;
        *) [[ -z "$cluster" ]] || die "one cluster name only"; cluster=$arg ;;
    esac
done
[[ -n "$cluster" ]] || { usage >&2; die "missing cluster name"; }
dataproc_names "$cluster"

# "gone WHAT describe-command...": true (and says so) if it does not exist.
gone() {
    local what=$1
    shift
    if exists "$@"; then
        log "deleting: $what"
        return 1
    fi
    log "absent:   $what"
}

gone "DataProc cluster $CLUSTER" dataproc clusters describe "$CLUSTER" --region="$REGION" ||
    gc dataproc clusters delete "$CLUSTER" --region="$REGION"

if exists pubsub topics describe "$TOPIC"; then
    for subscription in $(gc pubsub topics list-subscriptions "$TOPIC" --format='value(.)'); do
        [[ "$subscription" == "projects/$PROJECT/subscriptions/"* ]] || continue
        log "deleting: subscription $subscription"
        gc pubsub subscriptions delete "$subscription"
    done
fi

if exists storage buckets describe "$BUCKET_URL"; then
    for id in $(gc storage buckets notifications list "$BUCKET_URL" \
        --filter="\"Notification Configuration\".topic=\"//pubsub.googleapis.com/$TOPIC_PATH\"" \
        --format='value("Notification Configuration".id)'); do
        log "deleting: notification $id of $BUCKET_URL"
        gc storage buckets notifications delete "projects/_/buckets/$CLUSTER/notificationConfigs/$id"
    done
fi

gone "topic $TOPIC" pubsub topics describe "$TOPIC" || gc pubsub topics delete "$TOPIC"

for rule in "$FW_INTERNAL" "$FW_IAP"; do
    gone "firewall rule $rule" compute firewall-rules describe "$rule" || gc compute firewall-rules delete "$rule"
done
gone "Cloud NAT $NAT" compute routers nats describe "$NAT" --router="$ROUTER" --region="$REGION" ||
    gc compute routers nats delete "$NAT" --router="$ROUTER" --region="$REGION"
gone "router $ROUTER" compute routers describe "$ROUTER" --region="$REGION" ||
    gc compute routers delete "$ROUTER" --region="$REGION"
gone "subnet $SUBNET" compute networks subnets describe "$SUBNET" --region="$REGION" ||
    gc compute networks subnets delete "$SUBNET" --region="$REGION"
gone "network $NETWORK" compute networks describe "$NETWORK" || gc compute networks delete "$NETWORK"

for role in roles/dataproc.worker "$ROLE"; do
    if binding_exists "$role" "$MEMBER" "$PROJECT" projects; then
        log "deleting: $role grant on project $PROJECT"
        gc projects remove-iam-policy-binding "$PROJECT" --member="$MEMBER" --role="$role" --all >/dev/null
    fi
done
if ! ((DELETE_BUCKET)); then
    for role in roles/storage.objectUser roles/storage.objectViewer; do
        if binding_exists "$role" "$MEMBER" "$BUCKET_URL" storage buckets; then
            log "deleting: $role grant on $BUCKET_URL (the bucket stays)"
            gc storage buckets remove-iam-policy-binding "$BUCKET_URL" --member="$MEMBER" --role="$role" --all >/dev/null
        fi
    done
fi
gone "service account $SA" iam service-accounts describe "$SA" || gc iam service-accounts delete "$SA"

if ((DELETE_BUCKET)) && exists storage buckets describe "$BUCKET_URL"; then
    log "deleting: bucket $BUCKET_URL and all its objects"
    gc storage rm --recursive "$BUCKET_URL"
elif exists storage buckets describe "$BUCKET_URL"; then
    log "kept:     bucket $BUCKET_URL (pass --delete-bucket to delete it)"
fi
log "done"
