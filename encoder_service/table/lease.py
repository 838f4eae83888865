"""One run per output folder: a lease in `_lease/`, taken before anything in the folder is touched.

The lease is a sequence of generation files `_lease/<n>.json`, each created only if absent (O_EXCL
on local disk, a conditional put `If-None-Match: *` on S3; stores that cannot do this atomically
are refused). The newest generation says who holds the folder: its holder renews it (rewrites
`renewed`) every ttl/4, and releases it at the end (`released`). A run that finds the newest
generation live stops with one line naming the holder; one that finds it released, or not renewed
for `ttl_s` seconds (its holder died), or held by a process of this host that no longer exists
(kill -9), creates generation n+1 at once. Two runs racing for it both try to create the same n+1
and only one can. `--break-lease N` is the operator's way out: it takes over generation N whatever
it says (naming the generation keeps a stale command from breaking a newer run's lease).

A holder that cannot renew within its ttl, or that finds a newer generation (it was taken over after
looking dead), has lost the lease: `valid()` turns false, and the driver commits nothing more.
Expiry compares the holder's clock (renewed) with the reader's: hosts must agree on the time to
well within the ttl (NTP does).
"""
import json
import math
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass

from encoder_service.storage import NotAtomic, list_prefix, put_if_absent, retry
from encoder_service.table import layout
from encoder_service.table.writer import put_small

DEFAULT_TTL_S = 600.0


class LeaseError(Exception):
    """The folder is held by another run, or its lease cannot be taken: one line, exit 2."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    ray_job: str | None
    started: float

    @classmethod
    def this_process(cls) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), _ray_submission_id(), time.time())

    def gone(self) -> bool:
        """The holder was a process of this host that no longer exists (a driver killed with -9)."""
        if self.host != socket.gethostname() or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
        return False

    def describe(self) -> str:
        job = f", Ray job {self.ray_job}" if self.ray_job else ""
        return f"host {self.host}, pid {self.pid}{job}, started {_utc(self.started)}"


@dataclass(frozen=True)
class LeaseRecord:
    """One generation file, `_lease/<generation>.json`, as stored."""
    holder: Holder | None       # None: a generation released and removed between listing and reading
    renewed: float              # the holder's clock at its last renewal
    ttl_s: float
    released: bool
    generation: int

    def to_json(self) -> bytes:
        return json.dumps({**asdict(self), "holder": asdict(self.holder) if self.holder else None}).encode()

    @classmethod
    def from_json(cls, data: bytes, generation: int) -> "LeaseRecord":
        """Raises ValueError, TypeError or KeyError for what is not a lease record."""
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise TypeError("not an object")
        return cls(Holder(**raw["holder"]), float(raw["renewed"]), float(raw["ttl_s"]), bool(raw["released"]),
                   int(raw.get("generation", generation)))

    def live(self) -> bool:
        """Held: not released, renewed within its ttl, and not by a process of this host that is gone."""
        if self.released or self.holder is None or time.time() >= self.renewed + self.ttl_s:
            return False
        return not self.holder.gone()


def _ray_submission_id() -> str | None:
    """The `ray job submit` id of this driver: Ray hands the job's metadata to the entrypoint."""
    try:
        return json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["metadata"]["job_submission_id"]
    except (KeyError, TypeError, ValueError):
        return None


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


