"""Build llama.cpp's `llama-server` once per (version, CMake flags, CPU), from the pinned llama.cpp.

The llama.cpp source is the one llama-cpp-python's sdist (requirements-llamacpp.txt) vendors: the same
commit the llamacpp engine runs. The backend flags are llamacpp_build.cmake_args() (native CPU, CUDA
where nvcc and a GPU exist, CANN where its environment is sourced, -mno-amx-int8 on AMX CPUs). Only the
llama-server target is built, statically linked (one file to cache), without the web UI (no download:
the UI would be fetched from Hugging Face at build time) and without OpenSSL (it listens on 127.0.0.1).
The binary and a build.json (flags, commit, seconds) are cached beside llamacpp_build's wheels, under a
key of the same inputs: a second call returns the cached binary at once.

usage: python -m llmbench.system.llamaserver_build       (make setup runs it; prints the binary's path)
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from llmbench.system import llamacpp_build as lb

# Beyond the backend flags: what makes it a server-only, offline, self-contained build.
SERVER_ARGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_SERVER=ON",
               "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
               "-DLLAMA_OPENSSL=OFF"]


def cache_dir(version: str, args: list[str]) -> Path:
    root = Path(os.environ.get("LLMBENCH_WHEEL_CACHE") or Path.home() / ".cache" / "llmbench" / "llamacpp")
    key = hashlib.sha256(json.dumps(["llama-server", version, args, lb.cpu_id()]).encode()).hexdigest()[:16]
    return root / f"server-{version}-{key}"


def cached() -> tuple[Path, dict] | None:
    """(binary, build.json) of this machine's flags when already built, else None. Builds nothing."""
    version = lb.pins()["llama-cpp-python"]
    out = cache_dir(version, lb.cmake_args())
    binary, info = out / "llama-server", out / "build.json"
    if binary.is_file() and info.is_file():
        return binary, json.loads(info.read_text())
    return None


def build(version: str, args: list[str], out: Path, sdist: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            lb.pip("download", "-q", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", tmp)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
            tar.extractall(tmp, members=members, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build_dir = Path(tmp) / "build"
        t0 = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        log = out / "build.log"  # the compiler's warnings go here, not to the terminal
        with open(log, "w") as f:
            for cmd in (["cmake", "-S", str(src), "-B", str(build_dir), *SERVER_ARGS, *args],
                        ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(os.cpu_count() or 1)]):
                if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                    raise RuntimeError(f"llama-server build failed ({' '.join(cmd[:3])} ...); last lines of {log}:\n{tail}")
        binary = next(build_dir.rglob("bin/llama-server"))
        tmp_bin = out / f".llama-server.{os.getpid()}.tmp"
        shutil.copy2(binary, tmp_bin)
        os.replace(tmp_bin, out / "llama-server")
        info = {"llama_cpp_python": version, "llama_cpp_commit": lb.llama_cpp_commit(sdist), "cmake_args": args,
                "server_args": SERVER_ARGS, "cpu": lb.cpu_id().split(" | ")[0],
                "build_s": round(time.perf_counter() - t0, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "build.json").write_text(json.dumps(info, indent=1))
    return info


def ensure(sdist: Path | None = None) -> tuple[Path, dict]:
    """The cached llama-server of this machine's flags, built first when missing (minutes)."""
    hit = cached()
    if hit:
        return hit
    version = lb.pins()["llama-cpp-python"]
    args = lb.cmake_args()
    out = cache_dir(version, args)
    print(f"llama-server (llama-cpp-python {version}'s llama.cpp): building with {' '.join(args)} "
          f"({os.cpu_count()} cores; minutes)", file=sys.stderr, flush=True)
    info = build(version, args, out, sdist)
    print(f"llama-server: built in {info['build_s']} s -> {out / 'llama-server'}", file=sys.stderr, flush=True)
    return out / "llama-server", info


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    binary, _ = ensure(Path(argv[0]) if argv else None)
    print(binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
