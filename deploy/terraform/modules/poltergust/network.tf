# A VPC of its own: its only ingress rules are the ones below, so luigid is
# reachable from the nodes and nothing else (a shared "default" network would
# let every VM in it through its allow-internal rule).

resource "google_compute_network" "poltergust" {
  project                 = var.project_id
  name                    = "${var.name}-network"
  auto_create_subnetworks = false
}

resource "google_compute_subnetwork" "poltergust" {
  project       = var.project_id
  name          = "${var.name}-${var.region}"
  region        = var.region
  network       = google_compute_network.poltergust.id
  ip_cidr_range = var.subnet_cidr
  # The VMs have no external address: Google APIs (Storage, Pub/Sub) are
  # reached through Private Google Access ...
  private_ip_google_access = true

  log_config {
    aggregation_interval = "INTERVAL_10_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

# ... and the package index (Poltergust itself, the pipelines' dependencies)
# through Cloud NAT, outbound only.
resource "google_compute_router" "poltergust" {
  project = var.project_id
  name    = "${var.name}-router"
  region  = var.region
  network = google_compute_network.poltergust.id
}

resource "google_compute_router_nat" "poltergust" {
  project                            = var.project_id
  name                               = "${var.name}-nat"
  region                             = var.region
  router                             = google_compute_router.poltergust.name
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "ALL_SUBNETWORKS_ALL_IP_RANGES"

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}

# Nodes -> luigid. Matched by service account, which (unlike a network tag)
# only someone allowed to act as that service account can put on a VM.
resource "google_compute_firewall" "luigid_from_nodes" {
  project     = var.project_id
  name        = "${var.name}-allow-luigid-from-nodes"
  network     = google_compute_network.poltergust.id
  description = "Poltergust nodes reach the luigi central scheduler."
  direction   = "INGRESS"

  allow {
    protocol = "tcp"
    ports    = [tostring(local.luigid_port)]
  }

  source_service_accounts = [google_service_account.node.email]
  target_service_accounts = [google_service_account.scheduler.email]

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# Google's health checkers -> the nodes' /healthz (managed instance group autohealing).
resource "google_compute_firewall" "health_checks" {
  project     = var.project_id
  name        = "${var.name}-allow-health-checks"
  network     = google_compute_network.poltergust.id
  description = "Google Cloud health checkers reach the nodes' health port."
  direction   = "INGRESS"

  allow {
    protocol = "tcp"
    ports    = [tostring(local.health_port)]
  }

  source_ranges           = local.health_check_ranges
  target_service_accounts = [google_service_account.node.email]

  log_config {
    metadata = "EXCLUDE_ALL_METADATA"
  }
}

# Operator -> VMs over ssh, only through Identity-Aware Proxy (which checks
# the operator's IAM permissions); used for the tunnel to luigid's web page.
resource "google_compute_firewall" "iap_ssh" {
  count       = var.enable_iap_ssh ? 1 : 0
  project     = var.project_id
  name        = "${var.name}-allow-iap-ssh"
  network     = google_compute_network.poltergust.id
  description = "ssh through Identity-Aware Proxy only."
  direction   = "INGRESS"

  allow {
    protocol = "tcp"
    ports    = ["22"]
  }

  source_ranges = [local.iap_range]
  target_service_accounts = [
    google_service_account.node.email,
    google_service_account.scheduler.email,
  ]

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}
