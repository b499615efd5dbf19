import stat

from npukit.doctor import PASS, WARN, check_npu_smi
from npukit.npu_smi import (
    SAMPLE_NPU_SMI_INFO,
    SAMPLE_NPU_SMI_USAGEMEM,
    describe_chips,
    parse_npu_smi_info,
    parse_npu_smi_usagemem,
)
from tests.test_doctor import make_env

# The layout of a 310P card (Atlas 300I Duo): two chips per card, no HBM column, Device column in the chip row.
DUO_310P = """\
+--------------------------------------------------------------------------------------------------------+
| npu-smi 23.0.rc3                                 Version: 23.0.rc3                                     |
+-------------------------------+-----------------+------------------------------------------------------+
| NPU     Name                  | Health          | Power(W)     Temp(C)           Hugepages-Usage(page) |
| Chip    Device                | Bus-Id          | AICore(%)    Memory-Usage(MB)                        |
+===============================+=================+======================================================+
| 0       310P3                 | Alarm           | NA           55                0     / 0             |
| 0       0                     | 0000:01:00.0    | 0            1780 / 44280                            |
+-------------------------------+-----------------+------------------------------------------------------+
| 0       310P3                 | OK              | NA           54                0     / 0             |
| 1       1                     | 0000:01:00.0    | 12           43900/ 44280                            |
+===============================+=================+======================================================+
"""


def test_sample_info_parses_into_two_910b_chips():
    chips = parse_npu_smi_info(SAMPLE_NPU_SMI_INFO)
    assert [(c.npu, c.chip, c.name, c.health) for c in chips] == [(0, 0, "910B3", "OK"), (1, 0, "910B3", "OK")]
    assert (chips[0].hbm_used_mb, chips[0].hbm_total_mb, chips[0].memory_total_mb) == (3398, 65536, 0)
    assert (chips[1].used_mb, chips[1].total_mb, chips[1].power_w, chips[1].temp_c, chips[1].aicore_percent) == (
        52194, 65536, 312.7, 47, 87)
    assert describe_chips(chips).splitlines()[1] == "npu 1 chip 0 910B3 OK, 52194 / 65536 MB in use, AICore 87%"


def test_310p_layout_without_hbm_column():
    chips = parse_npu_smi_info(DUO_310P)
    assert [(c.npu, c.chip, c.health, c.power_w) for c in chips] == [(0, 0, "Alarm", None), (0, 1, "OK", None)]
    assert (chips[1].used_mb, chips[1].total_mb, chips[1].hbm_total_mb) == (43900, 44280, None)


def test_usagemem_fields_are_numbers():
    fields = parse_npu_smi_usagemem(SAMPLE_NPU_SMI_USAGEMEM)
    assert fields == {"DDR Capacity(MB)": 15171, "DDR Usage Rate(%)": 3, "HBM Capacity(MB)": 65536,
                      "HBM Usage Rate(%)": 5}
    assert parse_npu_smi_usagemem("garbage\nName : NA\n") == {}


def test_doctor_reads_a_real_npu_smi_with_the_parser(tmp_path):
    def fake(text):
        exe = tmp_path / "npu-smi"
        exe.write_text(f"#!/bin/sh\ncat <<'END'\n{text}END\n")
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)

    fake(SAMPLE_NPU_SMI_INFO)
    check = check_npu_smi(make_env(environ={"PATH": str(tmp_path)}))
    assert check.status == PASS and "24.1.rc2" in check.detail and "2 chip(s)" in check.detail
    assert "3398 / 65536 MB" in check.detail
    fake(DUO_310P)
    sick = check_npu_smi(make_env(environ={"PATH": str(tmp_path)}))
    assert sick.status == WARN and "Alarm" in sick.advice
