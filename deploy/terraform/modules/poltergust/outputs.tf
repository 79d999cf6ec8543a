output "bucket_name" {
  description = "The bucket (pipelines, results, logs, environment files)."
  value       = google_storage_bucket.poltergust.name
}

output "pipeline_url" {
  description = "Where to upload pipeline configs: gcloud storage cp NAME.config.yaml PIPELINE_URL/"
  value       = local.pipeline_url
}

output "topic_name" {
  description = "The Pub/Sub topic receiving the bucket's notifications."
  value       = google_pubsub_topic.bucket_events.name
}

output "topic_id" {
  description = "Full name of the topic: projects/PROJECT/topics/TOPIC."
  value       = google_pubsub_topic.bucket_events.id
}

output "scheduler_url" {
  description = "The luigid address the nodes use (internal: reach it through an ssh tunnel)."
  value       = local.scheduler_url
}

output "scheduler_address" {
  description = "Internal IP address of the luigid VM."
  value       = google_compute_address.scheduler.address
}

output "scheduler_instance" {
  description = "Name of the luigid VM."
  value       = google_compute_instance.scheduler.name
}

output "scheduler_zone" {
  description = "Zone of the luigid VM."
  value       = google_compute_instance.scheduler.zone
}

output "node_service_account" {
  description = "Email of the nodes' service account (grant it access to other buckets your pipelines read)."
  value       = google_service_account.node.email
}

output "instance_group_manager" {
  description = "The nodes' regional managed instance group."
  value       = google_compute_region_instance_group_manager.nodes.name
}

output "tunnel_command" {
  description = "Opens luigid's web page at http://localhost:8082 and the dashboard at http://localhost:8090."
  value       = "gcloud compute ssh ${google_compute_instance.scheduler.name} --project ${var.project_id} --zone ${google_compute_instance.scheduler.zone} --tunnel-through-iap -- -L 8082:localhost:8082 -L 8090:localhost:8090 -N"
}

output "release_version" {
  description = "The release the VMs install (gs://BUCKET/_poltergust/dist/VERSION/)."
  value       = local.release.version
}
