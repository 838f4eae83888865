"""Shared benchmark helpers: environment record, timing, peak memory, JSON output."""
import json
import os
import platform
import statistics
import subprocess
import time
import weakref
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# WFVAE_BENCH_RESULTS: where a check run (gpu_acceptance.sh --smoke) writes, away from the committed results
RESULTS = Path(os.environ.get("WFVAE_BENCH_RESULTS") or Path(__file__).parent / "results")


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.startswith("cuda"):
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["driver"] = _nvidia_driver()
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def _nvidia_driver() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def axes(width: float = 6, height: float = 4):
    """A (figure, axes) pair on the file-only Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(width, height))


def save_plot(fig, ax, path: Path, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def median_time(fn, device: str, warmup: int = 1, repeats: int = 3) -> float:
    """Median seconds of fn() after warm-up; CUDA events on GPU, a synchronised clock otherwise."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by operators while active (CPU stand-in for
    torch.cuda.max_memory_allocated). Storages are counted once, freed when the last tensor
    viewing them dies. Memory that existed before (weights, inputs) is not counted."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set):
        key = t.untyped_storage().data_ptr()
        if key not in self.live and key in inputs:
            return  # a view of memory that existed before (weights, the input)
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [t.untyped_storage().nbytes(), 1]
            self.current += self.live[key][0]
            self.peak = max(self.peak, self.current)
        weakref.finalize(t, self._release, key)

    def _release(self, key):
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


def peak_memory(fn, device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with TensorMemoryTracker() as tracker:
        fn()
    return tracker.peak
