"""Metrics end to end: a job sent with `ray job submit` to a `ray start` head, scraped by Debian's Prometheus
through deploy/prometheus/prometheus.yml (Ray's service-discovery file). Every query of the Grafana
dashboard must return data, the exported totals must equal the run summary, the exposition must
follow Prometheus naming conventions, and promtool must accept the scrape config and alert rules."""
import json
import os
import re
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from conftest import GOLDEN
from prometheus_client.parser import text_string_to_metric_families
from services import CLUSTER_ENV, RAY, free_port, prometheus, ray_head, require_prometheus
from tables import records

from encoder_service.metrics import DEFINITIONS, UNITLESS
from encoder_service.samples import write_tar, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROM_DIR = os.path.join(ROOT, "deploy", "prometheus")
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "wfvae-encoder.json")
RATE_WINDOW = "20s"  # Grafana's $__rate_interval here: 20 scrapes at 1 s


def panels():
    return [p for p in json.load(open(DASHBOARD))["panels"] if p["type"] != "row"]


def promql(expr: str) -> str:
    """A panel query as Grafana sends it: template variables replaced (all nodes selected)."""
    return expr.replace("$__rate_interval", RATE_WINDOW).replace("$node", ".*")


def exported_name(name: str) -> str:
    return "ray_" + name + ("_total" if DEFINITIONS[name][0] == "counter" else "")


# series a CPU run cannot have: the GPU's own utilization (NVML, sampled on CUDA only) and a DCGM
# exporter's (another exporter's, not ours: DCGM_)
DCGM = "DCGM_"
DEVICE_ONLY = ("ray_wfvae_device_utilization", DCGM)


def device_only(expr: str) -> bool:
    return any(name in expr for name in DEVICE_ONLY)


