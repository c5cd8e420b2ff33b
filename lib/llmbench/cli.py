"""llmbench command line. A user mistake prints one line naming the bad value, exits 2, no traceback."""
import argparse
import json
import sys
from pathlib import Path

from llmbench.core.errors import UserError


def _print_table(rows: list[dict], cols: list[tuple[str, str]]) -> None:
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in cols]
    print("  ".join(h.rjust(w) for (k, h), w in zip(cols, widths)))
    for r in rows:
        print("  ".join(r[k].rjust(w) for (k, h), w in zip(cols, widths)))


def cmd_models(args) -> int:
    from llmbench.model import costmodel
    from llmbench.model.models import describe_model, load_config, model_names
    out = []
    for name in model_names():
        d = describe_model(name)
        cfg = load_config(name)
        d["flops_per_token"] = costmodel.flops_per_token(cfg)
        for dt, nbytes in (("fp32", 4), ("bf16", 2)):
            wb = costmodel.dense_weight_bytes(cfg, nbytes)
            d[f"weight_bytes_{dt}"] = wb
            d[f"decode_step_bytes_{dt}_ctx1024"] = costmodel.decode_bytes(cfg, wb, 1, 1024, dt)
        out.append(d)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    rows = [{"model": d["model"], "params": f"{d['params_total']:,}",
             "embed": f"{d['params_embedding']:,} ({d['embedding_share']:.1%})",
             "layers": str(d["layers"]), "heads": f"{d['heads']}/{d['kv_heads']}x{d['head_dim']}",
             "kv16": f"{d['kv_bytes_per_token_bf16']:,}", "kv32": f"{d['kv_bytes_per_token_fp32']:,}",
             "gflop": f"{d['flops_per_token'] / 1e9:.2f}", "gb16": f"{d['weight_bytes_bf16'] / 1e9:.2f}"} for d in out]
    _print_table(rows, [("model", "model"), ("params", "parameters"), ("embed", "embedding (share)"),
                        ("layers", "layers"), ("heads", "heads/kv x dim"), ("kv16", "KV B/token 16-bit"),
                        ("kv32", "KV B/token fp32"), ("gflop", "GFLOP/token"), ("gb16", "GB weights 16-bit")])
    return 0


def cmd_env(args) -> int:
    from llmbench.system.device import availability, describe, pick_device
    kind = pick_device(args.device)
    info = describe(kind)
    info["available"] = {k: (ok or why) for k in ("npu", "cuda", "cpu") for ok, why in [availability(k)]}
    from llmbench.system.install import provenance  # the study's packages: from the system's site-packages or this venv
    pkgs = provenance()
    for src in ("system", "venv"):
        info[f"{src} packages"] = ", ".join(f"{n} {p['version']}" for n, p in pkgs.items() if p["from"] == src) or "none"
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for k, v in info.items():
            print(f"{k:>18}: {v}")
    return 0


def cmd_detect(args) -> int:
    from llmbench.system.device import pick_device, usable_dtypes
    kind = pick_device("auto")
    if not args.grid:
        print(kind)
    else:  # the study's grid for this device: an NPU without bf16 (310P, 910A) runs the fp16 one
        print(f"{kind}_fp16" if kind == "npu" and usable_dtypes(kind)["bf16"] else kind)
    return 0


def cmd_run(args) -> int:
    from llmbench.orchestration.runner import run_grid
    return run_grid(args.grid, force=args.force, dry_run=args.dry_run, runs_root=args.runs, strict=args.strict,
                    executor=args.executor, address=args.address)


def cmd_status(args) -> int:
    from llmbench.orchestration.runner import status
    from llmbench.results.status import status_lines
    return status(args.grid, runs_root=args.runs, checks=status_lines)


def cmd_run_point(args) -> int:
    """One grid point, self-contained: any scheduler can run this on any machine."""
    from llmbench.orchestration.grid import safe_slug
    from llmbench.experiments.params import check_value, declared
    from llmbench.system.nbexec import check_kernel
    from llmbench.orchestration.point import run_point
    declared(args.notebook)  # an unknown notebook is a user error, not a failed run
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as e:
        raise UserError(f"--params is not valid JSON ({e}): {args.params!r}")
    if not isinstance(params, dict):
        raise UserError(f"--params must be a JSON object, got {args.params!r}")
    for k, v in params.items():
        check_value(args.notebook, k, v)
    check_kernel()
    run_id = safe_slug(args.run_id, 120)
    info = run_point(args.notebook, params, Path(args.grid_dir), run_id, args.grid_name, args.cell_timeout,
                     Path(args.tmp_dir) if args.tmp_dir else None)
    print(f"{info['status']} {run_id} {info.get('error') or ''}")
    return 0 if info["status"] == "ok" else 1


def cmd_report(args) -> int:
    from llmbench.report.build import build
    html = build(args.results, figures_dir=args.figures, html_path=args.html)
    print(f"report: {html}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmbench", description="Llama 3.2 1B vs 3B inference efficiency study")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("models", help="list the models: parameters, layers, KV bytes per token, FLOPs")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_models)
    s = sub.add_parser("env", help="describe the device and software")
    s.add_argument("--json", action="store_true")
    s.add_argument("--device", default="auto", help="npu, cuda, cpu or auto (default)")
    s.set_defaults(fn=cmd_env)
    s = sub.add_parser("detect", help="print the device kind the study would use: npu, cuda or cpu")
    s.add_argument("--grid", action="store_true",
                   help="print the name of the study's grid for that device instead (npu_fp16 on an NPU without bf16)")
    s.set_defaults(fn=cmd_detect)
    for name, fn, help_ in (("run", cmd_run, "run a grid file (skips finished points)"),
                            ("status", cmd_status, "show done, failed and pending points of a grid")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("grid", help="a grid file, e.g. data/grids/cpu.yaml")
        s.add_argument("--runs", default=None, help="results root (default data/runs)")
        if name == "run":
            s.add_argument("--force", action="store_true", help="redo finished points (old runs are kept aside)")
            s.add_argument("--dry-run", action="store_true", help="list the points and their status, run nothing")
            s.add_argument("--strict", action="store_true", help="refuse to start while other processes keep the machine busy")
            s.add_argument("--executor", default="local", choices=["local", "ray"],
                           help="local: one point after another here (default); ray: every device of a Ray cluster")
            s.add_argument("--address", default=None, help="with --executor ray: a running cluster "
                           "(auto, or HEAD_IP:6379); without it a local Ray instance is started")
        s.set_defaults(fn=fn)
    s = sub.add_parser("run-point", help="run one grid point (used by the runner and by schedulers)")
    s.add_argument("notebook")
    s.add_argument("--params", default="{}", help="JSON object of notebook parameters")
    s.add_argument("--grid-dir", required=True)
    s.add_argument("--grid-name", default="adhoc")
    s.add_argument("--run-id", required=True)
    s.add_argument("--cell-timeout", type=int, default=1800)
    s.add_argument("--tmp-dir", default=None)
    s.set_defaults(fn=cmd_run_point)
    s = sub.add_parser("report", help="build figures/ and report/index.html from finished runs")
    s.add_argument("results", nargs="?", default="data/runs", help="folder of runs (default data/runs)")
    s.add_argument("--figures", default="figures", help="where figures go (default figures/)")
    s.add_argument("--html", default="report/index.html", help="the report's path (default report/index.html)")
    s.set_defaults(fn=cmd_report)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"llmbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
