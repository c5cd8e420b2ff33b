"""Run folders: where each grid point's run lives, and how a finished attempt is moved into place.

    data/runs/<grid>/<run_id>/{<notebook>.ipynb, records.parquet, run.json, log.txt}

A point runs in data/runs/<grid>/.tmp/<attempt>/<run_id>/ and is renamed into place only when its
run.json is written, so a reader (status, report, the next runner) never sees half a run. A run already
there is moved to .superseded/ rather than overwritten. 00_device runs once per host, into
<run_id>-<host>/: the other points read their ceilings from it (measure.ceilings.find_device_run).
"""
import os
import time
from pathlib import Path

from llmbench.core import paths
from llmbench.core.files import read_json
from llmbench.orchestration.grid import safe_slug


LOG_TAIL_LINES = 40


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