def test_promtool_accepts_scrape_config_and_alert_rules():
    promtool = os.path.join(os.path.dirname(require_prometheus()), "promtool")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                 ["test", "rules", "alerts_test.yml"]):  # each alert fires on a synthetic history
        result = subprocess.run([promtool, *args], cwd=PROM_DIR, capture_output=True, text=True)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_dashboard_is_well_formed_and_uses_only_exported_metrics():
    known = {exported_name(n) for n in DEFINITIONS}
    ids = [p["id"] for p in json.load(open(DASHBOARD))["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            if DCGM in target["expr"]:
                continue
            used = {m.removesuffix("_bucket") for m in re.findall(r"ray_wfvae_\w+", target["expr"])}
            assert used and used <= known, (panel["title"], used - known)
    for topic in ("Throughput", "latency", "Errors", "busy", "memory", "Progress", "ETA", "by node",
                  "Latent statistics", "drift", "QA"):
        assert any(topic in p["title"] for p in panels()), f"no panel for {topic}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    for s in range(4):
        samples = [(f"v{v}", {"mp4": write_video(d / f"{s}{v}.mp4", frames=24 + 6 * v, h=48, w=64).read_bytes()})
                   for v in range(4)]
        samples.append(("bad", {"mp4": b"not a video"}))
        write_tar(d / f"shard-{s:06d}.tar", samples)
    return str(d / "shard-{000000..000003}.tar")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def wait_for_target(prom: str, port: int, timeout: float = 90) -> None:
    """Until Prometheus has found the node's metrics port in Ray's discovery file and scraped it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        targets = get_json(prom + "/api/v1/targets")["activeTargets"]
        if any(t["scrapeUrl"].endswith(f":{port}/metrics") and t["health"] == "up" for t in targets):
            return
        time.sleep(1)
    raise AssertionError(f"Prometheus never scraped the Ray metrics port {port}: {targets}")


def query_range(prom: str, expr: str, start: float, end: float) -> list:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1s"})
    return get_json(f"{prom}/api/v1/query_range?{params}")["result"]


def scrape_while(proc: subprocess.Popen, url: str) -> list[str]:
    """The node's raw exposition, read every half second while the job runs."""
    texts = []

    def loop():
        while proc.poll() is None:
            try:
                texts.append(urllib.request.urlopen(url, timeout=5).read().decode())
            except OSError:
                pass
            time.sleep(0.5)
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return texts


def prometheus_config(tmp_path) -> str:
    """The deploy scrape config as it is (Ray's discovery file, the alert rules), scraping every second."""
    cfg = yaml.safe_load(open(os.path.join(PROM_DIR, "prometheus.yml")))
    cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    cfg["scrape_configs"][0]["file_sd_configs"][0]["refresh_interval"] = "1s"
    cfg["rule_files"] = [os.path.join(PROM_DIR, f) for f in cfg["rule_files"]]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.slow
def test_every_dashboard_query_has_data_from_a_submitted_job(shards, tmp_path):
    """The way users run it, on a machine without a GPU: `ray start` with one logical GPU, the job sent
    with `ray job submit` as the README says (--num-gpus 1, here with --device cpu), and Prometheus
    scraping it as in production."""
    metrics_port = free_port()
    fast_push = {"RAY_metrics_report_interval_ms": "1000"}  # Ray's default is 10 s
    with ray_head("--num-gpus=1", f"--metrics-export-port={metrics_port}", env=fast_push) as (_, dashboard), \
            prometheus(prometheus_config(tmp_path), str(tmp_path)) as prom:
        wait_for_target(prom, metrics_port)
        start = time.time()
        out = tmp_path / "out"
        proc = subprocess.Popen(
            [RAY, "job", "submit", f"--address={dashboard}", "--working-dir", ROOT, "--", "python",
             "pipelines/encode_dataset.py", "--input", shards, "--output", str(out), "--checkpoint",
             str(GOLDEN / "weights.safetensors"), "--num-frames", "9", "--size", "32x32", "--clips-per-video", "all",
             "--num-gpus", "1", "--device", "cpu", "--precision", "fp32", "--batch-size", "2",
             "--metrics-linger-s", "3", "--progress-every-s", "2", "--qa-fraction", "0.3"],
            env={**os.environ, **CLUSTER_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        texts = scrape_while(proc, f"http://127.0.0.1:{metrics_port}/metrics")
        log = proc.communicate(timeout=400)[0]
        assert proc.returncode == 0, log[-4000:]
        summary = json.load(open(out / "_summary.json"))["last_run"]
        assert summary["shards_done"] == 4 and summary["latents"] > 20 and summary["errors"] == 4
        assert f'"latents": {summary["latents"]}' in log  # the job's own summary line, streamed back by Ray
        assert len(records(out)["shard-000000"]["ledger"]) == 1
        expected = {"ray_wfvae_latents_written_total": summary["latents"], "ray_wfvae_errors_total": summary["errors"],
                    "ray_wfvae_clips_encoded_total": summary["latents"], "ray_wfvae_job_runs_total": 1}
        # until Prometheus has scraped the last values (the driver's final ones come in its last seconds)
        deadline = time.time() + 60
        while True:
            end = time.time()
            empty = [(p["title"], t["expr"]) for p in panels() for t in p["targets"] if not device_only(t["expr"])
                     and not any(s["values"] for s in query_range(prom, promql(t["expr"]), start, end))]
            totals = totals_since(prom, start, end, expected)
            if (not empty and totals == expected) or time.time() > deadline:
                break
            time.sleep(1)
        assert not empty, f"dashboard queries without data: {empty}"
    assert totals == expected
    check_exposition(texts)


def totals_since(prom: str, start: float, end: float, names) -> dict:
    span = f"[{int(end - start) + 60}s]"
    return {name: sum(float(s["value"][1]) for s in get_json(
        f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": f"sum(max_over_time({name}{span}))"}))["result"])
        for name in names}


def check_exposition(texts: list[str]) -> None:
    """Parsed with prometheus-client: every metric of encoder_service/metrics.py was exported, with
    its type and help text, and names follow the conventions (units, _total counters)."""
    families = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name.startswith("ray_wfvae_"):
                families[family.name] = family
    for name, (kind, description, _) in DEFINITIONS.items():
        family = families.get("ray_" + name)
        if name in ("wfvae_job_runs", "wfvae_job_eta_seconds") and family is None:
            continue  # set in the driver's last seconds / after the first shard: may fall between reads
        if name in ("wfvae_encoder_compile_seconds", "wfvae_text_encoder_seconds", "wfvae_device_utilization"):
            continue  # only with --compile / --text-encoder / on CUDA
        assert family is not None, f"ray_{name} was never exported"
        assert family.type == kind and family.documentation == description, name
    for name in DEFINITIONS:
        unit_ok = name.endswith(("_seconds", "_bytes", "_ratio", "_decibels")) or DEFINITIONS[name][0] == "counter" \
            or name == "wfvae_job_shards_planned" or name in UNITLESS
        assert unit_ok and not name.endswith("_total"), f"{name}: name a unit, and let the counter add _total"
