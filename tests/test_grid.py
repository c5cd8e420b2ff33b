import ast
import json

import pytest
import yaml

from conftest import cli
from llmbench.core.errors import UserError
from llmbench.orchestration.grid import load_grid, safe_slug


def write(tmp_path, doc, name="g.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc) if isinstance(doc, dict) else doc)
    return p


def test_shipped_grids_are_valid_and_expand():
    sizes = {g: len(load_grid(f"data/grids/{g}.yaml")["points"]) for g in ("smoke", "cpu", "cuda", "npu")}
    assert sizes["smoke"] == 14 and sizes["cpu"] == 21 and sizes["cuda"] > sizes["smoke"]
    serving = [p for p in load_grid("data/grids/cpu.yaml")["points"] if p["notebook"] == "04_serving"]
    assert {p["params"]["model"] for p in serving} == {"llama-3.2-1b", "llama-3.2-3b"}  # 1B and 3B served
    engines = {p["params"].get("engine") for p in load_grid("data/grids/cpu.yaml")["points"]}
    assert {"eager", "compiled", "llamacpp"} <= engines  # the engine comparison is never shrunk away
    cpu = load_grid("data/grids/cpu.yaml")
    assert cpu["points"][0]["notebook"] == "00_device"  # ceilings first, reused by the rest
    ids = [p["run_id"] for p in cpu["points"]]
    assert len(set(ids)) == len(ids)
    assert ids == [p["run_id"] for p in load_grid("data/grids/cpu.yaml")["points"]]  # stable


def test_product_and_per_notebook_override(tmp_path):
    g = load_grid(write(tmp_path, {"name": "t", "params": {"model": ["tiny-1b", "tiny-3b"], "repeats": [2]},
                                   "notebooks": {"01_latency": {"params": {"prompt_lens": [[8], [8, 16]]}},
                                                 "02_batch_sweep": [{"params": {"max_batch": [2]}},
                                                                    {"params": {"model": ["tiny-1b"], "max_batch": [4]}}]}}))
    nbs = [p["notebook"] for p in g["points"]]
    assert nbs.count("01_latency") == 4 and nbs.count("02_batch_sweep") == 3
    assert {p["params"]["repeats"] for p in g["points"]} == {2}
    assert all(safe_slug(p["run_id"], 200) == p["run_id"] for p in g["points"])


@pytest.mark.parametrize("doc,needles", [
    ({"notebooks": {"05_magic": None}}, ["notebooks.05_magic", "'05_magic'", "01_latency"]),
    ({"notebooks": {"01_latency": {"params": {"colour": ["red"]}}}}, ["notebooks.01_latency.params.colour", "'colour'", "prompt_lens"]),
    ({"notebooks": {"01_latency": {"params": {"repeats": ["3"]}}}}, ["params.repeats", "repeats='3'", "expected int"]),
    ({"notebooks": {"01_latency": {"params": {"prompt_lens": [16, 32]}}}}, ["prompt_lens=16", "expected list[int]", "[[...]]"]),
    ({"notebooks": {"01_latency": {"params": {"model": []}}}}, ["params.model", "empty list"]),
    ({"notebooks": {"01_latency": {"params": {"model": "tiny-1b"}}}}, ["params.model", "expected a list", "['tiny-1b']"]),
    ({"params": {"model": ["llama-70b"]}, "notebooks": {"01_latency": None}}, ["params.model", "'llama-70b'", "tiny-3b"]),
    ({"notebooks": {"01_latency": {"params": {"out_dir": ["/etc"]}}}}, ["out_dir", "set by the runner"]),
    ({"name": "../../etc", "notebooks": {"01_latency": None}}, ["name", "'../../etc'"]),
    ({"notebooks": {"01_latency": {"params": {"weights": ["x'; import os; os.system('id') #"]}}}}, ["weights", "does not exist"]),
    ({"params": {"quick": [True]}, "notebooks": {"01_latency": None}}, ["params.quick", "no notebook"]),
    ({"notebooks": {"02_batch_sweep": {"params": {"batch_factor": [1]}}}}, ["batch_factor=1", "2 or more"]),
    ({"nothing": 1}, ["nothing", "unknown key"]),
    ("notebooks: [unclosed", ["not valid YAML"]),
])
def test_invalid_grids_are_rejected_naming_file_key_and_value(tmp_path, doc, needles):
    p = write(tmp_path, doc)
    with pytest.raises(UserError) as e:
        load_grid(p)
    msg = str(e.value)
    assert str(p) in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_invalid_grid_runs_nothing(tmp_path):
    p = write(tmp_path, {"name": "bad", "notebooks": {"01_latency": {"params": {"model": ["nope"]}}}})
    r = cli("run", p, "--runs", tmp_path / "runs")
    assert r.returncode == 2 and "'nope'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_string_parameters_are_injected_as_literals(tmp_path):
    """A valid but hostile directory name cannot become code in the executed notebook."""
    import papermill
    from llmbench.core import paths
    from llmbench.model.models import load_model
    hostile = tmp_path / "w\"; import os; os.system('touch pwned') #"
    m, _ = load_model("tiny-1b")
    m.save_pretrained(hostile, safe_serialization=True)
    from llmbench.experiments.params import check_value
    check_value("01_latency", "weights", str(hostile))  # valid: it exists and holds safetensors
    nb = papermill.parameterize.parameterize_notebook(
        papermill.iorw.load_notebook_node(str(paths.NOTEBOOKS / "01_latency.ipynb")), {"weights": str(hostile)})
    injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    tree = ast.parse(injected.source)
    for node in tree.body:
        assert isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant), ast.dump(node)
    assert tree.body[0].value.value == str(hostile)
