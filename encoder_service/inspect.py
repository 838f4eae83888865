"""`python -m encoder_service inspect OUTPUT` (or `wfvae inspect`): what an output folder holds.

Shards done (a valid manifest), failed (the last run could not finish them) and pending (in the
input list, neither), the ledger by stage and reason with example messages, the latent statistics,
the last run's drift against the folder's history, the QA figures and the folder's settings.
Works on local and s3:// folders; `--json` for scripts."""
import json
from collections import Counter

import pyarrow.parquet as pq

from encoder_service.job import latent_stats, qa
from encoder_service.shards import layout
from encoder_service.shards.manifest import list_manifests, read_manifest
from encoder_service.storage import StorageOptions, filesystem, join


def _read_json(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def inspect_folder(output: str, inputs: list[str] | None = None, storage: StorageOptions | None = None,
                   examples: int = 3) -> dict:
    fs, root = filesystem(output, storage)
    manifests = {shard_id: read_manifest(fs, root, shard_id) for shard_id in list_manifests(fs, root)}
    manifests = {k: m for k, m in manifests.items() if m}
    summary = _read_json(fs, join(root, layout.SUMMARY)) or {}
    last_run = summary.get("last_run", {})
    failed = {k: v for k, v in last_run.get("failed_shards", {}).items() if k not in manifests}
    report = {"output": output, "settings": (_read_json(fs, join(root, layout.SETTINGS)) or {}).get("settings"),
              "shards_done": sorted(manifests), "shards_failed": failed,
              "clips": sum(m["clips"] for m in manifests.values()),
              "latents": sum(m["latents"] for m in manifests.values()),
              "ledger": _ledger(fs, root, manifests, examples),
              "stats": {kind: latent_stats.of_manifests(manifests.values(), kind) for kind in ("mean", "logvar")},
              "last_run_drift": (last_run.get("quality") or {}).get("drift"),
              "qa": qa.summarize([row for m in manifests.values() for row in m.get("qa", [])])}
    if inputs is not None:
        from encoder_service.ingest.tar_stream import shard_id_of
        from encoder_service.job.plan import expand_inputs
        expected = [shard_id_of(u) for u in expand_inputs(inputs, storage)]
        report["shards_pending"] = [s for s in expected if s not in manifests and s not in failed]
    return report


def _ledger(fs, root: str, manifests: dict, examples: int) -> dict:
    """Rows by stage/reason over the folder, with up to `examples` messages each."""
    counts = Counter()
    for m in manifests.values():
        counts.update(m.get("ledger_reasons", {}))
    found: dict[str, list] = {reason: [] for reason in counts}
    for m in manifests.values():
        wanted = [r for r in m.get("ledger_reasons", {}) if len(found[r]) < examples]
        if not wanted:
            continue
        with fs.open(join(root, m["errors"]["name"]), "rb") as f:
            for row in pq.read_table(f).to_pylist():
                reason = f"{row['stage']}/{row['reason']}"
                if reason in wanted and len(found[reason]) < examples:
                    found[reason].append({"key": row["key"], "message": row["message"]})
    return {reason: {"rows": counts[reason], "examples": found[reason]} for reason in sorted(counts)}


def format_report(report: dict) -> str:
    lines = [f"{report['output']}: {len(report['shards_done'])} shards done, {len(report['shards_failed'])} failed"
             + (f", {len(report['shards_pending'])} pending" if "shards_pending" in report else "")
             + f"; {report['latents']} latents of {report['clips']} clips"]
    for shard_id, reason in sorted(report["shards_failed"].items()):
        lines.append(f"  failed  {shard_id}: {reason}")
    for shard_id in report.get("shards_pending", []):
        lines.append(f"  pending {shard_id}")
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
