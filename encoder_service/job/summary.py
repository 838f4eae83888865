"""_summary.json describes the whole output folder after the last run, merged from the folder's
totals before it (the shards table, read once while planning) and the run's commits; each
invocation's own record goes to _runs/. Both are conveniences: `inspect` computes the same from the
tables."""
import json
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc

from encoder_service.records import FolderTotals
from encoder_service.storage import scrub
from encoder_service.table import layout, totals
from encoder_service.table.folder import OutputFolder
from encoder_service.table.writer import put_small


def folder_after_run(plan, run: FolderTotals, committed: set[str]) -> FolderTotals:
    """The folder's totals now: the shards the run left alone, the run's commits, and the earlier
    records of shards the run set out to redo but did not commit (kept from planning)."""
    folder = totals.add_totals(plan.base, run)
    if plan.redone is not None and plan.redone.num_rows:
        done = pa.array(sorted(committed), pa.string())
        kept = plan.redone.filter(pc.invert(pc.is_in(plan.redone["shard_id"], done)))
        folder = totals.add_totals(folder, totals.records_totals(kept))
    return folder


def write_records(folder: OutputFolder, totals_now: FolderTotals, run: dict) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    put_small(folder, folder.path(layout.RUNS, f"{stamp}-{uuid.uuid4().hex[:8]}.json"), _json(run))
    put_small(folder, folder.path(layout.SUMMARY),
              _json({**totals.folder_report(totals_now), "last_run": run}))


def _json(data: dict) -> bytes:
    return scrub(json.dumps(data, indent=1, sort_keys=True)).encode()
