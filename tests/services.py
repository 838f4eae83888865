"""Real local services for tests on 127.0.0.1: an S3-protocol server (moto in server mode), a Ray
head started with `ray start`, Debian's Prometheus, a TCP server that never answers."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import NamedTuple

import pytest

from encoder_service.storage import StorageOptions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answered (e.g. 401 from Ray's token auth): it is up
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up within {timeout}s")


class S3Server(NamedTuple):
    endpoint: str
    storage: StorageOptions
    log: str                      # the server's request log: one line per HTTP request

    def requests(self) -> int:
        """HTTP requests the server has answered so far (count before and after to measure)."""
        with open(self.log) as f:
            return sum(1 for line in f if '"' in line and " HTTP/1.1" in line)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto_server as a separate process over HTTP; yields S3Server(endpoint_url, StorageOptions, log)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    log = open(log_path, "w", buffering=1)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint + "/moto-api/")
        yield S3Server(endpoint, StorageOptions(endpoint_url=endpoint, extra={"key": "testing", "secret": "testing"}),
                       str(log_path))
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def make_bucket(options: StorageOptions, name: str) -> str:
    import s3fs
    fs = s3fs.S3FileSystem(**options.for_url("s3://x"))
    if not fs.exists(name):
        fs.mkdir(name)
    return f"s3://{name}"


RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# a throw-away cluster on 127.0.0.1: Ray 2.60's token authentication is switched off for it;
# the head runs job entrypoints with the `python` on its PATH: this environment's, as in a real image
CLUSTER_ENV = {"RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled",
               "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}


@contextlib.contextmanager
def ray_head(*extra_args, env=None):
    """`ray start --head --block` in its own process group, so stopping it touches no other Ray.
    Yields (gcs address, dashboard URL)."""
    gcs, dash = free_port(), free_port()
    env = {**os.environ, **CLUSTER_ENV, **(env or {})}
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
                             "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-agent-listen-port={free_port()}", *extra_args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{dash}/api/version", timeout=90)
        wait_job_agent(f"127.0.0.1:{gcs}")
        yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
    finally:
        stop(head, grace_s=1)  # nothing of a test head is kept: no need to wait for a graceful stop
        stale = "/tmp/ray/ray_current_cluster"  # would make a later plain ray.init() join the dead head
        if os.path.exists(stale):
            os.unlink(stale)


def wait_job_agent(gcs: str, timeout: float = 120.0) -> None:
    """Until the head's job agent has registered its address in the GCS and answers on it. The
    dashboard answers first, and a `ray job submit` the dashboard cannot route to an agent within
    10 s fails with "No available agent to submit job"."""
    from ray._private.ray_constants import KV_NAMESPACE_DASHBOARD
    from ray._raylet import GcsClient
    from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX

    client = GcsClient(address=gcs)
    deadline = time.time() + timeout
    while time.time() < deadline:
        keys = client.internal_kv_keys(DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX.encode(), KV_NAMESPACE_DASHBOARD)
        for key in keys:
            ip, http_port, _ = json.loads(client.internal_kv_get(key, KV_NAMESPACE_DASHBOARD))
            if http_port > 0 and answers(f"http://{ip}:{http_port}/api/job_agent/jobs/none/logs"):
                return
        time.sleep(0.5)
    raise RuntimeError(f"the Ray job agent of {gcs} did not come up within {timeout}s")


def answers(url: str) -> bool:
    """Whether an HTTP server answers at `url`, with any status."""
    try:
        urllib.request.urlopen(url, timeout=5)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def stop(proc: subprocess.Popen, grace_s: float = 5) -> None:
    """Stop a process group started for a test: SIGTERM, then SIGKILL after `grace_s` (a Ray head
    takes half a minute to stop gracefully, and nothing of it is kept)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def require_prometheus() -> str:
    """Debian's prometheus binary: `make test` installs it (package `prometheus`)."""
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus is not installed: run `make test` (installs Debian's prometheus) "
                    "or `apt-get install prometheus`")
    return path


@contextlib.contextmanager
def prometheus(config_file: str, data_dir: str):
    """Prometheus on a free port; yields its base URL once it is ready."""
    port = free_port()
    proc = subprocess.Popen([require_prometheus(), f"--config.file={config_file}", f"--storage.tsdb.path={data_dir}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(data_dir, "prometheus.log"), "w"),
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/-/ready", timeout=60)
        yield url
    finally:
        stop(proc)


@contextlib.contextmanager
def silent_server():
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a hung store)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, done = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not done.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        done.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
