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
    RETIRE_ROLE_ID="${NAME//-/_}_node_retires"
    RETIRE_ROLE="projects/$PROJECT/roles/$RETIRE_ROLE_ID"
    SCHEDULER_VM="$NAME-scheduler"
    SCHEDULER_ADDRESS="$NAME-scheduler"
    HEALTH_CHECK="$NAME-node-health"
    TEMPLATE_PREFIX="$NAME-node-"
    MIG="$NAME-nodes"
    # Where Google's health checkers and Identity-Aware Proxy connect from.
    HEALTH_CHECK_RANGES="35.191.0.0/16,130.211.0.0/22"
    IAP_RANGE="35.235.240.0/20"
    LUIGID_PORT=8082
    DASHBOARD_PORT=8090
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
# ROLE to MEMBER (with --unconditional: without an IAM condition).
# Usage: binding_exists [--unconditional] ROLE MEMBER RESOURCE GROUP...
binding_exists() {
    local extra=""
    if [[ "$1" == --unconditional ]]; then
        extra=" AND NOT bindings.condition:*"
        shift
    fi
    local role=$1 member=$2 resource=$3
    shift 3
    local found
    found=$(gc "$@" get-iam-policy "$resource" --flatten='bindings[].members' \
        --filter="bindings.role=\"$role\" AND bindings.members=\"$member\"$extra" \
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

# --- the release (deploy/build-release.sh) ----------------------------------
# sha256 of file $1 (python3: sha256sum is not everywhere an operator works).
sha256() { python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"; }

# Everything below this prefix is what VMs install: only the operator writes
# it (the nodes' object grant excludes it).
readonly DIST_ROOT="_poltergust/dist/"

# Read release.json $1 and check its files: sets RELEASE_VERSION, WHEEL_FILE,
# WHEEL_SHA, LOCK_FILE, LOCK_SHA (paths) and their sha256 digests.
load_release() {
    local manifest=$1 fields
    [[ -f "$manifest" ]] || die "no release at $manifest: run deploy/build-release.sh, or pass --release"
    fields=$(python3 -c 'import json, sys; r = json.load(open(sys.argv[1]))
print(r["version"], r["wheel"], r["wheel_sha256"], r["lock"], r["lock_sha256"])' "$manifest") ||
        die "$manifest is not a release.json written by deploy/build-release.sh"
    local wheel lock wheel_sha lock_sha
    read -r RELEASE_VERSION wheel wheel_sha lock lock_sha <<<"$fields"
    [[ "$RELEASE_VERSION" =~ ^[A-Za-z0-9._+-]+$ && "$wheel" =~ ^poltergust-[A-Za-z0-9._+-]+\.whl$ &&
        "$lock" =~ ^[A-Za-z0-9._-]+$ ]] || die "$manifest: unexpected version or file names"
    WHEEL_FILE="$(dirname "$manifest")/$RELEASE_VERSION/$wheel"
    LOCK_FILE="$(dirname "$manifest")/$RELEASE_VERSION/$lock"
    WHEEL_SHA=$(sha256 "$WHEEL_FILE")
    LOCK_SHA=$(sha256 "$LOCK_FILE")
    [[ "$WHEEL_SHA" == "$wheel_sha" && "$LOCK_SHA" == "$lock_sha" ]] ||
        die "the files of release $RELEASE_VERSION do not match $manifest: build the release again"
}

# The release given (release.json), or one built from this checkout now.
prepare_release() {
    local manifest=$1
    if [[ -z "$manifest" ]]; then
        log "building the release from this checkout (deploy/build-release.sh)"
        "$(dirname "${BASH_SOURCE[0]}")/../build-release.sh" >/dev/null
        manifest="$(dirname "${BASH_SOURCE[0]}")/../dist/release.json"
    elif [[ -d "$manifest" ]]; then
        manifest="$manifest/release.json"
    fi
    load_release "$manifest"
}

# Upload the release's files below gs://BUCKET/_poltergust/dist/VERSION/
# (once: an existing file is never replaced; the VMs check every digest).
# Sets WHEEL_URL and LOCK_URL.
upload_release() {
    local bucket_url=$1 file url
    WHEEL_URL="$bucket_url/$DIST_ROOT$RELEASE_VERSION/${WHEEL_FILE##*/}"
    LOCK_URL="$bucket_url/$DIST_ROOT$RELEASE_VERSION/${LOCK_FILE##*/}"
    for file in "$WHEEL_FILE" "$LOCK_FILE"; do
        url="$bucket_url/$DIST_ROOT$RELEASE_VERSION/${file##*/}"
        have "release file $url" storage objects describe "$url" ||
            gc storage cp "$file" "$url"
    done
}

# The metadata entries that make a VM install this release ("|"-separated).
release_metadata() {
    printf 'poltergust-wheel-url=%s|poltergust-wheel-sha256=%s|poltergust-lock-url=%s|poltergust-lock-sha256=%s' \
        "$WHEEL_URL" "$WHEEL_SHA" "$LOCK_URL" "$LOCK_SHA"
}

# An existing bucket must be this project's, with uniform bucket-level access
# (object-name IAM conditions need it) and public access prevention, and
# without versioning: there a deleted config is OBJECT_ARCHIVE, which the
# notification does not publish (cancel-by-delete would not work), and every
# overwritten log would stay as a noncurrent version. Its soft delete policy
# is left as it is (it may protect other data): a warning says what it costs.
check_bucket() {
    local bucket_url=$1 info number uniform prevention versioning soft_delete ours
    info=$(gc storage buckets describe "$bucket_url" --raw \
        --format='value[separator="|"](projectNumber,iamConfiguration.uniformBucketLevelAccess.enabled,iamConfiguration.publicAccessPrevention,versioning.enabled,softDeletePolicy.retentionDurationSeconds)')
    # "|", not tabs: empty fields (no versioning block) must keep their place.
    IFS='|' read -r number uniform prevention versioning soft_delete <<<"$info"
    ours=$(gc projects describe "$PROJECT" --format='value(projectNumber)')
    [[ "$number" == "$ours" ]] ||
        die "bucket $bucket_url belongs to project number $number, not to $PROJECT ($ours): choose another bucket name"
    [[ "$uniform" == [Tt]rue ]] || die "bucket $bucket_url has no uniform bucket-level access;" \
        "turn it on: gcloud storage buckets update $bucket_url --uniform-bucket-level-access"
    [[ "$prevention" == enforced ]] || die "bucket $bucket_url does not enforce public access prevention;" \
        "turn it on: gcloud storage buckets update $bucket_url --public-access-prevention"
    [[ "$versioning" != [Tt]rue ]] || die "bucket $bucket_url has object versioning on: a deleted config" \
        "would not cancel its run (OBJECT_ARCHIVE is not published) and every log refresh would be kept;" \
        "turn it off: gcloud storage buckets update $bucket_url --no-versioning"
    if [[ "${soft_delete:-0}" =~ ^[1-9] ]]; then
        log "warning:  bucket $bucket_url keeps deleted and overwritten objects for ${soft_delete}s (soft delete):" \
            "every log refresh and heartbeat is kept and billed that long; if nothing else needs it:" \
            "gcloud storage buckets update $bucket_url --soft-delete-duration=0"
    fi
}

# Grant ROLE on topic TOPIC to MEMBER, once.
grant_on_topic() {
    local topic=$1 role=$2 member=$3
    if binding_exists "$role" "$member" "$topic" pubsub topics; then
        log "exists:   $role grant for ${member#*:} on $topic"
    else
        log "creating: $role grant for ${member#*:} on $topic"
        retry gc pubsub topics add-iam-policy-binding "$topic" --member="$member" --role="$role" >/dev/null
    fi
}

# Grant ROLE on the bucket to MEMBER, once; with CONDITION (an IAM condition
# expression without commas) and its TITLE when given.
grant_on_bucket() {
    local bucket_url=$1 role=$2 member=$3 condition=${4:-} title=${5:-} only=()
    # A grant without a condition is missing while only a conditional one is
    # there (the scheduler's read of the release became a read of the bucket).
    [[ -n "$condition" ]] || only=(--unconditional)
    if binding_exists "${only[@]}" "$role" "$member" "$bucket_url" storage buckets; then
        log "exists:   $role grant for ${member#*:} on $bucket_url"
        return
    fi
    log "creating: $role grant for ${member#*:} on $bucket_url${condition:+ (only: $title)}"
    local args=(storage buckets add-iam-policy-binding "$bucket_url" --member="$member" --role="$role")
    [[ -z "$condition" ]] || args+=("--condition=expression=$condition,title=$title")
    retry gc "${args[@]}" >/dev/null
}

# IAM condition expressions on the objects of bucket $1 (by name).
not_the_release() { printf '!resource.name.startsWith("projects/_/buckets/%s/objects/%s")' "$1" "$DIST_ROOT"; }

# The permissions of the node's custom role: its own subscription, from
# creation to deletion at a clean shutdown.
readonly SUBSCRIPTION_PERMISSIONS="pubsub.subscriptions.consume,pubsub.subscriptions.create,pubsub.subscriptions.delete,pubsub.subscriptions.get"

# The permissions of the node's retire role: read its group, delete itself from it.
readonly RETIRE_PERMISSIONS="compute.instanceGroupManagers.get,compute.instanceGroupManagers.update"

# Create custom role $1 (an id in PROJECT) with SUBSCRIPTION_PERMISSIONS, or
# bring an existing one (or one deleted by a teardown) up to them.
ensure_subscription_role() {
    ensure_role "$1" "$2" "$SUBSCRIPTION_PERMISSIONS" "Create a Pub/Sub subscription, read from it and delete it"
}

# Create custom role $1 titled $2 with permissions $3 (comma-separated,
# sorted) and description $4, or bring an existing (or deleted) one up to them.
ensure_role() {
    local id=$1 title=$2 wanted=$3 description=$4 deleted permissions
    if deleted=$(gc iam roles describe "$id" --format='value(deleted)' 2>/dev/null); then
        if [[ "$deleted" == [Tt]rue ]]; then
            # A deleted role lingers for 7 days; its id cannot be reused.
            log "creating: custom role $id (undeleting it)"
            gc iam roles undelete "$id" >/dev/null
        fi
        permissions=$(gc iam roles describe "$id" --format='value(includedPermissions)')
        if [[ "${permissions//;/,}" == "$wanted" ]]; then
            log "exists:   custom role $id"
        else
            log "updating: custom role $id to $wanted"
            gc iam roles update "$id" --permissions="$wanted" >/dev/null
        fi
    else
        log "creating: custom role $id"
        gc iam roles create "$id" --title="$title" --description="$description" \
            --permissions="$wanted" --stage=GA >/dev/null
    fi
}
