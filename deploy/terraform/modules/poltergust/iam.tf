# Service accounts and what they may do. The nodes get exactly what a node
# does (deploy/permissions.yaml lists every call and the permission it needs;
# tests/test_permissions.py checks these grants against it) and nothing
# project-wide beyond creating, reading and deleting Pub/Sub subscriptions and
# removing themselves from their group; the scheduler may only read the bucket
# (the release it installs, and what its dashboard shows).

resource "google_service_account" "node" {
  project      = var.project_id
  account_id   = "${var.name}-node"
  display_name = "Poltergust node"
  description  = "Runs Luigi pipelines from gs://${local.bucket_name}: reads/writes its objects, subscribes to its notifications."
}

resource "google_service_account" "scheduler" {
  project      = var.project_id
  account_id   = "${var.name}-scheduler"
  display_name = "Poltergust luigid scheduler"
  description  = "Identity of the luigid VM; it only reads the bucket (its release, and pipelines for the dashboard)."
}

# Objects: read configs and environments, write results and logs, and the
# conditional rewrite/delete of configs that decides which node finishes a run.
# roles/storage.objectUser is object get/list/create/update/delete without the
# right to change IAM, granted on this bucket only, and (by the condition) not
# below _poltergust/dist/: pipelines run as this account, and must not be able
# to replace the release the next VM installs. Reading the release is granted
# by roles/storage.objectViewer on the bucket. IAM conditions on object names
# need uniform bucket-level access, which the bucket has.
resource "google_storage_bucket_iam_member" "node_objects" {
  bucket = google_storage_bucket.poltergust.name
  role   = "roles/storage.objectUser"
  member = local.node_member

  condition {
    title       = "not-the-release"
    description = "Everything but the release files under _poltergust/dist/."
    expression  = "!resource.name.startsWith(\"projects/_/buckets/${local.bucket_name}/objects/${local.dist_root}\")"
  }
}

resource "google_storage_bucket_iam_member" "node_reads" {
  bucket = google_storage_bucket.poltergust.name
  role   = "roles/storage.objectViewer"
  member = local.node_member
}

# The scheduler VM installs the release from _poltergust/dist/ and runs the
# dashboard, which lists and reads the pipeline prefix and _poltergust/ (logs,
# run markers, heartbeats). Listing is checked on the bucket, not on object
# names, so object-name conditions cannot narrow it to those prefixes: the
# account reads the whole bucket (environment files too, which hold no secret
# values) and can write nothing.
resource "google_storage_bucket_iam_member" "scheduler_reads" {
  bucket = google_storage_bucket.poltergust.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.scheduler.email}"
}

# Secrets for {{NAME}} in environment files: exactly the ones named.
resource "google_secret_manager_secret_iam_member" "node_reads_secrets" {
  for_each  = var.node_secrets
  project   = var.project_id
  secret_id = each.value
  role      = "roles/secretmanager.secretAccessor"
  member    = local.node_member
}

# Pipelines' Google credentials: the nodes mint short-lived tokens of the
# pipeline service account (IAM Credentials generateAccessToken) for each run's
# own metadata endpoint; runs cannot reach the metadata server, so they never
# hold the node's token. Token creation is granted on that one account only.
resource "google_service_account_iam_member" "node_mints_pipeline_tokens" {
  count              = var.pipeline_service_account == "" ? 0 : 1
  service_account_id = "projects/${var.project_id}/serviceAccounts/${var.pipeline_service_account}"
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.node_member
}

# Pub/Sub: each node creates its own subscription on the topic when it starts
# (every node must see every event). Creating a subscription is checked in
# two places:
#   - pubsub.topics.attachSubscription on the topic: roles/pubsub.subscriber,
#     granted on this topic only;
#   - pubsub.subscriptions.create on the project, because subscriptions are
#     children of the project, not of the topic; reading one afterwards needs
#     pubsub.subscriptions.consume (and .get to look at it) on the
#     subscription, which its creator does not get automatically.
# Pub/Sub IAM conditions cannot match resource names, so these three
# permissions cannot be narrowed to "subscriptions named poltergust-*". They
# are granted through a custom role holding only them, rather than
# roles/pubsub.editor (which could also delete or change anything in Pub/Sub).
# A node deletes its own subscription when it shuts down cleanly (others
# expire by their expiration policy), hence pubsub.subscriptions.delete.
# Residual reach: a node could pull from or delete other subscriptions of this
# project, so give Poltergust its own project if that matters.
resource "google_project_iam_custom_role" "node_subscriptions" {
  project     = var.project_id
  role_id     = "${replace(var.name, "-", "_")}_node_subscriptions"
  title       = "Poltergust node subscriptions"
  description = "Create a Pub/Sub subscription, read from it and delete it; the topic itself is granted separately."
  permissions = [
    "pubsub.subscriptions.consume",
    "pubsub.subscriptions.create",
    "pubsub.subscriptions.delete",
    "pubsub.subscriptions.get",
  ]
}

resource "google_project_iam_member" "node_subscriptions" {
  project = var.project_id
  role    = google_project_iam_custom_role.node_subscriptions.id
  member  = local.node_member
}

resource "google_pubsub_topic_iam_member" "node_attaches" {
  project = var.project_id
  topic   = google_pubsub_topic.bucket_events.name
  role    = "roles/pubsub.subscriber"
  member  = local.node_member
}

# A node that needs help publishes a call for help (eventType POLTERGUST_HELP)
# on the same topic, so that it reaches every node's subscription: that is
# pubsub.topics.publish, granted on this topic only.
resource "google_pubsub_topic_iam_member" "node_publishes_help" {
  project = var.project_id
  topic   = google_pubsub_topic.bucket_events.name
  role    = "roles/pubsub.publisher"
  member  = local.node_member
}

# An idle node removes itself from the group (node-init.sh's retire timer,
# poltergust.node.retire): the group's deleteInstances, which needs
# compute.instanceGroupManagers.update, and .get to read the group's target
# size (a node never retires below node_min_count). Both on the nodes' group
# only, by an IAM condition on its name.
resource "google_project_iam_custom_role" "node_retires" {
  project     = var.project_id
  role_id     = "${replace(var.name, "-", "_")}_node_retires"
  title       = "Poltergust node retires itself"
  description = "Read the nodes' managed instance group and delete one of its instances (the caller itself)."
  permissions = [
    "compute.instanceGroupManagers.get",
    "compute.instanceGroupManagers.update",
  ]
}

resource "google_project_iam_member" "node_retires" {
  project = var.project_id
  role    = google_project_iam_custom_role.node_retires.id
  member  = local.node_member

  condition {
    title       = "only-the-node-group"
    description = "The nodes' own regional managed instance group."
    expression  = "resource.name == \"projects/${var.project_id}/regions/${var.region}/instanceGroupManagers/${var.name}-nodes\""
  }
}

locals {
  node_member = "serviceAccount:${google_service_account.node.email}"
  dist_root   = "_poltergust/dist/"
}
