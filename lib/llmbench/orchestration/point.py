"""One grid point = one process: `llmbench run-point` executes one notebook with papermill into its own
folder and records how it went (ok, failed, timeout: status, error, log tail); the runner starts that
process with the grid's outer timeout and records the point itself if the process could not."""
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from llmbench.core import paths
from llmbench.core.files import read_json, write_json
from llmbench.orchestration.layout import LOG_TAIL_LINES, _tail, finalize, point_status
from llmbench.system.children import die_with_parent
from llmbench.system.nbexec import KERNEL
from llmbench.system.noise import machine_check
from llmbench.system.provenance import git_commit, package_versions


def _last_phase(log: Path) -> str:
    """The last phase line a native engine printed before the kernel died (llama.cpp names its model,
    type and backend), so that run.json says what crashed, not only that the kernel did."""
    lines = [ln for ln in _tail(log, 400).splitlines() if ln.startswith("llmbench llamacpp:")]
    return f" (last phase: {lines[-1]})" if lines else ""


def run_point(notebook: str, params: dict, gdir: Path, run_id: str, grid_name: str, cell_timeout: int,
              tmp: Path | None = None) -> dict:
    """Execute one notebook with papermill into its own folder; record how it went; move it into place."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    tmp = Path(tmp or gdir / ".tmp" / f"{os.getpid()}-{time.time_ns()}" / run_id)
    tmp.mkdir(parents=True, exist_ok=True)
    info = {"run_id": run_id, "grid": grid_name, "notebook": notebook, "parameters": params,
            "git_commit": git_commit(), "versions": package_versions(), "kernel": KERNEL,
            "start": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": "running",
            # Replaced by the kernel's own description (device.json). Not described here: on cuda/npu
            # that opens a device context in this parent, which holds device memory all run long.
            "device": {"device": params.get("device", "auto"), "host": platform.node()}}
    t0 = time.time()
    log = tmp / "log.txt"
    try:
        info["machine_check"] = machine_check(sample_s=0.5)  # who else was busy as this point began
        write_json(info, tmp / "run.json")
        with open(log, "w") as out:
            papermill.execute_notebook(
                str(paths.NOTEBOOKS / f"{notebook}.ipynb"), str(tmp / f"{notebook}.ipynb"),
                parameters={**params, "out_dir": str(tmp), "grid_dir": str(gdir)}, kernel_name=KERNEL,
                execution_timeout=cell_timeout, progress_bar=False, log_output=True,
                stdout_file=out, stderr_file=out, cwd=str(paths.ROOT))
        info.update(status="ok", error=None)
    except PapermillExecutionError as e:
        info.update(status="failed", error=f"{e.ename}: {e.evalue}")
    except Exception as e:  # a dead kernel, a cell timeout, a missing kernel: recorded, never raised
        kind = "timeout" if "timeout" in type(e).__name__.lower() or "timed out" in str(e).lower() else "failed"
        info.update(status=kind, error=f"{type(e).__name__}: {str(e).strip()[:2000]}" + _last_phase(log))
    if (tmp / "device.json").is_file():
        info["device"] = read_json(tmp / "device.json")
    info.update(end=time.strftime("%Y-%m-%dT%H:%M:%S%z"), duration_s=round(time.time() - t0, 3),
                log_tail=_tail(log))
    write_json(info, tmp / "run.json")
    finalize(tmp, gdir / run_id)
    return info


def _spawn(point, grid, gdir, tmp):
    cmd = [sys.executable, "-m", "llmbench.cli", "run-point", point["notebook"], "--params",
           json.dumps(point["params"]), "--grid-dir", str(gdir), "--run-id", point["run_id"],
           "--grid-name", grid["name"], "--cell-timeout", str(grid["cell_timeout_s"]), "--tmp-dir", str(tmp)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=die_with_parent(os.getpid()))


def _run_one(point, grid, gdir) -> dict:
    """Run a point in a child process with the outer timeout; record it if the child could not."""
    tmp = gdir / ".tmp" / f"{os.getpid()}-{time.time_ns()}" / point["run_id"]
    t0 = time.time()
    proc = _spawn(point, grid, gdir, tmp)
    try:
        out, _ = proc.communicate(timeout=grid["timeout_s"])
        status = None if proc.returncode == 0 else "failed"
        error = f"run-point exited with {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status, error = "timeout", f"exceeded the grid's timeout_s={grid['timeout_s']}"
    final_json = gdir / point["run_id"] / "run.json"
    if status is None or (not tmp.exists() and final_json.is_file() and final_json.stat().st_mtime >= t0):
        return point_status(gdir, point)  # the child recorded its own outcome
    # The child died or was killed before finalizing: record that, with what it left behind.
    tmp.mkdir(parents=True, exist_ok=True)
    info = read_json(tmp / "run.json") if (tmp / "run.json").is_file() else {
        "run_id": point["run_id"], "grid": grid["name"], "notebook": point["notebook"], "parameters": point["params"]}
    info.update(status=status, error=error, duration_s=round(time.time() - t0, 3),
                log_tail="\n".join(((out or "") + "\n" + _tail(tmp / "log.txt")).strip().splitlines()[-LOG_TAIL_LINES:]))
    write_json(info, tmp / "run.json")
    finalize(tmp, gdir / point["run_id"])
    return info
