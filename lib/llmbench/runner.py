"""Run a grid: one grid point = one process (`llmbench run-point`) that writes one run folder.

    data/runs/<grid>/<run_id>/{<notebook>.ipynb, records.parquet, run.json, log.txt}

A point runs in data/runs/<grid>/.tmp/<attempt>/<run_id>/ and is renamed into place only when its
run.json is written, so a reader (status, report, the next runner) never sees half a run.
00_device runs once per host, into <run_id>-<host>/, before every other point: the others read their
ceilings from it (ceilings.find_device_run). `--executor ray` runs the same points on a cluster
(run_ray.py) into the same folders. A run
already there is moved to .superseded/ rather than overwritten. Completed runs are skipped on re-run;
failed and timed-out ones are recorded (status, error, log tail) and retried on the next run.
"""
import ctypes
import fcntl
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import paths
from .errors import UserError
from .grid import load_grid, safe_slug
from .records import git_commit, package_versions, read_json, write_json

KERNEL = os.environ.get("LLMBENCH_KERNEL", "llmbench")
LOG_TAIL_LINES = 40
EXECUTORS = ("local", "ray")
DEVICE_NOTEBOOK = "00_device"  # measures the ceilings that the other notebooks' records are put against


def grid_dir(grid: dict, runs_root=None) -> Path:
    return Path(runs_root or paths.RUNS) / grid["name"]


def is_device(point: dict) -> bool:
    return point["notebook"] == DEVICE_NOTEBOOK


def device_point(point: dict, host: str) -> dict:
    """A 00_device point on one host: its own run folder there, since ceilings are per device."""
    return {**point, "run_id": f"{point['run_id']}-{safe_slug(host, 40)}", "host": host, "point_id": point["run_id"]}


def point_runs(gdir: Path, point: dict) -> list[tuple[str, dict]]:
    """(run id, run.json) of each run of a grid point (status pending where it has none yet); a
    00_device point has one run per host it ran on."""
    if is_device(point) and "host" not in point:
        runs = [(rj.parent.name, read_json(rj)) for rj in sorted(gdir.glob(f"{point['run_id']}-*/run.json"))]
        if runs:
            return runs
    rj = gdir / point["run_id"] / "run.json"
    return [(point["run_id"], read_json(rj) if rj.is_file() else {"status": "pending"})]


def point_status(gdir: Path, point: dict) -> dict:
    """The point's run.json (status pending when absent); for a 00_device point, its first run that
    is not ok, else any of them."""
    runs = [info for _, info in point_runs(gdir, point)]
    return next((r for r in runs if r.get("status") != "ok"), runs[0])


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def finalize(tmp: Path, final: Path) -> None:
    """Move a finished attempt into place; keep any earlier run of the same point in .superseded/."""
    if final.exists():
        keep = final.parent / ".superseded" / f"{final.name}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}"
        keep.parent.mkdir(parents=True, exist_ok=True)
        os.replace(final, keep)
    os.replace(tmp, final)
    try:
        tmp.parent.rmdir()  # the attempt's folder, now empty
    except OSError:
        pass


def _last_phase(log: Path) -> str:
    """The last phase line a native engine printed before the kernel died (llama.cpp names its model,
    type and backend), so that run.json says what crashed, not only that the kernel did."""
    lines = [ln for ln in _tail(log, 400).splitlines() if ln.startswith("llmbench llamacpp:")]
    return f" (last phase: {lines[-1]})" if lines else ""


def check_kernel() -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        raise UserError(f"Jupyter kernel {KERNEL!r} is not registered; run `make setup` "
                        f"(or: python -m ipykernel install --sys-prefix --name {KERNEL})")


def run_point(notebook: str, params: dict, gdir: Path, run_id: str, grid_name: str, cell_timeout: int,
              tmp: Path | None = None) -> dict:
    """Execute one notebook with papermill into its own folder; record how it went; move it into place."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from .noise import machine_check
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


def _die_with_parent():
    """In the child: get SIGKILL when the runner dies, so a killed runner leaves no orphan point."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _spawn(point, grid, gdir, tmp):
    cmd = [sys.executable, "-m", "llmbench.cli", "run-point", point["notebook"], "--params",
           json.dumps(point["params"]), "--grid-dir", str(gdir), "--run-id", point["run_id"],
           "--grid-name", grid["name"], "--cell-timeout", str(grid["cell_timeout_s"]), "--tmp-dir", str(tmp)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=_die_with_parent)


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


def _lock(gdir: Path):
    gdir.mkdir(parents=True, exist_ok=True)
    f = open(gdir / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"another runner is working on {gdir} (it holds {gdir / '.lock'}); wait for it to finish")
    return f


