"""Proof that 04_serving leaves no server behind: one tiny real grid point run to its end, then one whose
runner is SIGKILLed mid-sweep; each time the server pids the study recorded (servers.json) and what
`pgrep -g <pgid>` finds.

    PYTHONPATH=lib python benchmarks/serving_orphans.py [--model tiny-1b] [--wait-s 240]

Needs llama-server built (python -m llmbench.system.llamaserver_build). Exit 0 when no recorded server
outlives either run, 1 when one does (its pid is printed), 2 when a run could not get that far.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmbench.experiments import serving as S
from llmbench.system import llamaserver_build

ROOT = Path(__file__).resolve().parents[1]
GRID = """name: {name}
timeout_s: 600
cell_timeout_s: 550
params:
  device: [cpu]
  model: [{model}]
  tokens: [random]
notebooks:
  04_serving:
    params: {{prompt_len: [32], new_tokens: [{new}], rates: [[{rate}]], concurrencies: [[1]], requests: [{requests}],
             run_s: [{run_s}], max_run_s: [{max_run_s}], parallel: [1], threads: [1]}}
"""
# normal: a few requests and done; kill: a run long enough to be killed inside
NORMAL = dict(new=8, rate=4.0, requests=4, run_s=1.0, max_run_s=30.0)
KILL = dict(new=16, rate=0.5, requests=40, run_s=80.0, max_run_s=200.0)


def runner(grid: Path, runs: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib")}
    return subprocess.Popen([sys.executable, "-m", "llmbench.cli", "run", str(grid), "--runs", str(runs)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def recorded(runs: Path) -> list[dict]:
    return [e for f in runs.rglob("servers.json") for e in json.loads(f.read_text() or "[]")]


def serving(runs: Path) -> bool:
    """The server is up and has taken a request (llama-server logs launch_slot)."""
    return any(recorded(runs)) and any("launch_slot" in log.read_text(errors="replace")
                                       for log in runs.rglob("server-*.log"))


def report(what: str, runs: Path) -> bool:
    """Print the recorded pids and pgrep's answer for each; True when none is left."""
    entries = recorded(runs)
    print(f"{what}: recorded server pids {[e['pid'] for e in entries] or 'none'}")
    clean = True
    for e in entries:
        found, how = S.pgrep_group(e.get("pgid", e["pid"]))
        print(f"  `{how}` -> {found or 'no process'} (stopped recorded: {e.get('stopped')}, exit code {e.get('exit_code')})")
        clean &= not found and how.startswith("pgrep -g")
    return clean and bool(entries)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-1b")
    ap.add_argument("--wait-s", type=float, default=240.0, help="longest wait for a run's server to serve")
    args = ap.parse_args()
    if llamaserver_build.cached() is None:
        print("llama-server is not built here: python -m llmbench.system.llamaserver_build", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="serving-orphans-"))
    ok = True
    for name, load in (("normal", NORMAL), ("sigkill", KILL)):
        grid, runs = tmp / f"orphans-{name}.yaml", tmp / name
        grid.write_text(GRID.format(name=f"orphans-{name}", model=args.model, **load))
        t0 = time.time()
        proc = runner(grid, runs)
        if name == "normal":
            try:
                code = proc.wait(timeout=args.wait_s + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                print(f"normal run did not end within {args.wait_s + 60:.0f} s", file=sys.stderr)
                return 2
            print(f"normal run ended with exit code {code} after {time.time() - t0:.0f} s")
        else:
            while not serving(runs) and proc.poll() is None and time.time() - t0 < args.wait_s:
                time.sleep(0.5)
            up = serving(runs)
            alive = [e["pid"] for e in recorded(runs) if S.pid_alive(e["pid"])]
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            print(f"runner {proc.pid} SIGKILLed {time.time() - t0:.0f} s after its start; server serving then: {up}, "
                  f"alive then: {alive}")
            if not up:
                print("the server never started serving: nothing was proven", file=sys.stderr)
                return 2
            t1 = time.time()
            while any(S.pid_alive(e["pid"]) for e in recorded(runs)) and time.time() - t1 < 20:
                time.sleep(0.2)
            print(f"  {time.time() - t1:.1f} s after the SIGKILL:")
        ok &= report(name, runs)
    print("no server left" if ok else "A SERVER WAS LEFT RUNNING (or none was recorded)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
