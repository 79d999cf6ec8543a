#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Delete what dataproc-create-cluster.sh made:
#
#   cd clusters && ./dataproc-delete-cluster.sh mycluster [--delete-bucket]
#
# deletes the DataProc cluster, the bucket's notification, the nodes'
# subscriptions and the topic poltergust-mycluster. The bucket gs://mycluster
# (pipelines, results, logs) is kept unless --delete-bucket is given.
# Running it again deletes nothing. Settings: POLTERGUST_PROJECT and
# POLTERGUST_REGION as for dataproc-create-cluster.sh.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../deploy/gcloud/lib.sh
source "$HERE/../deploy/gcloud/lib.sh"

usage() {
    sed -n '3,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

CLUSTER=""
DELETE_BUCKET=0
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        --delete-bucket) DELETE_BUCKET=1 ;;
        -*) die "unknown option $arg (see --help)" ;;
        *) [[ -z "$CLUSTER" ]] || die "one cluster name only"; CLUSTER=$arg ;;
    esac
done
[[ -n "$CLUSTER" ]] || { usage >&2; die "missing cluster name"; }

if [[ -z "$PROJECT" ]]; then
    PROJECT=$(gcloud config get-value project 2>/dev/null || true)
    [[ -n "$PROJECT" ]] || die "no project: set POLTERGUST_PROJECT or gcloud config set project"
fi
BUCKET_URL="gs://$CLUSTER"
TOPIC="poltergust-$CLUSTER"
TOPIC_PATH="projects/$PROJECT/topics/$TOPIC"

if exists dataproc clusters describe "$CLUSTER" --region="$REGION"; then
    log "deleting: DataProc cluster $CLUSTER"
    gc dataproc clusters delete "$CLUSTER" --region="$REGION"
else
    log "absent:   DataProc cluster $CLUSTER"
fi

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

if exists pubsub topics describe "$TOPIC"; then
    log "deleting: topic $TOPIC"
    gc pubsub topics delete "$TOPIC"
else
    log "absent:   topic $TOPIC"
fi

if ((DELETE_BUCKET)) && exists storage buckets describe "$BUCKET_URL"; then
    log "deleting: bucket $BUCKET_URL and all its objects"
    gc storage rm --recursive "$BUCKET_URL"
elif exists storage buckets describe "$BUCKET_URL"; then
    log "kept:     bucket $BUCKET_URL (pass --delete-bucket to delete it)"
fi
log "done"
