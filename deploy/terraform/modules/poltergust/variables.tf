variable "project_id" {
  description = "Project that holds everything: bucket, topic, VMs, service accounts."
  type        = string
}

variable "region" {
  description = "Region of the nodes' managed instance group, the subnet and (by default) the bucket."
  type        = string
}

variable "zone" {
  description = "Zone of the scheduler VM. Default: the first zone of the region that is up."
  type        = string
  default     = null
}

variable "name" {
  description = "Prefix of every resource name (VMs, service accounts, firewall rules, ...)."
  type        = string
  default     = "poltergust"

  validation {
    # Service account ids are at most 30 characters: NAME-scheduler must fit.
    condition     = can(regex("^[a-z][a-z0-9-]{0,18}[a-z0-9]$", var.name))
    error_message = "name must be 2-20 lower-case letters, digits or dashes, starting with a letter."
  }
}

variable "bucket_name" {
  description = "Bucket for pipeline configs, results, logs and environment files. Default: PROJECT-poltergust."
  type        = string
  default     = null
}

variable "bucket_location" {
  description = "Location of the bucket. Default: the region."
  type        = string
  default     = null
}

variable "bucket_force_destroy" {
  description = "Let terraform destroy delete the bucket even when it still holds objects (pipelines, results, logs)."
  type        = bool
  default     = false
}

variable "pipeline_prefix" {
  description = "Folder of the bucket the nodes watch: configs go to gs://BUCKET/PREFIX/NAME.config.yaml."
  type        = string
  default     = "pipeline"

  validation {
    condition     = can(regex("^[^/]+(/[^/]+)*$", var.pipeline_prefix))
    error_message = "pipeline_prefix is a folder name without leading or trailing slash, e.g. \"pipeline\"."
  }
}

variable "topic_name" {
  description = "Pub/Sub topic for the bucket notifications. Default: poltergust-BUCKET, the name the node assumes."
  type        = string
  default     = null
}

variable "subnet_cidr" {
  description = "IP range of the subnet the scheduler and the nodes live in."
  type        = string
  default     = "10.42.0.0/24"
}

variable "scheduler_machine_type" {
  description = "Machine type of the luigid VM."
  type        = string
  default     = "e2-medium"
}

variable "node_machine_type" {
  description = "Machine type of each node."
  type        = string
  default     = "e2-standard-4"
}

variable "node_min_count" {
  description = "Fewest nodes the autoscaler keeps running: 0 pays for no node while no config waits; more keeps nodes warm."
  type        = number
  default     = 0

  validation {
    condition     = var.node_min_count >= 0
    error_message = "node_min_count must be 0 or more."
  }
}

variable "node_max_count" {
  description = "Most nodes the autoscaler may start."
  type        = number
  default     = 4

  validation {
    condition     = var.node_max_count >= 1
    error_message = "node_max_count must be at least 1."
  }
}

variable "node_max_concurrent" {
  description = "Pipelines one node runs at once; the autoscaler runs one node per this many configs waiting or running."
  type        = number
  default     = 4

  validation {
    condition     = var.node_max_concurrent >= 1 && var.node_max_concurrent <= 9999
    error_message = "node_max_concurrent must be 1 to 9999."
  }
}

variable "luigid_config" {
  description = "A luigi configuration fragment for luigid ([scheduler], [resources], [task_history], ...), e.g. file(\"luigid.cfg\"). The scheduler VM checks it at boot against what luigid reads and what Poltergust sets itself, and merges it with the fleet's settings; a change applies at the VM's next boot."
  type        = string
  default     = ""
}

variable "node_idle_minutes" {
  description = "A node with no run for this many minutes deletes itself from the group (the autoscaler only scales out), never below node_min_count; 0: nodes never retire."
  type        = number
  default     = 15

  validation {
    condition     = var.node_idle_minutes >= 0
    error_message = "node_idle_minutes must be 0 or more."
  }
}

variable "node_disk_size_gb" {
  description = "Boot disk of each node: holds the pipelines' environments and luigi working files."
  type        = number
  default     = 50
}

variable "scheduler_disk_size_gb" {
  description = "Boot disk of the scheduler VM."
  type        = number
  default     = 20
}

variable "image" {
  description = "Boot image of the VMs (node-init.sh expects Debian or Ubuntu)."
  type        = string
  default     = "debian-cloud/debian-12"
}

variable "node_image" {
  description = "Boot image of the nodes, if not var.image: a baked one from deploy/bake-image.sh, e.g. projects/PROJECT/global/images/family/poltergust-node (the release and environments already installed)."
  type        = string
  default     = null
}

variable "release_manifest" {
  description = "Path of release.json written by deploy/build-release.sh. Its wheel and lock file (in VERSION/ beside it) are uploaded to gs://BUCKET/_poltergust/dist/VERSION/, and every VM installs exactly them, checked by sha256."
  type        = string
}

variable "node_secrets" {
  description = "Secret Manager secrets the nodes put into their environment for {{NAME}} in environment files: NAME => secret id in project_id. The nodes' service account may read exactly these."
  type        = map(string)
  default     = {}

  validation {
    condition = alltrue([for name, id in var.node_secrets :
    can(regex("^[A-Za-z_][A-Za-z0-9_]*$", name)) && can(regex("^[A-Za-z0-9_-]+$", id))])
    error_message = "node_secrets maps environment variable names to secret ids (letters, digits, - and _)."
  }
}

variable "pipeline_service_account" {
  description = "Email of the service account whose short-lived tokens pipelines get (from a metadata endpoint of their own; runs never reach the node's). The nodes' account may mint tokens for exactly this one. Empty: pipelines get no Google credentials."
  type        = string
  default     = ""

  validation {
    condition     = var.pipeline_service_account == "" || can(regex("^[a-z][a-z0-9-]{4,29}@[a-z0-9.:-]+\\.iam\\.gserviceaccount\\.com$", var.pipeline_service_account))
    error_message = "pipeline_service_account is a service account email (NAME@PROJECT.iam.gserviceaccount.com)."
  }
}

variable "enable_iap_ssh" {
  description = "Allow ssh to the VMs through Identity-Aware Proxy (35.235.240.0/20), e.g. for the tunnel to the scheduler's web page."
  type        = bool
  default     = true
}

variable "labels" {
  description = "Labels put on the bucket, the topic and the VMs."
  type        = map(string)
  default     = {}
}

variable "run_record_days" {
  description = "Days after which run logs and run markers (_poltergust/logs/, _poltergust/runs/) are deleted."
  type        = number
  default     = 30
}

variable "result_days" {
  description = "Days after which result files (NAME.done.yaml, NAME.error.yaml) are deleted."
  type        = number
  default     = 365
}
