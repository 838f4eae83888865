"""`python -m encoder_service inspect OUTPUT` (or `wfvae inspect`): what an output folder holds.

Shards done (a valid manifest), failed (the last run could not finish them), pending (in the
input list, neither) and missing (in the input list, but the input does not exist), the ledger by
stage and reason with example messages, the latent statistics, the last run's drift against the
folder's history, the QA figures and the folder's settings. Read from the folder index, without a
request per shard. Works on local and s3:// folders; `--json` for scripts."""
import json

import pyarrow.parquet as pq

from encoder_service.ingest.inputs import expand_inputs, input_identities
from encoder_service.ingest.tar_stream import shard_id_of
from encoder_service.shards import index as folder_index
from encoder_service.shards import layout, totals
from encoder_service.shards.manifest import ManifestUnreadable, read_manifest
from encoder_service.storage import StorageOptions, filesystem, join, list_prefix


def _read_json(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def inspect_folder(output: str, inputs: list[str] | None = None, storage: StorageOptions | None = None,
                   examples: int = 3) -> dict:
    """Read only: the folder index (listings and its segments; manifests no segment covers are read
    themselves), summary.json and a few ledger files for the examples."""
    fs, root = filesystem(output, storage)
    index = folder_index.scan(fs, root)
    folder, _ = folder_index.folder_totals(fs, root, index)
    done = set(index.shards)
    summary = _read_json(fs, join(root, layout.SUMMARY)) or {}
    last_run = summary.get("last_run", {})
    failed = {k: v for k, v in last_run.get("failed_shards", {}).items() if k not in done}
    report = {"output": output, "settings": (_read_json(fs, join(root, layout.SETTINGS)) or {}).get("settings"),
              "shards_done": sorted(done), "shards_failed": failed, **_folder_fields(folder),
              "ledger": _ledger(fs, root, folder.ledger_reasons, examples),
              "last_run_drift": (last_run.get("quality") or {}).get("drift")}
    if inputs is not None:
        urls = expand_inputs(inputs, storage)
        present = input_identities(urls, storage)
        waiting = [(u, shard_id_of(u)) for u in urls]
        waiting = [(u, s) for u, s in waiting if s not in done and s not in failed]
        report["shards_pending"] = [s for u, s in waiting if u in present]
        report["shards_missing"] = [s for u, s in waiting if u not in present]
    return report


def _folder_fields(folder) -> dict:
    report = totals.folder_report(folder)
    return {"clips": report["clips"], "latents": report["latents"], "stats": report["stats"], "qa": report["qa"]}


def _ledger(fs, root: str, counts: dict, examples: int) -> dict:
    """Rows by stage/reason over the folder (from the index), with up to `examples` messages each,
    read from the ledger files of as few shards as it takes."""
    found: dict[str, list] = {reason: [] for reason in counts}
    wanted = {reason for reason in counts if examples}
    for sid in _ledger_shards(fs, root):
        if not wanted:
            break
        try:
            manifest = read_manifest(fs, root, sid)
        except ManifestUnreadable:
            continue
        if manifest is None or not wanted & set(manifest.ledger_reasons):
            continue
        with fs.open(join(root, manifest.errors.name), "rb") as f:
            for row in pq.read_table(f, use_threads=False).to_pylist():
                reason = f"{row['stage']}/{row['reason']}"
                if reason in wanted:
                    found[reason].append({"key": row["key"], "message": row["message"]})
                    if len(found[reason]) >= examples:
                        wanted.discard(reason)
    return {reason: {"rows": counts[reason], "examples": found[reason]} for reason in sorted(counts)}


def _ledger_shards(fs, root: str):
    """Shards with a ledger file, listed from errors/ page by page (the caller stops early)."""
    for entry in list_prefix(fs, join(root, layout.ERRORS)):
        sid = layout.shard_of(entry.name)
        if sid is not None:
            yield sid


def format_report(report: dict) -> str:
    lines = [f"{report['output']}: {len(report['shards_done'])} shards done, {len(report['shards_failed'])} failed"
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
