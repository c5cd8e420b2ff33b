"""The Ray executor on a local Ray instance (2 CPUs and a fake `NPU: 2` resource): device assignment,
the same run folders as the local executor, a killed task recorded and rerun, a killed driver resumed;
and, without Ray, the per-device ceilings and the scheduling rules."""
import os
import platform
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import LLMBENCH, ROOT, cli
from llmbench.measure import ceilings
from llmbench.orchestration import ray_executor as run_ray
from llmbench.orchestration.grid import load_grid
from llmbench.measure.records import COLUMNS, read_all
from llmbench.core.files import read_json, write_json
from llmbench.orchestration import layout
from llmbench.orchestration import local

TINY = {"prompt_lens": [[8]], "decode_contexts": [[8]], "decode_steps": [2], "gen_prompt_len": [8],
        "gen_new_tokens": [[3]]}


def tiny_grid(tmp_path, name: str) -> Path:
    """The smoke grid cut down to 00_device (quick) and two tiny latency points. No `device`: each point
    takes what its node has, here a fake NPU (the kernel itself, finding no torch_npu, runs on the CPU)."""
    smoke = yaml.safe_load((ROOT / "data/grids/smoke.yaml").read_text())
    lat = {**smoke["notebooks"]["01_latency"]["params"], **TINY}
    lat = {k: v[:1] if k == "engine" else v for k, v in lat.items()}  # one engine: one point per model
    params = {k: v for k, v in smoke["params"].items() if k != "device"}
    doc = {"name": name, "timeout_s": 240, "params": {**params, "repeats": [2]},
           "notebooks": {"00_device": smoke["notebooks"]["00_device"], "01_latency": {"params": lat}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def point_processes(grid_name: str) -> dict[int, str]:
    """pid -> command line of the `llmbench run-point` processes of one grid, one per point: a point's
    process that is starting its kernel has a forked child with the same command line (and environment)
    until that child execs, so processes whose parent is one of them are left out."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
            except OSError:
                continue
            if "run-point" in cmd and f"--grid-name {grid_name} " in cmd:
                out[int(d.name)] = cmd
    return {pid: cmd for pid, cmd in out.items() if _parent_or_none(pid) not in out}


def _parent_or_none(pid: int) -> int | None:
    try:
        return parent(pid)
    except (OSError, IndexError, ValueError):  # the process ended meanwhile
        return None


def wait_for(cond, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def environ(pid: int) -> dict:
    raw = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    return dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)


def parent(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with 2 CPUs and 2 fake NPUs; the CLI joins it with --address."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, resources={"NPU": 2}, include_dashboard=False, log_to_driver=False,
             logging_level="CRITICAL")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_ray_grid_killed_task_killed_driver_resume(cluster, tmp_path):
    g = tiny_grid(tmp_path, "raygrid")
    runs = tmp_path / "runs"
    gdir = runs / "raygrid"
    run = [*LLMBENCH, "run", str(g), "--runs", str(runs), "--executor", "ray"]

    # 1. The device run first; then both latency points at once, each on its own NPU.
    log = open(tmp_path / "d1.txt", "w+")
    d1 = subprocess.Popen([*run, "--address", cluster], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def both_latency_points():
        procs = point_processes("raygrid")
        models = sorted(m for c in procs.values() for m in ("tiny-1b", "tiny-3b") if f"01_latency-{m}" in c)
        return procs if models == ["tiny-1b", "tiny-3b"] and len(procs) == 2 else None
    procs = wait_for(both_latency_points, 180, "two latency points running at once")
    device_run = layout.device_point(load_grid(g)["points"][0], platform.node())["run_id"]
    assert [p.name for p in gdir.iterdir() if not p.name.startswith(".")] == [device_run]  # it ended before them
    visible = sorted(environ(pid).get("ASCEND_RT_VISIBLE_DEVICES") for pid in procs)
    assert visible == ["0", "1"], visible
    # Kill the Ray worker running one of them: that point is recorded as failed (on which host, why).
    victim = next(pid for pid, c in procs.items() if "tiny-3b" in c)
    os.kill(parent(victim), signal.SIGKILL)

    def failed_runs():
        return [read_json(p) for p in gdir.glob("*/run.json") if read_json(p)["status"] != "ok"]
    (failed,) = wait_for(failed_runs, 60, "the killed point's failure record")
    assert "tiny-3b" in failed["run_id"] and "Error" in failed["error"] and platform.node() in failed["error"]
    assert failed["ray"]["host"] == platform.node()
    # 2. SIGKILL the driver while the other point still runs: Ray ends that point, nothing half-written lands.
    assert d1.poll() is None and any("tiny-1b" in c for c in point_processes("raygrid").values())
    d1.send_signal(signal.SIGKILL)
    d1.wait()
    wait_for(lambda: not point_processes("raygrid"), 60, "Ray to end the killed driver's point")
    landed = sorted(p.name for p in gdir.iterdir() if not p.name.startswith("."))
    assert landed == sorted([device_run, failed["run_id"]]), landed

    # 3. Resumed: both latency points run again, every point ends ok, the exit status says so.
    r = cli(*run[3:], "--address", cluster, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 already done, running 2" in r.stdout
    grid = load_grid(g)
    devices, rest = local.ordered_todo(grid, gdir, platform.node(), force=True)
    expected = sorted(p["run_id"] for p in devices + rest)  # exactly what the local executor writes
    final = sorted(p.name for p in gdir.iterdir() if not p.name.startswith("."))
    assert final == expected
    assert len(list((gdir / ".superseded").iterdir())) == 1  # the failed attempt, kept aside
    assert not any((gdir / ".tmp").rglob("run.json"))
    df = read_all(gdir)
    assert sorted(df.run_id.unique()) == final
    per_run = [pd.read_parquet(gdir / f / "records.parquet") for f in final]
    assert len(df) == sum(map(len, per_run))  # no duplicated records
    for rec in per_run:
        assert list(rec.columns) == list(COLUMNS)
    assert final[0] == device_run
    for f in final[1:]:  # the experiment points read their ceilings from this host's device run
        assert device_run in (gdir / f / "log.txt").read_text()
        info = read_json(gdir / f / "run.json")
        assert info["device"]["host"] == platform.node() and "cpu_threads" in info["device"]  # the kernel's description


def test_bad_address_and_executor_are_one_line_errors(tmp_path, capsys):
    from llmbench.cli import main
    g = tiny_grid(tmp_path, "rayerr")
    assert main(["run", str(g), "--runs", str(tmp_path / "runs"), "--executor", "ray", "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "127.0.0.1:1" in err[0] and "ray start --head" in err[0]
    assert main(["run", str(g), "--runs", str(tmp_path / "runs"), "--address", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--executor ray" in err[0]


def _device_run(gdir, name, host, device_name, quick=True, end="2026-01-01T00:00:00+0000"):
    d = gdir / name
    d.mkdir(parents=True)
    write_json({"notebook": "00_device", "status": "ok", "parameters": {"quick": quick}, "end": end,
                "device": {"device": "cpu", "host": host, "device_name": device_name}}, d / "run.json")
    (d / "records.parquet").write_bytes(b"")


def test_ceilings_come_from_this_host_and_device_only(tmp_path):
    _device_run(tmp_path, "dev-other-host", "node-b", "CPU X")
    _device_run(tmp_path, "dev-other-name", "node-a", "CPU Y")
    assert ceilings.find_device_run(tmp_path, "cpu", "node-a", "CPU X") is None
    assert ceilings.find_device_run(tmp_path, "cuda", "node-b", "CPU X") is None
    _device_run(tmp_path, "dev-quick", "node-a", "CPU X", end="2026-01-02T00:00:00+0000")
    _device_run(tmp_path, "dev-full", "node-a", "CPU X", quick=False)
    assert ceilings.find_device_run(tmp_path, "cpu", "node-a", "CPU X").name == "dev-full"  # full beats quick
    assert ceilings.find_device_run(tmp_path, "cpu", "node-b", "CPU X").name == "dev-other-host"


def test_device_points_have_one_run_per_host(tmp_path):
    point = {"notebook": "00_device", "params": {"quick": True}, "run_id": "00_device-abc"}
    assert layout.point_status(tmp_path, point)["status"] == "pending"
    a, b = layout.device_point(point, "node-a"), layout.device_point(point, "node b")
    assert (a["run_id"], b["run_id"]) == ("00_device-abc-node-a", "00_device-abc-node_b")
    for p, status in ((a, "ok"), (b, "failed")):
        write_json({"status": status}, tmp_path / p["run_id"] / "run.json")
    assert layout.point_status(tmp_path, a)["status"] == "ok"
    assert layout.point_status(tmp_path, point)["status"] == "failed"  # the grid point: not ok on every host
    assert [rid for rid, _ in layout.point_runs(tmp_path, point)] == [a["run_id"], b["run_id"]]


def test_a_point_takes_one_accelerator_or_a_whole_cpu_node():
    npu = run_ray.Node("a1" * 28, "a", "npu", slots=8, cpus=192)
    cpu = run_ray.Node("b2" * 28, "b", "cpu", slots=1, cpus=2)
    auto = {"params": {}}
    assert run_ray.point_kind(auto, npu) == "npu" and run_ray.point_kind(auto, cpu) == "cpu"
    assert run_ray.point_kind({"params": {"device": "cuda"}}, npu) is None
    assert run_ray.point_kind({"params": {"device": "cpu"}}, npu) == "cpu"
    assert run_ray.cost("npu", npu) == 1 and run_ray.cost("cpu", npu) == 8 and run_ray.cost("cpu", cpu) == 1
    pytest.importorskip("ray")
    o = run_ray.task_options("npu", npu)
    assert o["resources"] == {"NPU": 1} and o["num_cpus"] == 24 and o["max_retries"] == 0
    assert run_ray.task_options("cpu", cpu)["num_cpus"] == 2
    assert run_ray.task_options("cuda", run_ray.Node("c3" * 28, "c", "cuda", 4, 64))["num_gpus"] == 1


def test_a_returned_folder_cannot_write_outside_its_run(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        run_ray.unpack({"../evil": b"x"}, tmp_path / "run")
    run_ray.unpack({"run.json": b"{}", "sub/log.txt": b"hi"}, tmp_path / "run")
    assert run_ray.pack(tmp_path / "run") == {"run.json": b"{}", "sub/log.txt": b"hi"}