class Lease:
    def __init__(self, folder, generation: int, holder: Holder, ttl_s: float):
        """folder: the table.folder.OutputFolder the lease is on (its filesystem, root and names)."""
        if not math.isfinite(ttl_s) or ttl_s <= 0:
            raise LeaseError(f"a lease's ttl must be a positive number of seconds, got {ttl_s!r}")
        self.folder, self.generation, self.holder, self.ttl_s = folder, generation, holder, ttl_s
        self.renewed = time.monotonic()
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- taking it ----------------------------------------------------------------------------
    @classmethod
    def acquire(cls, folder, ttl_s: float = DEFAULT_TTL_S, holder: Holder | None = None,
                breaking: int | None = None) -> "Lease":
        """Take the folder's (an OutputFolder's) lease; `breaking`: the generation to take over even
        if it looks live."""
        holder = holder or Holder.this_process()
        for _ in range(3):
            newest = _generations(folder)
            current = _read(folder, newest[-1]) if newest else None
            if breaking is not None and (not newest or newest[-1] != breaking):
                raise LeaseError(f"--break-lease {breaking}: the folder's lease is at generation "
                                 f"{newest[-1] if newest else 'none'}, not {breaking}; nothing was broken")
            if current is not None and current.live() and newest[-1] != breaking:
                raise LeaseError(f"--output {folder.url} is in use by another run ({current.holder.describe()}; "
                                 f"lease generation {newest[-1]} renewed {_utc(current.renewed)}, expires after "
                                 f"{current.ttl_s:.0f} s without renewal); one run per output folder at a time. "
                                 f"If that run is gone, pass --break-lease {newest[-1]}")
            generation = (newest[-1] if newest else 0) + 1
            lease = cls(folder, generation, holder, ttl_s)
            try:
                created = put_if_absent(folder.fs, lease.path(generation), lease._record())
            except NotAtomic:
                raise LeaseError(f"--output {folder.root}: this store cannot create a file only if it is "
                                 "absent, so two runs on one folder could not be kept apart; use a local folder "
                                 "or s3://") from None
            if created:
                if current is not None and not current.released and current.holder is not None:
                    why = ("broken by --break-lease" if newest[-1] == breaking else "its process is gone"
                           if current.holder.gone() else "it stopped renewing its lease")
                    print(f"[lease] took over {folder.url} from a run ({current.holder.describe()}): {why}",
                          flush=True)
                lease._remove_older(newest)
                return lease
        raise LeaseError(f"--output {folder.root}: other runs keep taking the folder's lease; try again")

    def path(self, generation: int) -> str:
        return _path(self.folder, generation)

    def _record(self, released: bool = False) -> bytes:
        return LeaseRecord(self.holder, time.time(), self.ttl_s, released, self.generation).to_json()

    def _remove_older(self, generations: list[int]) -> None:
        try:
            if generations:
                self.folder.fs.rm([self.path(g) for g in generations])
        except OSError:
            pass  # stale generations are harmless: the newest one counts

    # ---- holding it ---------------------------------------------------------------------------
    def renew(self) -> None:
        newer = [g for g in _generations(self.folder) if g > self.generation]
        if newer:
            self.lost = f"generation {newer[-1]} was taken by another run"
            return
        put_small(self.folder, self.path(self.generation), self._record())  # whole: readers never see half
        self.renewed = time.monotonic()

    def valid(self) -> bool:
        """Whether the folder is still ours: not taken over, renewed within the ttl."""
        if self.lost is None and time.monotonic() - self.renewed > self.ttl_s:
            self.lost = f"not renewed for {self.ttl_s:.0f} s"
        return self.lost is None

    def start_renewing(self) -> "Lease":
        def loop():
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    self.renew()
                except PermissionError as exc:  # a folder made read-only under the run: say so, not "in use"
                    self.lost = f"the output folder cannot be written any more ({exc})"
                except OSError:
                    pass  # tried again next time; valid() turns false once the ttl has passed
                if self.lost:
                    return
        self._thread = threading.Thread(target=loop, name="wfvae-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self.lost is None and not [g for g in _generations(self.folder) if g > self.generation]:
                put_small(self.folder, self.path(self.generation), self._record(released=True))
        except PermissionError:
            pass  # a read-only folder: the next run on this host sees this process gone and takes over


def _generations(folder) -> list[int]:
    found = []
    for entry in list_prefix(folder.fs, folder.path(layout.LEASE)):
        if entry.name.startswith("."):
            continue  # a renewal being written (table/writer.py: put_small)
        stem = entry.name[:-len(".json")]
        if entry.name.endswith(".json") and stem.isdigit():
            found.append(int(stem))
        else:
            raise LeaseError(f"--output {folder.root}: {layout.LEASE}/{entry.name} is not a lease file of this "
                             "service; if no run is using the folder, delete it")
    return sorted(found)


def _path(folder, generation: int) -> str:
    return folder.path(layout.LEASE, f"{generation:012d}.json")


def _read(folder, generation: int) -> LeaseRecord:
    path = _path(folder, generation)
    try:
        return LeaseRecord.from_json(retry(lambda: folder.fs.cat_file(path)), generation)
    except FileNotFoundError:  # released and cleaned between the listing and the read: free
        return LeaseRecord(None, 0.0, 0.0, True, generation)
    except (ValueError, TypeError, KeyError) as exc:
        raise LeaseError(f"--output {folder.root}: {path} is not a lease of this service ({type(exc).__name__}); if no "
                         "run is using the folder, delete it") from None
