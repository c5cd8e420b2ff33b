"""One tidy record schema (one row = one metric of one configuration), written atomically.

Rows keep their raw samples, so the report can bootstrap ratios between runs. Every write goes
to a temporary name in the same directory and is renamed into place: a reader never sees half a file.
"""
from pathlib import Path

import pandas as pd

from llmbench.core.files import atomic_write, read_json
from llmbench.core.stats import block_lengths, flatten, summarize

# Column -> meaning. Units are in the metric name (…_s, …_bytes, …_per_s) and repeated in `unit`.
COLUMNS = {
    "run_id": "grid point that produced the row",
    "study": "which experiment notebook measured it: device | latency | batch_sweep | quantization | pairs "
             "(core/keys.STUDIES)",
    "experiment": "device | load | prefill | decode | generate | batch | quant | fidelity | ceiling | pair",
    "model": "model name (data/models)", "weights": "synthetic or real", "weights_source": "path, hub id or 'synthetic'",
    "tokens": "where input ids came from: synthetic-ids, or corpus:<file> via <tokenizer>",
    "device": "npu | cuda | cpu", "device_name": "device model", "dtype": "activation/weight dtype",
    "quant": "none | w8a16 | w8a8 | w4a16", "engine": "eager | compiled | llamacpp (engine.py); serving: llama-server | endpoint", "batch": "sequences per step", "prompt_len": "prompt tokens",
    "context_len": "tokens in the KV cache before the timed step", "new_tokens": "generated tokens",
    "metric": "what was measured", "unit": "unit of the statistics", "status": "ok | oom | unsupported: why | error: why",
    "n": "samples", "median": "", "mean": "", "std": "", "p90": "", "p99": "",
    "ci_low": "bootstrap 95% CI of the median", "ci_high": "", "samples": "raw samples",
    "ci_method": "how the CI was made: bootstrap (independent samples) | block bootstrap over N repeats | "
                 "t over N repeat medians (fewer than 10 repeats; samples within a repeat are correlated) | none: why",
    "sample_blocks": "lengths of the repeats `samples` is cut into (None: independent samples); stats.regroup",
    "quiet": "the timed window saw no other load (noise.LIMITS); None: not watched or unreadable",
    "attempts": "times the measurement ran: disturbed windows are redone (noise.measure)",
    "disturbance": "why each redone or kept-disturbed attempt was judged disturbed; None when the first was quiet",
    "other_cores": "CPU cores used by other processes during the kept window, averaged over it",
    "steal_share": "share of CPU time stolen by the hypervisor during the kept window",
    "cpu_mhz": "lowest core clock at the end of the kept window, MHz (None: not exposed)",
    "canary_before_gbs": "CPU memory canary: read rate of a buffer beyond the last-level cache just before the "
                         "kept window's measurement, GB/s (system/canary.py; None: not a CPU run or not read)",
    "canary_after_gbs": "the same read just after it",
    "canary_note": "how the canary was read; on accelerators the clocks and states at the window's start -> end "
                   "(NVML clocks and throttle reasons, npu-smi AI core clock and health)",
    "flops": "useful FLOPs of one measured unit (cost model)", "bytes": "bytes moved by one unit (cost model)",
    "bound_s": "lower-bound time against the measured ceilings", "mbu": "bytes/s over measured bandwidth",
    "mbu_window": "bytes/s over the kept window's own canary read rate (mean of its two reads): an MBU above "
                  "100% with mbu_window below it means the ceiling was read in a slower minute",
    "mfu": "FLOP/s over measured peak", "bound_spec_s": "lower bound against the published spec",
    "mbu_spec": "", "mfu_spec": "",
    "predicted_s": "generate rows: the time TTFT + (n-1) x TPOT of the same prompt predicts",
    "pair": "pair records (experiment pair): the axis the two sides differ in: model | engine | quant",
    "versus": "pair records: side B's value of that axis; a tpot_ratio is B's TPOT over side A's (the record's own)",
    "pairing": "pair records: alternating (both sides loaded, rounds alternate) | sequential (one after the "
               "other in one process: both did not fit in memory)",
    "mbu_read": "pair records: median over steps of the step's bytes / its time / the read rate of the "
                "engine's own weights measured just before it",
    "request_rate": "serving: target Poisson arrival rate, requests/s (None: not an open-loop run)",
    "concurrency": "serving: requests kept in flight by a closed loop (None: not a closed-loop run)",
    "ceilings_run": "the 00_device run (same host and device) whose ceilings give bound_s, mbu and mfu; "
                    "quick-in-run: none there, measured quickly by this run", "note": "free text",
}


def record(samples=None, **fields) -> dict:
    """A row: given fields, statistics of `samples` (if any), every other column None."""
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown record fields: {sorted(unknown)}")
    row = dict.fromkeys(COLUMNS)
    row.update(status="ok")
    if samples is not None:  # a list of lists: one inner list per repeat (see stats)
        row.update(summarize(samples), samples=[float(s) for s in flatten(samples)],
                   sample_blocks=block_lengths(samples))
    row.update(fields)
    return row


def write_records(rows: list[dict], path) -> None:
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def ok_runs(results_dir) -> list[Path]:
    """Finished run folders (their run.json says ok), anywhere under results_dir."""
    out = []
    for rj in sorted(Path(results_dir).rglob("run.json")):
        if any(part.startswith(".") for part in rj.relative_to(results_dir).parts):
            continue  # .tmp and .superseded hold unfinished or replaced runs
        if read_json(rj).get("status") == "ok" and (rj.parent / "records.parquet").is_file():
            out.append(rj.parent)
    return out


def read_all(results_dir) -> pd.DataFrame:
    """Every record of every finished run under results_dir, with the run's grid attached."""
    frames = []
    for run in ok_runs(results_dir):
        df = pd.read_parquet(run / "records.parquet")
        df["grid"] = read_json(run / "run.json").get("grid")
        frames.append(df)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*COLUMNS, "grid"])
    for c in COLUMNS:  # runs written before a column existed: it is empty there, never a missing key
        if c not in df:
            df[c] = None
    return df
