"""npukit.doctor: the pairing table, CANN lookup on fake trees, each check on made-up environments, the report."""
from __future__ import annotations

import importlib
import json
import os
import stat
import sys

import pytest
from packaging.version import Version

from npukit.doctor import (
    CHECKS,
    FAIL,
    PAIRING_TABLE,
    PASS,
    WARN,
    CannInfo,
    Check,
    DeviceFacts,
    DoctorReport,
    Environment,
    check_alloc_conf,
    check_autoload,
    check_bf16,
    check_cache,
    check_cann,
    check_device,
    check_home,
    check_ml_dtypes,
    check_npu_smi,
    check_pairing,
    check_python,
    check_torch,
    check_torch_npu,
    check_visible_devices,
    doctor,
    explain_error,
    find_cann,
    pairs_for_cann,
    read_cann_version,
)

doctor_mod = importlib.import_module("npukit.doctor")


# ---------------------------------------------------------------------------------------------
# pairing
# ---------------------------------------------------------------------------------------------


def test_table_rows_pair_torch_npu_with_the_same_base_torch():
    for row in PAIRING_TABLE:
        assert len(row.torch_npu) == len(row.torch), row
        for npu, torch in zip(row.torch_npu, row.torch):
            assert Version(npu).base_version == torch, (npu, torch, row.cann)


def test_every_table_entry_passes():
    for row in PAIRING_TABLE:
        for npu, torch in zip(row.torch_npu, row.torch):
            check = check_pairing(npu, torch, row.cann)
            assert check.status == PASS, check
            assert npu in check.detail and row.cann in check.detail


@pytest.mark.parametrize("torch_npu, torch, cann", [
    ("2.7.1.post8", "2.7.1", "9.1.0"),
    ("2.10.0.post4", "2.10.0", "9.1.0"),
    ("2.9.0.post2", "2.9.0", "9.0.0"),
    ("2.6.0.post5", "2.6.0", "8.5.0"),
    ("2.6.0.post3", "2.6.0", "8.3.RC1"),
    ("2.8.0", "2.8.0+cpu", "8.3.rc1"),      # local torch build tag and lower-case RC are the same thing
    ("2.5.1.post1", "2.5.1", "8.2.RC1"),
    ("2.3.1.post6", "2.3.1", "8.1.RC1"),
])
def test_known_good_triples_pass(torch_npu, torch, cann):
    check = check_pairing(torch_npu, torch, cann)
    assert (check.name, check.status) == ("pairing", PASS)
    assert "known-good" in check.detail


@pytest.mark.parametrize("torch_npu, torch, cann, needed", [
    ("2.7.1.post8", "2.8.0", "9.1.0", "2.7.1"),
    ("2.9.0.post2", "2.7.1", "9.0.0", "2.9.0"),
    ("2.6.0", "2.5.1", "8.2.RC1", "2.6.0"),
    ("2.10.0.post4", "2.10.1", "9.1.0", "2.10.0"),
    ("2.4.0.post4", "2.13.0+cpu", None, "2.4.0"),   # a mismatch FAILs even when CANN is unknown
])
def test_torch_npu_torch_mismatch_fails_with_the_fix(torch_npu, torch, cann, needed):
    check = check_pairing(torch_npu, torch, cann)
    assert check.status == FAIL
    assert f"built for torch {needed}" in check.detail
    assert f"pip install torch=={needed}" in check.advice
    assert "undefined symbol" in check.advice


def test_mismatch_advice_offers_torch_npu_for_the_installed_torch():
    check = check_pairing("2.9.0.post2", "2.7.1", "9.0.0")
    # the table has torch_npu builds for torch 2.7.1 (e.g. 2.7.1.post4 for CANN 9.0.0)
    assert "torch_npu==2.7.1.post4 (CANN 9.0.0)" in check.advice


