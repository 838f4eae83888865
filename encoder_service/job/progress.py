"""Progress while the job runs: a tqdm bar of clips encoded (clips/s, ETA) on a terminal, a line
every few seconds otherwise (job logs), and the progress/ETA gauges for Grafana. Counts move as each
unit comes back, not only when a shard commits."""
import contextlib
import sys
import threading
import time

from encoder_service import metrics
from encoder_service.job.driver import Totals
from encoder_service.storage import scrub


class Progress:
    def __init__(self, total_shards: int, every_s: float, terminal: bool | None = None):
        self.total_shards, self.every_s, self.started, self.last_print = total_shards, every_s, time.time(), 0.0
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = None
        if terminal and total_shards:
            from tqdm import tqdm
            self.bar = tqdm(unit="clip", dynamic_ncols=True, file=sys.stderr, mininterval=0.5)

    def expected_clips(self, t: Totals) -> int | None:
        """Clips of the whole run, estimated from the shards ingested so far."""
        if not t.shards_ingested:
            return None
        return max(t.clips_encoded, round(t.clips_ingested / t.shards_ingested * self.total_shards))

    def eta_s(self, t: Totals) -> float | None:
        total, elapsed = self.expected_clips(t), time.time() - self.started
        if total is None or not t.clips_encoded:
            return None
        return max(0.0, (total - t.clips_encoded) / (t.clips_encoded / elapsed))

    def update(self, t: Totals) -> None:
        finished = self._gauges(t)
        if self.bar is not None:
            self.bar.total = self.expected_clips(t)
            self.bar.update(t.clips_encoded - self.bar.n)
            self.bar.set_postfix(shards=f"{finished}/{self.total_shards}",
                                 errors=sum(t.committed.ledger_reasons.values()), refresh=False)
        elif time.time() - self.last_print >= self.every_s:
            print(self.line(t), flush=True)
            self.last_print = time.time()

    def heartbeat(self, totals):
        """While the run waits for results, a line still comes every `every_s` (without a terminal),
        saying what it waits for: a run that makes no progress is seen to make none."""
        def beat():
            if self.bar is None and time.time() - self.last_print >= self.every_s:
                t = totals()
                print(f"{self.line(t)}; waiting for {self.waiting_for(t)}", flush=True)
                self.last_print = time.time()
        return every(self.every_s, beat, "wfvae-progress")

    def waiting_for(self, t: Totals) -> str:
        if not t.shards_ingested and not t.clips_encoded:
            return "the first shard to be read and decoded (ingest tasks starting, or a slow input store)"
        if not t.clips_encoded:
            return "the first encoder results (encoder actors starting: model load, GPUs the cluster may lack)"
        return "encoder results"

    def line(self, t: Totals) -> str:
        elapsed = max(1e-9, time.time() - self.started)
        eta = self.eta_s(t)
        finished = t.committed.shards + len(t.failed)
        failed = f" ({t.committed.shards} committed, {len(t.failed)} failed)" if t.failed else ""
        return (f"[encode] {finished}/{self.total_shards} shards{failed}, {t.clips_encoded} clips encoded, "
                f"{sum(t.committed.ledger_reasons.values())} errors, {t.clips_encoded / elapsed:.2f} clips/s, "
                f"ETA {'0s' if finished == self.total_shards else ('unknown' if eta is None else f'{eta:.0f}s')}")

    def _gauges(self, t: Totals) -> int:
        finished = t.committed.shards + len(t.failed)
        metrics.set_gauge("wfvae_job_progress_ratio", finished / self.total_shards if self.total_shards else 1.0)
        if self.eta_s(t) is not None:
            metrics.set_gauge("wfvae_job_eta_seconds", self.eta_s(t))
        return finished

    def close(self, t: Totals) -> None:
        """The final line, once."""
        self._gauges(t)
        if self.bar is not None:
            self.bar.update(t.clips_encoded - self.bar.n)
            self.bar.close()
        print(self.line(t), flush=True)


def planning_heartbeat(cfg):
    """While planning talks to the stores (before Ray starts), a line every --progress-every-s saying
    what it waits for and the most it can take: a store that accepts connections and never answers
    shows as waiting, never as silence."""
    per_request = cfg.store_attempts * (cfg.store_connect_timeout_s + cfg.store_read_timeout_s)
    started = time.time()

    def beat():
        print(scrub(f"[plan] waiting for --output {cfg.output} and the inputs after "
                    f"{time.time() - started:.0f}s (each request gives up within {per_request:g}s: "
                    f"{cfg.store_attempts} attempts x ({cfg.store_connect_timeout_s:g}s connect + "
                    f"{cfg.store_read_timeout_s:g}s read); --store-* options)"), flush=True)
    return every(cfg.progress_every_s, beat, "wfvae-planning")


@contextlib.contextmanager
def every(seconds: float, beat, name: str):
    """For the block, beat() every `seconds` in a daemon thread."""
    done = threading.Event()

    def loop():
        while not done.wait(seconds):
            beat()

    threading.Thread(target=loop, name=name, daemon=True).start()
    try:
        yield
    finally:
        done.set()
