"""summary.json describes the whole output folder, recomputed from its manifests at the end of every
run; each invocation's own record goes to _runs/."""
import json
import time
import uuid
from collections import Counter

from encoder_service.job import latent_stats, qa
from encoder_service.shards import layout
from encoder_service.shards.manifest import list_manifests, read_manifest
from encoder_service.shards.writer import put_bytes
from encoder_service.storage import join, scrub


def folder_summary(fs, root: str, known: dict[str, dict]) -> dict:
    """Totals over every committed shard of the folder (manifests already read are passed in)."""
    manifests = []
    for shard_id in list_manifests(fs, root):
        manifest = known.get(shard_id) or read_manifest(fs, root, shard_id)
        if manifest:
            manifests.append(manifest)
    reasons = Counter()
    for m in manifests:
        reasons.update(m.get("ledger_reasons", {}))
    return {"shards": len(manifests), "clips": sum(m["clips"] for m in manifests),
            "latents": sum(m["latents"] for m in manifests), "ledger_rows": sum(reasons.values()),
            "ledger_by_reason": dict(sorted(reasons.items())),
            "latent_file_bytes": sum(f["bytes"] for m in manifests for f in m["files"]),
            "non_finite_rejected": sum(m.get("non_finite_rejected", 0) for m in manifests),
            "checkpoints": sorted({m.get("checkpoint_sha256", "") for m in manifests} - {""}),
            "stats": {kind: latent_stats.of_manifests(manifests, kind) for kind in ("mean", "logvar")},
            "qa": qa.summarize([row for m in manifests for row in m.get("qa", [])])}


def write_records(fs, root: str, folder: dict, run: dict) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    put_bytes(fs, join(root, layout.RUNS, f"{stamp}-{uuid.uuid4().hex[:8]}.json"), _json(run))
    put_bytes(fs, join(root, layout.SUMMARY), _json({**folder, "last_run": run}))


def _json(data: dict) -> bytes:
    return scrub(json.dumps(data, indent=1, sort_keys=True)).encode()
