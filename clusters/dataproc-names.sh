# shellcheck shell=bash disable=SC2034
# (SC2034: the variables set here are used by the scripts that source this file.)
# Shared by dataproc-create-cluster.sh and dataproc-delete-cluster.sh: the
# names of everything made for cluster $1, so that both always agree.
# Not meant to be run on its own; source deploy/gcloud/lib.sh first.

dataproc_names() {
    CLUSTER=$1
    [[ "$CLUSTER" =~ ^[a-z][a-z0-9-]{0,49}[a-z0-9]$ ]] ||
        die "cluster name '$CLUSTER': lower-case letters, digits and dashes, starting with a letter"
    if [[ -z "$PROJECT" ]]; then
        PROJECT=$(gcloud config get-value project 2>/dev/null || true)
        [[ -n "$PROJECT" ]] || die "no project: set POLTERGUST_PROJECT or gcloud config set project"
    fi
    BUCKET=$CLUSTER
    BUCKET_URL="gs://$CLUSTER"
    TOPIC="poltergust-$CLUSTER" # what the node assumes for gs://$CLUSTER
    TOPIC_PATH="projects/$PROJECT/topics/$TOPIC"
    # Service account ids are 6 to 30 characters.
    SA_ID="poltergust-${CLUSTER:0:19}"
    SA_ID=${SA_ID%-}
    SA="$SA_ID@$PROJECT.iam.gserviceaccount.com"
    MEMBER="serviceAccount:$SA"
    ROLE_ID="poltergust_dataproc_node"
    ROLE="projects/$PROJECT/roles/$ROLE_ID"
    NETWORK="$CLUSTER-net"
    SUBNET="$CLUSTER-subnet"
    ROUTER="$CLUSTER-router"
    NAT="$CLUSTER-nat"
    FW_INTERNAL="$CLUSTER-internal"
    FW_IAP="$CLUSTER-iap-ssh"
    IAP_RANGE="35.235.240.0/20"
    LUIGID_PORT=8082
}
