"""Grid files: which notebooks to run over which parameter lists, validated before anything runs.

    name: cpu                      # folder under data/runs/ (letters, digits, '-', '_')
    timeout_s: 1800                # wall clock per grid point
    cell_timeout_s: 1200           # per notebook cell
    params:                        # every value is a list of candidates; applied to each notebook
      model: [llama-3.2-1b, llama-3.2-3b]     # that declares the parameter
    notebooks:
      01_latency:
        params:                    # per-notebook lists override the shared ones
          prompt_lens: [[16, 64, 256]]        # one candidate that is itself a list
      03_quantization:             # a list of blocks: each is expanded on its own
        - params: {methods: [[none, w8a8]]}
        - params: {model: [llama-3.2-1b], methods: [[none, w4a16]]}

The runner expands the product of each notebook's lists; 00_device runs first. A grid file is data:
it is parsed with yaml.safe_load and its strings are checked against the notebooks' declared types
and value rules, never executed.
"""
import hashlib
import itertools
import json
import re
from pathlib import Path

import yaml

from llmbench.core.errors import UserError
from llmbench.core.keys import RUN_ID_KEYS
from llmbench.experiments.params import RESERVED, check_value, declared
from llmbench.orchestration.estimate import anchors

TOP_KEYS = {"name", "description", "timeout_s", "cell_timeout_s", "params", "notebooks",
            "estimate"}  # estimate: measured figures that price --dry-run's estimate (estimate.py)
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def _fail(path, key, msg):
    raise UserError(f"{path}: {key}: {msg}")


def _candidates(path, key, value):
    if not isinstance(value, list):
        _fail(path, key, f"expected a list of candidate values, got {value!r} (write [{value!r}] for one value)")
    if not value:
        _fail(path, key, "empty list: give at least one value")
    return value


def safe_slug(text: str, limit: int = 60) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return slug[:limit] or "x"


def run_id(notebook: str, params: dict, shown) -> str:
    """Readable (notebook and the values that matter) and stable (hash of all parameters)."""
    digest = hashlib.sha1(json.dumps([notebook, params], sort_keys=True).encode()).hexdigest()[:8]
    label = "-".join("+".join(map(str, v)) if isinstance(v, list) else str(v)
                     for v in (params[k] for k in shown if k in params))
    return f"{safe_slug(notebook + ('-' + label if label else ''))}-{digest}"


def _expand(path, nb, where_nb, decl, block, shared, used_shared) -> list[dict]:
    """The points of one parameter block of one notebook: checked, then the product of its lists."""
    block = block or {}
    if not isinstance(block, dict) or set(block) - {"params"}:
        _fail(path, where_nb, "expected a mapping with one key, params")
    own = block.get("params") or {}
    if not isinstance(own, dict):
        _fail(path, f"{where_nb}.params", "expected a mapping of parameter name to list of values")
    lists = {}
    for key, value in shared.items():
        if key in decl:
            lists[key] = (f"params.{key}", value)
            used_shared.add(key)
    for key, value in own.items():
        lists[key] = (f"{where_nb}.params.{key}", value)
    for key, (where, value) in lists.items():
        if key in RESERVED:
            _fail(path, where, f"{key!r} is set by the runner and cannot be set in a grid")
        for v in _candidates(path, where, value):
            try:
                check_value(nb, key, v)
            except UserError as e:
                _fail(path, where, str(e))
    keys = list(lists)
    swept = [k for k in keys if len(lists[k][1]) > 1]
    shown = [k for k in RUN_ID_KEYS if k in keys] + [k for k in swept if k not in RUN_ID_KEYS]
    points = []
    for combo in itertools.product(*(lists[k][1] for k in keys)):
        params = dict(zip(keys, combo))
        points.append({"notebook": nb, "params": params, "run_id": run_id(nb, params, shown)})
    return points


def load_grid(path) -> dict:
    """{name, path, timeout_s, cell_timeout_s, points: [{notebook, params, run_id}]}; UserError if invalid."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"grid file {str(path)!r} does not exist; grids here: "
                        f"{', '.join(sorted(str(p) for p in Path('data/grids').glob('*.yaml'))) or 'none'}")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a mapping with keys {', '.join(sorted(TOP_KEYS))}")
    for key in doc:
        if key not in TOP_KEYS:
            _fail(path, key, f"unknown key; valid: {', '.join(sorted(TOP_KEYS))}")
    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not NAME.match(name):
        _fail(path, "name", f"{name!r} must be lower-case letters, digits, '-' or '_' (it names a folder)")
    timeouts = {}
    for key, default in (("timeout_s", 3600), ("cell_timeout_s", 1800)):
        v = doc.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            _fail(path, key, f"{v!r} must be a positive integer number of seconds")
        timeouts[key] = v
    shared = doc.get("params") or {}
    notebooks = doc.get("notebooks")
    if not isinstance(shared, dict):
        _fail(path, "params", "expected a mapping of parameter name to list of values")
    if not isinstance(notebooks, dict) or not notebooks:
        _fail(path, "notebooks", "expected a non-empty mapping of notebook name to its params")

    points = []
    used_shared = set()
    for nb in sorted(notebooks):
        try:
            decl = declared(str(nb))
        except UserError as e:
            _fail(path, f"notebooks.{nb}", str(e))
        blocks = notebooks[nb] if isinstance(notebooks[nb], list) else [notebooks[nb]]
        for i, block in enumerate(blocks):
            where_nb = f"notebooks.{nb}" + (f"[{i}]" if isinstance(notebooks[nb], list) else "")
            points += _expand(path, nb, where_nb, decl, block, shared, used_shared)
    unused = set(shared) - used_shared
    if unused:
        _fail(path, f"params.{sorted(unused)[0]}", "no notebook of this grid declares this parameter")
    return {"name": name, "path": str(path), "description": doc.get("description", ""), **timeouts,
            "points": points, "estimate": anchors(str(path), doc.get("estimate"))}
