#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Create a Poltergust deployment with gcloud: the same resources as the
# Terraform module in deploy/terraform (see deploy/README.md for the picture).
#
# The VMs install the release built from this checkout (deploy/build-release.sh,
# run by this script unless --release names one): its wheel and lock file go
# to gs://BUCKET/_poltergust/dist/VERSION/, and the VMs' metadata pins both by
# sha256.
#
# Idempotent: every resource is looked up (describe) before it is created, so
# running the script again creates nothing and can finish a run that stopped
# half-way. Existing resources are not changed, with two exceptions: when the
# node settings (release, machine type, init script, ...) changed, a new
# instance template is made and the nodes are rolled over to it; and the
# scheduler VM's metadata is pointed at a new release (applied at its next boot).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

INIT_SCRIPT="$(cd "$HERE/.." && pwd)/node-init.sh"
MIN_NODES=${POLTERGUST_MIN_NODES:-0}
MAX_NODES=${POLTERGUST_MAX_NODES:-4}
NODE_MACHINE_TYPE=${POLTERGUST_NODE_MACHINE_TYPE:-e2-standard-4}
SCHEDULER_MACHINE_TYPE=${POLTERGUST_SCHEDULER_MACHINE_TYPE:-e2-medium}
NODE_DISK_SIZE=${POLTERGUST_NODE_DISK_SIZE:-50GB}
SCHEDULER_DISK_SIZE=${POLTERGUST_SCHEDULER_DISK_SIZE:-20GB}
IMAGE_FAMILY=${POLTERGUST_IMAGE_FAMILY:-debian-12}
IMAGE_PROJECT=${POLTERGUST_IMAGE_PROJECT:-debian-cloud}
SUBNET_CIDR=${POLTERGUST_SUBNET_CIDR:-10.42.0.0/24}
MAX_CONCURRENT=${POLTERGUST_MAX_CONCURRENT:-4}
IDLE_MINUTES=${POLTERGUST_IDLE_MINUTES:-15}
RELEASE=${POLTERGUST_RELEASE:-}
LUIGID_CONFIG=${POLTERGUST_LUIGID_CONFIG:-}
LUIGID_CONFIG_TEXT=""
read -r -a SECRETS <<<"${POLTERGUST_SECRETS:-}"
IAP_SSH=${POLTERGUST_IAP_SSH:-1}
PIPELINE_SA=${POLTERGUST_PIPELINE_SERVICE_ACCOUNT:-}

