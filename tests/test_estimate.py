"""llmbench run --dry-run: the points and the wall time the grid's `estimate:` figures give them."""
import json
import re

import pytest
import yaml

from conftest import ROOT, cli
from llmbench.orchestration import estimate
from llmbench.core.errors import UserError
from llmbench.orchestration.grid import load_grid


def _seconds(out: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+)\s+\w+\s+(\d+) s ", out, re.M)}


def test_cuda_quick_dry_run_lists_points_and_fits_a_short_slot(tmp_path):
    r = cli("run", "data/grids/cuda-quick.yaml", "--dry-run", "--runs", tmp_path)
    assert r.returncode == 0, r.stderr
    per = _seconds(r.stdout)
    assert len(per) == 8 and "8 points" in r.stdout
    total = float(re.search(r"estimated wall time [\d.]+ min \((\d+) s;", r.stdout).group(1))
    assert abs(total - sum(per.values())) <= len(per)  # printed per point rounded
    # the slot the grid is for (issue 28: under 6 minutes on one H200), and from what
    assert total < 6 * 60 and "one H200 (measured 2026-12-04)" in r.stdout
    # graph engines pay their compilations: the compiled point of a model costs more than its eager one
    eager, compiled = (next(v for k, v in per.items() if k.startswith(f"01_latency-llama-3.2-3b-bf16-{e}"))
                       for e in ("eager", "compiled"))
    assert compiled > eager
    full = cli("run", "data/grids/cuda.yaml", "--dry-run", "--runs", tmp_path)
    assert full.returncode == 0 and "no estimate: the grid has no `estimate:` block" in full.stdout


def test_a_finished_point_counts_its_measured_duration(tmp_path):
    grid = load_grid(ROOT / "data/grids/cuda-quick.yaml")
    p = grid["points"][1]
    run = tmp_path / grid["name"] / p["run_id"]
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": "ok", "duration_s": 1234.0}))
    r = cli("run", "data/grids/cuda-quick.yaml", "--dry-run", "--runs", tmp_path)
    assert _seconds(r.stdout)[p["run_id"]] == 1234 and "1 of 8 points at their measured duration" in r.stdout


def test_more_work_costs_more():
    a = load_grid(ROOT / "data/grids/cuda-quick.yaml")["estimate"]
    point = {"notebook": "01_latency", "params": {"device": "cuda", "model": "llama-3.2-1b", "engine": "eager",
                                                  "dtype": "bf16", "repeats": 3, "warmup": 1}}
    base = estimate.point_seconds(a, point)
    more = estimate.point_seconds(a, {**point, "params": {**point["params"], "repeats": 10}})
    longer = estimate.point_seconds(a, {**point, "params": {**point["params"], "prompt_lens": [4096, 8192]}})
    assert base > a.point_overhead_s and more > base and longer > base


def test_an_incomplete_estimate_block_is_one_clear_error(tmp_path):
    doc = yaml.safe_load((ROOT / "data/grids/cuda-quick.yaml").read_text())
    del doc["estimate"]["compile_s"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match="estimate: expected the keys .*compile_s"):
        load_grid(bad)
