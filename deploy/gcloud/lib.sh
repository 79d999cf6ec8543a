# shellcheck shell=bash disable=SC2034
# (SC2034: the variables set here are used by the scripts that source this file.)
# Shared by create.sh and teardown.sh: settings, resource names and small
# helpers, so that both scripts always agree on what the resources are called.
# Not meant to be run on its own.

# --- settings (flags override these environment variables) -----------------
PROJECT=${POLTERGUST_PROJECT:-}
REGION=${POLTERGUST_REGION:-europe-north1}
ZONE=${POLTERGUST_ZONE:-}
NAME=${POLTERGUST_NAME:-poltergust}
BUCKET=${POLTERGUST_BUCKET:-}
TOPIC=${POLTERGUST_TOPIC:-}
PIPELINE_PREFIX=${POLTERGUST_PIPELINE_PREFIX:-pipeline}
# Seconds between retries of IAM changes right after creating a service
# account (it takes a moment to become visible to IAM).
RETRY_SLEEP=${POLTERGUST_RETRY_SLEEP:-10}

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Read the value of a "--flag VALUE" or "--flag=VALUE" argument: sets VALUE,
# and SHIFT to the number of arguments used (1 or 2).
flag_arg() {
    if [[ "$1" == *=* ]]; then
        VALUE=${1#*=}
        SHIFT=1
    else
        VALUE=${2-}
        SHIFT=2
    fi
    [[ -n "$VALUE" ]] || die "${1%%=*} needs a value"
}

# Handle one of the flags both scripts take. Sets SHIFT to the number of
# arguments used, 0 if "$1" is not a common flag.
common_flag() {
    local flag=${1%%=*}
    case "$flag" in
        --project|--region|--zone|--name|--bucket|--topic|--pipeline-prefix) ;;
        *) SHIFT=0; return 0 ;;
    esac
    flag_arg "$@"
    case "$flag" in
        --project) PROJECT=$VALUE ;;
        --region) REGION=$VALUE ;;
        --zone) ZONE=$VALUE ;;
        --name) NAME=$VALUE ;;
        --bucket) BUCKET=$VALUE ;;
        --topic) TOPIC=$VALUE ;;
        --pipeline-prefix) PIPELINE_PREFIX=$VALUE ;;
    esac
}

readonly COMMON_HELP="Settings shared with the other script (flag, or environment variable):
  --project ID        POLTERGUST_PROJECT  (default: gcloud config get-value project)
  --region REGION     POLTERGUST_REGION   (default: europe-north1)
  --zone ZONE         POLTERGUST_ZONE     zone of the luigid VM (default: REGION-b)
  --name PREFIX       POLTERGUST_NAME     prefix of every resource name (default: poltergust)
  --bucket NAME       POLTERGUST_BUCKET   (default: PROJECT-poltergust)
  --topic NAME        POLTERGUST_TOPIC    (default: poltergust-BUCKET, the node's default)
  --pipeline-prefix P POLTERGUST_PIPELINE_PREFIX  folder the nodes watch (default: pipeline)"

# Fill in defaults and derive every resource name from the settings.
derive_names() {
    if [[ -z "$PROJECT" ]]; then
        PROJECT=$(gcloud config get-value project 2>/dev/null || true)
        [[ -n "$PROJECT" ]] || die "no project: pass --project or set POLTERGUST_PROJECT"
    fi
    [[ "$NAME" =~ ^[a-z][a-z0-9-]{0,18}[a-z0-9]$ ]] ||
        die "--name must be 2-20 lower-case letters, digits or dashes (it prefixes service account ids)"
    [[ "$PIPELINE_PREFIX" =~ ^[^/]+(/[^/]+)*$ ]] ||
        die "--pipeline-prefix is a folder name without leading or trailing slash"
    ZONE=${ZONE:-$REGION-b}
    BUCKET=${BUCKET:-$PROJECT-poltergust}
    TOPIC=${TOPIC:-poltergust-$BUCKET}

    BUCKET_URL="gs://$BUCKET"
    PIPELINE_URL="$BUCKET_URL/$PIPELINE_PREFIX"
    TOPIC_PATH="projects/$PROJECT/topics/$TOPIC"
    NETWORK="$NAME-network"
    SUBNET="$NAME-$REGION"
    ROUTER="$NAME-router"
    NAT="$NAME-nat"
    FW_LUIGID="$NAME-allow-luigid-from-nodes"
    FW_HEALTH="$NAME-allow-health-checks"
    FW_IAP="$NAME-allow-iap-ssh"
    NODE_SA_ID="$NAME-node"
    SCHEDULER_SA_ID="$NAME-scheduler"
    NODE_SA="$NODE_SA_ID@$PROJECT.iam.gserviceaccount.com"
    SCHEDULER_SA="$SCHEDULER_SA_ID@$PROJECT.iam.gserviceaccount.com"
    NODE_MEMBER="serviceAccount:$NODE_SA"
    ROLE_ID="${NAME//-/_}_node_subscriptions"
    ROLE="projects/$PROJECT/roles/$ROLE_ID"
    SCHEDULER_VM="$NAME-scheduler"
    SCHEDULER_ADDRESS="$NAME-scheduler"
    HEALTH_CHECK="$NAME-node-health"
    TEMPLATE_PREFIX="$NAME-node-"
    MIG="$NAME-nodes"
    # Where Google's health checkers and Identity-Aware Proxy connect from.
    HEALTH_CHECK_RANGES="35.191.0.0/16,130.211.0.0/22"
    IAP_RANGE="35.235.240.0/20"
    LUIGID_PORT=8082
    HEALTH_PORT=8080
}

# gcloud for this project, never prompting.
gc() {
    gcloud --quiet --project="$PROJECT" "$@"
}

# True if a describe-like gcloud command succeeds. Any failure counts as
# "missing": if it was something else, the create that follows says what.
exists() {
    gc "$@" >/dev/null 2>&1
}

# "have WHAT describe-command...": log and succeed if it exists, else log
# that it is about to be created and fail. Used as: have ... || gc ... create
have() {
    local what=$1
    shift
    if exists "$@"; then
        log "exists:   $what"
        return 0
    fi
    log "creating: $what"
    return 1
}

# True if the IAM policy printed by "GROUP... get-iam-policy RESOURCE" grants
# ROLE to MEMBER. Usage: binding_exists ROLE MEMBER RESOURCE GROUP...
binding_exists() {
    local role=$1 member=$2 resource=$3
    shift 3
    local found
    found=$(gc "$@" get-iam-policy "$resource" --flatten='bindings[].members' \
        --filter="bindings.role=\"$role\" AND bindings.members=\"$member\"" \
        --format='value(bindings.role)' 2>/dev/null) || return 1
    [[ -n "$found" ]]
}

# Run a command, retrying a few times: IAM changes naming a service account
# made seconds ago can fail until the account has propagated.
retry() {
    local attempt
    for attempt in 1 2 3 4 5; do
        if "$@"; then
            return 0
        fi
        log "retrying in ${RETRY_SLEEP}s (attempt $attempt failed): $*"
        sleep "$RETRY_SLEEP"
    done
    die "failed 5 times: $*"
}