usage() {
    cat <<EOF
Usage: ${0##*/} [options]

Creates (or completes) a Poltergust deployment in one project: bucket,
notification topic, service accounts and IAM grants, a VPC with Cloud NAT,
firewall rules, the luigid VM and an autoscaled regional group of nodes, all
installing the release built from this checkout.
Requires: gcloud, logged in as someone who may create all that; python3, and
uv (pip install uv) to build the release.

$COMMON_HELP

Settings of this script:
  --min-nodes N             POLTERGUST_MIN_NODES  (default: 0: no node runs while
                            no config waits; more keeps nodes warm)
  --max-nodes N             POLTERGUST_MAX_NODES  (default: 4)
  --nodes N                 shorthand for --min-nodes N --max-nodes N
  --node-machine-type T     POLTERGUST_NODE_MACHINE_TYPE  (default: e2-standard-4)
  --scheduler-machine-type T POLTERGUST_SCHEDULER_MACHINE_TYPE  (default: e2-medium)
  --max-concurrent N        POLTERGUST_MAX_CONCURRENT  pipelines one node runs at once;
                            the autoscaler runs one node per N configs waiting or
                            running in the backlog subscription (default: 4)
  --idle-minutes N          POLTERGUST_IDLE_MINUTES  a node with no run for N minutes
                            removes itself from the group, never below --min-nodes
                            (the autoscaler only adds nodes); 0: never (default: 15)
  --release FILE            POLTERGUST_RELEASE  release.json of a release made by
                            deploy/build-release.sh (default: build one now)
  --secret NAME=SECRET      POLTERGUST_SECRETS (space-separated)  a Secret Manager
                            secret of this project the nodes put into their
                            environment as NAME (for {{NAME}}); repeatable
  --pipeline-service-account EMAIL  POLTERGUST_PIPELINE_SERVICE_ACCOUNT  the service
                            account whose tokens pipelines get (the nodes may mint
                            tokens for it alone; default: none, no Google credentials)
  --subnet-cidr CIDR        POLTERGUST_SUBNET_CIDR  (default: 10.42.0.0/24)
  --luigid-config FILE      POLTERGUST_LUIGID_CONFIG  a luigi configuration file for
                            luigid ([scheduler], [resources], ...), checked and
                            merged with the fleet's settings when the luigid VM
                            boots (an existing VM: at its next boot)
  --no-iap-ssh              POLTERGUST_IAP_SSH=0  no firewall rule for ssh through IAP
  -h, --help                this text
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
            --no-iap-ssh) IAP_SSH=0; shift; continue ;;
            --min-nodes|--max-nodes|--nodes|--node-machine-type|--scheduler-machine-type|\
            --max-concurrent|--idle-minutes|--release|--secret|--subnet-cidr|--luigid-config|\
            --pipeline-service-account) flag_arg "$@" ;;
            --package|--version) die "${1%%=*} is gone: the VMs install the release built from this checkout (see --release)" ;;
            *) die "unknown argument: $1 (see --help)" ;;
        esac
        case "${1%%=*}" in
            --min-nodes) MIN_NODES=$VALUE ;;
            --max-nodes) MAX_NODES=$VALUE ;;
            --nodes) MIN_NODES=$VALUE; MAX_NODES=$VALUE ;;
            --node-machine-type) NODE_MACHINE_TYPE=$VALUE ;;
            --scheduler-machine-type) SCHEDULER_MACHINE_TYPE=$VALUE ;;
            --max-concurrent) MAX_CONCURRENT=$VALUE ;;
            --idle-minutes) IDLE_MINUTES=$VALUE ;;
            --release) RELEASE=$VALUE ;;
            --secret) SECRETS+=("$VALUE") ;;
            --subnet-cidr) SUBNET_CIDR=$VALUE ;;
            --luigid-config) LUIGID_CONFIG=$VALUE ;;
            --pipeline-service-account) PIPELINE_SA=$VALUE ;;
        esac
        shift "$SHIFT"
    done
}

check_settings() {
    [[ "$MIN_NODES" =~ ^[0-9]+$ ]] || die "--min-nodes must be 0 or more"
    [[ "$MAX_NODES" =~ ^[1-9][0-9]*$ ]] || die "--max-nodes must be 1 or more"
    [[ "$MAX_CONCURRENT" =~ ^[1-9][0-9]{0,3}$ ]] || die "--max-concurrent must be 1 to 9999"
    [[ "$IDLE_MINUTES" =~ ^[0-9]{1,4}$ ]] || die "--idle-minutes must be 0 to 9999"
    ((MIN_NODES <= MAX_NODES)) || die "--min-nodes ($MIN_NODES) is larger than --max-nodes ($MAX_NODES)"
    [[ -f "$INIT_SCRIPT" ]] || die "node init script not found: $INIT_SCRIPT"
    if [[ -n "$LUIGID_CONFIG" ]]; then
        [[ -f "$LUIGID_CONFIG" ]] || die "--luigid-config: no such file: $LUIGID_CONFIG"
        LUIGID_CONFIG_TEXT=$(<"$LUIGID_CONFIG")
        # The metadata flags below separate attributes with "|".
        [[ "$LUIGID_CONFIG_TEXT" != *"|"* ]] || die "--luigid-config $LUIGID_CONFIG: the file may not contain '|'"
    fi
    local secret
    for secret in "${SECRETS[@]}"; do
        [[ "$secret" =~ ^[A-Za-z_][A-Za-z0-9_]*=[A-Za-z0-9_-]+$ ]] ||
            die "--secret $secret: expected NAME=SECRET_ID (a secret of project $PROJECT)"
    done
}

