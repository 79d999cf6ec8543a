# The release every VM installs: the wheel and the lock file made by
# deploy/build-release.sh, uploaded under _poltergust/dist/VERSION/. The VMs
# get their URLs and sha256 digests as metadata and refuse any other file;
# the nodes' own grants (iam.tf) cannot write below _poltergust/dist/, so a
# pipeline cannot replace what the next VM installs.

locals {
  release     = jsondecode(file(var.release_manifest))
  release_dir = "${dirname(var.release_manifest)}/${local.release.version}"
  dist_prefix = "${local.dist_root}${local.release.version}/"

  release_metadata = {
    wheel_url    = "gs://${google_storage_bucket_object.wheel.bucket}/${google_storage_bucket_object.wheel.name}"
    wheel_sha256 = filesha256("${local.release_dir}/${local.release.wheel}")
    lock_url     = "gs://${google_storage_bucket_object.lock.bucket}/${google_storage_bucket_object.lock.name}"
    lock_sha256  = filesha256("${local.release_dir}/${local.release.lock}")
  }
}

resource "google_storage_bucket_object" "wheel" {
  bucket       = google_storage_bucket.poltergust.name
  name         = "${local.dist_prefix}${local.release.wheel}"
  source       = "${local.release_dir}/${local.release.wheel}"
  content_type = "application/zip"

  lifecycle {
    precondition {
      condition     = filesha256("${local.release_dir}/${local.release.wheel}") == local.release.wheel_sha256
      error_message = "The wheel beside release.json is not the one build-release.sh recorded: build the release again."
    }
  }
}

resource "google_storage_bucket_object" "lock" {
  bucket       = google_storage_bucket.poltergust.name
  name         = "${local.dist_prefix}${local.release.lock}"
  source       = "${local.release_dir}/${local.release.lock}"
  content_type = "text/plain"

  lifecycle {
    precondition {
      condition     = filesha256("${local.release_dir}/${local.release.lock}") == local.release.lock_sha256
      error_message = "The lock file beside release.json is not the one build-release.sh recorded: build the release again."
    }
  }
}
