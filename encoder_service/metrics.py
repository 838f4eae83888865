"""Encoder-domain metrics, exported through Ray's own Prometheus endpoint (`ray.util.metrics`).

Why Ray's metrics rather than a prometheus-client HTTP server per process: the job runs in many
short-lived Ray worker processes (ingest tasks, encoder actors that may be restarted, the driver).
Ray's per-node metrics agent already aggregates every worker on the node behind one port, labels
each series with `NodeAddress` (the per-node breakdown) and writes a service-discovery file for
Prometheus, so no port has to be opened or discovered per process. (prometheus-client parses
that endpoint in the tests.)

Ray prefixes every name with `ray_` and counters with `_total`: `wfvae_errors` is scraped as
`ray_wfvae_errors_total`. Outside a Ray worker (unit tests, the CLI) every call is a no-op.
"""
import functools
import os
import threading
import time

LATENCY_BUCKETS = {
    "decode": [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],      # per clip
    "encode": [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],     # per encoder batch
    "write": [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],        # per shard commit
}

# name: (kind, description, tag keys)
DEFINITIONS = {
    "wfvae_clips_decoded": ("counter", "Clips decoded, resized and cropped by ingest, by bucket (TxHxW)", ("bucket",)),
    "wfvae_frames_decoded": ("counter", "Frames decoded by ingest", ()),
    "wfvae_clips_encoded": ("counter", "Clips encoded into latents", ()),
    "wfvae_frames_encoded": ("counter", "Frames encoded into latents", ()),
    "wfvae_latent_bytes_written": ("counter", "Bytes of latent data files (Parquet) committed", ()),
    "wfvae_latents_written": ("counter", "Latent rows committed to shards", ()),
    "wfvae_shards": ("counter", "Shards by outcome: done, skipped (already complete), failed", ("status",)),
    "wfvae_errors": ("counter", "Error-ledger rows by stage and reason", ("stage", "reason")),
    "wfvae_encoder_busy_seconds": ("counter", "Seconds the model ran (CUDA events on a GPU, the model call's wall "
                                   "time on the CPU)", ()),
    "wfvae_encoder_dispatch_seconds": ("counter", "Host CPU seconds of the thread calling the model (Python, "
                                       "dispatch, kernel launches): close to busy seconds, the device waits for "
                                       "launches", ()),
    "wfvae_device_utilization": ("gauge", "Fraction of the last second the GPU ran a kernel (NVML, sampled each "
                                 "second in the encoder actor): the device's own figure", ("device",)),
    "wfvae_encoder_wait_seconds": ("counter", "Seconds an encoder actor held no unit (waiting for input)", ()),
    "wfvae_encoder_critical_host_seconds": ("counter", "Host seconds on the encoder's critical path: while holding "
                                            "the device, outside the model calls", ()),
    "wfvae_encoder_finish_seconds": ("counter", "Seconds spent beside the model: latents to rows, statistics, file "
                                     "write and upload, QA", ()),
    "wfvae_text_encoder_seconds": ("counter", "Seconds the text encoder ran on captions (--text-encoder), beside "
                                   "the VAE, not counted as its busy time", ()),
    "wfvae_encoder_compile_seconds": ("counter", "Seconds torch.compile took for new clip shapes (--compile), not "
                                      "counted as busy", ()),
    "wfvae_encoder_units_in_flight": ("gauge", "Units inside an encoder actor (preparing, on the device, finishing)",
                                      ()),
    "wfvae_decode_seconds": ("histogram", "Decode + resize + crop time per clip", ()),
    "wfvae_encode_seconds": ("histogram", "Model seconds per unit (one encoder call)", ()),
    "wfvae_write_seconds": ("histogram", "Time to write and commit one output shard", ()),
    "wfvae_encoder_memory_bytes": ("gauge", "Encoder device memory in use: CUDA allocated bytes on a GPU, "
                                   "resident set size on CPU", ("device",)),
    "wfvae_encoder_memory_peak_bytes": ("gauge", "Peak CUDA memory allocated by the encoder (RSS on CPU)", ("device",)),
    "wfvae_job_shards_planned": ("gauge", "Shards this run has to encode", ()),
    "wfvae_job_progress_ratio": ("gauge", "Fraction of planned shards finished (done or failed)", ()),
    "wfvae_job_eta_seconds": ("gauge", "Estimated seconds until the run finishes", ()),
    "wfvae_job_runs": ("counter", "Finished runs by outcome: succeeded, failed (a shard failed or the run raised), "
                       "interrupted (SIGTERM/SIGINT)", ("outcome",)),
    "wfvae_latent_channel_mean": ("gauge", "This run's per-channel mean of the latent means or logvars",
                                  ("tensor", "channel")),
    "wfvae_latent_channel_std": ("gauge", "This run's per-channel standard deviation of the latent means or logvars",
                                 ("tensor", "channel")),
    "wfvae_latent_mean_shift_ratio": ("gauge", "Largest per-channel shift of this run's latent mean from the "
                                      "output folder's history, in historical standard deviations (0: no history)",
                                      ("tensor",)),
    "wfvae_latent_std_ratio": ("gauge", "Largest per-channel ratio between this run's latent std and the folder's "
                               "history, either way (1: no history)", ("tensor",)),
    "wfvae_qa_drift_ratio": ("gauge", "Relative L2 of QA clips' stored means against an fp32 (TF32 off) encode",
                             ("stat",)),
    "wfvae_qa_psnr_decibels": ("gauge", "Mean PSNR of QA clips decoded from their stored means", ()),
    "wfvae_qa_ssim": ("gauge", "Mean SSIM of QA clips decoded from their stored means", ()),
}
UNITLESS = ("wfvae_latent_channel_mean", "wfvae_latent_channel_std", "wfvae_qa_ssim",  # values without a unit
            "wfvae_encoder_units_in_flight", "wfvae_device_utilization")


