"""Real local services for tests: an S3-protocol server (moto in server mode) on 127.0.0.1."""
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto_server as a separate process over HTTP; yields (endpoint_url, StorageOptions)."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint + "/moto-api/")
        yield endpoint, StorageOptions(endpoint_url=endpoint, extra={"key": "testing", "secret": "testing"})
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
