"""`python -m encoder_service inspect OUTPUT` (or `wfvae inspect`): what an output folder holds.

Shards done (committed), failed (the last run could not finish them), pending (in the input list,
neither) and missing (in the input list, but the input does not exist), the ledger by stage and
reason with example messages, the latent statistics, the last run's drift against the folder's
history, the QA figures and the folder's settings. Read from the folder's two Delta tables (their
checkpoints and the commits after them), without a request per shard. Works on local and s3://
folders; `--json` for scripts."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from encoder_service.ingest.inputs import expand_inputs, input_identities
from encoder_service.ingest.tar_stream import shard_id_of
from encoder_service.storage import StorageOptions
from encoder_service.table import layout, totals
from encoder_service.table.folder import FolderError, OutputFolder


def _read_json(folder: OutputFolder, name: str) -> dict | None:
    try:
        return json.loads(folder.fs.cat_file(folder.path(name)))
    except (FileNotFoundError, ValueError):
        return None


def open_folder(output: str, storage: StorageOptions | None = None) -> OutputFolder:
    """The folder, or FolderError (one line) if it is not an output folder of this service."""
    folder = OutputFolder(output, storage)
    if folder.is_legacy():
        raise FolderError(f"{output} was written before output folders became Delta tables; convert it with: "
                          f"python -m encoder_service migrate {output}")
    if not folder.is_table():
        what = "does not exist" if not folder.fs.exists(folder.root) else "holds no Delta table (_delta_log/)"
        raise FolderError(f"{output} {what}: not an output folder of this service")
    return folder


def inspect_folder(output: str, inputs: list[str] | None = None, storage: StorageOptions | None = None,
                   examples: int = 3) -> dict:
    """Read only: the shards table (its log and its data files; the latents table is not opened:
    records are committed after the latents they describe, so a record never names files the table
    lacks), and _summary.json (the last run's failures and drift)."""
    folder = open_folder(output, storage)
    last_run = (_read_json(folder, layout.SUMMARY) or {}).get("last_run", {})
    records = folder.records()
    done = set(records["shard_id"].to_pylist())
    folder_totals = totals.records_totals(records)
    failed = {k: v for k, v in last_run.get("failed_shards", {}).items() if k not in done}
    version = pc.max(records["commit"]).as_py() if records.num_rows else 0
    report = {"output": output, "version": version, "settings": last_run.get("settings"),
              "shards_done": sorted(done), "shards_failed": failed, **_folder_fields(folder_totals),
              "ledger": _ledger(records, folder_totals.ledger_reasons, examples),
              "last_run_drift": (last_run.get("quality") or {}).get("drift")}
    if inputs is not None:
        urls = expand_inputs(inputs, storage)
        present = input_identities(urls, storage)
        waiting = [(u, s) for u, s in ((u, shard_id_of(u)) for u in urls) if s not in done and s not in failed]
        report["shards_pending"] = [s for u, s in waiting if u in present]
        report["shards_missing"] = [s for u, s in waiting if u not in present]
    return report


def _folder_fields(folder) -> dict:
    report = totals.folder_report(folder)
    return {"clips": report["clips"], "latents": report["latents"], "stats": report["stats"], "qa": report["qa"]}


def _ledger(records, counts: dict, examples: int) -> dict:
    """Rows by stage/reason over the folder, with up to `examples` messages each, taken from the
    ledgers of the first shards whose counts name the reason (one Arrow filter per reason)."""
    out = {}
    reasons = records["ledger_reasons"].combine_chunks()
    offsets = reasons.offsets.to_numpy()
    names, owners = reasons.keys, pa.array(np.repeat(np.arange(len(reasons)), np.diff(offsets)))
    for reason in sorted(counts):
        found = []
        if examples:
            rows = pc.unique(owners.filter(pc.equal(names, reason)))[:examples]
            stage, why = reason.split("/", 1)
            for ledger in records["ledger"].take(rows).to_pylist():
                found += [{"key": r["key"], "message": r["message"]} for r in ledger
                          if (r["stage"], r["reason"]) == (stage, why)][:examples - len(found)]
        out[reason] = {"rows": counts[reason], "examples": found}
    return out


def format_report(report: dict) -> str:
    lines = [f"{report['output']} (table version {report['version']}): {len(report['shards_done'])} shards done, "
             f"{len(report['shards_failed'])} failed"
             + (f", {len(report['shards_pending'])} pending" if "shards_pending" in report else "")
             + (f", {len(report['shards_missing'])} missing" if report.get("shards_missing") else "")
             + f"; {report['latents']} latents of {report['clips']} clips"]
    for shard_id, reason in sorted(report["shards_failed"].items()):
        lines.append(f"  failed  {shard_id}: {reason}")
    for shard_id in report.get("shards_pending", []):
        lines.append(f"  pending {shard_id}")
    for shard_id in report.get("shards_missing", []):
        lines.append(f"  missing {shard_id} (the input shard does not exist)")
    lines.append("ledger:" if report["ledger"] else "ledger: empty")
    for reason, entry in report["ledger"].items():
        lines.append(f"  {reason}: {entry['rows']}")
        lines += [f"    {e['key']}: {e['message']}" for e in entry["examples"]]
    stats = report["stats"]["mean"]
    if stats:
        lines.append("latent means per channel: "
                     + ", ".join(f"{m:+.3f}±{s:.3f}" for m, s in zip(stats["mean"], stats["std"])))
    if report["last_run_drift"] and report["last_run_drift"]["mean"]["history"]:
        d = report["last_run_drift"]["mean"]
        lines.append(f"last run vs history: mean shift {d['mean_shift_ratio']:.3f} std, std ratio {d['std_ratio']:.3f}"
                     + (" (DRIFT)" if d.get("alert") else ""))
    if report["qa"]:
        q = report["qa"]
        lines.append(f"QA: {q['clips']} clips, drift vs fp32 mean {q['drift_mean']['mean']:.2e} p99 "
                     f"{q['drift_mean']['p99']:.2e} max {q['drift_mean']['max']:.2e}; PSNR {q['psnr_db']:.2f} dB, "
                     f"SSIM {q['ssim']:.4f} ({q['note']})")
    if report["settings"]:
        lines.append("settings: " + json.dumps({k: v for k, v in report["settings"].items() if k != "model"},
                                               sort_keys=True))
    return "\n".join(lines)
