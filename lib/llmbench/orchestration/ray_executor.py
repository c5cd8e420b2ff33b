"""Run a grid on a Ray cluster: `llmbench run GRID --executor ray [--address ADDR]`.

Every grid point is one Ray task that holds one whole device for its duration (`NPU: 1` on an Ascend
node, one GPU on a CUDA node, every core of a CPU-only node) and runs `llmbench run-point` in a child
process on the worker, exactly as the local runner does (same timeout, same failure records). Ray makes
the assigned device the only visible one (ASCEND_RT_VISIBLE_DEVICES, CUDA_VISIBLE_DEVICES), so the
point sees it as device 0.

No shared filesystem is assumed: the worker runs the point in a temporary folder and returns the
finished run folder (kilobytes: records, run.json, executed notebook, log); this driver moves it into
data/runs/<grid>/<run_id>/ through .tmp/ and a rename, the layout the local runner writes, so status,
report and resume work unchanged. A shared --runs folder works the same way.

Order on each host: the grid's 00_device points first (once per host, into <run_id>-<host>/), then the
experiment points, which get that host's device runs shipped with them to read their ceilings from.
"""
import os
import platform
import socket
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from llmbench.core.errors import UserError
from llmbench.core.files import read_json, write_json
from llmbench.orchestration import layout, local
from llmbench.orchestration.point import _run_one

PROBE_TIMEOUT_S = 60      # a node that does not say its hostname within this is not used
REFRESH_S = 10            # how often the driver looks for nodes that joined or died


@dataclass
class Node:
    node_id: str
    host: str              # platform.node() there: with the device name, the key of its ceilings
    kind: str              # npu | cuda | cpu: what a point with device "auto" gets there
    slots: int             # points that can run at once: its NPUs or GPUs, else 1
    cpus: int
    busy: int = 0          # slots taken by running points


def _hostname() -> str:
    return platform.node()


def connect(address: str | None):
    """ray, connected: to the cluster at address, or to a new local instance (stopped at the end)."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs the ray package; install the pinned one: "
                        "pip install $(grep '^ray==' requirements.lock)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
    if address and ":" in address and "://" not in address:
        reachable(address)
    kw = {} if address else {"include_dashboard": False}
    # Worker processes are started by `ray start` with its shell's environment and may import torch before
    # llmbench (a reused worker): set it there from the start, or torch-npu's autoload entry point makes
    # `import torch` fail on a node whose CANN is not sourced.
    kw["runtime_env"] = {"env_vars": {"TORCH_DEVICE_BACKEND_AUTOLOAD":
                                      os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")}}
    try:  # "local": a new instance, even where `ray start` left a cluster running on this machine
        ray.init(address=address or "local", log_to_driver=False, logging_level="ERROR", **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"--address {address!r}: no Ray cluster could be joined there "
                        f"({str(e).strip().splitlines()[0][:200]}); start one with `ray start --head`, "
                        f"or leave --address out to start a local one")
    return ray


def reachable(address: str, timeout_s: float = 10) -> None:
    """A HOST:PORT that nothing answers on is a user error now (ray.init would retry for minutes)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise UserError(f"--address {address!r}: no Ray head answers there ({e}); start one with "
                        f"`ray start --head`, use --address auto on a cluster node, or leave --address out")


