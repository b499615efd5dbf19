"""Dashboards without a kernel: set widget values, click buttons, read the widgets back.

Uses the tiny random Llama (fast); the notebooks and the browser test exercise SmolLM2.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig

from npukit.dashboards import GenerationDashboard, LatencyDashboard, PrecisionDashboard
from npukit.dashboards.base import Dashboard, action
from npukit.dashboards.generation import sampling_settings, stream_chat
from npukit.dashboards.latency import (
    kv_bytes_per_token,
    kv_cache_bytes,
    kv_cache_usage,
    kv_formula,
    synthetic_prompt_ids,
)
from npukit.dashboards.precision import compare_precisions, logit_drift
from npukit.metrics import format_bytes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def watch(widget, name: str = "value") -> list:
    """Record every new value of a widget trait."""
    seen: list = []
    widget.observe(lambda change: seen.append(change["new"]), names=name)
    return seen


# ------------------------------------------------------------------------------------------------
# base
# ------------------------------------------------------------------------------------------------


class _Boom(Dashboard):
    @action("working…")
    def run(self):
        raise RuntimeError("the device fell over")


def test_action_turns_errors_into_status_line():
    dash = _Boom()
    assert dash.run() is None  # did not raise
    assert isinstance(dash.last_error, RuntimeError)
    assert "RuntimeError: the device fell over" in dash.status.value
    assert not dash.busy


def test_cell_text_is_stable_and_short(tiny):
    model, tok = tiny
    dash = GenerationDashboard(model, tok)
    bundle = dash._repr_mimebundle_()
    assert bundle["text/plain"] == "GenerationDashboard(model='tiny-llama')"
    assert "model_id" in bundle["application/vnd.jupyter.widget-view+json"]


def test_loaded_model_needs_its_tokenizer(tiny):
    with pytest.raises(TypeError, match="pass the tokenizer"):
        GenerationDashboard(tiny[0])


# ------------------------------------------------------------------------------------------------
# precision
# ------------------------------------------------------------------------------------------------


def test_compare_precisions_memory_and_drift():
    steps: list[str] = []
    results = compare_precisions("tiny-llama", ["float16", "bfloat16"], device="cpu", prompt="Hello!",
                                 max_new_tokens=4, on_step=steps.append)
    by = {r.dtype: r for r in results}
    assert [r.dtype for r in results] == ["float32", "float16", "bfloat16"]  # reference first
    assert all(r.ok for r in results)
    assert by["float32"].max_logit_diff == 0.0 and by["float32"].top1_agreement == 1.0
    assert by["bfloat16"].weight_bytes * 2 == by["float32"].weight_bytes
    assert by["float16"].weight_bytes * 2 == by["float32"].weight_bytes
    # bf16 keeps 8 mantissa bits, fp16 11: both drift, bf16 more.
    assert 0 < by["float16"].max_logit_diff < by["bfloat16"].max_logit_diff
    assert 0 <= by["bfloat16"].top1_agreement <= 1
    assert len(by["float32"].token_ids) <= 4 and by["float32"].tokens_per_s > 0
    assert steps[:3] == ["float32: loaded", "float32: timed", "float32: compared"]


def test_logit_drift_numbers():
    ref = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    d = logit_drift(ref + torch.tensor([[0.0, 0.0, 0.5], [0.0, 1.5, 0.0]]), ref)
    assert d.max_abs == pytest.approx(1.5) and d.mean_abs == pytest.approx(2.0 / 6)
    assert d.top1_agreement == 0.5 and d.positions == 2
    with pytest.raises(ValueError, match="logit shapes differ"):
        logit_drift(ref[:1], ref)


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": "   "}, "prompt is empty"),
    ({"dtypes": ["float8"]}, "unknown dtype"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive int"),
])
def test_compare_precisions_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compare_precisions("tiny-llama", device="cpu", **kwargs)


def test_precision_dashboard_compare_click():
    dash = PrecisionDashboard("tiny-llama", device="cpu", prompt="Hi", max_new_tokens=3)
    assert "picks" in dash.auto_line.value
    dash.dtypes["float16"].value = False
    tables = watch(dash.table)
    dash.compare_button.click()
    assert dash.last_error is None, dash.last_error
    assert [r.dtype for r in dash.results] == ["float32", "bfloat16"]
    assert len(tables) >= 2  # the table grows as each precision finishes
    assert "bf16" in dash.table.value and "fp16" not in dash.table.value
    assert bytes(dash.chart.value).startswith(PNG_MAGIC)
    assert "done: 2 precisions" in dash.status.value
    assert dash.progress.value == dash.progress.max and not dash.compare_button.disabled


def test_precision_dashboard_unavailable_device_shows_error():
    dash = PrecisionDashboard("tiny-llama", device="cpu")
    dash.device.value = "npu"  # no NPU here
    assert "npu" in dash.auto_line.value
    dash.compare_button.click()
    assert type(dash.last_error).__name__ == "DeviceError"
    assert "torch_npu" in dash.status.value and dash.results == []
    assert not dash.compare_button.disabled


def test_precision_dashboard_dtype_the_device_lacks(monkeypatch):
    import npukit.device

    real = npukit.device.supports_dtype

    def no_bf16(dev, dtype):
        return (False, "this chip has no bf16 (like 310P)") if dtype == torch.bfloat16 else real(dev, dtype)

    monkeypatch.setattr(npukit.device, "supports_dtype", no_bf16)
    dash = PrecisionDashboard("tiny-llama", device="cpu", prompt="Hi", max_new_tokens=2)
    dash.run()
    assert dash.last_error is None
    by = {r.dtype: r for r in dash.results}
    assert not by["bfloat16"].ok and "no bf16" in by["bfloat16"].error
    assert by["float16"].ok and by["float32"].ok
    assert "bfloat16 not run" in dash.status.value and "not run" in dash.table.value


def test_precision_dashboard_wants_a_name(tiny):
    with pytest.raises(TypeError, match="pass its name or folder"):
        PrecisionDashboard(tiny[0])


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_stream_chat_pieces_and_timings(tiny):
    model, tok = tiny
    pieces: list[str] = []
    run = stream_chat(model, tok, MESSAGES, on_text=pieces.append, max_new_tokens=6)
    assert "".join(pieces) == run.text
    assert run.text == tok.decode(run.token_ids, skip_special_tokens=True)
    m = run.metrics
    assert 1 <= m.num_output_tokens == len(run.token_ids) <= 6
    assert m.ttft > 0 and m.e2e >= m.ttft
    assert run.finish_reason == ("stop" if run.token_ids[-1] == tok.eos_token_id else "length")
    assert run.settings["do_sample"] is False and run.settings["max_new_tokens"] == 6
    assert "TTFT" in run.readout()


def test_stream_chat_seeded_sampling_repeats(tiny):
    model, tok = tiny
    knobs = dict(do_sample=True, temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=8)
    a = stream_chat(model, tok, MESSAGES, seed=3, **knobs)
    b = stream_chat(model, tok, MESSAGES, seed=3, **knobs)
    assert a.token_ids == b.token_ids
    others = {tuple(stream_chat(model, tok, MESSAGES, seed=s, **knobs).token_ids) for s in range(4, 8)}
    assert len(others | {tuple(a.token_ids)}) > 1  # different seeds, different samples


@pytest.mark.parametrize("knobs, message", [
    ({"do_sample": True, "temperature": 0.0}, "temperature must be > 0"),
    ({"do_sample": True, "top_p": 0.0}, "top_p must be in"),
    ({"do_sample": True, "top_k": -1}, "top_k must be >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive int"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
])
def test_sampling_settings_bad_values(knobs, message):
    with pytest.raises(ValueError, match=message):
        sampling_settings(**knobs)


def test_sampling_settings_greedy_ignores_sampling_knobs():
    cfg = sampling_settings(do_sample=False, temperature=0.3, top_k=5, max_new_tokens=7)
    assert cfg.do_sample is False and cfg.temperature == 1.0 and cfg.max_new_tokens == 7


def test_generation_dashboard_streams_into_widget(tiny):
    model, tok = tiny
    dash = GenerationDashboard(model, tok, prompt="Hello!", max_new_tokens=12)
    dash.apply_preset("creative")  # sampling: a random model's text is then long enough to stream
    outputs, readouts = watch(dash.output), watch(dash.readout)
    dash.generate_button.click()
    assert dash.last_error is None, dash.last_error
    run = dash.runs[-1]
    assert len(outputs) >= 2  # streamed piece by piece, then the final render
    assert "Hello!" in dash.output.value
    assert readouts and "TTFT" in dash.readout.value
    assert f"{run.metrics.num_output_tokens} new tokens" in dash.readout.value
    assert "done:" in dash.status.value
    assert dash.runs_table.value.count("<tr>") == 2  # header + one run
    assert dash.progress.value == run.metrics.num_output_tokens


def test_generation_dashboard_presets_set_knobs(tiny):
    dash = GenerationDashboard(*tiny)
    assert dash.do_sample.value is False and dash.temperature.disabled
    dash.preset.value = "balanced"
    assert dash.do_sample.value is True and not dash.temperature.disabled
    assert (dash.temperature.value, dash.top_k.value, dash.top_p.value) == (0.7, 20, 0.8)
    assert dash.knobs()["repetition_penalty"] == 1.05


def test_generation_dashboard_seed_makes_sampling_repeatable(tiny):
    dash = GenerationDashboard(*tiny, max_new_tokens=8)
    dash.preset.value = "creative"
    dash.seed.value = 11
    dash.generate()
    dash.generate()
    assert dash.runs[0].token_ids == dash.runs[1].token_ids
    assert dash.runs[0].settings["seed"] == 11


def test_generation_dashboard_multi_turn_and_reset(tiny):
    dash = GenerationDashboard(*tiny, max_new_tokens=4)
    dash.keep_history.value = True
    dash.generate()
    dash.prompt.value = "And of Italy?"
    assert dash.messages("And of Italy?")[:2] == dash.history
    dash.generate()
    assert [m["role"] for m in dash.history] == ["user", "assistant"] * 2
    assert "2 turns in history" in dash.status.value
    dash.reset_button.click()
    assert dash.history == [] and "And of Italy?" not in dash.output.value


def test_generation_dashboard_shows_thinking_apart(tiny):
    dash = GenerationDashboard(*tiny)
    shown = dash._conversation_html("<think>France… capital… Paris</think>It is Paris.", "Capital of France?")
    assert "thinking:" in shown and "capital… Paris" in shown and "It is Paris." in shown


def test_generation_dashboard_errors_in_status(tiny):
    model, tok = tiny
    dash = GenerationDashboard(model, tok)
    dash.prompt.value = "  "
    dash.generate_button.click()
    assert "prompt is empty" in dash.status.value and dash.runs == []
    no_template = copy.deepcopy(tok)
    no_template.chat_template = None
    dash = GenerationDashboard(model, no_template)
    dash.generate_button.click()
    assert "no chat template" in dash.status.value and isinstance(dash.last_error, ValueError)


# ------------------------------------------------------------------------------------------------
# latency and KV cache
# ------------------------------------------------------------------------------------------------

SMOL_LIKE = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                        head_dim=64)


def test_kv_cache_formula():
    assert kv_bytes_per_token(SMOL_LIKE, torch.float32) == 2 * 30 * 3 * 64 * 4
    assert kv_cache_bytes(SMOL_LIKE, 1000, torch.bfloat16) == 2 * 30 * 3 * 64 * 2 * 1000
    assert "30 layers × 3 kv_heads × 64 head_dim × 2 bytes" in kv_formula(SMOL_LIKE, torch.bfloat16)
    with pytest.raises(ValueError, match="num_tokens must be >= 0"):
        kv_cache_bytes(SMOL_LIKE, -1)


def test_kv_cache_usage_contiguous_vs_paged():
    u = kv_cache_usage([1, 16, 17], max_model_len=32, bytes_per_token=10, block_size=16)
    assert (u.tokens, u.used_bytes, u.contiguous_bytes, u.paged_bytes) == (34, 340, 960, 640)
    assert u.contiguous_waste == pytest.approx(1 - 34 / 96)
    assert u.paged_waste == pytest.approx(1 - 34 / 64)
    with pytest.raises(ValueError, match="lengths is empty"):
        kv_cache_usage([], 32, 10)
    with pytest.raises(ValueError, match="outside 0..max_model_len=32"):
        kv_cache_usage([40], 32, 10)


def test_synthetic_prompt_is_exact_length(tiny):
    tok = tiny[1]
    for n in (1, 7, 300):
        assert len(synthetic_prompt_ids(tok, n)) == n
    with pytest.raises(ValueError, match="num_tokens must be >= 1"):
        synthetic_prompt_ids(tok, 0)


def test_latency_dashboard_runs_with_and_without_cache(tiny):
    model, tok = tiny
    dash = LatencyDashboard(model, tok, prompt_tokens=8, max_new_tokens=5, repeats=2, cache="both")
    assert "2 (K and V) × 2 layers × 2 kv_heads × 16 head_dim × 4 bytes" in dash.formula.value
    charts = watch(dash.chart)
    dash.run_button.click()
    assert dash.last_error is None, dash.last_error
    assert set(dash.results) == {True, False}
    for runs in dash.results.values():
        assert len(runs) == 2
        assert all(r.metrics.num_output_tokens == 5 and r.metrics.num_prompt_tokens == 8 for r in runs)
    # both settings decode greedily from the same prompt: the cache changes speed, not the tokens.
    assert dash.results[True][0].token_ids == dash.results[False][0].token_ids
    assert len(charts) == 4 and bytes(dash.chart.value).startswith(PNG_MAGIC)  # redrawn after every run
    assert "KV cache" in dash.summary.value and "no cache" in dash.summary.value
    assert format_bytes((8 + 5) * 2 * 2 * 2 * 16 * 4) in dash.summary.value  # K/V kept at the end of a run
    assert dash.progress.value == 4


def test_latency_dashboard_too_long_is_an_error(tiny):
    dash = LatencyDashboard(*tiny, cache="with KV cache")
    dash.prompt_tokens.value = 1024
    dash.max_new_tokens.value = 16
    dash.run()
    assert "exceeds the model" in dash.status.value and "context (1024)" in dash.status.value
    assert dash.results == {}


def test_snapshot_is_a_static_png_of_the_last_run(tiny):
    model, tok = tiny
    dash = LatencyDashboard(model, tok, prompt_tokens=8, max_new_tokens=4, repeats=1, cache="both")
    with pytest.raises(ValueError, match="run it first"):
        dash.snapshot()
    dash.run()
    snap = dash.snapshot()
    assert snap._repr_png_() == bytes(dash.chart.value) and snap._repr_png_().startswith(PNG_MAGIC)
    assert repr(snap) == "<static chart: LatencyDashboard(model='tiny-llama'), last run>"


def test_generation_dashboard_snapshot_draws_the_token_stream(tiny):
    model, tok = tiny
    dash = GenerationDashboard(model, tok, prompt="Hello!", max_new_tokens=6)
    with pytest.raises(ValueError):
        dash.snapshot()
    dash.generate()
    assert dash.snapshot()._repr_png_().startswith(PNG_MAGIC)