def test_cann_not_matching_the_row_warns_and_names_both():
    check = check_pairing("2.7.1.post8", "2.7.1", "8.3.RC1")
    assert check.status == WARN
    assert "released for CANN 9.1.0" in check.detail and "8.3.RC1" in check.detail
    assert "torch_npu 2.7.1 + torch 2.7.1" in check.advice  # what the table lists for the installed CANN


@pytest.mark.parametrize("torch_npu, torch, cann", [
    ("2.7.1.post99", "2.7.1", "9.1.0"),   # unknown post release
    ("2.1.0", "2.1.0", "7.0.0"),          # older than the table
    ("2.9.0.post2", "2.9.0", "10.0.0"),   # CANN not in the table
])
def test_combinations_outside_the_table_warn(torch_npu, torch, cann):
    check = check_pairing(torch_npu, torch, cann)
    assert check.status == WARN
    assert check.advice


def test_unknown_cann_warns_with_the_expected_version():
    check = check_pairing("2.9.0.post2", "2.9.0", None)
    assert check.status == WARN
    assert "CANN 9.0.0" in check.detail
    assert "set_env.sh" in check.advice


def test_no_torch_npu_is_nothing_to_pair():
    assert check_pairing(None, "2.13.0+cpu", None).status == PASS


def test_unparseable_versions_warn():
    check = check_pairing("not-a-version", "2.7.1", "9.1.0")
    assert check.status == WARN and "not-a-version" in check.detail


def test_pairs_for_cann():
    assert ("2.9.0.post2", "2.9.0") in pairs_for_cann("9.0.0")
    assert pairs_for_cann("8.3.rc1") == [("2.8.0", "2.8.0"), ("2.7.1", "2.7.1"), ("2.6.0.post3", "2.6.0")]
    assert pairs_for_cann("1.0") == []


# ---------------------------------------------------------------------------------------------
# CANN lookup on fake install trees
# ---------------------------------------------------------------------------------------------


def _fake_toolkit(root, version="8.3.RC1", arch="aarch64"):
    latest = root / "ascend-toolkit" / "latest"
    (latest / f"{arch}-linux").mkdir(parents=True)
    (latest / f"{arch}-linux" / "ascend_toolkit_install.info").write_text(
        f"package_name=Ascend-cann-toolkit\nversion={version}\ninnerversion=V100R001C23B123\narch={arch}\n")
    (root / "ascend-toolkit" / "set_env.sh").write_text("export ASCEND_TOOLKIT_HOME=...\n")
    return latest


def test_read_install_info(tmp_path):
    latest = _fake_toolkit(tmp_path, "8.3.RC1")
    assert read_cann_version(latest) == "8.3.RC1"
    assert read_cann_version(latest.parent) == "8.3.RC1"  # the folder that holds latest/ works too


def test_read_version_cfg_prefers_toolkit(tmp_path):
    (tmp_path / "version.cfg").write_text(
        "# version: 1.0\n"
        "runtime_running_version=[7.5.0.1.129:8.0.RC3]\n"
        "toolkit_running_version=[7.6.0.1.220:8.0.0]\n"
        "opp_running_version=[7.6.0.1.220:8.0.0]\n")
    assert read_cann_version(tmp_path) == "8.0.0"


def test_read_version_cfg_runtime_only(tmp_path):
    (tmp_path / "version.cfg").write_text("runtime_running_version=[7.3.0.1.231:9.1.0]\n")
    assert read_cann_version(tmp_path) == "9.1.0"


def test_install_info_wins_over_version_cfg(tmp_path):
    latest = _fake_toolkit(tmp_path, "9.1.0", arch="x86_64")
    (latest / "version.cfg").write_text("toolkit_running_version=[7.6.0.1.220:8.0.0]\n")
    assert read_cann_version(latest) == "9.1.0"


def test_read_cann_version_none_when_nothing_there(tmp_path):
    assert read_cann_version(tmp_path) is None
    assert read_cann_version(tmp_path / "missing") is None
    (tmp_path / "version.cfg").write_text("# version: 1.0\n")
    assert read_cann_version(tmp_path) is None


