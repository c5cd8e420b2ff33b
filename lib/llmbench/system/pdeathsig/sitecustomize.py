"""Imported at start-up by every python process of a server the study starts with this folder as its
PYTHONPATH (serving.vllm_env): each one gets SIGKILL when the thread that started it dies. vLLM's API server
starts its engine core, and the engine core its worker, as processes of their own (multiprocessing, spawn:
each a fresh python, so this runs in each); a parent-death signal is not inherited, so without this a Jupyter
kernel killed with SIGKILL would take the API server with it (serving.spawn sets its signal) but leave the
engine core running, holding the model in memory. stdlib only: the server's python is not the study's."""
import ctypes
import signal

try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except OSError:
    pass  # not Linux: the process group kill of serving.stop remains
