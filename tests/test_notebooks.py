"""Notebook conventions: typed, commented parameters; validation right after; committed without outputs."""
import ast

import nbformat
import pytest

from llmbench.core import paths
from llmbench.experiments.params import declared, validate

NOTEBOOKS = sorted(p.stem for p in paths.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def test_the_study_notebooks_exist():
    assert NOTEBOOKS == ["00_device", "01_latency", "02_batch_sweep", "03_quantization", "04_serving", "05_pairs",
                         "99_report"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_conventions(name):
    nb = nbformat.read(paths.NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "committed with outputs"
    assert "parameters" in code[0].metadata.get("tags", [])
    for node in ast.parse(code[0].source).body:  # typed literals only
        assert isinstance(node, ast.AnnAssign) and isinstance(node.annotation, (ast.Name, ast.Subscript))
        ast.literal_eval(node.value)
    assert all(p["help"] for p in declared(name).values()), "every parameter has a comment"
    assert "Validation" in code[1].source and ("validate(" in code[1].source or "UserError" in code[1].source)
    assert nb.metadata.kernelspec.name == "llmbench"


@pytest.mark.parametrize("name", [n for n in NOTEBOOKS if n != "99_report"])
def test_defaults_are_valid_here(name):
    defaults = {k: ast.literal_eval(v["default"]) for k, v in declared(name).items()}
    params = validate(name, defaults)
    assert params["kind"] == "cpu"
