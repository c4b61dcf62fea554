# Google Cloud side of keychain-warmer: the notification topic, the worker's subscription (with dead-lettering),
# the Secret Manager service agent allowed to publish, the worker's identity, and topics attached to secrets.
# terraform init && terraform apply -var project_id=my-project -var project_number=123 -var 'secret_ids=["openai-api-key"]'

terraform {
  required_providers {
    google      = { source = "hashicorp/google", version = ">= 5.0" }
    google-beta = { source = "hashicorp/google-beta", version = ">= 5.0" } # google_project_service_identity
  }
}

variable "project_id" { type = string }
variable "project_number" { type = string }
variable "secret_ids" {
  type        = list(string)
  description = "Secrets whose changes keychain-warmer must hear about"
}
variable "namespace" {
  type    = string
  default = "noetl"
}

provider "google" {
  project = var.project_id
}

provider "google-beta" {
  project = var.project_id
}

resource "google_pubsub_topic" "events" {
  name = "secret-manager-events"
}

resource "google_pubsub_topic" "dead" {
  name = "secret-manager-events-dead"
}

resource "google_pubsub_subscription" "warmer" {
  name                 = "keychain-warmer"
  topic                = google_pubsub_topic.events.id
  ack_deadline_seconds = 10 # streams/bridge.py ACK_DEADLINE_SECONDS
  retry_policy {
    minimum_backoff = "1s"
    maximum_backoff = "60s"
  }
  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead.id
    max_delivery_attempts = 10
  }
}

# A subscription on the dead-letter topic: without one, what Pub/Sub moves there is lost. Inspect it with
# `gcloud pubsub subscriptions pull keychain-warmer-dead`.
resource "google_pubsub_subscription" "dead" {
  name                       = "keychain-warmer-dead"
  topic                      = google_pubsub_topic.dead.id
  message_retention_duration = "604800s"
}

# Secret Manager publishes as its service agent, which does not exist on a fresh project until it is created.
resource "google_project_service_identity" "secretmanager" {
  provider = google-beta
  project  = var.project_id
  service  = "secretmanager.googleapis.com"
}

resource "google_pubsub_topic_iam_member" "secretmanager_publishes" {
  topic  = google_pubsub_topic.events.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${google_project_service_identity.secretmanager.email}"
}

# Pub/Sub moves undeliverable messages to the dead-letter topic as its own service agent.
resource "google_pubsub_topic_iam_member" "pubsub_dead_letters" {
  topic  = google_pubsub_topic.dead.id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:service-${var.project_number}@gcp-sa-pubsub.iam.gserviceaccount.com"
}

resource "google_pubsub_subscription_iam_member" "pubsub_acks_dead_letters" {
  subscription = google_pubsub_subscription.warmer.id
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:service-${var.project_number}@gcp-sa-pubsub.iam.gserviceaccount.com"
}

# The worker's identity (GKE Workload Identity: deploy/base/serviceaccount.yaml).
resource "google_service_account" "warmer" {
  account_id   = "keychain-warmer"
  display_name = "keychain-warmer worker"
}

resource "google_service_account_iam_member" "workload_identity" {
  service_account_id = google_service_account.warmer.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${var.namespace}/keychain-warmer]"
}

resource "google_project_iam_member" "warmer_roles" {
  for_each = toset(["roles/secretmanager.secretAccessor", "roles/secretmanager.viewer"])
  project  = var.project_id
  role     = each.value
  member   = "serviceAccount:${google_service_account.warmer.email}"
}

resource "google_pubsub_subscription_iam_member" "warmer_pulls" {
  subscription = google_pubsub_subscription.warmer.id
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:${google_service_account.warmer.email}"
}

# Attaching the topic to existing secrets: `gcloud secrets update SECRET --add-topics TOPIC` (a secret managed
# in terraform takes `topics { name = google_pubsub_topic.events.id }` instead).
resource "terraform_data" "attach_topic" {
  for_each = toset(var.secret_ids)
  triggers_replace = [google_pubsub_topic.events.id, each.value]
  provisioner "local-exec" {
    command = "gcloud secrets update ${each.value} --project ${var.project_id} --add-topics ${google_pubsub_topic.events.id}"
  }
  depends_on = [google_pubsub_topic_iam_member.secretmanager_publishes]
}
