"""Data pipeline: raw manifests -> audio shards -> tokenized IndexedDatasets -> batches."""
