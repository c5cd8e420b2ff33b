"""The local executor: a grid's points one after the other on this machine, device points first."""
import platform
import sys
from pathlib import Path

from llmbench.orchestration.layout import device_point, is_device, point_status
from llmbench.orchestration.point import _run_one


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
