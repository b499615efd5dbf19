"""Read `npu-smi` output: the Ascend driver's view of the NPUs (like `nvidia-smi`).

    chips = parse_npu_smi_info(text)          # `npu-smi info`: one NpuChip per chip
    mem = parse_npu_smi_usagemem(text)        # `npu-smi info -t usagemem -i 0`: {field: number}

The doctor runs the real `npu-smi` when it is on PATH and parses its answer with these functions. The
`SAMPLE_*` texts show the format on machines without an NPU (notebook 00); they are **samples**, written
in npu-smi's layout with made-up numbers, not a measurement of any machine.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# NOTE: a sample in the layout of `npu-smi info` on an Atlas 800T A2 (910B chips, 64 GB HBM each); two of
# its eight NPUs are shown. The driver version and every number are illustrative.
SAMPLE_NPU_SMI_INFO = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 24.1.rc2                 Version: 24.1.rc2                                             |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B3               | OK            | 96.1        38                0    / 0             |
| 0                         | 0000:C1:00.0  | 0           0    / 0          3398 / 65536         |
+===========================+===============+====================================================+
| 1     910B3               | OK            | 312.7       47                0    / 0             |
| 0                         | 0000:C2:00.0  | 87          0    / 0          52194/ 65536         |
+===========================+===============+====================================================+
+---------------------------+---------------+----------------------------------------------------+
| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |
+===========================+===============+====================================================+
| No running processes found in NPU 0                                                            |
+===========================+===============+====================================================+
| 1       0                 | 48213         | python3                  | 48796                   |
+===========================+===============+====================================================+
"""

# NOTE: a sample in the key : value layout of `npu-smi info -t usagemem -i 0` (numbers illustrative).
SAMPLE_NPU_SMI_USAGEMEM = """\
        DDR Capacity(MB)               : 15171
        DDR Usage Rate(%)              : 3
        HBM Capacity(MB)               : 65536
        HBM Usage Rate(%)              : 5
"""


@dataclass
class NpuChip:
    """One chip of one NPU as `npu-smi info` lists it (memory in MB, as npu-smi prints it)."""

    npu: int
    chip: int
    name: str
    health: str
    power_w: float | None
    temp_c: float | None
    aicore_percent: float | None
    bus_id: str
    memory_used_mb: int | None
    memory_total_mb: int | None
    hbm_used_mb: int | None = None
    hbm_total_mb: int | None = None

    @property
    def used_mb(self) -> int | None:
        """Device memory in use: HBM where the chip has it (910B), else its memory column (310P)."""
        return self.hbm_used_mb if self.hbm_total_mb else self.memory_used_mb

    @property
    def total_mb(self) -> int | None:
        return self.hbm_total_mb if self.hbm_total_mb else self.memory_total_mb


_HEALTH = re.compile(r"^(OK|Warning|Alarm|Critical|Unknown|NA)$", re.IGNORECASE)
_BUS_ID = re.compile(r"^[0-9A-Fa-f]{4}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f]$")
_PAIR = re.compile(r"(\d+)\s*/\s*(\d+)")
_KEY_VALUE = re.compile(r"^\s*([^:]+?)\s*:\s*(\S.*?)\s*$")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # npu-smi prints NA where a sensor has no value


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_npu_smi_info(text: str) -> list[NpuChip]:
    """The chips listed by `npu-smi info` (910B layout with an HBM column, or 310P without one).

    Each chip takes two table rows: ``NPU Name | Health | Power Temp Hugepages`` then
    ``Chip [Device] | Bus-Id | AICore Memory-Usage [HBM-Usage]``. The process table is ignored.
    """
    chips: list[NpuChip] = []
    head: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = _cells(line)
        if len(cells) < 3:
            head = None
            continue
        first = cells[0].split()
        if len(first) >= 2 and first[0].isdigit() and _HEALTH.match(cells[1]):
            head = cells
            continue
        if head is not None and first and first[0].isdigit() and _BUS_ID.match(cells[1]):
            npu_id, name = head[0].split()[:2]
            power_temp = head[2].split()
            pairs = [(int(a), int(b)) for a, b in _PAIR.findall(cells[2])]
            (mem_used, mem_total), hbm = (pairs[0] if pairs else (None, None)), (pairs[1] if len(pairs) > 1 else None)
            chips.append(NpuChip(
                npu=int(npu_id), chip=int(first[0]), name=name, health=head[1],
                power_w=_number(power_temp[0]) if power_temp else None,
                temp_c=_number(power_temp[1]) if len(power_temp) > 1 else None,
                aicore_percent=_number(cells[2].split()[0]) if cells[2] else None, bus_id=cells[1],
                memory_used_mb=mem_used, memory_total_mb=mem_total,
                hbm_used_mb=hbm[0] if hbm else None, hbm_total_mb=hbm[1] if hbm else None))
        head = None
    return chips


def parse_npu_smi_usagemem(text: str) -> dict[str, float]:
    """The ``Field(unit) : value`` lines of `npu-smi info -t usagemem -i N` as numbers (others skipped)."""
    fields: dict[str, float] = {}
    for line in text.splitlines():
        m = _KEY_VALUE.match(line)
        if m and (value := _number(m.group(2))) is not None:
            fields[m.group(1)] = value
    return fields


def describe_chips(chips: list[NpuChip]) -> str:
    """One line per chip: ``npu 0 chip 0 910B3 OK, 3398 / 65536 MB in use, AICore 0%``."""
    lines = []
    for c in chips:
        mem = f"{c.used_mb} / {c.total_mb} MB in use" if c.total_mb else "memory unknown"
        aicore = f", AICore {c.aicore_percent:.0f}%" if c.aicore_percent is not None else ""
        lines.append(f"npu {c.npu} chip {c.chip} {c.name} {c.health}, {mem}{aicore}")
    return "\n".join(lines)