def check_machine(strict: bool = False) -> dict:
    """Print a one-line look at the machine; with strict, refuse to start when others keep it busy."""
    from .noise import machine_check
    check = machine_check()
    print(check["line"], flush=True)
    if strict and check["busy"]:
        raise UserError(f"--strict: the machine is busy (others use {check['other_cores']:.2f} cores: "
                        f"{', '.join(check['busy_processes']) or 'many short processes'}); wait, or run without --strict")
    return check


def run_grid(path, force: bool = False, dry_run: bool = False, runs_root=None, strict: bool = False,
             executor: str = "local", address: str | None = None) -> int:
    """Run every pending point; 0 when all points of the grid end ok, 1 otherwise."""
    from .errors import check_choice
    check_choice("executor", executor, EXECUTORS)
    if address and executor != "ray":
        raise UserError(f"--address {address!r} applies only to --executor ray")
    grid = load_grid(path)
    gdir = grid_dir(grid, runs_root)
    if dry_run:
        from .estimate import point_seconds, summary
        a, secs, measured = grid["estimate"], [], 0
        for p in grid["points"]:
            st = point_status(gdir, p)
            if a is not None:  # a point already run: its own duration
                done = st["status"] == "ok" and st.get("duration_s")
                measured += bool(done)
                secs.append(st["duration_s"] if done else point_seconds(a, p))
            est = f"{secs[-1]:6.0f} s " if secs else ""
            print(f"{p['run_id']:<70} {st['status']:<8} {est}{json.dumps(p['params'])}")
        print(f"{len(grid['points'])} points")
        print(summary(a, secs, measured))
        return 0
    check_machine(strict)
    if executor == "local":
        check_kernel()  # on ray, each worker's run-point checks its own
    lock = _lock(gdir)
    shutil.rmtree(gdir / ".tmp", ignore_errors=True)  # attempts of a runner that was killed
    if executor == "ray":
        from .run_ray import run_on_ray
        run_on_ray(grid, gdir, force, address)
    else:
        run_local(grid, gdir, force)
    lock.close()
    return print_status(grid, gdir)


def ordered_todo(grid: dict, gdir: Path, host: str, force: bool) -> tuple[list, list]:
    """(device points of this host, other points) still to run. The others depend on the first: they
    read this host's ceilings from its 00_device run, so the device points run, and end, first."""
    devices = [device_point(p, host) for p in grid["points"] if is_device(p)]
    rest = [p for p in grid["points"] if not is_device(p)]
    def pending(points):
        return [p for p in points if force or point_status(gdir, p)["status"] != "ok"]
    return pending(devices), pending(rest)


def progress(total: int):
    from tqdm import tqdm
    return tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr)


def report_line(bar, info: dict, run_id: str, where: str = "") -> None:
    err = f"  {info.get('error')}" if info["status"] != "ok" else ""
    bar.write(f"{info['status']:<8} {info.get('duration_s', 0) or 0:7.1f} s  {run_id}{where}{err}")


def run_local(grid: dict, gdir: Path, force: bool) -> None:
    devices, rest = ordered_todo(grid, gdir, platform.node(), force)
    todo = devices + rest
    print(f"grid {grid['name']}: {len(grid['points'])} points, {len(grid['points']) - len(todo)} already "
          f"done, running {len(todo)} -> {gdir}", flush=True)
    with progress(len(todo)) as bar:
        for p in todo:
            bar.set_description(p["run_id"][:40])
            info = _run_one(p, grid, gdir)
            bar.update(1)
            report_line(bar, info, p["run_id"])


def print_status(grid: dict, gdir: Path) -> int:
    counts = {}
    for p in grid["points"]:
        s = point_status(gdir, p)["status"]
        counts[s] = counts.get(s, 0) + 1
    print(f"grid {grid['name']}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"  ({gdir})")
    return 0 if counts.get("ok", 0) == len(grid["points"]) else 1


def status(path, runs_root=None) -> int:
    grid = load_grid(path)
    gdir = grid_dir(grid, runs_root)
    for p in grid["points"]:
        for run_id, info in point_runs(gdir, p):
            extra = f"  {info.get('error')}" if info["status"] not in ("ok", "pending") else ""
            print(f"{info['status']:<8} {info.get('duration_s', 0) or 0:8.1f} s  {run_id}{extra}")
    if gdir.is_dir():  # anomalies in the finished runs: the report's checks (they do not change the exit code)
        from .anomalies import status_lines
        for line in status_lines(gdir):
            print(line)
    return print_status(grid, gdir)
