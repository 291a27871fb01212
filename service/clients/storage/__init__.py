"""Cloud Storage: the per-loop gcloud-aio-storage client, its errors, names and media responses."""
