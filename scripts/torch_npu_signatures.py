"""Regenerate data/torch_npu_ops.json: the signatures of the torch_npu ops llmbench calls, read from a torch-npu wheel.

    .venv/bin/pip download --no-deps torch-npu==2.13.0 -d /tmp/wheel
    .venv/bin/python scripts/torch_npu_signatures.py /tmp/wheel/torch_npu-2.13.0-*.whl

The schemas come from the wheel's torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml (what op-plugin registers,
the same text as op-plugin's op_plugin_functions.yaml) and PYTHON's functions from torch_npu/npu/utils.py. The wheel is
only read as a zip: nothing in it is imported or executed. tests/test_npu_contracts.py compares the fake with the file.
"""
import ast
import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path

import yaml

OPS = ("npu_weight_quant_batchmatmul", "npu_convert_weight_to_int4pack", "npu_dynamic_quant", "npu_quant_matmul",
       "npu_format_cast")
PYTHON = ("get_cann_version", "set_task_queue_enable", "get_task_queue_enable")  # torch_npu/npu/utils.py
SCHEMAS = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
OUT = Path(__file__).resolve().parents[1] / "data" / "torch_npu_ops.json"


def parse_schema(schema: str) -> dict:
    """'name(Type a, *, Type? b=None) -> Ret' -> {name, args: [{name, type, default, kwonly}], returns}."""
    m = re.fullmatch(r"(\w+)\((.*)\)\s*->\s*(.+)", schema.strip())
    name, arglist, returns = m.groups()
    args, kwonly = [], False
    for part in (p.strip() for p in arglist.split(",") if p.strip()):
        if part == "*":
            kwonly = True
            continue
        typ, rest = part.rsplit(" ", 1)
        arg, _, default = rest.partition("=")
        args.append({"name": arg, "type": typ, "default": default or None, "kwonly": kwonly})
    return {"name": name, "args": args, "returns": returns.strip()}


def schemas(text: str) -> dict:
    """Every `func:` schema in the codegen YAML, by op name (overloads like name.out are skipped)."""
    out = {}
    for section in yaml.safe_load(text).values():
        for entry in section if isinstance(section, list) else []:
            func = entry.get("func", "") if isinstance(entry, dict) else ""
            name = func.split("(", 1)[0]
            if name in OPS:
                out[name] = func
    return out


def python_signature(source: str, func: str) -> dict:
    """A module-level function's parameters from source (ast only)."""
    fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == func)
    defaults = [None] * (len(fn.args.args) - len(fn.args.defaults)) + fn.args.defaults
    return {"name": func, "args": [{"name": a.arg, "type": "python", "kwonly": False,
                                    "default": None if d is None else ast.unparse(d)}
                                   for a, d in zip(fn.args.args, defaults)]}


def main(wheel: str) -> None:
    data = Path(wheel).read_bytes()
    with zipfile.ZipFile(wheel) as z:
        version = dict(re.findall(r"^(\w+) = '([^']*)'", z.read("torch_npu/version.py").decode(), re.M))
        found = schemas(z.read(SCHEMAS).decode())
        utils = z.read("torch_npu/npu/utils.py").decode()
    missing = sorted(set(OPS) - set(found))
    if missing:
        sys.exit(f"{wheel}: no schema for {', '.join(missing)} in {SCHEMAS}")
    out = {"source": {"wheel": Path(wheel).name, "sha256": hashlib.sha256(data).hexdigest(),
                      "torch_npu_version": version.get("__version__"), "git_version": version.get("git_version"),
                      "schemas_file": SCHEMAS, "python_file": "torch_npu/npu/utils.py",
                      "regenerate": "python scripts/torch_npu_signatures.py <torch_npu wheel>"},
           "ops": {name: {"schema": found[name], **parse_schema(found[name])} for name in OPS},
           "python": {f"npu.{name}": python_signature(utils, name) for name in PYTHON}}
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT} from {Path(wheel).name} (torch_npu {version.get('__version__')}, {version.get('git_version')})")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].endswith(".whl"):
        sys.exit("usage: python scripts/torch_npu_signatures.py <torch_npu-*.whl>  (get one with: "
                 "pip download --no-deps torch-npu==2.13.0)")
    main(sys.argv[1])
