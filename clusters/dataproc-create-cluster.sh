#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Run Poltergust on a DataProc cluster (the original way to deploy it):
#
#   cd clusters && ./dataproc-create-cluster.sh mycluster 2
#
# makes, if missing: the bucket gs://mycluster, its notification topic
# poltergust-mycluster, the notification (OBJECT_FINALIZE and OBJECT_DELETE
# under pipeline/), and a DataProc cluster "mycluster" with 2 workers whose
# initialisation action (dataproc-init.sh) runs luigid on the master and a
# Poltergust node on each worker. Then it opens an ssh tunnel to the master,
# so luigid's web page is at http://localhost:8082 until you press Ctrl-C.
# Running it again creates nothing new and just opens the tunnel.
#
# Settings (environment variables):
#   POLTERGUST_PROJECT       project (default: gcloud config get-value project)
#   POLTERGUST_REGION        region (default: europe-north1)
#   POLTERGUST_ZONE          zone (default: chosen by DataProc)
#   POLTERGUST_PACKAGE       pip install spec of Poltergust (default: poltergust)
#   DATAPROC_IMAGE_VERSION   (default: 2.2-debian12)
#   DATAPROC_MASTER_MACHINE_TYPE, DATAPROC_WORKER_MACHINE_TYPE (default: n2-standard-4)
#   DATAPROC_SERVICE_ACCOUNT service account of the cluster VMs (default: the
#                            project's Compute Engine default service account)
#   POLTERGUST_NO_TUNNEL=1   do not open the tunnel at the end
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The helpers (gc, have, binding_exists, ...) of the gcloud deploy scripts.
# shellcheck source=../deploy/gcloud/lib.sh
source "$HERE/../deploy/gcloud/lib.sh"

usage() {
    sed -n '3,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    "") usage >&2; die "missing cluster name" ;;
esac
CLUSTER=$1
WORKERS=${2:-2}
[[ "$CLUSTER" =~ ^[a-z][a-z0-9-]{0,49}[a-z0-9]$ ]] ||
    die "cluster name '$CLUSTER': lower-case letters, digits and dashes, starting with a letter"
# DataProc's standard clusters have at least 2 workers.
if ! [[ "$WORKERS" =~ ^[0-9]+$ ]] || ((WORKERS < 2)); then
    die "number of workers must be 2 or more"
fi

if [[ -z "$PROJECT" ]]; then
    PROJECT=$(gcloud config get-value project 2>/dev/null || true)
    [[ -n "$PROJECT" ]] || die "no project: set POLTERGUST_PROJECT or gcloud config set project"
fi
PACKAGE=${POLTERGUST_PACKAGE:-poltergust}
[[ "$PACKAGE" != *"|"* ]] || die "POLTERGUST_PACKAGE must not contain '|'"
IMAGE_VERSION=${DATAPROC_IMAGE_VERSION:-2.2-debian12}
MASTER_MACHINE_TYPE=${DATAPROC_MASTER_MACHINE_TYPE:-n2-standard-4}
WORKER_MACHINE_TYPE=${DATAPROC_WORKER_MACHINE_TYPE:-n2-standard-4}

BUCKET_URL="gs://$CLUSTER"
TOPIC="poltergust-$CLUSTER" # what the node assumes for gs://$CLUSTER
TOPIC_PATH="projects/$PROJECT/topics/$TOPIC"
SCRIPTS_URL="$BUCKET_URL/dataproc"
LUIGID_PORT=8082

log "project $PROJECT, region $REGION, cluster $CLUSTER with $WORKERS workers"

have "bucket $BUCKET_URL" storage buckets describe "$BUCKET_URL" ||
    gc storage buckets create "$BUCKET_URL" --location="$REGION" \
        --uniform-bucket-level-access --public-access-prevention

have "topic $TOPIC" pubsub topics describe "$TOPIC" ||
    gc pubsub topics create "$TOPIC"

# Cloud Storage publishes notifications as the project's storage service agent.
AGENT=$(gc storage service-agent)
if binding_exists roles/pubsub.publisher "serviceAccount:$AGENT" "$TOPIC" pubsub topics; then
    log "exists:   publisher grant for $AGENT on $TOPIC"
else
    log "creating: publisher grant for $AGENT on $TOPIC"
    gc pubsub topics add-iam-policy-binding "$TOPIC" --member="serviceAccount:$AGENT" \
        --role=roles/pubsub.publisher >/dev/null
fi

if [[ -n $(gc storage buckets notifications list "$BUCKET_URL" \
    --filter="\"Notification Configuration\".topic=\"//pubsub.googleapis.com/$TOPIC_PATH\"" \
    --format='value("Notification Configuration".id)') ]]; then
    log "exists:   notification $BUCKET_URL -> $TOPIC"
else
    log "creating: notification $BUCKET_URL -> $TOPIC"
    gc storage buckets notifications create "$BUCKET_URL" --topic="$TOPIC_PATH" \
        --event-types=OBJECT_FINALIZE,OBJECT_DELETE --object-prefix=pipeline/ \
        --payload-format=json --skip-topic-setup
fi

# The init action and the script it hands over to; uploaded on every run so
# that a new cluster always gets the current version.
log "uploading: init scripts to $SCRIPTS_URL/"
gc storage cp "$HERE/dataproc-init.sh" "$HERE/../deploy/node-init.sh" "$SCRIPTS_URL/"

if have "DataProc cluster $CLUSTER" dataproc clusters describe "$CLUSTER" --region="$REGION"; then
    :
else
    create=(dataproc clusters create "$CLUSTER" --region="$REGION"
        --num-workers="$WORKERS"
        --master-machine-type="$MASTER_MACHINE_TYPE" --worker-machine-type="$WORKER_MACHINE_TYPE"
        --master-boot-disk-size=50GB --worker-boot-disk-size=50GB
        --image-version="$IMAGE_VERSION" --scopes=cloud-platform
        --initialization-actions="$SCRIPTS_URL/dataproc-init.sh"
        --initialization-action-timeout=20m
        # Read by dataproc-init.sh on every VM of the cluster.
        --metadata="^|^poltergust-path=$BUCKET_URL/pipeline|poltergust-topic=$TOPIC|poltergust-project=$PROJECT|poltergust-package=$PACKAGE|poltergust-init-url=$SCRIPTS_URL/node-init.sh")
    [[ -z "$ZONE" ]] || create+=(--zone="$ZONE")
    [[ -z "${DATAPROC_SERVICE_ACCOUNT:-}" ]] || create+=(--service-account="$DATAPROC_SERVICE_ACCOUNT")
    gc "${create[@]}"
fi

cat <<EOF

Submit a pipeline:  gcloud storage cp mypipeline.config.yaml $BUCKET_URL/pipeline/
Delete it all:      $HERE/dataproc-delete-cluster.sh $CLUSTER
EOF

if [[ "${POLTERGUST_NO_TUNNEL:-0}" == 1 ]]; then
    exit 0
fi
ZONE=$(gc dataproc clusters describe "$CLUSTER" --region="$REGION" \
    --format='value(config.gceClusterConfig.zoneUri.basename())')
log "tunnel open: luigid's web page is at http://localhost:$LUIGID_PORT (Ctrl-C closes it)"
exec gcloud --project="$PROJECT" compute ssh "$CLUSTER-m" --zone="$ZONE" -- \
    -L "$LUIGID_PORT:localhost:$LUIGID_PORT" -N
