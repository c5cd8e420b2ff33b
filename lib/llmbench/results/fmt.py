"""Numbers as the report writes them: times with units, bytes in GB, a median with its CI, a table as HTML."""
import math

import numpy as np
import pandas as pd


def fmt_time(s: float) -> str:
    if s is None or not np.isfinite(s):
        return "n/a"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def fmt_gb(b: float) -> str:
    if b is None or not np.isfinite(b):
        return "n/a"
    return f"{b / 1e9:.3g} GB" if abs(b) >= 1e8 else f"{b / 1e6:.3g} MB"


def fmt_ci(m, lo, hi, fmt=lambda x: f"{x:.3g}") -> str:
    if lo is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return fmt(m)
    return f"{fmt(m)} (95% CI {fmt(lo)}–{fmt(hi)})"


def table_html(t: pd.DataFrame) -> str:
    return t.to_html(index=False, escape=True, na_rep="", float_format=lambda x: f"{x:.3g}") if len(t) else ""


def is_finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def fmt_mbu(mbu, window=None, spec: str = ".0%") -> str:
    """An MBU (against the run's read ceiling) with, where the window's memory canary was read, the MBU
    against that window's own read rate beside it: "119% (window 84%)" tells a slow ceiling from a bound
    that was beaten. Empty where the MBU is unknown."""
    if not is_finite(mbu):
        return ""
    return f"{mbu:{spec}}" + (f" (window {window:{spec}})" if is_finite(window) else "")
