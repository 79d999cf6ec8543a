# The luigi central scheduler every node talks to, and the dashboard (given
# poltergust-path; on 127.0.0.1:8090, like luigid's page reached through the
# IAP tunnel). Its internal address is reserved so that the nodes'
# --scheduler-url survives a rebuilt VM.

resource "google_compute_address" "scheduler" {
  project      = var.project_id
  name         = "${var.name}-scheduler"
  region       = var.region
  subnetwork   = google_compute_subnetwork.poltergust.id
  address_type = "INTERNAL"
}

resource "google_compute_instance" "scheduler" {
  #checkov:skip=CKV_GCP_38:Customer-supplied disk keys would have to be handed to every restart of the VM; the disk holds only luigid's task state and is encrypted with Google-managed keys.
  project      = var.project_id
  name         = "${var.name}-scheduler"
  zone         = local.zone
  machine_type = var.scheduler_machine_type
  labels       = var.labels
  # Changing the machine type stops the VM; luigid reloads its state file.
  allow_stopping_for_update = true

  boot_disk {
    initialize_params {
      image = var.image
      size  = var.scheduler_disk_size_gb
    }
  }

  # No access_config block: no external address. Outbound goes through NAT.
  network_interface {
    subnetwork = google_compute_subnetwork.poltergust.id
    network_ip = google_compute_address.scheduler.address
  }

  service_account {
    email = google_service_account.scheduler.email
    # Access is decided by IAM (the account has no roles), not by scopes.
    scopes = ["cloud-platform"]
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  metadata = {
    poltergust-role         = "scheduler"
    poltergust-path         = local.pipeline_url
    poltergust-wheel-url    = local.release_metadata.wheel_url
    poltergust-wheel-sha256 = local.release_metadata.wheel_sha256
    poltergust-lock-url     = local.release_metadata.lock_url
    poltergust-lock-sha256  = local.release_metadata.lock_sha256
    # luigid's own settings, checked and merged with the fleet's at boot (see node-init.sh).
    poltergust-luigid-config = var.luigid_config
    # ssh only with OS Login (IAM-controlled), never with keys in metadata.
    enable-oslogin         = "TRUE"
    block-project-ssh-keys = "TRUE"
  }
  metadata_startup_script = local.init_script
}
