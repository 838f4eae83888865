"""Units: the clips one encoder call takes and one data file holds.

A unit holds clips of one shard and one shape, in shard order, as many as make about `file_mb`
of latents (bounded by MAX_UNIT_FRAME_BYTES of frames). Which clips share a unit depends only on
the shard's content and the options, never on scheduling, so a shard encoded again gives the same
files byte for byte. The one place clips are grouped by shape.
"""
import math
from dataclasses import dataclass

import numpy as np

from encoder_service.records import Clip, StageRow, Unit

MAX_UNIT_FRAME_BYTES = 1 << 30   # frames one unit (one Ray object, one encoder call) may hold


@dataclass(frozen=True)
class UnitPlan:
    latent_dim: int
    value_bytes: int        # bytes per stored latent value
    tensors: int            # 2 with logvar, 1 without
    file_bytes: int         # target latent bytes per unit / data file

    @classmethod
    def for_job(cls, cfg, latent_dim: int) -> "UnitPlan":
        value_bytes = cfg.precision.storage_bytes
        return cls(latent_dim, value_bytes, 2 if cfg.store_logvar else 1, int(cfg.file_mb * (1 << 20)))

    def latent_bytes(self, shape) -> int:
        t, h, w = shape[:3]
        return self.latent_dim * ((t - 1) // 4 + 1) * (h // 8) * (w // 8) * self.value_bytes * self.tensors

    def clips_per_unit(self, shape) -> int:
        frame_bytes = math.prod(shape)
        return max(1, min(self.file_bytes // self.latent_bytes(shape), MAX_UNIT_FRAME_BYTES // frame_bytes))


class UnitBuilder:
    """Collect a shard's clips into units; `add` and `flush` yield StageRows of kind "unit"."""

    def __init__(self, shard_id: str, plan: UnitPlan):
        self.shard_id, self.plan, self.count = shard_id, plan, 0
        self.groups: dict[tuple, list[tuple[Clip, np.ndarray]]] = {}

    def add(self, clip: Clip, frames: np.ndarray):
        group = self.groups.setdefault(frames.shape, [])
        group.append((clip, frames))
        if len(group) >= self.plan.clips_per_unit(frames.shape):
            yield self._emit(frames.shape)

    def flush(self):
        for shape in list(self.groups):
            if self.groups[shape]:
                yield self._emit(shape)

    def _emit(self, shape) -> StageRow:
        group = self.groups.pop(shape)
        unit = Unit(self.shard_id, self.count, list(shape), [c for c, _ in group],
                    b"".join(f.tobytes() for _, f in group))
        self.count += 1
        return StageRow("unit", self.shard_id, unit=unit)
