"""`npukit doctor`: check the Python / torch / torch_npu / CANN stack and explain what is wrong.

    report = npukit.doctor()       # or: npukit doctor [--json]
    report.ok                      # False when any check FAILs
    print(report)                  # a table; notebooks render report._repr_html_()

Each check is a small function `check_xxx(env) -> Check` over an `Environment` snapshot
(versions, CANN, device, environment variables), so checks are plain functions that tests can
feed a made-up environment. `probe_environment()` is the only place that looks at the machine.
"""
from __future__ import annotations

import html
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging.version import InvalidVersion, Version

from npukit.i18n import t
from npukit.npu_smi import (  # noqa: F401
    SAMPLE_NPU_SMI_INFO,
    SAMPLE_NPU_SMI_USAGEMEM,
    describe_chips,
    parse_npu_smi_info,
    parse_npu_smi_usagemem,
)

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
STATUSES = (PASS, WARN, FAIL)

SET_ENV = "source /usr/local/Ascend/ascend-toolkit/set_env.sh"
MIN_PYTHON = (3, 10)
MIN_TRANSFORMERS = "4.56"


@dataclass
class Check:
    """One line of the report: what was checked, how it went, and what to do about it."""

    name: str
    status: str  # PASS | WARN | FAIL
    detail: str
    advice: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"Check status must be one of {STATUSES}, got {self.status!r}")


