"""Run a grid: every pending point, each in its own process that writes its own run folder (layout.py).

00_device runs once per host before every other point: the others read their ceilings from it. The
executor decides where points run: `local` (local.py, one after the other here) or `ray` (ray_executor.py,
the same points on a cluster, into the same folders). Completed runs are skipped on re-run; failed and
timed-out ones are recorded (status, error, log tail) and retried on the next run.
"""
import fcntl
import json
import shutil
from pathlib import Path

from llmbench.core.errors import UserError, check_choice
from llmbench.orchestration.estimate import point_seconds, summary
from llmbench.orchestration.grid import load_grid
from llmbench.orchestration.layout import grid_dir, point_runs, point_status
from llmbench.system.nbexec import check_kernel
from llmbench.system.noise import machine_check


def executor_for(name: str):
    """The executor registry: name -> run(grid, gdir, force, address). Each is imported only when chosen
    (ray is an optional dependency, and ray_executor itself builds on local's progress lines)."""
    check_choice("executor", name, EXECUTORS)
    if name == "ray":
        from llmbench.orchestration.ray_executor import run_on_ray
        return run_on_ray
    from llmbench.orchestration.local import run_local
    return lambda grid, gdir, force, address: run_local(grid, gdir, force)


EXECUTORS = ("local", "ray")


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
    check = machine_check()
    print(check["line"], flush=True)
    if strict and check["busy"]:
        raise UserError(f"--strict: the machine is busy (others use {check['other_cores']:.2f} cores: "
                        f"{', '.join(check['busy_processes']) or 'many short processes'}); wait, or run without --strict")
    return check


def run_grid(path, force: bool = False, dry_run: bool = False, runs_root=None, strict: bool = False,
             executor: str = "local", address: str | None = None) -> int:
    """Run every pending point; 0 when all points of the grid end ok, 1 otherwise."""
    run = executor_for(executor)
    if address and executor != "ray":
        raise UserError(f"--address {address!r} applies only to --executor ray")
    grid = load_grid(path)
    gdir = grid_dir(grid, runs_root)
    if dry_run:
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
    run(grid, gdir, force, address)
    lock.close()
    return print_status(grid, gdir)


def print_status(grid: dict, gdir: Path) -> int:
    counts = {}
    for p in grid["points"]:
        s = point_status(gdir, p)["status"]
        counts[s] = counts.get(s, 0) + 1
    print(f"grid {grid['name']}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"  ({gdir})")
    return 0 if counts.get("ok", 0) == len(grid["points"]) else 1


def status(path, runs_root=None, checks=None) -> int:
    """Print each run's status, then `checks(gdir)`'s lines (the CLI passes the report's anomaly checks:
    they do not change the exit code), then the summary line."""
    grid = load_grid(path)
    gdir = grid_dir(grid, runs_root)
    for p in grid["points"]:
        for run_id, info in point_runs(gdir, p):
            extra = f"  {info.get('error')}" if info["status"] not in ("ok", "pending") else ""
            print(f"{info['status']:<8} {info.get('duration_s', 0) or 0:8.1f} s  {run_id}{extra}")
    if checks and gdir.is_dir():
        for line in checks(gdir):
            print(line)
    return print_status(grid, gdir)
