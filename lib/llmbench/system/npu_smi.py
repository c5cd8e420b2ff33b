"""Which card and chip `npu-smi` knows this process's NPU by, for power readings and the process table.

torch and ASCEND_RT_VISIBLE_DEVICES count chips by logical id; npu-smi addresses an NPU ID (`-i`) and a
chip on it (`-c`). They differ: 310P servers number their cards 1, 4, 224..., and an Atlas 300I Duo or an
A3 carries two chips under one NPU ID. `npu-smi info -m` maps one to the other (Mcu rows have no
logical id; some versions add a "Chip Phy-ID" column before the name):

        NPU ID      Chip ID     Chip Logic ID     Chip Name
        224         0           0                 Ascend 310P3
        224         1           1                 Ascend 310P3
        224         2           -                 Mcu

This process runs on its logical device 0, the first of ASCEND_RT_VISIBLE_DEVICES. LLMBENCH_NPU_SMI_ID
("224" or "224:1") names the card (and chip) outright, where the map is missing or wrong.
"""
import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from llmbench.core.errors import UserError


@dataclass(frozen=True)
class Target:
    npu_id: int
    chip: int | None   # None: LLMBENCH_NPU_SMI_ID named the card only
    how: str           # how it was found, for the record

    def args(self) -> list[str]:
        """`-i ID [-c CHIP]` for npu-smi info -t ..."""
        return ["-i", str(self.npu_id)] + ([] if self.chip is None else ["-c", str(self.chip)])


class Unmapped(Exception):
    """No NPU ID is known for this process's device; the message says why and what to set."""


def logical_device() -> int:
    """The logical id of this process's device 0: the first of ASCEND_RT_VISIBLE_DEVICES, else 0."""
    first = (os.environ.get("ASCEND_RT_VISIBLE_DEVICES") or "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def parse_map(text: str) -> dict[int, tuple[int, int]]:
    """{chip logical id: (NPU ID, chip id)} from `npu-smi info -m`."""
    out = {}
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 4 and cols[0].isdigit() and cols[1].isdigit() and cols[2].isdigit():
            out[int(cols[2])] = (int(cols[0]), int(cols[1]))
    return out


@functools.lru_cache(maxsize=8)
def _map(exe: str) -> tuple[dict, str]:
    """(map, "") or ({}, why not): one `npu-smi info -m` per npu-smi executable and process."""
    try:
        out = subprocess.run([exe, "info", "-m"], capture_output=True, text=True, errors="replace", timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return {}, f"`npu-smi info -m` failed: {type(e).__name__}"
    mapping = parse_map(out.stdout)
    if out.returncode or not mapping:
        return {}, f"`npu-smi info -m` gave no map (exit status {out.returncode}: {(out.stderr or out.stdout).strip()[:120]!r})"
    return mapping, ""


def target() -> Target:
    """The card and chip of this process's NPU; UserError for a malformed LLMBENCH_NPU_SMI_ID, Unmapped
    where npu-smi is missing or its map lacks the device."""
    override = os.environ.get("LLMBENCH_NPU_SMI_ID", "").strip()
    if override:
        m = re.fullmatch(r"(\d+)(?::(\d+))?", override)
        if not m:
            raise UserError(f"LLMBENCH_NPU_SMI_ID {override!r} is not a number; valid: an NPU ID, or NPU_ID:CHIP, "
                            "as `npu-smi info -m` lists them")
        return Target(int(m[1]), None if m[2] is None else int(m[2]), f"LLMBENCH_NPU_SMI_ID={override}")
    exe = shutil.which("npu-smi")
    if exe is None:
        raise Unmapped("npu-smi is not on PATH")
    mapping, why = _map(exe)
    dev = logical_device()
    if dev not in mapping:
        raise Unmapped((why or f"`npu-smi info -m` lists no chip with logical id {dev} ({sorted(mapping)})")
                       + "; set LLMBENCH_NPU_SMI_ID=NPU_ID[:CHIP]")
    npu, chip = mapping[dev]
    return Target(npu, chip, f"logical device {dev} is NPU {npu} chip {chip} (npu-smi info -m)")