@dataclass
class DoctorReport:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        """True when no check FAILed (WARNs are fine)."""
        return not any(c.status == FAIL for c in self.checks)

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(c.status == s for c in self.checks) for s in STATUSES}

    def __getitem__(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; checks: {', '.join(c.name for c in self.checks)}")

    def summary(self) -> str:
        n = self.counts
        verdict = t("doctor.verdict_ok") if self.ok else t("doctor.verdict_fail")
        return t("doctor.summary", passed=n[PASS], warned=n[WARN], failed=n[FAIL], verdict=verdict)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "counts": self.counts, "checks": [asdict(c) for c in self.checks]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def __str__(self) -> str:
        width = max((len(c.name) for c in self.checks), default=0)
        lines = [self.summary()]
        for c in self.checks:
            lines.append(f"  {c.status}  {c.name:<{width}}  {c.detail}")
            if c.advice and c.status != PASS:  # PASS advice is informational: JSON / HTML only
                lines.append(f"  {'':4}  {'':<{width}}  -> {c.advice}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        colour = {PASS: "#1a7f37", WARN: "#9a6700", FAIL: "#cf222e"}
        rows = "".join(
            f"<tr><td style='color:{colour[c.status]};font-weight:bold'>{c.status}</td>"
            f"<td><code>{html.escape(c.name)}</code></td><td>{html.escape(c.detail)}</td>"
            f"<td>{html.escape(c.advice)}</td></tr>"
            for c in self.checks
        )
        return (
            f"<p><b>{html.escape(self.summary())}</b></p>"
            "<table><thead><tr>" + "".join(f"<th>{html.escape(t('doctor.col_' + col))}</th>"
                                           for col in ("status", "check", "detail", "advice")) + "</tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )


# ---------------------------------------------------------------------------------------------
# torch_npu <-> torch <-> CANN pairing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairingRow:
    """torch_npu[i] is built for torch[i]; the whole row is released for one CANN version."""

    torch_npu: tuple[str, ...]
    torch: tuple[str, ...]
    cann: str


# NOTE: the Ascend/pytorch compatibility table (DESIGN.md), newest CANN first. Invariant (tested):
# Version(torch_npu[i]).base_version == torch[i], which is what "torch_npu needs the same torch" means.
PAIRING_TABLE: tuple[PairingRow, ...] = (
    PairingRow(("2.12.0", "2.11.0", "2.10.0.post4", "2.9.0.post6", "2.7.1.post8"),
               ("2.12.0", "2.11.0", "2.10.0", "2.9.0", "2.7.1"), "9.1.0"),
    PairingRow(("2.9.0.post2", "2.8.0.post4", "2.7.1.post4"),
               ("2.9.0", "2.8.0", "2.7.1"), "9.0.0"),
    PairingRow(("2.9.0", "2.8.0.post2", "2.7.1.post2", "2.6.0.post5"),
               ("2.9.0", "2.8.0", "2.7.1", "2.6.0"), "8.5.0"),
    PairingRow(("2.8.0", "2.7.1", "2.6.0.post3"),
               ("2.8.0", "2.7.1", "2.6.0"), "8.3.RC1"),
    PairingRow(("2.6.0", "2.5.1.post1"),
               ("2.6.0", "2.5.1"), "8.2.RC1"),
    PairingRow(("2.5.1", "2.4.0.post4", "2.3.1.post6"),
               ("2.5.1", "2.4.0", "2.3.1"), "8.1.RC1"),
)

def _same_cann(a: str, b: str) -> bool:
    return a.strip().upper() == b.strip().upper()


def _row_for_torch_npu(torch_npu: Version) -> PairingRow | None:
    for row in PAIRING_TABLE:
        if any(Version(v) == Version(torch_npu.public) for v in row.torch_npu):
            return row
    return None


def pairs_for_cann(cann: str) -> list[tuple[str, str]]:
    """The (torch_npu, torch) pairs the table lists for a CANN version; [] when it is not in the table."""
    return [pair for row in PAIRING_TABLE if _same_cann(row.cann, cann) for pair in zip(row.torch_npu, row.torch)]


def _format_pairs(pairs: list[tuple[str, str]]) -> str:
    return ", ".join(f"torch_npu {n} + torch {t}" for n, t in pairs)


def check_pairing(torch_npu: str | None, torch: str, cann: str | None) -> Check:
    """Is (torch_npu, torch, CANN) a combination from the official table?

    FAIL when torch_npu was built for another torch (their base versions must match), PASS for a row
    of the table, WARN when the combination is not in the table or CANN is unknown.
    """
    name = "pairing"
    if torch_npu is None:
        return Check(name, PASS, t("doctor.pairing.no_npu"))
    try:
        npu_v, torch_v = Version(torch_npu), Version(torch)
    except InvalidVersion as e:
        return Check(name, WARN, t("doctor.pairing.bad_version", error=e), t("doctor.pairing.bad_version_advice"))

    # NOTE: torch_npu X.Y.Z[.postN] is compiled against torch X.Y.Z exactly; anything else fails at import.
    if npu_v.base_version != torch_v.base_version:
        fits_torch = [(n, c) for row in PAIRING_TABLE for n, t in zip(row.torch_npu, row.torch)
                      for c in [row.cann] if t == torch_v.base_version]
        alt = t("doctor.pairing.or_keep_torch", choices=", ".join(f"torch_npu=={n} (CANN {c})" for n, c in fits_torch)
                ) if fits_torch else ""
        return Check(
            name, FAIL,
            t("doctor.pairing.torch_mismatch", torch_npu=torch_npu, wanted=npu_v.base_version, torch=torch),
            t("doctor.pairing.torch_mismatch_advice", wanted=npu_v.base_version, alt=alt),
        )

    row = _row_for_torch_npu(npu_v)
    if cann is None:
        expect = t("doctor.pairing.released_for", torch_npu=torch_npu, cann=row.cann) if row else \
            t("doctor.pairing.not_in_table", torch_npu=torch_npu)
        return Check(name, WARN, t("doctor.pairing.cann_unknown", expect=expect),
                     t("doctor.pairing.cann_unknown_advice", set_env=SET_ENV))
    if row is None:
        pairs = pairs_for_cann(cann)
        newest = PAIRING_TABLE[0]
        hint = (t("doctor.pairing.table_lists", cann=cann, pairs=_format_pairs(pairs)) if pairs else
                t("doctor.pairing.newest_known", cann=cann, newest=newest.cann,
                  pairs=_format_pairs(list(zip(newest.torch_npu, newest.torch)))))
        return Check(name, WARN, t("doctor.pairing.unknown_combo", torch_npu=torch_npu, torch=torch, cann=cann), hint)
    if _same_cann(row.cann, cann):
        return Check(name, PASS, t("doctor.pairing.good", torch_npu=torch_npu, torch=torch, cann=cann))
    pairs = pairs_for_cann(cann)
    alt = t("doctor.pairing.or_for_cann", cann=cann, pairs=_format_pairs(pairs)) if pairs else ""
    return Check(
        name, WARN,
        t("doctor.pairing.cann_mismatch", torch_npu=torch_npu, wanted=row.cann, cann=cann),
        t("doctor.pairing.cann_mismatch_advice", wanted=row.cann, alt=alt),
    )


# ---------------------------------------------------------------------------------------------
# CANN lookup
# ---------------------------------------------------------------------------------------------

CANN_ENV_VARS = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH")


def default_cann_roots(home: str | os.PathLike | None = None) -> list[Path]:
    """Where CANN toolkits usually live (root install, then the per-user install under $HOME)."""
    home = Path(home) if home else Path.home()
    return [
        Path("/usr/local/Ascend/ascend-toolkit/latest"),
        Path("/usr/local/Ascend/cann"),  # CANN >= 8.5 layout
        home / "Ascend/ascend-toolkit/latest",
        home / "Ascend/cann",
    ]


def _read_install_info(path: Path) -> str | None:
    # ascend_toolkit_install.info: "package_name=Ascend-cann-toolkit\nversion=8.3.RC1\n..."
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip().lower() == "version" and value.strip():
            return value.strip()
    return None


def _read_version_cfg(path: Path) -> str | None:
    # version.cfg: "toolkit_running_version=[7.6.0.1.220:8.0.0]" (inner version : CANN version)
    found: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"\s*(\w+)_running_version\s*=\s*\[([^\]]*)\]", line)
        if m and m.group(2).strip():
            value = m.group(2).split(":")[-1].strip()
            found[m.group(1)] = value.removeprefix("CANN-")
    for component in ("toolkit", "runtime", "compiler"):
        if component in found:
            return found[component]
    return next(iter(found.values()), None)


def read_cann_version(root: str | os.PathLike) -> str | None:
    """The CANN version of the toolkit at `root` (e.g. /usr/local/Ascend/ascend-toolkit/latest), or None.

    Reads `<root>/<arch>-linux/ascend_toolkit_install.info` (its `version=` line), else
    `<root>/version.cfg` (`toolkit_running_version=[inner:CANN]`). `root` may also be the folder
    that holds `latest/`.
    """
    root = Path(root)
    for base in (root, root / "latest"):
        if not base.is_dir():
            continue
        for info in sorted(base.glob("*-linux/ascend_toolkit_install.info")):
            if version := _read_install_info(info):
                return version
        cfg = base / "version.cfg"
        if cfg.is_file() and (version := _read_version_cfg(cfg)):
            return version
    return None


@dataclass
class CannInfo:
    version: str | None
    root: str | None
    sourced: bool  # True when ASCEND_TOOLKIT_HOME / ASCEND_HOME_PATH is set (set_env.sh was sourced)


def find_cann(environ: Mapping[str, str] | None = None, roots: list[Path] | None = None) -> CannInfo:
    """Look for CANN: first where the environment variables point, then in the usual places."""
    environ = os.environ if environ is None else environ
    env_roots = [Path(environ[v]) for v in CANN_ENV_VARS if environ.get(v)]
    candidates = env_roots + (default_cann_roots(environ.get("HOME")) if roots is None else list(roots))
    for root in candidates:
        try:
            version = read_cann_version(root)
        except OSError:
            continue
        if version:
            return CannInfo(version, str(root), bool(env_roots))
    return CannInfo(None, str(env_roots[0]) if env_roots else None, bool(env_roots))


# ---------------------------------------------------------------------------------------------
# Known problems: error text -> what to do
# ---------------------------------------------------------------------------------------------

# NOTE: (substring to look for in an error message, message key of the explanation in npukit/locales/).
# Lower-case substrings; every matching entry is reported, in this order.
KNOWN_PROBLEMS: tuple[tuple[str, str], ...] = (
    ("undefined symbol", "problem.undefined_symbol"),
    ("libatb.so", "problem.libatb"),
    ("failed to infer device type", "problem.infer_device"),
    ("libascend_hal.so", "problem.libascend_hal"),
    ("libascendcl.so", "problem.cann_libraries"),
    ("libhccl.so", "problem.cann_libraries"),
    ("no module named 'ml_dtypes'", "problem.ml_dtypes"),
    ("no module named 'torch_npu'", "problem.no_torch_npu"),
    ("permission denied", "problem.permission"),
    ("expandable_segments", "problem.expandable_segments"),
    ("out of memory", "problem.oom"),
    ("garbled", "problem.garbled_chinese"),
    ("乱码", "problem.garbled_chinese"),
)


def explain_error(message: str) -> str:
    """What a known error message means and what to do; "" when npukit does not know it."""
    text = message.lower()
    keys = dict.fromkeys(key for needle, key in KNOWN_PROBLEMS if needle in text)  # libascendcl + libhccl: once
    return "\n".join(t(key) for key in keys)


# ---------------------------------------------------------------------------------------------
# The environment snapshot
# ---------------------------------------------------------------------------------------------

PACKAGES = ("torch", "torch_npu", "transformers", "numpy", "ml_dtypes")


@dataclass
class DeviceFacts:
    kind: str | None = None  # npu | cuda | mps | cpu; None when torch is unusable
    name: str | None = None
    count: int = 0
    memory_total: int | None = None  # bytes
    memory_free: int | None = None
    bf16: bool | None = None
    bf16_reason: str = ""
    error: str | None = None  # why probing failed


@dataclass
class Environment:
    """Everything the checks look at. `probe_environment()` fills it from this machine."""

    python: tuple[int, int, int]
    packages: dict[str, str | None]  # distribution name -> version, None when not installed
    cann: CannInfo
    device: DeviceFacts
    environ: dict[str, str] = field(default_factory=dict, repr=False)  # NOTE: may hold tokens: never printed
    import_errors: dict[str, str] = field(default_factory=dict)  # module -> "Type: message"

    @property
    def torch_npu_installed(self) -> bool:
        return self.packages.get("torch_npu") is not None

    @property
    def on_npu(self) -> bool:
        """Looks like an Ascend machine: an NPU was found, or torch_npu / CANN are installed."""
        return self.device.kind == "npu" or self.torch_npu_installed or self.cann.version is not None


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]


def _probe_device(import_errors: dict[str, str]) -> DeviceFacts:
    try:
        import torch

        from npukit import device as dev
    except Exception as e:  # e.g. torch autoloads a mismatched torch_npu -> undefined symbol
        import_errors.setdefault("torch", _error_text(e))
        return DeviceFacts(error=_error_text(e))
    if _dist_version("torch_npu") is not None:
        try:
            import torch_npu  # noqa: F401
        except Exception as e:
            import_errors["torch_npu"] = _error_text(e)
    facts = DeviceFacts()
    try:
        facts.kind = dev.detect()
        facts.name = dev.device_name(facts.kind)
        facts.count = dev.device_count(facts.kind)
        mem = dev.memory_stats(facts.kind)
        facts.memory_total, facts.memory_free = mem.total, mem.free
        if facts.kind != "cpu":
            facts.bf16, facts.bf16_reason = dev.supports_dtype(facts.kind, torch.bfloat16)
        else:
            facts.bf16 = True
            cap = dev.cpu_isa_cap()
            facts.bf16_reason = (t("doctor.bf16.native") if dev.cpu_has_fast_bf16()
                                 else t("doctor.bf16.slow_cpu", cap=f" ({cap})" if cap else ""))
    except Exception as e:
        facts.error = _error_text(e)
    return facts


def probe_environment() -> Environment:
    """Read versions, CANN, the device and the environment variables of this process."""
    import_errors: dict[str, str] = {}
    packages = {name: _dist_version(name) for name in PACKAGES}
    device = _probe_device(import_errors) if packages["torch"] else DeviceFacts(error="torch is not installed")
    return Environment(
        python=tuple(sys.version_info[:3]),
        packages=packages,
        cann=find_cann(),
        device=device,
        environ=dict(os.environ),
        import_errors=import_errors,
    )


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


def _with_explanation(advice: str, error: str) -> str:
    extra = explain_error(error)
    return f"{advice} {extra}".strip() if extra else advice


def check_python(env: Environment) -> Check:
    v = ".".join(map(str, env.python))
    if env.python[:2] >= MIN_PYTHON:
        return Check("python", PASS, t("doctor.python.ok", version=v, system=platform.system(),
                                       machine=platform.machine()))
    need = ".".join(map(str, MIN_PYTHON))
    return Check("python", FAIL, t("doctor.python.old", version=v), t("doctor.python.old_advice", need=need))


def check_torch(env: Environment) -> Check:
    version = env.packages.get("torch")
    if version is None:
        return Check("torch", FAIL, t("doctor.torch.missing"), t("doctor.torch.missing_advice"))
    if "torch" in env.import_errors:
        err = env.import_errors["torch"]
        return Check("torch", FAIL, t("doctor.torch.import_error", version=version, error=err),
                     _with_explanation(t("doctor.torch.import_error_advice"), err))
    return Check("torch", PASS, t("doctor.version", package="torch", version=version))


def check_transformers(env: Environment) -> Check:
    version = env.packages.get("transformers")
    if version is None:
        return Check("transformers", FAIL, t("doctor.not_installed", package="transformers"),
                     f"pip install 'transformers>={MIN_TRANSFORMERS}'")
    if Version(version) < Version(MIN_TRANSFORMERS):
        return Check("transformers", WARN, t("doctor.transformers.old", version=version, need=MIN_TRANSFORMERS),
                     t("doctor.transformers.old_advice", need=MIN_TRANSFORMERS))
    return Check("transformers", PASS, t("doctor.version", package="transformers", version=version))


def check_numpy(env: Environment) -> Check:
    version = env.packages.get("numpy")
    if version is None:
        return Check("numpy", FAIL, t("doctor.not_installed", package="numpy"), "pip install numpy")
    return Check("numpy", PASS, t("doctor.version", package="numpy", version=version), t("doctor.numpy.advice"))


def check_ml_dtypes(env: Environment) -> Check:
    version = env.packages.get("ml_dtypes")
    if version is None:
        return Check("ml_dtypes", WARN, t("doctor.ml_dtypes.missing"), t("doctor.ml_dtypes.missing_advice"))
    return Check("ml_dtypes", PASS, t("doctor.version", package="ml-dtypes", version=version))


def check_torch_npu(env: Environment) -> Check:
    version = env.packages.get("torch_npu")
    if version is None:
        if env.cann.version:
            pairs = _format_pairs(pairs_for_cann(env.cann.version)) or t("doctor.pairing.see_table")
            return Check("torch_npu", WARN, t("doctor.torch_npu.cann_without", cann=env.cann.version),
                         t("doctor.torch_npu.cann_without_advice", pairs=pairs))
        return Check("torch_npu", PASS, t("doctor.torch_npu.absent"))
    if "torch_npu" in env.import_errors:
        err = env.import_errors["torch_npu"]
        return Check("torch_npu", FAIL, t("doctor.torch_npu.import_error", version=version, error=err),
                     _with_explanation(t("doctor.torch_npu.import_error_advice"), err))
    return Check("torch_npu", PASS, t("doctor.version", package="torch_npu", version=version))


def _set_env_script(root: Path) -> str:
    # ascend-toolkit/latest -> ascend-toolkit/set_env.sh; the CANN >= 8.5 layout keeps it in the root itself.
    for candidate in (root / "set_env.sh", root.parent / "set_env.sh"):
        if candidate.is_file():
            return str(candidate)
    return SET_ENV.removeprefix("source ")


def check_cann(env: Environment) -> Check:
    cann = env.cann
    if cann.version is None:
        if cann.sourced:
            return Check("cann", WARN, t("doctor.cann.no_version", root=cann.root), t("doctor.cann.no_version_advice"))
        if env.torch_npu_installed:
            return Check("cann", WARN, t("doctor.cann.missing"), t("doctor.cann.missing_advice", set_env=SET_ENV))
        return Check("cann", PASS, t("doctor.cann.absent"))
    if not cann.sourced:
        return Check("cann", WARN, t("doctor.cann.not_sourced", version=cann.version, root=cann.root),
                     t("doctor.cann.not_sourced_advice", script=_set_env_script(Path(cann.root))))
    return Check("cann", PASS, t("doctor.cann.ok", version=cann.version, root=cann.root))


def check_versions_pairing(env: Environment) -> Check:
    torch = env.packages.get("torch")
    if torch is None:
        return Check("pairing", WARN, t("doctor.pairing.no_torch"))
    return check_pairing(env.packages.get("torch_npu"), torch, env.cann.version)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def check_device(env: Environment) -> Check:
    d = env.device
    if d.kind is None or d.error:
        return Check("device", FAIL if d.kind is None else WARN, t("doctor.device.probe_failed", error=d.error),
                     _with_explanation(t("doctor.device.probe_failed_advice"), d.error or ""))
    detail = t("doctor.device.detail", kind=d.kind, name=d.name, count=d.count, total=_gib(d.memory_total),
               free=_gib(d.memory_free))
    if env.torch_npu_installed and d.kind != "npu":
        return Check("device", WARN, t("doctor.device.no_npu", detail=detail),
                     t("doctor.device.no_npu_advice", set_env=SET_ENV))
    return Check("device", PASS, detail)


def check_bf16(env: Environment) -> Check:
    d = env.device
    if d.kind is None or d.bf16 is None:
        return Check("bf16", WARN, t("doctor.bf16.unknown"))
    if not d.bf16:
        return Check("bf16", WARN, t("doctor.bf16.no", name=d.name, reason=d.bf16_reason), t("doctor.bf16.no_advice"))
    return Check("bf16", PASS, t("doctor.bf16.ok", kind=d.kind, reason=d.bf16_reason))


def check_npu_smi(env: Environment, timeout: float = 10.0) -> Check:
    exe = shutil.which("npu-smi", path=env.environ.get("PATH"))
    if exe is None:
        if env.on_npu:
            return Check("npu-smi", WARN, t("doctor.npu_smi.not_on_path"), t("doctor.npu_smi.not_on_path_advice"))
        return Check("npu-smi", PASS, t("doctor.npu_smi.absent"))
    # NOTE: guarded: a wedged driver can hang npu-smi, so it always runs with a timeout.
    try:
        out = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("npu-smi", WARN, t("doctor.npu_smi.failed", error=_error_text(e)),
                     t("doctor.npu_smi.failed_advice"))
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().splitlines()
        return Check("npu-smi", WARN, t("doctor.npu_smi.exited", code=out.returncode, message=msg[0] if msg else ""),
                     t("doctor.npu_smi.exited_advice"))
    first = next((ln.strip("|+= ").strip() for ln in out.stdout.splitlines() if "npu-smi" in ln.lower()), "")
    detail = t("doctor.npu_smi.works", exe=exe, version=': ' + first.split()[1] if len(first.split()) > 1 else '')
    chips = parse_npu_smi_info(out.stdout)
    if chips:
        detail += t("doctor.npu_smi.chips", count=len(chips), chips="; ".join(describe_chips(chips).splitlines()))
    sick = [c for c in chips if c.health.upper() != "OK"]
    if sick:
        return Check("npu-smi", WARN, detail, t("doctor.npu_smi.sick_advice", npu=sick[0].npu, health=sick[0].health))
    return Check("npu-smi", PASS, detail)


def _writable(path: Path) -> tuple[bool, str]:
    """Can we write in `path` (or create it)? Tries a real temporary file: root ignores permission bits."""
    target = path
    while not target.exists():
        if target.parent == target:
            return False, t("doctor.writable.no_parent", path=path)
        target = target.parent
    if not target.is_dir():
        return False, t("doctor.writable.is_file", path=path, target=target)
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".npukit-doctor-"):
            pass
    except OSError as e:
        return False, f"{target}: {_error_text(e)}"
    return True, str(path) if target == path else t("doctor.writable.created_in", path=path, target=target)


