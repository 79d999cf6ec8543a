output "bucket_name" {
  value = module.poltergust.bucket_name
}

output "pipeline_url" {
  value = module.poltergust.pipeline_url
}

output "topic_name" {
  value = module.poltergust.topic_name
}

output "scheduler_url" {
  value = module.poltergust.scheduler_url
}

output "tunnel_command" {
  value = module.poltergust.tunnel_command
}

output "release_version" {
  value = module.poltergust.release_version
}
