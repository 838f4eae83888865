"""summary.json describes the whole output folder, merged at the end of every run from the folder's
totals before it (the index, read once while planning) and the run's commits; each invocation's
own record goes to _runs/."""
import json
import time
import uuid

from encoder_service.records import FolderTotals
from encoder_service.shards import layout, totals
from encoder_service.shards.manifest import ManifestUnreadable, read_manifest
from encoder_service.shards.writer import put_small
from encoder_service.storage import join, scrub


def folder_after_run(plan, run: FolderTotals, committed: set[str]) -> FolderTotals:
    """The folder's totals now: the shards the run left alone, the run's commits, and the earlier
    commits of shards the run set out to redo but did not commit (read again: one request each,
    failures only)."""
    folder = totals.add_totals(plan.base, run)
    for sid, pending in plan.pending.items():
        if pending.replaces and sid not in committed:
            try:
                manifest = read_manifest(plan.fs, plan.root, sid)
            except ManifestUnreadable:
                continue
            if manifest is not None:
                totals.add_shard(folder, totals.shard_record(manifest, 0, ""))
    return folder


def write_records(fs, root: str, folder: FolderTotals, run: dict) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    put_small(fs, root, join(root, layout.RUNS, f"{stamp}-{uuid.uuid4().hex[:8]}.json"), _json(run))
    put_small(fs, root, join(root, layout.SUMMARY), _json({**totals.folder_report(folder), "last_run": run}))


def _json(data: dict) -> bytes:
    return scrub(json.dumps(data, indent=1, sort_keys=True)).encode()