def _npukit_home(environ: Mapping[str, str]) -> Path:
    # NOTE: same rule as npukit.samples.npukit_home(): $NPUKIT_HOME, else ~/.cache/npukit. Kept here so the
    # check can use the snapshot's environ (and does not import the samples module).
    if environ.get("NPUKIT_HOME"):
        return Path(environ["NPUKIT_HOME"]).expanduser()
    home = environ.get("HOME")
    return (Path(home) if home else Path.home()) / ".cache" / "npukit"


def check_home(env: Environment) -> Check:
    home = env.environ.get("HOME")
    if not home:
        return Check("home", FAIL, t("doctor.home.unset"), t("doctor.home.unset_advice"))
    ok, where = _writable(Path(home))
    if not ok:
        return Check("home", FAIL, t("doctor.home.not_writable", where=where), t("doctor.home.not_writable_advice"))
    return Check("home", PASS, t("doctor.home.ok", home=home), t("doctor.home.ok_advice"))


def check_cache(env: Environment) -> Check:
    path = _npukit_home(env.environ)
    ok, where = _writable(path)
    if not ok:
        return Check("cache", FAIL, t("doctor.cache.not_writable", where=where), t("doctor.cache.not_writable_advice"))
    return Check("cache", PASS, t("doctor.cache.ok", where=where))


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def check_alloc_conf(env: Environment) -> Check:
    name, value = "PYTORCH_NPU_ALLOC_CONF", env.environ.get("PYTORCH_NPU_ALLOC_CONF")
    graph_note = t("doctor.alloc.graph_note")
    if value is None:
        if env.on_npu:
            return Check(name, WARN, t("doctor.alloc.unset_npu"),
                         t("doctor.alloc.unset_npu_advice", graph_note=graph_note))
        return Check(name, PASS, t("doctor.alloc.unset"))
    if "expandable_segments:true" in value.replace(" ", "").lower():
        return Check(name, PASS, value, graph_note)
    return Check(name, PASS, value, t("doctor.alloc.other_advice"))