def test_find_cann_from_env_is_sourced(tmp_path):
    latest = _fake_toolkit(tmp_path, "9.0.0")
    info = find_cann({"ASCEND_TOOLKIT_HOME": str(latest)}, roots=[])
    assert info == CannInfo("9.0.0", str(latest), True)
    info = find_cann({"ASCEND_HOME_PATH": str(latest)}, roots=[])
    assert info.version == "9.0.0" and info.sourced


def test_find_cann_in_default_place_is_not_sourced(tmp_path):
    latest = _fake_toolkit(tmp_path, "8.5.0")
    info = find_cann({}, roots=[tmp_path / "nothing", latest])
    assert info == CannInfo("8.5.0", str(latest), False)


def test_find_cann_nothing(tmp_path):
    assert find_cann({}, roots=[tmp_path]) == CannInfo(None, None, False)
    info = find_cann({"ASCEND_TOOLKIT_HOME": str(tmp_path)}, roots=[])
    assert info == CannInfo(None, str(tmp_path), True)


# ---------------------------------------------------------------------------------------------
# checks over made-up environments
# ---------------------------------------------------------------------------------------------


def make_env(**kw) -> Environment:
    packages = {"torch": "2.13.0+cpu", "torch_npu": None, "transformers": "5.23.0", "numpy": "2.4.0",
                "ml_dtypes": "0.5.0"}
    packages.update(kw.pop("packages", {}))
    device = kw.pop("device", DeviceFacts("cpu", "x86_64", 1, 16 * 2**30, 8 * 2**30, True, "ok"))
    return Environment(python=kw.pop("python", (3, 11, 7)), packages=packages,
                       cann=kw.pop("cann", CannInfo(None, None, False)), device=device,
                       environ=kw.pop("environ", {}), import_errors=kw.pop("import_errors", {}))


NPU_910B = DeviceFacts("npu", "Ascend910B3", 8, 64 * 2**30, 60 * 2**30, True, "ok")
NPU_310P = DeviceFacts("npu", "Ascend310P3", 1, 24 * 2**30, 20 * 2**30, False, "Ascend310P3 has no bf16")


def test_python_version():
    assert check_python(make_env()).status == PASS
    old = check_python(make_env(python=(3, 9, 18)))
    assert old.status == FAIL and "3.10" in old.advice


def test_missing_torch_fails_and_import_error_is_explained():
    assert check_torch(make_env(packages={"torch": None})).status == FAIL
    check = check_torch(make_env(import_errors={
        "torch": "ImportError: libtorch_npu.so: undefined symbol: _ZN3c104impl8GPUTrace"}))
    assert check.status == FAIL
    assert "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in check.advice and "pairing" in check.advice


def test_ml_dtypes_missing_warns():
    check = check_ml_dtypes(make_env(packages={"ml_dtypes": None}))
    assert check.status == WARN and "pip install ml-dtypes" in check.advice
    assert check_ml_dtypes(make_env()).status == PASS


def test_torch_npu_checks():
    assert check_torch_npu(make_env()).status == PASS  # not installed, no CANN: a CPU box
    no_npu_pkg = check_torch_npu(make_env(cann=CannInfo("9.0.0", "/x", True)))
    assert no_npu_pkg.status == WARN and "torch_npu 2.9.0.post2 + torch 2.9.0" in no_npu_pkg.advice
    error = "OSError: libatb.so: cannot open shared object file"
    broken = check_torch_npu(make_env(packages={"torch_npu": "2.7.1.post8"}, import_errors={"torch_npu": error}))
    assert broken.status == FAIL and "nnal/atb/set_env.sh" in broken.advice


def test_cann_found_but_not_sourced_names_its_set_env(tmp_path):
    latest = _fake_toolkit(tmp_path, "9.1.0")
    check = check_cann(make_env(cann=find_cann({}, roots=[latest])))
    assert check.status == WARN
    assert f"source {tmp_path / 'ascend-toolkit' / 'set_env.sh'}" in check.advice
    assert check_cann(make_env(cann=find_cann({"ASCEND_TOOLKIT_HOME": str(latest)}, roots=[]))).status == PASS


