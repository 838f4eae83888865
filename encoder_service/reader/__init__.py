"""What a trainer imports: the output folder's pinned table version as a PyTorch IterableDataset
(no model, no job)."""
from encoder_service.reader.dataset import LatentShardDataset, ShardError, collate

__all__ = ["LatentShardDataset", "ShardError", "collate"]
