"""Latent shards: Parquet files of posterior mean/logvar with provenance, a manifest committed last,
an error ledger beside them, and a training-side IterableDataset."""
from encoder_service.shards.manifest import ShardStatus, shard_status
from encoder_service.shards.reader import LatentShardDataset, decode_tensor
from encoder_service.shards.schema import SCHEMA_VERSION, encode_tensor
from encoder_service.shards.writer import ShardWriter, write_shard

__all__ = ["LatentShardDataset", "SCHEMA_VERSION", "ShardStatus", "ShardWriter", "decode_tensor", "encode_tensor",
           "shard_status", "write_shard"]