@functools.cache
def _metric(name: str):
    from ray.util import metrics
    kind, description, tags = DEFINITIONS[name]
    if kind == "histogram":
        return metrics.Histogram(name, description, boundaries=LATENCY_BUCKETS[name.split("_")[1]], tag_keys=tags)
    return (metrics.Counter if kind == "counter" else metrics.Gauge)(name, description, tag_keys=tags)


def _enabled() -> bool:
    try:
        import ray
        return ray.is_initialized()
    except ImportError:
        return False


def inc(name: str, value: float = 1.0, **tags) -> None:
    if value > 0 and _enabled():
        _metric(name).inc(value, tags=tags or None)


def observe(name: str, value: float, **tags) -> None:
    if _enabled():
        _metric(name).observe(value, tags=tags or None)


def set_gauge(name: str, value: float, **tags) -> None:
    if _enabled():
        _metric(name).set(value, tags=tags or None)


def sample_device_utilization(device, every_s: float = 1.0) -> threading.Thread | None:
    """On CUDA, a daemon thread setting wfvae_device_utilization every `every_s` from NVML, through
    torch.cuda.utilization (nvidia-ml-py; it maps the CUDA index to NVML's, CUDA_VISIBLE_DEVICES
    included). NVML's own figure is the share of its last sample period in which a kernel ran, so
    launch gaps count as idle, unlike CUDA events around a call. None off CUDA or without NVML."""
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch
    try:
        torch.cuda.utilization(device)
    except Exception as exc:  # no NVML (a driver without it): the busy ratio is all there is
        print(f"[encoder] no NVML device utilization: {type(exc).__name__}: {exc}", flush=True)
        return None

    def sample():
        while True:
            try:
                set_gauge("wfvae_device_utilization", torch.cuda.utilization(device) / 100, device=str(device))
            except Exception as exc:  # NVML gone (a driver reset): stop sampling, say so once
                print(f"[encoder] NVML sampling stopped: {type(exc).__name__}: {exc}", flush=True)
                return
            time.sleep(every_s)
    thread = threading.Thread(target=sample, name="nvml-utilization", daemon=True)
    thread.start()
    return thread


def device_memory(device) -> tuple[int, int]:
    """(in use, peak) bytes for the encoder's device; the process RSS on CPU."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    rss = _rss_bytes()
    return rss, rss


def _rss_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
