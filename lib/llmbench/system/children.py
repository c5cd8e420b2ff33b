"""Child processes that die with the process that started them (Linux PR_SET_PDEATHSIG), so a killed
runner or kernel leaves no orphan grid point or server behind."""
import ctypes
import os
import signal
from pathlib import Path

# A PYTHONPATH folder whose sitecustomize.py gives every python process started under it the same signal:
# for servers whose own processes start more processes (vLLM's engine core and worker).
PDEATHSIG_SITE = Path(__file__).with_name("pdeathsig")


def die_with_parent(parent: int):
    """A preexec_fn for the child, before exec: SIGKILL when the parent thread dies; exit now if it already
    has. libc is loaded here, in the parent: a forked child of a threaded process must not dlopen."""
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        prctl = None  # not Linux: the callers' process groups, timeouts and handlers remain

    def f():
        if prctl is not None:
            prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)
    return f
