"""The batch job: WebDataset video shards -> Ray Data (ingest on CPU, encode in an actor pool) ->
one Parquet latent shard per input shard, resumable and exactly-once."""
