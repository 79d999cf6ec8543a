variable "project_id" {
  description = "Project to deploy into."
  type        = string
}

variable "region" {
  description = "Region of the nodes, the scheduler and the bucket."
  type        = string
  default     = "europe-north1"
}

variable "bucket_name" {
  description = "Bucket name. Default: PROJECT-poltergust."
  type        = string
  default     = null
}

variable "node_machine_type" {
  description = "Machine type of each node."
  type        = string
  default     = "e2-standard-4"
}

variable "node_min_count" {
  description = "Fewest nodes (0: none while no config waits)."
  type        = number
  default     = 0
}

variable "node_max_count" {
  description = "Most nodes."
  type        = number
  default     = 4
}

variable "release_manifest" {
  description = "release.json of the release to install, written by deploy/build-release.sh. Default: deploy/dist/release.json of this checkout."
  type        = string
  default     = null
}

variable "node_secrets" {
  description = "Secret Manager secrets for {{NAME}} in environment files: NAME => secret id."
  type        = map(string)
  default     = {}
}
