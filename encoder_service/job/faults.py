"""Faults that are not the input's: counted across actor restarts, and (for tests) injected.

An exception while encoding a unit that is not caused by its clips (a CUDA error, out of memory,
a dead context, a bug, the store failing) ends the encoder actor, so Ray starts a fresh process
and retries the unit; the FaultRegistry, one small actor per run, remembers how often each unit
failed. On the MAX_ATTEMPTS-th failure the unit comes back as failed, its shard is not committed
and the run reports it; a later run redoes the shard.

Test-only injection comes from the environment variable WFVAE_INJECT_FAULTS (JSON), never from
job options: {"kill_after_calls": N, "kill_marker": PATH} kills an actor once after N calls
(PATH is created then); {"raise_unit": "SHARD/INDEX", "times": K, "marker": PATH} raises a
RuntimeError on the first K attempts of that unit (a line in PATH for each), as the call starts
or, with "raise_stage": "write", while its data file is written (beside the model); {"nan_keys": TEXT}
turns the frames of clips whose key contains TEXT into NaN (an input problem: those clips become
ledger rows); {"hold_after_calls": N, "hold_until": PATH} makes every call after an actor's N-th
wait until PATH exists (a stalled device: the run makes no progress while it waits). They combine.
"""
import json
import os
import time
from dataclasses import dataclass

import numpy as np

ENV = "WFVAE_INJECT_FAULTS"
MAX_ATTEMPTS = 2


def make_registry():
    """The run's FaultRegistry actor, on the driver's node (it lives and dies with the driver)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)

    @ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy=here)
    class FaultRegistry:
        def __init__(self):
            self.counts: dict[str, int] = {}

        def record(self, key: str) -> int:
            self.counts[key] = self.counts.get(key, 0) + 1
            return self.counts[key]

        def count(self, key: str) -> int:
            return self.counts.get(key, 0)

    return FaultRegistry.remote()


@dataclass(frozen=True)
class Injection:
    kill_after_calls: int | None = None
    kill_marker: str | None = None
    marker: str | None = None
    raise_unit: str | None = None
    times: int = 0
    raise_stage: str = "start"   # start | write
    nan_keys: str | None = None
    hold_after_calls: int | None = None
    hold_until: str | None = None

    @classmethod
    def from_env(cls) -> "Injection | None":
        text = os.environ.get(ENV)
        return cls(**json.loads(text)) if text else None

    def before_call(self, calls: int, unit_key: str | None, registry) -> None:
        """Called as an encoder call starts: may kill this process or raise (as a fault would)."""
        if self.kill_after_calls is not None and calls > self.kill_after_calls and not os.path.exists(self.kill_marker):
            open(self.kill_marker, "w").close()
            os._exit(1)
        if self.raise_stage == "start":
            self.maybe_raise(unit_key, registry)
        if self.hold_after_calls is not None and calls > self.hold_after_calls:
            while not os.path.exists(self.hold_until):
                time.sleep(0.05)

    def before_write(self, unit_key: str, registry) -> None:
        """Called as a unit's data file is about to be written."""
        if self.raise_stage == "write":
            self.maybe_raise(unit_key, registry)

    def maybe_raise(self, unit_key: str | None, registry) -> None:
        if unit_key is not None and unit_key == self.raise_unit:
            import ray
            if ray.get(registry.count.remote(unit_key)) < self.times:
                if self.marker:
                    with open(self.marker, "a") as f:
                        f.write(f"{unit_key}\n")
                raise RuntimeError(f"injected fault in unit {unit_key}")

    def frames(self, clips, frames: np.ndarray) -> np.ndarray:
        if not self.nan_keys or not any(self.nan_keys in c.key for c in clips):
            return frames
        out = frames.astype(np.float32)
        for i, clip in enumerate(clips):
            if self.nan_keys in clip.key:
                out[i] = np.nan
        return out


def env_for_workers() -> dict:
    """runtime_env entries that carry an injection to the encoder actors."""
    return {"env_vars": {ENV: os.environ[ENV]}} if os.environ.get(ENV) else {}
