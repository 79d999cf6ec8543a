# The nodes: an instance template booting node-init.sh, a regional managed
# instance group (spread over the region's zones) that replaces nodes whose
# /healthz stops answering, and an autoscaler on the backlog that only scales
# out (idle nodes retire themselves).

resource "google_compute_instance_template" "node" {
  project      = var.project_id
  name_prefix  = "${var.name}-node-"
  region       = var.region
  machine_type = var.node_machine_type
  labels       = var.labels

  disk {
    source_image = coalesce(var.node_image, var.image)
    disk_size_gb = var.node_disk_size_gb
    auto_delete  = true
    boot         = true
  }

  # No access_config block: no external address. Outbound goes through NAT.
  network_interface {
    subnetwork = google_compute_subnetwork.poltergust.id
  }

  service_account {
    email = google_service_account.node.email
    # Access is decided by the node's IAM grants (iam.tf), not by scopes.
    scopes = ["cloud-platform"]
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  # Read by node-init.sh: the release to install, and the node's settings.
  # Secrets are named here, never their values (node-init.sh reads those).
  metadata = {
    poltergust-role                     = "node"
    poltergust-path                     = local.pipeline_url
    poltergust-scheduler-url            = local.scheduler_url
    poltergust-topic                    = google_pubsub_topic.bucket_events.name
    poltergust-project                  = var.project_id
    poltergust-backlog-subscription     = google_pubsub_subscription.backlog.name
    poltergust-max-concurrent           = tostring(var.node_max_concurrent)
    poltergust-retire-after             = tostring(var.node_idle_minutes * 60)
    poltergust-min-nodes                = tostring(var.node_min_count)
    poltergust-secrets                  = join(" ", [for name, id in var.node_secrets : "${name}=${id}"])
    poltergust-pipeline-service-account = var.pipeline_service_account
    poltergust-wheel-url                = local.release_metadata.wheel_url
    poltergust-wheel-sha256             = local.release_metadata.wheel_sha256
    poltergust-lock-url                 = local.release_metadata.lock_url
    poltergust-lock-sha256              = local.release_metadata.lock_sha256
    # ssh only with OS Login (IAM-controlled), never with keys in metadata.
    enable-oslogin         = "TRUE"
    block-project-ssh-keys = "TRUE"
  }
  metadata_startup_script = local.init_script

  lifecycle {
    # Templates are immutable: make the new one before the group lets go of the old.
    create_before_destroy = true
  }
}

resource "google_compute_health_check" "node" {
  project             = var.project_id
  name                = "${var.name}-node-health"
  description         = "A Poltergust node answers GET /healthz with 200 once it is ready."
  check_interval_sec  = 10
  timeout_sec         = 5
  healthy_threshold   = 2
  unhealthy_threshold = 3

  http_health_check {
    port         = local.health_port
    request_path = "/healthz"
  }
}

resource "google_compute_region_instance_group_manager" "nodes" {
  project            = var.project_id
  name               = "${var.name}-nodes"
  region             = var.region
  base_instance_name = "${var.name}-node"
  # No target_size: the autoscaler owns the size.

  version {
    instance_template = google_compute_instance_template.node.id
  }

  auto_healing_policies {
    health_check = google_compute_health_check.node.id
    # First boot installs the release before /healthz can answer.
    initial_delay_sec = 600
  }

  update_policy {
    type                  = "PROACTIVE"
    minimal_action        = "REPLACE"
    max_surge_fixed       = 3 # a regional group needs 0 or at least its zone count
    max_unavailable_fixed = 0
    # Never move nodes between zones to even them out: that deletes busy nodes.
    instance_redistribution_type = "NONE"
  }
}

resource "google_compute_region_autoscaler" "nodes" {
  project = var.project_id
  name    = "${var.name}-nodes"
  region  = var.region
  target  = google_compute_region_instance_group_manager.nodes.id

  autoscaling_policy {
    min_replicas = var.node_min_count
    max_replicas = var.node_max_count
    # Covers a new node's first boot (installs) before it pulls from the backlog.
    cooldown_period = 300

    # One node per node_max_concurrent configs waiting or running: the backlog
    # subscription's undelivered messages, a per-group metric that exists while
    # no node runs, so the group scales from and to zero.
    metric {
      name                       = "pubsub.googleapis.com/subscription/num_undelivered_messages"
      filter                     = "resource.type = pubsub_subscription AND resource.label.subscription_id = ${google_pubsub_subscription.backlog.name}"
      single_instance_assignment = var.node_max_concurrent
    }

    # The autoscaler only adds nodes: it picks the nodes it scales in without
    # regard to the pipelines they run. An idle node removes itself instead
    # (poltergust-retire-after, poltergust.node.retire): after
    # node_idle_minutes without a run it deletes itself from the group, never
    # below node_min_count.
    mode = "ONLY_SCALE_OUT"
  }

  lifecycle {
    precondition {
      condition     = var.node_min_count <= var.node_max_count
      error_message = "node_min_count must not be larger than node_max_count."
    }
  }
}
