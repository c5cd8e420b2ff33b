"""Files written atomically: every write goes to a temporary name in the same directory and is renamed
into place, so a reader never sees half a file. And the one reader of data/published.yaml."""
import json
import os
import tempfile
from pathlib import Path

import yaml

from llmbench.core import paths


def atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(obj, path) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
    atomic_write(path, write)


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def published() -> dict:
    """data/published.yaml: published figures and the latency targets (MLPerf limits), each with its source."""
    return yaml.safe_load(paths.PUBLISHED.read_text())
