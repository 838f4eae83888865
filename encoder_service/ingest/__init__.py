"""Video ingest: WebDataset shards -> decoded, sampled, cropped uint8 clips with provenance."""