def test_torch_npu_without_cann_warns():
    check = check_cann(make_env(packages={"torch_npu": "2.7.1.post8"}))
    assert check.status == WARN and "set_env.sh" in check.advice


def test_device_torch_npu_installed_but_no_npu_explains_infer_device_type():
    check = check_device(make_env(packages={"torch_npu": "2.7.1.post8"}))
    assert check.status == WARN and "Failed to infer device type" in check.advice
    ok = check_device(make_env(device=NPU_910B, packages={"torch_npu": "2.7.1.post8"}))
    assert ok.status == PASS and "Ascend910B3 x8" in ok.detail and "64.0 GiB" in ok.detail


def test_device_probe_failure_fails():
    check = check_device(make_env(device=DeviceFacts(error="ImportError: undefined symbol: foo")))
    assert check.status == FAIL and "npukit doctor" in check.advice


def test_bf16_on_310p_recommends_fp16():
    check = check_bf16(make_env(device=NPU_310P))
    assert check.status == WARN and "float16" in check.advice
    assert check_bf16(make_env(device=NPU_910B)).status == PASS


def test_alloc_conf_on_npu():
    npu = dict(device=NPU_910B, packages={"torch_npu": "2.7.1.post8"})
    unset = check_alloc_conf(make_env(**npu))
    assert unset.status == WARN
    assert "expandable_segments:True" in unset.advice and "graph" in unset.advice
    set_ = check_alloc_conf(make_env(environ={"PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True"}, **npu))
    assert set_.status == PASS and "enforce-eager" in set_.advice
    assert check_alloc_conf(make_env()).status == PASS  # irrelevant on CPU


