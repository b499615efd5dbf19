"""Messages in Chinese: the catalogues, the language setting, and the doctor / CLI / dashboards / plots in zh."""
from __future__ import annotations

import re
import string
import warnings

import pytest

from npukit import cjk, i18n
from npukit.i18n import t
from npukit.locales import en, zh

CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture
def lang_zh():
    i18n.set_language("zh")
    yield
    i18n.set_language(None)


def fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


# --- the catalogues -----------------------------------------------------------------------------------


def test_zh_has_every_english_key_with_the_same_fields():
    missing = sorted(set(en.MESSAGES) - set(zh.MESSAGES))
    assert not missing, f"add to npukit/locales/zh.py: {missing}"
    assert not sorted(set(zh.MESSAGES) - set(en.MESSAGES)), "zh keys that English lacks"
    for key, template in en.MESSAGES.items():
        assert fields(zh.MESSAGES[key]) == fields(template), key


def test_zh_messages_are_chinese_where_english_has_words():
    # a zh message with no Chinese character is an untranslated copy (ids, units and numbers excepted)
    same = [k for k, v in zh.MESSAGES.items() if not CJK.search(v) and re.search(r"[a-z]{3,} [a-z]{3,}", en.MESSAGES[k])
            and v == en.MESSAGES[k]]
    allowed = {"doctor.version", "problem.ml_dtypes"}
    assert set(same) <= allowed, sorted(set(same) - allowed)


def test_unknown_key_raises_and_missing_zh_key_falls_back_to_english(monkeypatch):
    with pytest.raises(KeyError, match="no message"):
        t("no.such.key")
    monkeypatch.delitem(zh.MESSAGES, "dash.run")
    assert t("dash.run", lang="zh") == "Run"


@pytest.mark.parametrize("environ, expected", [
    ({}, "en"),
    ({"LANG": "zh_CN.UTF-8"}, "zh"),
    ({"LANG": "en_US.UTF-8", "LC_ALL": "zh_CN.UTF-8"}, "zh"),
    ({"LANG": "zh_CN.UTF-8", "NPUKIT_LANG": "en"}, "en"),
    ({"NPUKIT_LANG": "zh"}, "zh"),
    ({"LC_ALL": "C"}, "en"),
])
def test_language_comes_from_npukit_lang_then_the_locale(environ, expected):
    assert i18n.detect_language(environ) == expected


def test_set_language_wins_over_the_environment_until_reset(monkeypatch):
    monkeypatch.setenv("NPUKIT_LANG", "en")
    try:
        assert i18n.set_language("zh_CN") == "zh" and t("dash.run") == "运行"
    finally:
        i18n.set_language(None)
    assert t("dash.run") == "Run"
    monkeypatch.setenv("NPUKIT_LANG", "zh")
    assert t("dash.run") == "运行"  # read on every call: no restart needed
    with pytest.raises(ValueError, match="unknown language"):
        i18n.set_language("")


def test_prompts_follow_the_language(lang_zh):
    assert i18n.prompt("capital") == "法国的首都是哪里？"
    assert i18n.prompt("capital", lang="en") == "What is the capital of France?"


# --- doctor, explain_error, the CLI ----------------------------------------------------------------


def test_doctor_speaks_chinese(lang_zh):
    from test_doctor import make_env  # noqa: I001  (tests/ is on sys.path under pytest)

    from npukit.doctor import doctor

    report = doctor(make_env(packages={"torch_npu": "2.7.1.post4", "torch": "2.8.0"}))
    text = str(report)
    assert text.startswith("npukit doctor：") and "请先修复 FAIL 项" in text
    assert "torch_npu 2.7.1.post4 是为 torch 2.7.1 编译的" in report["pairing"].detail
    assert "pip install torch==2.7.1" in report["pairing"].advice
    assert "<th>状态</th>" in report._repr_html_()
    assert "编译" in report.to_json()  # `npukit doctor --json` keeps Chinese readable (no \\u escapes)


def test_explain_error_in_chinese(lang_zh):
    from npukit.doctor import explain_error

    advice = explain_error("ImportError: libhccl.so and libascendcl.so: cannot open shared object file")
    assert advice.count("CANN 的动态库不在库搜索路径中") == 1  # one explanation, however many needles match
    assert "版本不配套" in explain_error("undefined symbol: _ZN3c10")
    assert explain_error("a message npukit does not know") == ""


