#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Run Poltergust on a DataProc cluster (the original way to deploy it):
#
#   cd clusters && ./dataproc-create-cluster.sh mycluster 2
#
# makes, if missing:
#   - the bucket gs://mycluster (or checks that an existing one is this
#     project's, with uniform access and public access prevention), its
#     notification topic poltergust-mycluster and the notification
#     (OBJECT_FINALIZE and OBJECT_DELETE under pipeline/);
#   - the release built from this checkout (deploy/build-release.sh) and the
#     init scripts, uploaded below gs://mycluster/_poltergust/dist/, where
#     the cluster (and so every pipeline) can read but not write;
#   - a service account poltergust-mycluster for the cluster's VMs with only
#     the node grants: roles/dataproc.worker (which DataProc needs; its object
#     access is confined by a condition to gs://mycluster outside
#     _poltergust/dist/), read and write on the bucket except the release,
#     subscriber and publisher (calls for help) on the topic, and the custom project role
#     poltergust_dataproc_node (create, read and delete its own subscription);
#   - a network mycluster-net (subnet with Private Google Access, Cloud Router
#     and Cloud NAT for the package installs, no external addresses) whose
#     firewall admits traffic, luigid's port included, only between the
#     cluster's VMs, plus ssh through Identity-Aware Proxy;
#   - the DataProc cluster "mycluster" with 2 workers whose initialisation
#     action (dataproc-init.sh) runs luigid on the master and a Poltergust
#     node on each worker.
# Then it opens an ssh tunnel to the master through IAP, so luigid's web page
# is at http://localhost:8082 until you press Ctrl-C. Running it again
# creates nothing new and just opens the tunnel.
#
# Settings (environment variables):
#   POLTERGUST_PROJECT       project (default: gcloud config get-value project)
#   POLTERGUST_REGION        region (default: europe-north1)
#   POLTERGUST_ZONE          zone (default: chosen by DataProc)
#   POLTERGUST_RELEASE       release.json of a release built by
#                            deploy/build-release.sh (default: build one now)
#   DATAPROC_IMAGE_VERSION   (default: 2.2-debian12)
#   DATAPROC_MASTER_MACHINE_TYPE, DATAPROC_WORKER_MACHINE_TYPE (default: n2-standard-4)
#   DATAPROC_SUBNET_CIDR     the cluster's subnet (default: 10.43.0.0/24)
#   POLTERGUST_LUIGID_CONFIG a luigi configuration file for luigid on the master
#                            ([scheduler], [resources], ...; see "Luigi on the
#                            fleet" in README.md), checked when the master boots
#   POLTERGUST_NO_TUNNEL=1   do not open the tunnel at the end
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The helpers (gc, have, binding_exists, ...) of the gcloud deploy scripts.
# shellcheck source=../deploy/gcloud/lib.sh
source "$HERE/../deploy/gcloud/lib.sh"
# shellcheck source=dataproc-names.sh
source "$HERE/dataproc-names.sh"