def test_visible_devices_and_autoload():
    assert check_visible_devices(make_env(environ={"ASCEND_RT_VISIBLE_DEVICES": ""})).status == WARN
    assert check_visible_devices(make_env(environ={"ASCEND_RT_VISIBLE_DEVICES": "0,1"})).status == PASS
    off = check_autoload(make_env(environ={"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}, packages={"torch_npu": "2.7.1"}))
    assert off.status == WARN and "import torch_npu" in off.advice
    assert check_autoload(make_env(environ={"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"})).status == PASS


def test_home_and_cache(tmp_path):
    assert check_home(make_env(environ={})).status == FAIL
    assert check_home(make_env(environ={"HOME": str(tmp_path)})).status == PASS
    cache = check_cache(make_env(environ={"HOME": str(tmp_path)}))
    assert cache.status == PASS and str(tmp_path / ".cache" / "npukit") in cache.detail
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad = check_cache(make_env(environ={"NPUKIT_HOME": str(blocker / "cache")}))
    assert bad.status == FAIL and "NPUKIT_HOME" in bad.advice
    assert check_home(make_env(environ={"HOME": str(blocker)})).status == FAIL


def test_cache_folder_rule_matches_samples(tmp_path, monkeypatch):
    from npukit.samples import npukit_home

    monkeypatch.setenv("NPUKIT_HOME", str(tmp_path / "kit"))
    assert doctor_mod._npukit_home(os.environ) == npukit_home()
    monkeypatch.delenv("NPUKIT_HOME")
    assert doctor_mod._npukit_home(os.environ) == npukit_home()


def _fake_npu_smi(folder, body: str):
    exe = folder / "npu-smi"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def test_npu_smi_found_and_run(tmp_path):
    exe = _fake_npu_smi(tmp_path, 'echo "| npu-smi 24.1.rc2          Version: 24.1.rc2     |"')
    check = check_npu_smi(make_env(environ={"PATH": str(tmp_path)}))
    assert check.status == PASS and str(exe) in check.detail and "24.1.rc2" in check.detail


def test_npu_smi_failing_or_hanging_warns(tmp_path):
    _fake_npu_smi(tmp_path, 'echo "dcmi model initialized failed" >&2; exit 3')
    check = check_npu_smi(make_env(environ={"PATH": str(tmp_path)}))
    assert check.status == WARN and "exited 3" in check.detail and "dcmi" in check.detail
    _fake_npu_smi(tmp_path, "sleep 5")
    hung = check_npu_smi(make_env(environ={"PATH": str(tmp_path)}), timeout=0.3)
    assert hung.status == WARN and "TimeoutExpired" in hung.detail


def test_npu_smi_missing(tmp_path):
    assert check_npu_smi(make_env(environ={"PATH": str(tmp_path)})).status == PASS
    on_npu = check_npu_smi(make_env(environ={"PATH": str(tmp_path)}, packages={"torch_npu": "2.7.1"}))
    assert on_npu.status == WARN and "driver" in on_npu.advice


# ---------------------------------------------------------------------------------------------
# explain_error
# ---------------------------------------------------------------------------------------------


def test_explain_known_errors():
    assert "pairing" in explain_error("ImportError: /x/libtorch_npu.so: undefined symbol: _ZN2at4_ops")
    assert "set_env.sh" in explain_error('RuntimeError: Failed to infer device type')
    assert "pip install ml-dtypes" in explain_error("ModuleNotFoundError: No module named 'ml_dtypes'")
    assert "$HOME" in explain_error("mkdir: cannot create directory '/home/models': Permission denied")
    both = explain_error("libatb.so: undefined symbol: x")
    assert "ATB" in both and "pairing" in both


def test_explain_unknown_error_is_empty():
    assert explain_error("ZeroDivisionError: division by zero") == ""


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report() -> DoctorReport:
    return doctor()


def test_report_on_this_machine(report):
    names = [c.name for c in report.checks]
    assert len(names) == len(CHECKS) == len(set(names))
    assert all(c.status in (PASS, WARN, FAIL) for c in report.checks)
    assert report.ok == all(c.status != FAIL for c in report.checks)
    assert report["torch"].detail.startswith("torch 2.")
    with pytest.raises(KeyError, match="checks: python"):
        report["nope"]


def test_report_json_shape(report):
    data = json.loads(report.to_json())
    assert set(data) == {"ok", "counts", "checks"}
    assert data["ok"] == report.ok
    assert sum(data["counts"].values()) == len(data["checks"])
    assert all(set(c) == {"name", "status", "detail", "advice"} for c in data["checks"])


def test_report_text_and_html():
    rep = DoctorReport([Check("a", PASS, "fine", "just so you know"), Check("b<x>", FAIL, "broken", "fix <it>")])
    text = str(rep)
    assert text.splitlines()[0] == rep.summary() == "npukit doctor: 1 PASS, 0 WARN, 1 FAIL (fix the FAIL lines)"
    assert "-> fix <it>" in text and "just so you know" not in text  # PASS advice only in JSON / HTML
    page = rep._repr_html_()
    assert page.count("<tr>") == 3 and "b&lt;x&gt;" in page and "just so you know" in page
    assert not rep.ok and DoctorReport([Check("a", WARN, "meh")]).ok


def test_check_rejects_unknown_status():
    with pytest.raises(ValueError, match="PASS"):
        Check("x", "OK", "detail")


def test_a_crashing_check_becomes_a_warn(monkeypatch):
    def check_boom(env):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(doctor_mod, "CHECKS", [check_python, check_boom])
    rep = doctor(make_env())
    assert [c.status for c in rep.checks] == [PASS, WARN]
    assert rep.checks[1].name == "boom" and "kaboom" in rep.checks[1].detail


def test_npukit_doctor_is_callable_from_the_package():
    import npukit

    assert isinstance(npukit.doctor(make_env()), DoctorReport)
    assert isinstance(npukit.doctor(make_env()), DoctorReport)  # still callable once the module is bound
    assert sys.modules["npukit.doctor"] is doctor_mod