def _pin(node_id: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def discover(ray, known: dict) -> dict:
    """The alive nodes {node_id: Node}, keeping the slot counts of those already known."""
    alive = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
    new = [nid for nid in alive if nid not in known]
    probe = ray.remote(_hostname)
    refs = {nid: probe.options(num_cpus=0, scheduling_strategy=_pin(nid)).remote() for nid in new}
    out = {nid: node for nid, node in known.items() if nid in alive}
    for nid, ref in refs.items():
        try:
            host = ray.get(ref, timeout=PROBE_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError):
            continue  # died or unreachable since it was listed: not used
        res = alive[nid].get("Resources", {})
        npus, gpus, cpus = int(res.get("NPU", 0)), int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
        kind = "npu" if npus else "cuda" if gpus else "cpu"
        out[nid] = Node(nid, host, kind, npus or gpus or 1, cpus)
    return out


def point_kind(point: dict, node: Node) -> str | None:
    """The device kind this point runs on at this node, or None when the node has no such device."""
    want = point["params"].get("device", "auto")
    if want == "auto":
        return node.kind
    return want if want == "cpu" or want == node.kind else None


def cost(kind: str, node: Node) -> int:
    """Slots a point takes: one accelerator, or (cpu) the whole node, so that no two CPU points share
    cores or memory bandwidth and no accelerator point runs beside a CPU one."""
    return 1 if kind in ("npu", "cuda") else node.slots


def task_options(kind: str, node: Node) -> dict:
    """Ray resources for one point: the device, an equal share of the node's cores, pinned to node.
    max_retries=0: a point whose process dies is recorded as failed, and retried by the next run."""
    opts = dict(num_cpus=max(1, node.cpus // node.slots), max_retries=0, scheduling_strategy=_pin(node.node_id))
    if kind == "npu":
        opts["resources"] = {"NPU": 1}
    elif kind == "cuda":
        opts["num_gpus"] = 1
    else:
        opts["num_cpus"] = node.cpus
    return opts


# --- run folders as bytes: what travels between worker and driver ------------------------------------

def pack(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def unpack(files: dict[str, bytes], folder: Path) -> None:
    for rel, data in files.items():
        path = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"refusing a run file outside its folder: {rel!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def land(files: dict[str, bytes], gdir: Path, run_id: str) -> dict:
    """Write a returned run folder under .tmp/ and rename it into place (layout.finalize)."""
    tmp = gdir / ".tmp" / f"{os.getpid()}-{time.time_ns()}" / run_id
    unpack(files, tmp)
    layout.finalize(tmp, gdir / run_id)
    return read_json(gdir / run_id / "run.json")


def device_runs(gdir: Path, host: str) -> dict[str, dict[str, bytes]]:
    """The finished 00_device runs of one host (run.json and records): what its points read ceilings from."""
    out = {}
    for rj in sorted(gdir.glob("*/run.json")):
        info = read_json(rj)
        if info.get("notebook") == layout.DEVICE_NOTEBOOK and info.get("status") == "ok" \
                and (info.get("device") or {}).get("host") == host and (rj.parent / "records.parquet").is_file():
            out[rj.parent.name] = {"run.json": rj.read_bytes(),
                                   "records.parquet": (rj.parent / "records.parquet").read_bytes()}
    return out


# --- on the worker -------------------------------------------------------------------------------------

def run_point_task(point: dict, grid: dict, kind: str, device_files: dict) -> dict[str, bytes]:
    """Run one point here, in a temporary grid folder holding this host's device runs; return its folder."""
    import ray
    rt = ray.get_runtime_context()
    placed = {"node_id": rt.get_node_id(), "host": platform.node(), "pid": os.getpid(),
              "accelerators": {k: v for k, v in rt.get_accelerator_ids().items() if v}}
    # Ray sets OMP_NUM_THREADS to the task's CPUs. A CPU point holds the whole node: leave the thread
    # count to torch, as the local runner does (the kernel records it as cpu_threads).
    omp = os.environ.get("OMP_NUM_THREADS")
    if kind == "cpu" and omp == str(int(rt.get_assigned_resources().get("CPU", -1))):
        os.environ.pop("OMP_NUM_THREADS")
    try:
        with tempfile.TemporaryDirectory(prefix="llmbench-ray-") as work:
            gdir = Path(work) / grid["name"]
            for name, files in device_files.items():
                unpack(files, gdir / name)
            info = _run_one(point, grid, gdir)
            info["ray"] = placed
            write_json(info, gdir / point["run_id"] / "run.json")
            return pack(gdir / point["run_id"])
    finally:
        if omp is not None:
            os.environ["OMP_NUM_THREADS"] = omp


# --- the driver ---------------------------------------------------------------------------------------

def failure(gdir: Path, grid: dict, point: dict, node: Node, err: Exception, t0: float) -> dict:
    """Record a point whose task died (worker or node lost, process killed): retried by the next run."""
    lines = str(err).strip().splitlines() or [""]
    info = {"run_id": point["run_id"], "grid": grid["name"], "notebook": point["notebook"],
            "parameters": point["params"], "status": "failed",
            "error": f"{type(err).__name__} on {node.host}: {lines[0][:500]}",
            "duration_s": round(time.time() - t0, 3), "log_tail": "\n".join(lines[-layout.LOG_TAIL_LINES:]),
            "device": {"device": point["params"].get("device", "auto"), "host": node.host},
            "ray": {"node_id": node.node_id, "host": node.host}}
    tmp = gdir / ".tmp" / f"{os.getpid()}-{time.time_ns()}" / point["run_id"]
    write_json(info, tmp / "run.json")
    layout.finalize(tmp, gdir / point["run_id"])
    return info


def check_placeable(points: list, nodes: dict) -> None:
    """Refuse, before anything runs, a point whose device no node of the cluster has."""
    for p in points:
        if not any(point_kind(p, n) for n in nodes.values()):
            have = "; ".join(f"{n.host}: {n.kind} x{n.slots}" for n in nodes.values()) or "none"
            raise UserError(f"point {p['run_id']} asks for device {p['params'].get('device')!r}, which no node "
                            f"of the Ray cluster has (nodes: {have})")


def run_on_ray(grid: dict, gdir: Path, force: bool, address: str | None) -> None:
    ray = connect(address)
    try:
        Driver(ray, grid, gdir, force).run()
    finally:
        ray.shutdown()  # a local instance stops; a cluster only loses this driver, and Ray ends its tasks


class Driver:
    """Places points on free devices, device runs of each host first; lands what comes back."""

    def __init__(self, ray, grid: dict, gdir: Path, force: bool):
        self.ray, self.grid, self.gdir, self.force = ray, grid, gdir, force
        self.task = ray.remote(run_point_task)
        self.nodes = discover(ray, {})
        self.device_pts = [p for p in grid["points"] if layout.is_device(p)]
        self.queue = deque(p for p in grid["points"] if not layout.is_device(p)
                           and (force or layout.point_status(gdir, p)["status"] != "ok"))
        check_placeable(list(self.queue) + self.device_pts, self.nodes)
        self.todo_dev = {}          # host -> its 00_device points still to run there
        self.measuring = set()      # hosts whose device run is under way
        self.inflight = {}          # ObjectRef -> (point, node, kind, start time)

    def add_hosts(self) -> int:
        """Device points still to run on hosts not seen before; how many."""
        new = 0
        for n in self.nodes.values():
            if n.host not in self.todo_dev:
                dps = (layout.device_point(p, n.host) for p in self.device_pts)
                self.todo_dev[n.host] = [dp for dp in dps
                                         if self.force or layout.point_status(self.gdir, dp)["status"] != "ok"]
                new += len(self.todo_dev[n.host])
        return new

    def left(self) -> bool:
        return bool(self.queue) or any(self.todo_dev[n.host] for n in self.nodes.values())

    def submit(self, p: dict, n: Node, kind: str, files) -> None:
        ref = self.task.options(**task_options(kind, n)).remote(p, self.grid, kind, files)
        self.inflight[ref] = (p, n, kind, time.time())
        n.busy += cost(kind, n)

    def fits(self, p: dict, n: Node) -> str | None:
        kind = point_kind(p, n)
        return kind if kind and n.busy + cost(kind, n) <= n.slots else None

    def place(self) -> None:
        for n in self.nodes.values():
            todo = self.todo_dev[n.host]
            if todo or n.host in self.measuring:  # the host's ceilings come first: one device run at a time
                if todo and n.host not in self.measuring and (kind := self.fits(todo[0], n)):
                    self.submit(todo.pop(0), n, kind, {})
                    self.measuring.add(n.host)
                continue
            files = None
            for p in list(self.queue):
                if kind := self.fits(p, n):
                    files = files or self.ray.put(device_runs(self.gdir, n.host))
                    self.queue.remove(p)
                    self.submit(p, n, kind, files)

    def collect(self, bar) -> None:
        ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=REFRESH_S)
        for ref in ready:
            p, n, kind, t0 = self.inflight.pop(ref)
            n.busy -= cost(kind, n)
            try:
                info = land(self.ray.get(ref), self.gdir, p["run_id"])
            except self.ray.exceptions.RayError as e:  # worker or node died, process killed
                info = failure(self.gdir, self.grid, p, n, e, t0)
            if layout.is_device(p):
                self.measuring.discard(n.host)
            bar.update(1)
            local.report_line(bar, info, p["run_id"], f"  @{n.host}")

    def run(self) -> None:
        total = self.add_hosts() + len(self.queue)
        pts = self.grid["points"]
        to_measure = {dp["point_id"] for todo in self.todo_dev.values() for dp in todo}
        done = len(pts) - len(self.queue) - len(to_measure)
        nodes = ", ".join(f"{n.host}: {n.kind} x{n.slots}" for n in self.nodes.values())
        print(f"grid {self.grid['name']}: {len(pts)} points, {done} already done, running {total} on "
              f"{len(self.nodes)} Ray node(s) [{nodes}] -> {self.gdir}", flush=True)
        refreshed = time.time()
        with local.progress(total) as bar:
            while self.left() or self.inflight:
                self.place()
                if not self.inflight:
                    bar.write("points left that no alive node can run (their device is gone); they stay pending")
                    break
                hosts = {n.host for _, n, _, _ in self.inflight.values()}
                bar.set_description(f"{len(self.inflight)} running on {len(hosts)} host(s)")
                self.collect(bar)
                if time.time() - refreshed > REFRESH_S:  # nodes that joined get their device run first
                    self.nodes = discover(self.ray, self.nodes)
                    bar.total += self.add_hosts()
                    bar.refresh()
                    refreshed = time.time()