enable_apis() {
    local apis=(cloudresourcemanager.googleapis.com compute.googleapis.com iam.googleapis.com
        pubsub.googleapis.com storage.googleapis.com)
    ((${#SECRETS[@]} == 0)) || apis+=(secretmanager.googleapis.com)
    local enabled missing=() api
    enabled=$(gc services list --enabled --format='value(config.name)')
    for api in "${apis[@]}"; do
        grep -qx "$api" <<<"$enabled" || missing+=("$api")
    done
    if ((${#missing[@]})); then
        log "enabling: ${missing[*]}"
        gc services enable "${missing[@]}"
    else
        log "exists:   APIs enabled"
    fi
}

create_bucket_and_topic() {
    if have "bucket $BUCKET_URL" storage buckets describe "$BUCKET_URL"; then
        check_bucket "$BUCKET_URL"
    else
        # No soft delete: every overwritten log, heartbeat and marker would be
        # kept (and billed) for 7 days. No versioning (check_bucket says why).
        gc storage buckets create "$BUCKET_URL" --location="$REGION" \
            --uniform-bucket-level-access --public-access-prevention --soft-delete-duration=0
    fi
    upload_release "$BUCKET_URL"

    have "topic $TOPIC" pubsub topics describe "$TOPIC" ||
        gc pubsub topics create "$TOPIC"

    # Cloud Storage publishes notifications as the project's storage service agent.
    local agent
    agent=$(gc storage service-agent)
    [[ -n "$agent" ]] || die "could not get the Cloud Storage service agent of $PROJECT"
    if binding_exists roles/pubsub.publisher "serviceAccount:$agent" "$TOPIC" pubsub topics; then
        log "exists:   publisher grant for $agent on $TOPIC"
    else
        log "creating: publisher grant for $agent on $TOPIC"
        retry gc pubsub topics add-iam-policy-binding "$TOPIC" \
            --member="serviceAccount:$agent" --role=roles/pubsub.publisher >/dev/null
    fi

    local notifications
    notifications=$(gc storage buckets notifications list "$BUCKET_URL" \
        --filter="\"Notification Configuration\".topic=\"//pubsub.googleapis.com/$TOPIC_PATH\"" \
        --format='value("Notification Configuration".id)')
    if [[ -n "$notifications" ]]; then
        log "exists:   notification $BUCKET_URL -> $TOPIC"
    else
        log "creating: notification $BUCKET_URL -> $TOPIC"
        gc storage buckets notifications create "$BUCKET_URL" --topic="$TOPIC_PATH" \
            --event-types=OBJECT_FINALIZE,OBJECT_DELETE --object-prefix="$PIPELINE_PREFIX/" \
            --payload-format=json --skip-topic-setup
    fi

    # The backlog: one message per config until a node finished it, never
    # expiring (with zero nodes it is the autoscaler's only signal). Only
    # uploads under the prefix (poltergust.events.pubsub.backlog_filter):
    # deletes and calls for help must not wake nodes. Pub/Sub filters have no
    # suffix match: other uploads there (results) pass, and nodes ack them.
    local filter current
    filter="attributes.eventType = \"OBJECT_FINALIZE\" AND (attributes.bucketId = \"$BUCKET\" AND hasPrefix(attributes.objectId, \"$PIPELINE_PREFIX/\"))"
    if have "subscription $BACKLOG" pubsub subscriptions describe "$BACKLOG"; then
        # A filter cannot be changed; replacing the subscription would drop the waiting configs' messages.
        current=$(gc pubsub subscriptions describe "$BACKLOG" --format='value(filter)')
        [[ "$current" == "$filter" ]] || log "warning:  $BACKLOG has filter '$current', which wakes nodes for" \
            "deletes and calls for help; when no config waits, delete it and run this script again:" \
            "gcloud pubsub subscriptions delete $BACKLOG --project=$PROJECT"
    else
        gc pubsub subscriptions create "$BACKLOG" --topic="$TOPIC" --message-filter="$filter" \
            --ack-deadline=60 --message-retention-duration=7d --expiration-period=never
    fi
}

create_service_accounts() {
    have "service account $NODE_SA" iam service-accounts describe "$NODE_SA" ||
        gc iam service-accounts create "$NODE_SA_ID" --display-name="Poltergust node" \
            --description="Runs Luigi pipelines from $BUCKET_URL"
    have "service account $SCHEDULER_SA" iam service-accounts describe "$SCHEDULER_SA" ||
        gc iam service-accounts create "$SCHEDULER_SA_ID" --display-name="Poltergust luigid scheduler" \
            --description="Identity of the luigid VM; reads the bucket (its release, and pipelines for the dashboard)"
}

# What a node may do, and why (deploy/README.md has the long version):
# - objects of this bucket: roles/storage.objectViewer, and
#   roles/storage.objectUser on everything but _poltergust/dist/ (pipelines
#   run as the node and must not replace the release the next VM installs);
# - attach subscriptions to this topic: roles/pubsub.subscriber on the topic;
# - publish calls for help on this topic: roles/pubsub.publisher on the topic;
# - its own subscription, from creation to deletion: a custom project role
#   with only pubsub.subscriptions.create/.consume/.get/.delete. Subscriptions
#   belong to the project, not the topic, and Pub/Sub IAM conditions cannot
#   match names, so this is as narrow as Pub/Sub allows;
# - remove itself from the group when idle: a custom role with only
#   compute.instanceGroupManagers.get/.update, on the nodes' group only;
# - the secrets named with --secret: roles/secretmanager.secretAccessor on each.
# The scheduler VM reads the bucket, never writes: its release from
# _poltergust/dist/, and for the dashboard the pipeline prefix and _poltergust/.
# Listing is checked on the bucket, not on object names, so no condition can
# narrow that read to those prefixes.
# Every grant is checked against the calls the code makes: deploy/permissions.yaml
# and tests/test_permissions.py.
grant_permissions() {
    ensure_subscription_role "$ROLE_ID" "Poltergust node subscriptions"
    ensure_role "$RETIRE_ROLE_ID" "Poltergust node retires itself" "$RETIRE_PERMISSIONS" \
        "Read the nodes' managed instance group and delete one of its instances (the caller itself)"
    grant_on_bucket "$BUCKET_URL" roles/storage.objectViewer "$NODE_MEMBER"
    grant_on_bucket "$BUCKET_URL" roles/storage.objectUser "$NODE_MEMBER" "$(not_the_release "$BUCKET")" \
        not-the-release
    grant_on_bucket "$BUCKET_URL" roles/storage.objectViewer "serviceAccount:$SCHEDULER_SA"
    if binding_exists roles/pubsub.subscriber "$NODE_MEMBER" "$TOPIC" pubsub topics; then
        log "exists:   subscriber grant on $TOPIC"
    else
        log "creating: subscriber grant on $TOPIC"
        retry gc pubsub topics add-iam-policy-binding "$TOPIC" \
            --member="$NODE_MEMBER" --role=roles/pubsub.subscriber >/dev/null
    fi
    grant_on_topic "$TOPIC" roles/pubsub.publisher "$NODE_MEMBER"
    local group="projects/$PROJECT/regions/$REGION/instanceGroupManagers/$MIG"
    if binding_exists "$RETIRE_ROLE" "$NODE_MEMBER" "$PROJECT" projects; then
        log "exists:   $RETIRE_ROLE grant on $group"
    else
        log "creating: $RETIRE_ROLE grant on $group"
        retry gc projects add-iam-policy-binding "$PROJECT" --member="$NODE_MEMBER" --role="$RETIRE_ROLE" \
            --condition="expression=resource.name == \"$group\",title=only-the-node-group" >/dev/null
    fi
    if binding_exists "$ROLE" "$NODE_MEMBER" "$PROJECT" projects; then
        log "exists:   $ROLE grant on project $PROJECT"
    else
        log "creating: $ROLE grant on project $PROJECT"
        retry gc projects add-iam-policy-binding "$PROJECT" \
            --member="$NODE_MEMBER" --role="$ROLE" --condition=None >/dev/null
    fi
    local secret
    for secret in "${SECRETS[@]}"; do
        secret=${secret#*=}
        if binding_exists roles/secretmanager.secretAccessor "$NODE_MEMBER" "$secret" secrets; then
            log "exists:   accessor grant on secret $secret"
        else
            log "creating: accessor grant on secret $secret"
            retry gc secrets add-iam-policy-binding "$secret" \
                --member="$NODE_MEMBER" --role=roles/secretmanager.secretAccessor >/dev/null
        fi
    done
    [[ -n "$PIPELINE_SA" ]] || return 0
    if binding_exists roles/iam.serviceAccountTokenCreator "$NODE_MEMBER" "$PIPELINE_SA" iam service-accounts; then
        log "exists:   token creator grant on $PIPELINE_SA"
    else
        log "creating: token creator grant on $PIPELINE_SA (pipelines' tokens, minted by the nodes)"
        retry gc iam service-accounts add-iam-policy-binding "$PIPELINE_SA" \
            --member="$NODE_MEMBER" --role=roles/iam.serviceAccountTokenCreator >/dev/null
    fi
}

# A VPC of its own: nothing but the rules below lets traffic in, so luigid is
# reachable from the nodes only. No external addresses: Private Google Access
# for the bucket and Pub/Sub, Cloud NAT for the package installs.
create_network() {
    have "network $NETWORK" compute networks describe "$NETWORK" ||
        gc compute networks create "$NETWORK" --subnet-mode=custom
    have "subnet $SUBNET" compute networks subnets describe "$SUBNET" --region="$REGION" ||
        gc compute networks subnets create "$SUBNET" --network="$NETWORK" --region="$REGION" \
            --range="$SUBNET_CIDR" --enable-private-ip-google-access --enable-flow-logs
    have "router $ROUTER" compute routers describe "$ROUTER" --region="$REGION" ||
        gc compute routers create "$ROUTER" --network="$NETWORK" --region="$REGION"
    have "Cloud NAT $NAT" compute routers nats describe "$NAT" --router="$ROUTER" --region="$REGION" ||
        gc compute routers nats create "$NAT" --router="$ROUTER" --region="$REGION" \
            --auto-allocate-nat-external-ips --nat-all-subnet-ip-ranges --enable-logging \
            --log-filter=ERRORS_ONLY

    # Matched by service account: only someone allowed to act as that
    # account can put it on a VM, unlike a network tag.
    have "firewall rule $FW_LUIGID" compute firewall-rules describe "$FW_LUIGID" ||
        gc compute firewall-rules create "$FW_LUIGID" --network="$NETWORK" --direction=INGRESS \
            --action=ALLOW --rules="tcp:$LUIGID_PORT" --source-service-accounts="$NODE_SA" \
            --target-service-accounts="$SCHEDULER_SA" \
            --description="Poltergust nodes reach the luigi central scheduler"
    have "firewall rule $FW_HEALTH" compute firewall-rules describe "$FW_HEALTH" ||
        gc compute firewall-rules create "$FW_HEALTH" --network="$NETWORK" --direction=INGRESS \
            --action=ALLOW --rules="tcp:$HEALTH_PORT" --source-ranges="$HEALTH_CHECK_RANGES" \
            --target-service-accounts="$NODE_SA" \
            --description="Google Cloud health checkers reach the nodes' /healthz"
    if ((IAP_SSH)); then
        have "firewall rule $FW_IAP" compute firewall-rules describe "$FW_IAP" ||
            gc compute firewall-rules create "$FW_IAP" --network="$NETWORK" --direction=INGRESS \
                --action=ALLOW --rules=tcp:22 --source-ranges="$IAP_RANGE" \
                --target-service-accounts="$NODE_SA,$SCHEDULER_SA" \
                --description="ssh through Identity-Aware Proxy only"
    fi
}

create_scheduler() {
    # A reserved internal address keeps the nodes' --scheduler-url valid
    # when the VM is rebuilt.
    have "address $SCHEDULER_ADDRESS" compute addresses describe "$SCHEDULER_ADDRESS" --region="$REGION" ||
        gc compute addresses create "$SCHEDULER_ADDRESS" --region="$REGION" --subnet="$SUBNET"
    SCHEDULER_IP=$(gc compute addresses describe "$SCHEDULER_ADDRESS" --region="$REGION" \
        --format='value(address)')
    [[ -n "$SCHEDULER_IP" ]] || die "address $SCHEDULER_ADDRESS has no IP"
    SCHEDULER_URL="http://$SCHEDULER_IP:$LUIGID_PORT"

    # poltergust-path: what the VM's dashboard shows.
    local metadata settings
    settings="$(release_metadata)|poltergust-path=$PIPELINE_URL"
    metadata="^|^poltergust-role=scheduler|$settings|enable-oslogin=TRUE|block-project-ssh-keys=TRUE"
    if have "luigid VM $SCHEDULER_VM" compute instances describe "$SCHEDULER_VM" --zone="$ZONE"; then
        local installs
        installs=$(gc compute instances describe "$SCHEDULER_VM" --zone="$ZONE" --format=json |
            python3 -c 'import json, sys
items = {i["key"]: i["value"] for i in json.load(sys.stdin).get("metadata", {}).get("items", [])}
print(items.get("poltergust-wheel-sha256"), items.get("poltergust-lock-sha256"), items.get("poltergust-path"))')
        if [[ "$installs" != "$WHEEL_SHA $LOCK_SHA $PIPELINE_URL" ]]; then
            log "updating: $SCHEDULER_VM to release $RELEASE_VERSION and dashboard path $PIPELINE_URL," \
                "applied at its next boot: gcloud compute instances reset $SCHEDULER_VM --zone=$ZONE --project=$PROJECT"
            gc compute instances add-metadata "$SCHEDULER_VM" --zone="$ZONE" --metadata="^|^$settings"
        fi
        if [[ -n "$LUIGID_CONFIG" ]] && [[ "$(gc compute instances describe "$SCHEDULER_VM" --zone="$ZONE" \
            --format=json | python3 -c 'import json, sys
items = {i["key"]: i["value"] for i in json.load(sys.stdin).get("metadata", {}).get("items", [])}
print(items.get("poltergust-luigid-config", ""))')" != "$LUIGID_CONFIG_TEXT" ]]; then
            log "updating: luigid's configuration on $SCHEDULER_VM, applied at its next boot (a restart of luigid):" \
                "gcloud compute instances reset $SCHEDULER_VM --zone=$ZONE --project=$PROJECT"
            gc compute instances add-metadata "$SCHEDULER_VM" --zone="$ZONE" \
                --metadata="^|^poltergust-luigid-config=$LUIGID_CONFIG_TEXT"
        fi
        return
    fi
    gc compute instances create "$SCHEDULER_VM" --zone="$ZONE" \
        --machine-type="$SCHEDULER_MACHINE_TYPE" \
        --subnet="$SUBNET" --no-address --private-network-ip="$SCHEDULER_IP" \
        --service-account="$SCHEDULER_SA" --scopes=cloud-platform \
        --image-family="$IMAGE_FAMILY" --image-project="$IMAGE_PROJECT" \
        --boot-disk-size="$SCHEDULER_DISK_SIZE" \
        --shielded-secure-boot --shielded-vtpm --shielded-integrity-monitoring \
        --metadata-from-file="startup-script=$INIT_SCRIPT" \
        --metadata="$metadata${LUIGID_CONFIG:+|poltergust-luigid-config=$LUIGID_CONFIG_TEXT}"
}

create_nodes() {
    have "health check $HEALTH_CHECK" compute health-checks describe "$HEALTH_CHECK" --global ||
        gc compute health-checks create http "$HEALTH_CHECK" --global --port="$HEALTH_PORT" \
            --request-path=/healthz --check-interval=10s --timeout=5s \
            --healthy-threshold=2 --unhealthy-threshold=3

    # Templates cannot change, so the template's name carries a checksum of
    # everything in it: changed settings give a new template, the same
    # settings find the existing one.
    local metadata checksum template
    metadata="^|^poltergust-role=node|$(release_metadata)|poltergust-path=$PIPELINE_URL"
    metadata+="|poltergust-scheduler-url=$SCHEDULER_URL|poltergust-topic=$TOPIC|poltergust-project=$PROJECT"
    metadata+="|poltergust-backlog-subscription=$BACKLOG|poltergust-max-concurrent=$MAX_CONCURRENT"
    metadata+="|poltergust-retire-after=$((IDLE_MINUTES * 60))|poltergust-min-nodes=$MIN_NODES"
    ((${#SECRETS[@]} == 0)) || metadata+="|poltergust-secrets=${SECRETS[*]}"
    [[ -z "$PIPELINE_SA" ]] || metadata+="|poltergust-pipeline-service-account=$PIPELINE_SA"
    metadata+="|enable-oslogin=TRUE|block-project-ssh-keys=TRUE"
    checksum=$( { printf '%s\n' "$metadata" "$NODE_MACHINE_TYPE" "$NODE_DISK_SIZE" "$IMAGE_FAMILY" \
        "$IMAGE_PROJECT" "$SUBNET" "$NODE_SA"; cat "$INIT_SCRIPT"; } | cksum | cut -d' ' -f1)
    template="$TEMPLATE_PREFIX$checksum"

    have "instance template $template" compute instance-templates describe "$template" ||
        gc compute instance-templates create "$template" \
            --machine-type="$NODE_MACHINE_TYPE" \
            --subnet="projects/$PROJECT/regions/$REGION/subnetworks/$SUBNET" --no-address \
            --service-account="$NODE_SA" --scopes=cloud-platform \
            --image-family="$IMAGE_FAMILY" --image-project="$IMAGE_PROJECT" \
            --boot-disk-size="$NODE_DISK_SIZE" \
            --shielded-secure-boot --shielded-vtpm --shielded-integrity-monitoring \
            --metadata-from-file="startup-script=$INIT_SCRIPT" \
            --metadata="$metadata"

    if have "managed instance group $MIG" compute instance-groups managed describe "$MIG" --region="$REGION"; then
        local current
        current=$(gc compute instance-groups managed describe "$MIG" --region="$REGION" \
            --format='value(instanceTemplate.basename())')
        if [[ "$current" != "$template" ]]; then
            log "updating: $MIG from template $current to $template (rolling replace)"
            gc compute instance-groups managed rolling-action start-update "$MIG" --region="$REGION" \
                --version="template=$template" --max-surge=3 --max-unavailable=0
        fi
    else
        # First boot installs the release: give it 10 minutes before
        # autohealing judges /healthz. Never move nodes between zones to even
        # them out: that deletes busy nodes.
        gc compute instance-groups managed create "$MIG" --region="$REGION" \
            --template="$template" --size="$MIN_NODES" --base-instance-name="$NAME-node" \
            --health-check="$HEALTH_CHECK" --initial-delay=600 --instance-redistribution-type=NONE
    fi

    local autoscaler
    autoscaler=$(gc compute instance-groups managed describe "$MIG" --region="$REGION" \
        --format='value(status.autoscaler)')
    if [[ -n "$autoscaler" ]]; then
        log "exists:   autoscaling of $MIG"
    else
        log "creating: autoscaling of $MIG ($MIN_NODES-$MAX_NODES nodes, one per $MAX_CONCURRENT configs in $BACKLOG)"
        # A per-group metric: the backlog's undelivered messages exist while no
        # node runs, so the group scales out from zero. The autoscaler only
        # adds nodes (it would scale in busy ones): an idle node removes itself
        # after --idle-minutes (poltergust.node.retire).
        gc compute instance-groups managed set-autoscaling "$MIG" --region="$REGION" \
            --min-num-replicas="$MIN_NODES" --max-num-replicas="$MAX_NODES" \
            --update-stackdriver-metric=pubsub.googleapis.com/subscription/num_undelivered_messages \
            --stackdriver-metric-filter="resource.type = pubsub_subscription AND resource.label.subscription_id = $BACKLOG" \
            --stackdriver-metric-single-instance-assignment="$MAX_CONCURRENT" --cool-down-period=300 \
            --mode=only-scale-out
    fi
}

main() {
    parse_args "$@"
    derive_names
    BACKLOG="$NAME-backlog"
    check_settings
    prepare_release "$RELEASE"
    log "project $PROJECT, region $REGION, bucket $BUCKET_URL, topic $TOPIC, nodes $MIN_NODES-$MAX_NODES," \
        "release $RELEASE_VERSION"

    enable_apis
    create_bucket_and_topic
    create_service_accounts
    grant_permissions
    create_network
    create_scheduler
    create_nodes

    cat <<EOF

Poltergust is deployed. Nodes take a few minutes to install on first boot.
  Submit a pipeline:  gcloud storage cp mypipeline.config.yaml $PIPELINE_URL/
  Scheduler and dashboard: gcloud compute ssh $SCHEDULER_VM --project=$PROJECT --zone=$ZONE --tunnel-through-iap -- -L $LUIGID_PORT:localhost:$LUIGID_PORT -L $DASHBOARD_PORT:localhost:$DASHBOARD_PORT -N
                           then open http://localhost:$LUIGID_PORT (luigid) and http://localhost:$DASHBOARD_PORT (dashboard)
  Remove it again:    $HERE/teardown.sh --project=$PROJECT --region=$REGION --name=$NAME --bucket=$BUCKET
EOF
}

main "$@"
