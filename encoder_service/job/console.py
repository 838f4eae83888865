"""The driver's console without Ray's one known false alarm.

Ray Data starts every map-worker actor with its DataContext and map transformer as object refs and
`max_restarts=-1`, and Ray's core worker then logs an ERROR line in the driver, on every run:
"... has constructor arguments in the object store and max_restarts > 0. If the arguments ... are
lost, the actor restart will fail" (ray-project/ray#53727). Ray Data holds those refs for the
operator's whole life, so the restart it warns about does not fail (a killed actor is restarted
and its unit redone: tests/test_job.py). Only RAY_BACKEND_LOG_LEVEL turns it off, and that would
hide every other core-worker error too, so the driver's stderr goes through a small filter process
that drops the lines carrying that sentence and passes everything else on unchanged, as it comes.
A process and not a thread: what the driver wrote just before a crash or `os._exit` still reaches
the console (the filter reads until every writer is gone), and it ignores SIGINT/SIGTERM, which
are the driver's to handle.
"""
import contextlib
import os
import subprocess
import sys

FALSE_ALARMS = ("has constructor arguments in the object store and max_restarts > 0",)

_FILTER = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
marks = [m.encode() for m in sys.argv[1:]]
while chunk := os.read(0, 1 << 16):
    out = memoryview(b"".join(s for s in chunk.splitlines(keepends=True) if not any(m in s for m in marks)))
    while out:
        out = out[os.write(1, out):]
"""


@contextlib.contextmanager
def without_false_alarms():
    """For the duration, this process's fd 2 (Python's and C++'s stderr) goes through the filter."""
    sys.stderr.flush()
    console = os.dup(2)
    try:
        shown = subprocess.Popen([sys.executable, "-S", "-c", _FILTER, *FALSE_ALARMS], stdin=subprocess.PIPE,
                                 stdout=console, stderr=console)
    except OSError:  # no filter: the console as it was
        os.close(console)
        yield
        return
    os.dup2(shown.stdin.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(console, 2)
        os.close(console)
        shown.stdin.close()  # the filter reads to the end, then exits
        try:
            shown.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # a child of ours still holds the pipe: the filter serves it until it is gone


__all__ = ["FALSE_ALARMS", "without_false_alarms"]