def test_cli_errors_in_chinese(monkeypatch, capsys):
    from npukit.cli import main

    monkeypatch.setenv("NPUKIT_LANG", "zh")
    assert main(["plan"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("npukit: 错误：npukit plan 需要一个模型")


def test_cli_error_adds_the_explanation(monkeypatch, capsys):
    from npukit.args import error

    monkeypatch.setenv("NPUKIT_LANG", "zh")
    assert error("could not load 'x': NPU out of memory") == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "npukit: 错误：could not load 'x': NPU out of memory" and "设备内存" in err[1]


# --- dashboards and plots ----------------------------------------------------------------------------


def test_dashboard_labels_in_chinese(lang_zh, tiny):
    from npukit.dashboards import GenerationDashboard, LatencyDashboard

    gen = GenerationDashboard(*tiny)
    assert gen.generate_button.description == "生成" and gen.prompt.value == "法国的首都是哪里？"
    assert "生成参数" in gen.widget.children[0].value
    lat = LatencyDashboard(*tiny, prompt_tokens=4, max_new_tokens=2, repeats=1, cache="with KV cache")
    assert lat.run_button.description == "运行" and ("使用 KV Cache", "with KV cache") in lat.cache.options
    lat.run()
    assert lat.last_error is None and "完成：共 1 次运行" in lat.status.value and "内存峰值" in lat.summary.value


def test_plot_labels_use_a_cjk_font_when_there_is_one(lang_zh, monkeypatch):
    from matplotlib import rcParams

    monkeypatch.setattr(cjk, "find_cjk_font", lambda: "WenQuanYi Zen Hei")
    monkeypatch.setitem(rcParams, "font.sans-serif", ["DejaVu Sans"])
    assert cjk.plot_text("dash.latency.kv_title") == "单条序列的 KV Cache 大小"
    assert rcParams["font.sans-serif"][0] == "WenQuanYi Zen Hei"


def test_plot_labels_fall_back_to_english_without_a_cjk_font(lang_zh, monkeypatch):
    monkeypatch.setattr(cjk, "find_cjk_font", lambda: None)
    monkeypatch.setattr(cjk, "_warned", False)
    with pytest.warns(UserWarning, match="fonts-noto-cjk"):
        assert cjk.plot_text("dash.latency.kv_title") == "KV cache size of one sequence"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough
        assert cjk.plot_text("dash.latency.run") == "run"
    assert t("dash.latency.run") == "运行序号"  # widgets need no font: they stay Chinese


def test_chinese_plot_renders_without_missing_glyphs(lang_zh):
    font = cjk.find_cjk_font()
    if font is None:
        pytest.skip("no CJK font installed (scripts/test.sh installs fonts-noto-cjk)")
    from npukit.viz import new_plot

    fig, ax = new_plot(3, 2)
    ax.set_title(cjk.plot_text("dash.latency.kv_title"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "Glyph ... missing from font(s)" for empty boxes
        assert fig.png().startswith(b"\x89PNG")


def test_viz_plots_speak_chinese_with_a_cjk_font(lang_zh, monkeypatch):
    from matplotlib import rcParams

    from npukit import viz

    monkeypatch.setitem(rcParams, "font.sans-serif", list(rcParams["font.sans-serif"]))  # restored afterwards
    monkeypatch.setattr(cjk, "find_cjk_font", lambda: "Noto Sans CJK SC")
    fig = viz.draw_block_tables({"A": [0, 1]}, {"A": 20}, block_size=16, num_blocks=4)
    assert [ax.get_title() for ax in fig.axes] == ["块表（每块 16 个 Token）", "物理块池（已用 2/4；深色 = 共享）"]
    monkeypatch.setattr(cjk, "find_cjk_font", lambda: None)
    monkeypatch.setattr(cjk, "_warned", True)  # warned already
    fig = viz.draw_block_tables({"A": [0, 1]}, {"A": 20}, block_size=16, num_blocks=4)
    assert fig.axes[0].get_title() == "block tables (16 tokens per block)"