def check_hf_endpoint(env: Environment) -> Check:
    name, value = "HF_ENDPOINT", env.environ.get("HF_ENDPOINT")
    if value:
        return Check(name, PASS, t("doctor.hf_endpoint.set", value=value), t("doctor.hf_endpoint.set_advice"))
    return Check(name, PASS, t("doctor.hf_endpoint.unset"), t("doctor.hf_endpoint.unset_advice"))


def check_hf_offline(env: Environment) -> Check:
    name, value = "HF_HUB_OFFLINE", env.environ.get("HF_HUB_OFFLINE")
    if _truthy(value):
        return Check(name, PASS, t("doctor.hf_offline.on", value=value), t("doctor.hf_offline.on_advice"))
    return Check(name, PASS, t("doctor.hf_offline.online") if value is None else
                 t("doctor.hf_offline.value_online", value=value))


def check_visible_devices(env: Environment) -> Check:
    name, value = "ASCEND_RT_VISIBLE_DEVICES", env.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    if value is None:
        return Check(name, PASS, t("doctor.visible.unset_npu") if env.on_npu else t("doctor.visible.unset"))
    if not value.strip():
        return Check(name, WARN, t("doctor.visible.empty"), t("doctor.visible.empty_advice"))
    return Check(name, PASS, t("doctor.visible.set", value=value))


