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
  description = "Fewest nodes."
  type        = number
  default     = 1
}

variable "node_max_count" {
  description = "Most nodes."
  type        = number
  default     = 4
}

variable "poltergust_package" {
  description = "pip install spec of Poltergust: a name, a git+https URL or a wheel URL."
  type        = string
  default     = "poltergust"
}

variable "poltergust_version" {
  description = "Version to pin when poltergust_package is a plain name; empty for the newest."
  type        = string
  default     = ""
}
