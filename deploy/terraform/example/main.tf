# Example root configuration: everything Poltergust needs in one project.
#
#   deploy/build-release.sh          # the wheel and lock file, in deploy/dist/
#   cd deploy/terraform/example
#   terraform init
#   terraform apply -var project_id=MY-PROJECT
#
# Then upload a pipeline to the printed pipeline_url (see deploy/README.md).

provider "google" {
  project = var.project_id
  region  = var.region
}

# APIs the module uses. Left enabled on destroy: other things may use them.
resource "google_project_service" "apis" {
  for_each = toset(concat([
    "cloudresourcemanager.googleapis.com",
    "compute.googleapis.com",
    "iam.googleapis.com",
    "pubsub.googleapis.com",
    "storage.googleapis.com",
  ], length(var.node_secrets) > 0 ? ["secretmanager.googleapis.com"] : []))
  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}

module "poltergust" {
  source = "../modules/poltergust"

  project_id        = var.project_id
  region            = var.region
  bucket_name       = var.bucket_name
  node_machine_type = var.node_machine_type
  node_min_count    = var.node_min_count
  node_max_count    = var.node_max_count
  release_manifest  = var.release_manifest
  node_secrets      = var.node_secrets

  depends_on = [google_project_service.apis]
}