def check_autoload(env: Environment) -> Check:
    name, value = "TORCH_DEVICE_BACKEND_AUTOLOAD", env.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD")
    if value is not None and value.strip() == "0":
        if env.torch_npu_installed:
            return Check(name, WARN, t("doctor.autoload.off_npu"), t("doctor.autoload.off_npu_advice"))
        return Check(name, PASS, t("doctor.autoload.off"))
    return Check(name, PASS, t("doctor.autoload.unset") if value is None else value, t("doctor.autoload.advice"))


# NOTE: the order of the report. A check may be added anywhere; each must return one Check and never raise
# (doctor() still guards them, turning a crash into a WARN).
CHECKS: list[Callable[[Environment], Check]] = [
    check_python, check_torch, check_transformers, check_numpy, check_ml_dtypes,
    check_torch_npu, check_cann, check_versions_pairing,
    check_device, check_bf16, check_npu_smi,
    check_home, check_cache,
    check_alloc_conf, check_hf_endpoint, check_hf_offline, check_visible_devices, check_autoload,
]


def doctor(env: Environment | None = None) -> DoctorReport:
    """Run every check in CHECKS over `env` (default: this machine) and return the report.

    Messages follow npukit's language (NPUKIT_LANG / the locale / npukit.set_language); check names stay English
    (they are ids: report["pairing"]).
    """
    env = probe_environment() if env is None else env
    checks = []
    for fn in CHECKS:
        try:
            checks.append(fn(env))
        except Exception as e:  # a doctor that crashes helps nobody
            checks.append(Check(fn.__name__.removeprefix("check_"), WARN,
                                t("doctor.check_crashed", error=_error_text(e)), t("doctor.check_crashed_advice")))
    return DoctorReport(checks)
