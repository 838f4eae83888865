"""deploy/ manifests: Kubernetes kinds against the official JSON schemas (kubernetes-validate,
offline, strict: unknown fields are errors); RayCluster and RayJob (no KubeRay schema is available
offline) by the fields the job needs, their pod templates against the Kubernetes PodTemplateSpec
schema; the job's config file through the job's own option parser; the image definition."""
import os
import re
import shlex
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from encoder_service.job.config import load_config

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"
K8S_VERSION = "1.31.0"
GPU = "nvidia.com/gpu"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def resources() -> dict[str, dict]:
    """kind -> document (one of each kind here), from the kustomization's resources and generators."""
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    out = {}
    for name in kustomization["resources"]:
        for doc in documents(KUBERAY / name):
            out[doc["kind"]] = doc
    return out


def validate_k8s(doc: dict) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{doc['kind']} {doc['metadata']}: {exc.message} at {list(exc.path)}")


def validate_pod_template(template: dict) -> None:
    validate_k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template})


def test_kustomization_files_exist():
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    files = kustomization["resources"] + [f for g in kustomization["configMapGenerator"] for f in g["files"]]
    assert all((KUBERAY / f).is_file() for f in files), files


@pytest.mark.parametrize("kind", ["PersistentVolumeClaim", "ServiceAccount", "Role", "RoleBinding", "CronJob"])
def test_kubernetes_kinds_match_the_schema(kind):
    validate_k8s(resources()[kind])


def test_raycluster_cpu_head_gpu_workers():
    cluster = resources()["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    head = cluster["spec"]["headGroupSpec"]
    validate_pod_template(head["template"])
    head_container = head["template"]["spec"]["containers"][0]
    assert GPU not in head_container["resources"]["limits"] and head["rayStartParams"]["num-cpus"] == "0"
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    validate_pod_template(workers["template"])
    worker = workers["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"][GPU] == 1 and worker["resources"]["requests"][GPU] == 1
    assert worker["image"] == head_container["image"]
    assert 0 <= workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    # every Ray pod exports metrics on the port the PodMonitor scrapes
    for group, container in ((head, head_container), (workers, worker)):
        port = int(group["rayStartParams"]["metrics-export-port"])
        assert {"containerPort": port, "name": "metrics"} in container["ports"]
    assert cluster["spec"]["rayVersion"] == ray_version()


def test_rayjob_runs_the_encode_job_on_the_cluster():
    job = documents(KUBERAY / "rayjob.yaml")[0]
    cluster = resources()["RayCluster"]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["generateName"]  # a new RayJob each night
    assert job["metadata"]["labels"]["app.kubernetes.io/name"] == "wfvae-encode"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "/app/pipelines/encode_dataset.py"]
    assert (ROOT / argv[1].removeprefix("/app/")).is_file()
    config_path = argv[argv.index("--config-file") + 1]
    # the config file is the ConfigMap mounted on the head, where the entrypoint runs
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    generated = {g["name"]: g["files"] for g in yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
                 ["configMapGenerator"]}
    assert os.path.basename(config_path) in generated[volume["configMap"]["name"]]


def test_job_config_is_accepted_by_the_job():
    cfg = load_config(["--config-file", str(KUBERAY / "job.yaml")])
    cfg.sampling()
    workers = resources()["RayCluster"]["spec"]["workerGroupSpecs"][0]
    assert cfg.precision.name == "bf16" and cfg.num_gpus == workers["maxReplicas"]
    assert cfg.checkpoint.startswith("/checkpoints/") and cfg.metrics_linger_s > 10


def test_nightly_cronjob_creates_the_rayjob():
    docs = resources()
    cron = docs["CronJob"]
    assert len(cron["spec"]["schedule"].split()) == 5 and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    script = pod["containers"][0]["command"][-1]
    assert "kubectl create -f /manifests/rayjob.yaml" in script
    assert pod["volumes"][0]["configMap"]["name"] == "wfvae-rayjob"
    rule = docs["Role"]["rules"][0]
    assert rule["apiGroups"] == ["ray.io"] and "rayjobs" in rule["resources"] and "create" in rule["verbs"]
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]


@pytest.mark.parametrize("final, code", [("Complete", 0), ("Failed", 1)])
def test_the_nightly_pod_lives_as_long_as_its_rayjob(tmp_path, final, code):
    """The CronJob's script (run by sh, against a kubectl stand-in that plays the API server's
    answers) creates the RayJob and returns only once it has finished, so concurrencyPolicy:
    Forbid sees a night still running."""
    script = resources()["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(f"""#!/bin/sh
echo "$*" >> {tmp_path}/calls
case "$1 $2" in
  "create -f") echo rayjob.ray.io/wfvae-encode-x7k2p ;;
  "get rayjobs") ;;
  "get rayjob.ray.io/wfvae-encode-x7k2p")
    n=$(($(cat {tmp_path}/polls 2>/dev/null || echo 0) + 1)); echo $n > {tmp_path}/polls
    if [ $n -lt 3 ]; then echo Running; else echo {final}; fi ;;
esac
""")
    kubectl.chmod(0o755)
    result = subprocess.run(["sh", "-c", script], env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}",
                                                       "POLL_S": "0"}, capture_output=True, text=True, timeout=30)
    assert result.returncode == code, result.stderr
    assert (tmp_path / "polls").read_text().strip() == "3"
    assert "create -f /manifests/rayjob.yaml -o name" in (tmp_path / "calls").read_text()


def test_podmonitor_selects_the_ray_pods():
    monitor = resources()["PodMonitor"]
    labels = resources()["RayCluster"]["spec"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def ray_version() -> str:
    return re.search(r'"ray\[[^]]*\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)


def test_dockerfile_matches_the_pinned_stack():
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_version())}-py311-gpu$", dockerfile, re.M)
    torch_pin = re.search(r"torch==[\d.]+", (ROOT / "Makefile").read_text()).group(0)
    assert f"pip install --no-cache-dir {torch_pin}" in dockerfile
    for folder in ("encoder_service", "kernels", "pipelines"):
        assert f"COPY --chown=ray:users {folder} {folder}" in dockerfile
    image = resources()["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert image.split(":")[-1] == re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(),
                                              re.M).group(1)
