# Poltergust on Compute Engine: a bucket whose pipeline/ folder users drop
# pipeline configs into, the bucket's notification topic, one luigid VM and an
# autoscaled, autohealed regional group of nodes. See README.md.

locals {
  bucket_name = coalesce(var.bucket_name, "${var.project_id}-poltergust")
  # The node defaults to poltergust-BUCKET when told no topic; keep the same name.
  topic_name    = coalesce(var.topic_name, "poltergust-${local.bucket_name}")
  pipeline_url  = "gs://${local.bucket_name}/${var.pipeline_prefix}"
  zone          = coalesce(var.zone, data.google_compute_zones.up.names[0])
  scheduler_url = "http://${google_compute_address.scheduler.address}:${local.luigid_port}"

  # Both roles boot the same script; the poltergust-role attribute picks one.
  init_script = file("${path.module}/../../../node-init.sh")

  luigid_port = 8082
  health_port = 8080
  # Where Google's health checkers and Identity-Aware Proxy connect from.
  health_check_ranges = ["35.191.0.0/16", "130.211.0.0/22"]
  iap_range           = "35.235.240.0/20"
}

data "google_compute_zones" "up" {
  project = var.project_id
  region  = var.region
  status  = "UP"
}

# ---------------------------------------------------------------------------
# The bucket

resource "google_storage_bucket" "poltergust" {
  #checkov:skip=CKV_GCP_78:Versioning must stay off: on a versioned bucket GCS sends OBJECT_ARCHIVE instead of OBJECT_DELETE when a config is deleted, which the notification does not publish, and every log refresh would keep an old version.
  #checkov:skip=CKV_GCP_62:Access logs would need a second bucket; use Cloud Audit Logs (Data Access logs for storage.googleapis.com) if you need to know who touched which object.
  project                     = var.project_id
  name                        = local.bucket_name
  location                    = upper(coalesce(var.bucket_location, var.region))
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.bucket_force_destroy
  labels                      = var.labels

  versioning {
    enabled = false
  }

  # No soft delete: the nodes overwrite their logs, heartbeats and run markers
  # all the time, and soft delete would keep (and bill) every overwritten
  # generation for 7 days. Result files stay until result_days.
  soft_delete_policy {
    retention_duration_seconds = 0
  }

  # Run logs and run markers are the nodes' own bookkeeping: kept for a while, then deleted.
  lifecycle_rule {
    condition {
      age            = var.run_record_days
      matches_prefix = ["_poltergust/logs/", "_poltergust/runs/"]
    }
    action {
      type = "Delete"
    }
  }

  # Result files accumulate under the pipeline prefix; listings only ever read configs.
  lifecycle_rule {
    condition {
      age            = var.result_days
      matches_prefix = ["${var.pipeline_prefix}/"]
      matches_suffix = [".done.yaml", ".error.yaml"]
    }
    action {
      type = "Delete"
    }
  }
}

# ---------------------------------------------------------------------------
# Bucket notifications -> topic

resource "google_pubsub_topic" "bucket_events" {
  #checkov:skip=CKV_GCP_83:The topic carries only object names and metadata of the bucket's notifications, encrypted at rest with Google-managed keys; a customer-managed key adds a KMS key ring to run for no gain here.
  project = var.project_id
  name    = local.topic_name
  labels  = var.labels
}

# Cloud Storage publishes notifications as the project's storage service agent.
data "google_storage_project_service_account" "gcs" {
  project = var.project_id
}

resource "google_pubsub_topic_iam_member" "gcs_publishes_events" {
  project = var.project_id
  topic   = google_pubsub_topic.bucket_events.name
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}

# The backlog: one message per config until a node finished it, shared by
# all nodes; its undelivered count drives the autoscaler (see nodes.tf).
# Only uploads (OBJECT_FINALIZE) under the pipeline prefix: deletes and calls
# for help must not wake nodes. The same filter as a node creates
# (poltergust.events.pubsub.backlog_filter). Pub/Sub filters have no suffix
# match, so other uploads under the prefix (result files) pass too; a node
# acknowledges them at once.
resource "google_pubsub_subscription" "backlog" {
  project                    = var.project_id
  name                       = "${var.name}-backlog"
  topic                      = google_pubsub_topic.bucket_events.id
  filter                     = "attributes.eventType = \"OBJECT_FINALIZE\" AND (attributes.bucketId = \"${local.bucket_name}\" AND hasPrefix(attributes.objectId, \"${var.pipeline_prefix}/\"))"
  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"

  # Never removed for want of a subscriber: with zero nodes it is the only signal.
  expiration_policy {
    ttl = ""
  }
}

resource "google_storage_notification" "pipeline" {
  bucket             = google_storage_bucket.poltergust.name
  topic              = google_pubsub_topic.bucket_events.id
  payload_format     = "JSON_API_V1"
  event_types        = ["OBJECT_FINALIZE", "OBJECT_DELETE"]
  object_name_prefix = "${var.pipeline_prefix}/"

  # The notification is refused unless the service agent may publish.
  depends_on = [google_pubsub_topic_iam_member.gcs_publishes_events]
}
