"""npukit.dashboards.engine: the engine-tuning dashboard, driven by setting widget values and clicking (no
kernel). Uses the tiny random Llama; the workloads and runs it wires up are tested in test_workload.py."""
from __future__ import annotations

import pytest

from npukit.dashboards.engine import EngineDashboard

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# the dashboard
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def dash(tiny):
    model, tok = tiny
    return EngineDashboard(model, tok, num_requests=5, prompt_len=12, output_len=6, max_num_seqs=2,
                           num_kv_blocks=32, block_size=4)


def test_dashboard_run_fills_table_and_chart(dash):
    assert dash.describe() == "EngineDashboard(model='tiny-llama')"
    assert dash._repr_mimebundle_()["text/plain"] == "EngineDashboard(model='tiny-llama')"
    dash.run_button.click()
    assert dash.last_error is None, dash.last_error
    assert "done: run 1: 5 requests" in dash.status.value
    assert dash.table.value.count("<tr>") == 2 and "run 1" in dash.table.value
    assert bytes(dash.chart.value).startswith(PNG_MAGIC)
    assert dash.last.config["max_num_seqs"] == 2 and not dash.run_button.disabled

    dash.max_num_seqs.value = 5
    dash.compare_static.value = True
    first_chart = bytes(dash.chart.value)
    dash.run_button.click()
    assert dash.last_error is None, dash.last_error
    assert [r.config["max_num_seqs"] for r in dash.runs] == [2, 5]
    assert dash.runs[1].num_steps < dash.runs[0].num_steps  # more sequences per step: fewer steps
    assert "HF static batches" in dash.table.value and dash.table.value.count("<tr>") == 4
    assert "static batches" in dash.status.value and bytes(dash.chart.value) != first_chart

    dash.clear_button.click()
    assert dash.runs == [] and dash.table.value == "" and "ready" in dash.status.value


def test_dashboard_capacity_line_follows_the_knobs(dash):
    before = dash.capacity.value
    assert "32 blocks × 4 tokens = 128 token slots" in before
    dash.num_kv_blocks.value = 8
    assert "8 blocks × 4 tokens = 32 token slots" in dash.capacity.value
    assert "about 1 of them fit" in dash.capacity.value  # the longest request needs 18 tokens = 5 blocks
    dash.num_kv_blocks.value = 4
    assert "not even one fits whole" in dash.capacity.value and "raise num_kv_blocks" in dash.capacity.value


@pytest.mark.parametrize("setting, message", [
    ({"num_kv_blocks": 2}, "whole KV cache holds 8"),
    ({"enable_chunked_prefill": False, "max_num_batched_tokens": 16, "prompt_len": 40},
     "chunked prefill is off, so a whole prompt must fit in one step: the longest prompt has"),
    ({"shared_prefix_len": 12}, "shared prefix tokens (12) must be fewer than prompt tokens (12)"),
])
def test_dashboard_bad_knobs_show_in_the_status_line(dash, setting, message):
    widgets = {"num_kv_blocks": dash.num_kv_blocks, "enable_chunked_prefill": dash.chunked_prefill,
               "max_num_batched_tokens": dash.max_num_batched_tokens, "prompt_len": dash.prompt_len,
               "shared_prefix_len": dash.shared_prefix_len}
    for name, value in setting.items():
        widgets[name].value = value
    dash.run_button.click()  # does not raise
    assert isinstance(dash.last_error, ValueError)
    assert "ValueError" in dash.status.value and message in dash.last_error.args[0]
    assert dash.runs == [] and not dash.busy and not dash.run_button.disabled
    # fix it: the dashboard still works
    dash.num_kv_blocks.value, dash.chunked_prefill.value, dash.shared_prefix_len.value = 32, True, 0
    dash.prompt_len.value = 12
    dash.run_button.click()
    assert dash.last_error is None and len(dash.runs) == 1
