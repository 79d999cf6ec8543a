# Service accounts and what they may do. The nodes get exactly what a node
# does and nothing project-wide beyond creating and reading Pub/Sub
# subscriptions; the scheduler gets nothing at all.

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
  description  = "Identity of the luigid VM; it needs no Google Cloud permissions."
}

# Objects: read configs and environments, write results and logs, and the
# conditional rewrite/delete of configs that decides which node finishes a run.
# roles/storage.objectUser is object get/list/create/update/delete without the
# right to change IAM, granted on this bucket only.
resource "google_storage_bucket_iam_member" "node_objects" {
  bucket = google_storage_bucket.poltergust.name
  role   = "roles/storage.objectUser"
  member = local.node_member
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
# Residual reach: a node could pull from other subscriptions of this project,
# so give Poltergust its own project if that matters.
# Nodes never delete subscriptions: each sets an expiration policy on its own
# subscription, and Pub/Sub deletes it after that long without a subscriber.
resource "google_project_iam_custom_role" "node_subscriptions" {
  project     = var.project_id
  role_id     = "${replace(var.name, "-", "_")}_node_subscriptions"
  title       = "Poltergust node subscriptions"
  description = "Create a Pub/Sub subscription and read from it; the topic itself is granted separately."
  permissions = [
    "pubsub.subscriptions.consume",
    "pubsub.subscriptions.create",
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

locals {
  node_member = "serviceAccount:${google_service_account.node.email}"
}
