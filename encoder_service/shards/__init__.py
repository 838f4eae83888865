"""Latent shards: an output folder of Parquet data files, error ledgers and manifests committed last
(shards/layout.py), and the training-side IterableDataset."""
from encoder_service.shards import layout
from encoder_service.shards.manifest import ShardStatus, shard_status
from encoder_service.shards.reader import LatentShardDataset, ShardError, data_files
from encoder_service.shards.schema import SCHEMA_VERSION, decode_tensor, encode_tensor
from encoder_service.shards.writer import StagingWriter, commit_shard

__all__ = ["LatentShardDataset", "SCHEMA_VERSION", "ShardError", "ShardStatus", "StagingWriter", "commit_shard",
           "data_files", "decode_tensor", "encode_tensor", "layout", "shard_status"]
