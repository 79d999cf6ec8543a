terraform {
  required_version = ">= 1.3"

  required_providers {
    google = {
      source = "hashicorp/google"
      # metric.filter and metric.single_instance_assignment of the autoscaler are GA from 5.21.
      version = ">= 5.21, < 7.0"
    }
  }
}