usage() {
    sed -n '3,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    "") usage >&2; die "missing cluster name" ;;
esac
dataproc_names "$1"
WORKERS=${2:-2}
# DataProc's standard clusters have at least 2 workers.
if ! [[ "$WORKERS" =~ ^[0-9]+$ ]] || ((WORKERS < 2)); then
    die "number of workers must be 2 or more"
fi
IMAGE_VERSION=${DATAPROC_IMAGE_VERSION:-2.2-debian12}
MASTER_MACHINE_TYPE=${DATAPROC_MASTER_MACHINE_TYPE:-n2-standard-4}
WORKER_MACHINE_TYPE=${DATAPROC_WORKER_MACHINE_TYPE:-n2-standard-4}
SUBNET_CIDR=${DATAPROC_SUBNET_CIDR:-10.43.0.0/24}

prepare_release "${POLTERGUST_RELEASE:-}"
log "project $PROJECT, region $REGION, cluster $CLUSTER with $WORKERS workers, release $RELEASE_VERSION"

# --- bucket, topic, notification ---------------------------------------------
if have "bucket $BUCKET_URL" storage buckets describe "$BUCKET_URL"; then
    check_bucket "$BUCKET_URL"
else
    # No soft delete: every overwritten log and heartbeat would be kept for 7 days.
    gc storage buckets create "$BUCKET_URL" --location="$REGION" \
        --uniform-bucket-level-access --public-access-prevention --soft-delete-duration=0
fi

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

# --- the release and the init scripts, where the cluster cannot write --------
upload_release "$BUCKET_URL"
INIT_SHA=$(sha256 "$HERE/../deploy/node-init.sh")
INIT_URL="$BUCKET_URL/$DIST_ROOT$RELEASE_VERSION/init-$(sha256 "$HERE/dataproc-init.sh" | cut -c1-6)${INIT_SHA:0:6}"
for script in "$HERE/dataproc-init.sh" "$HERE/../deploy/node-init.sh"; do
    have "init script $INIT_URL/${script##*/}" storage objects describe "$INIT_URL/${script##*/}" ||
        gc storage cp "$script" "$INIT_URL/${script##*/}"
done

# --- the cluster's own service account and its grants ------------------------
have "service account $SA" iam service-accounts describe "$SA" ||
    gc iam service-accounts create "$SA_ID" --display-name="Poltergust on DataProc $CLUSTER" \
        --description="VMs of the DataProc cluster $CLUSTER: Poltergust nodes and luigid"
ensure_subscription_role "$ROLE_ID" "Poltergust nodes on DataProc"
grant_on_bucket "$BUCKET_URL" roles/storage.objectViewer "$MEMBER"
grant_on_bucket "$BUCKET_URL" roles/storage.objectUser "$MEMBER" "$(not_the_release "$CLUSTER")" not-the-release
if binding_exists roles/pubsub.subscriber "$MEMBER" "$TOPIC" pubsub topics; then
    log "exists:   subscriber grant on $TOPIC"
else
    log "creating: subscriber grant on $TOPIC"
    retry gc pubsub topics add-iam-policy-binding "$TOPIC" --member="$MEMBER" --role=roles/pubsub.subscriber >/dev/null
fi
# Calls for help are published on the same topic (pubsub.topics.publish).
grant_on_topic "$TOPIC" roles/pubsub.publisher "$MEMBER"
# DataProc's agent needs roles/dataproc.worker on the project; the condition
# keeps the object access that role brings to this bucket, outside the release.
WORKER_CONDITION="resource.type != \"storage.googleapis.com/Object\" || (resource.name.startsWith(\"projects/_/buckets/$CLUSTER/objects/\") && $(not_the_release "$CLUSTER"))"
for role in roles/dataproc.worker "$ROLE"; do
    if binding_exists "$role" "$MEMBER" "$PROJECT" projects; then
        log "exists:   $role grant on project $PROJECT"
        continue
    fi
    log "creating: $role grant on project $PROJECT"
    condition=None
    [[ "$role" != roles/dataproc.worker ]] ||
        condition="expression=$WORKER_CONDITION,title=dataproc-objects-of-$CLUSTER"
    retry gc projects add-iam-policy-binding "$PROJECT" --member="$MEMBER" --role="$role" \
        --condition="$condition" >/dev/null
done

# --- network: the cluster talks to itself, installs go through NAT -----------
have "network $NETWORK" compute networks describe "$NETWORK" ||
    gc compute networks create "$NETWORK" --subnet-mode=custom
have "subnet $SUBNET" compute networks subnets describe "$SUBNET" --region="$REGION" ||
    gc compute networks subnets create "$SUBNET" --network="$NETWORK" --region="$REGION" \
        --range="$SUBNET_CIDR" --enable-private-ip-google-access --enable-flow-logs
have "router $ROUTER" compute routers describe "$ROUTER" --region="$REGION" ||
    gc compute routers create "$ROUTER" --network="$NETWORK" --region="$REGION"
have "Cloud NAT $NAT" compute routers nats describe "$NAT" --router="$ROUTER" --region="$REGION" ||
    gc compute routers nats create "$NAT" --router="$ROUTER" --region="$REGION" \
        --auto-allocate-nat-external-ips --nat-all-subnet-ip-ranges --enable-logging --log-filter=ERRORS_ONLY
# DataProc's VMs talk to each other on many ports; nothing else gets in,
# so luigid (port 8082 on the master) answers only the cluster.
have "firewall rule $FW_INTERNAL" compute firewall-rules describe "$FW_INTERNAL" ||
    gc compute firewall-rules create "$FW_INTERNAL" --network="$NETWORK" --direction=INGRESS \
        --action=ALLOW --rules=tcp,udp,icmp --source-service-accounts="$SA" --target-service-accounts="$SA" \
        --description="VMs of the DataProc cluster $CLUSTER reach each other (luigid included)"
have "firewall rule $FW_IAP" compute firewall-rules describe "$FW_IAP" ||
    gc compute firewall-rules create "$FW_IAP" --network="$NETWORK" --direction=INGRESS \
        --action=ALLOW --rules=tcp:22 --source-ranges="$IAP_RANGE" --target-service-accounts="$SA" \
        --description="ssh through Identity-Aware Proxy only"

# --- the cluster --------------------------------------------------------------
if have "DataProc cluster $CLUSTER" dataproc clusters describe "$CLUSTER" --region="$REGION"; then
    log "note:     its VMs keep the release they were created with; delete and create the cluster for a new one"
else
    create=(dataproc clusters create "$CLUSTER" --region="$REGION"
        --num-workers="$WORKERS"
        --master-machine-type="$MASTER_MACHINE_TYPE" --worker-machine-type="$WORKER_MACHINE_TYPE"
        --master-boot-disk-size=50GB --worker-boot-disk-size=50GB
        --image-version="$IMAGE_VERSION" --scopes=cloud-platform
        --service-account="$SA" --subnet="$SUBNET" --no-address
        --bucket="$CLUSTER" --temp-bucket="$CLUSTER"
        --initialization-actions="$INIT_URL/dataproc-init.sh"
        --initialization-action-timeout=20m
        # Read by dataproc-init.sh on every VM of the cluster.
        --metadata="^|^poltergust-path=$BUCKET_URL/pipeline|poltergust-topic=$TOPIC|poltergust-project=$PROJECT|$(release_metadata)|poltergust-init-url=$INIT_URL/node-init.sh|poltergust-init-sha256=$INIT_SHA")
    if [[ -n "${POLTERGUST_LUIGID_CONFIG:-}" ]]; then
        luigid_config=$(<"$POLTERGUST_LUIGID_CONFIG") || die "cannot read POLTERGUST_LUIGID_CONFIG"
        [[ "$luigid_config" != *"|"* ]] || die "POLTERGUST_LUIGID_CONFIG: the file may not contain '|'"
        create[-1]+="|poltergust-luigid-config=$luigid_config"  # the --metadata flag
    fi
    [[ -z "$ZONE" ]] || create+=(--zone="$ZONE")
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
exec gcloud --project="$PROJECT" compute ssh "$CLUSTER-m" --zone="$ZONE" --tunnel-through-iap -- \
    -L "$LUIGID_PORT:localhost:$LUIGID_PORT" -N
