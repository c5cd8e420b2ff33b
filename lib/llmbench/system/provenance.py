"""What produced a run: the project's commit and the versions of the packages that matter to its numbers."""
import subprocess

from llmbench.core import paths


def git_commit() -> str:
    """HEAD of the project checkout, with '+dirty' when files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=paths.ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=paths.ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("torch", "torch_npu", "transformers", "torchao", "papermill", "pandas", "numpy", "scipy"):
        try:
            out[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            pass
    return out
