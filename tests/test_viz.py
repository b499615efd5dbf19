"""npukit.viz: the drawings of notebooks 05-08 (no model needed: step logs and metrics are built by hand)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from npukit import viz
from npukit.bench.workload import schedule_result, static_schedule
from npukit.metrics import RequestMetrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_plot_shows_itself_as_png():
    fig, ax = viz.new_plot(3, 2)
    ax.plot([0, 1], [1, 0])
    assert fig._repr_png_().startswith(PNG_MAGIC)
    assert repr(fig).startswith("<Plot size")  # the notebook's text/plain: stable, no address


def test_slot_of_matches_the_formula_and_rejects_positions_outside_the_table():
    table = [7, 2, 9]
    assert [viz.slot_of(table, p, 4) for p in (0, 3, 4, 9)] == [28, 31, 8, 37]
    with pytest.raises(ValueError, match="outside the 3 blocks of 4 tokens"):
        viz.slot_of(table, 12, 4)


def test_block_tables_mark_shared_blocks_and_the_highlighted_slot():
    fig = viz.draw_block_tables({"A": [0, 1, 3], "B": [0, 1, 2]}, {"A": 10, "B": 9}, block_size=4, num_blocks=8,
                                highlight=("B", 9))
    ax_logical, ax_pool = fig.axes
    pool = texts(ax_pool)
    assert pool[:4] == ["0\n×2", "1\n×2", "2", "3"] and len(pool) == 8  # one label per physical block
    assert "(4/8 used" in ax_pool.get_title()
    assert "slot 2 × 4 + 1 = 9" in ax_logical.get_title()  # B's token 9 is in its block 2 (physical 2), offset 1
    assert fig.png().startswith(PNG_MAGIC)


@pytest.mark.parametrize("tables, tokens, num_blocks, message", [
    ({}, {}, None, "block_tables is empty"),
    ({"A": [0]}, {}, None, "num_tokens has no entry"),
    ({"A": [0]}, {"A": 5}, None, "do not fit in 1 blocks"),
    ({"A": [0, 9]}, {"A": 5}, 4, "outside the pool of 4 blocks"),
])
def test_block_tables_bad_input(tables, tokens, num_blocks, message):
    with pytest.raises(ValueError, match=message):
        viz.draw_block_tables(tables, tokens, block_size=4, num_blocks=num_blocks)


def test_timeline_rows_of_a_static_schedule():
    run = schedule_result(static_schedule([3, 1, 2], batch_size=2), [3, 1, 2], batch_size=2)
    tokens, held = viz.timeline_rows(run, x="step")
    assert tokens == {"0": [1.0, 2.0, 3.0], "1": [1.0], "2": [4.0, 5.0]}
    # request 1 finishes after one step but holds its place until its batch is done
    assert held == {"0": [(0.0, 3.0)], "1": [(0.0, 3.0)], "2": [(3.0, 5.0)]}
    with pytest.raises(ValueError, match="x must be 'step' or 'time'"):
        viz.timeline_rows(run, x="tokens")


def test_timeline_rows_split_when_a_request_leaves_the_batch():
    from npukit.bench.workload import StepRecord, WorkloadRun

    # request 0 is preempted after step 1 and admitted again at step 3
    steps = [StepRecord(0, 0.5, ["0", "1"], ["0", "1"]), StepRecord(1, 1.0, ["0", "1"], ["0", "1"]),
             StepRecord(2, 1.5, ["1"], ["1"]), StepRecord(3, 2.5, ["0"], ["0"])]
    run = WorkloadRun("r", [RequestMetrics(0.0), RequestMetrics(0.0)], steps, wall_time=2.5)
    tokens, held = viz.timeline_rows(run, x="time")
    assert held == {"0": [(0.0, 1.0), (1.5, 2.5)], "1": [(0.0, 1.5)]}
    assert tokens == {"0": [0.5, 1.0, 2.5], "1": [0.5, 1.0, 1.5]}


def test_draw_timeline_one_row_per_request():
    run = schedule_result(static_schedule([3, 1, 2], batch_size=2), [3, 1, 2], batch_size=2)
    fig = viz.draw_timeline(*viz.timeline_rows(run), title="static")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["req 2", "req 1", "req 0"]
    assert len(ax.collections) == 3 + 3  # a held bar and the token ticks per request
    both = viz.draw_batching_comparison([run, run], titles=["a", "b"])
    assert [a.get_title() for a in both.axes] == ["a", "b"]
    assert both.axes[0].get_xlim() == both.axes[1].get_xlim()


def _metrics(ttft: float, gaps: list[float]) -> RequestMetrics:
    m = RequestMetrics(arrival_time=0.0, num_prompt_tokens=4)
    t = ttft
    m.record_token(t)
    for g in gaps:
        t += g
        m.record_token(t)
    m.finish(t)
    return m


def test_latency_histograms_and_boxes():
    ms = [_metrics(0.1, [0.02, 0.03]), _metrics(0.2, [0.02]), _metrics(0.3, [])]
    fig = viz.draw_latency_histograms(ms)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["TTFT (3 values)", "TPOT (2 values)", "ITL (3 values)"]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["mean 200.0 ms", "median 200.0 ms", "p99 298.0 ms"]  # numpy linear: 200 + 0.98 * 100
    with pytest.raises(ValueError, match="nothing to plot"):
        viz.draw_latency_histograms([])
    run = SimpleNamespace(label="r", metrics=ms)
    box = viz.draw_latency_boxes([run, run])
    assert [t.get_text() for t in box.axes[0].get_xticklabels()] == ["TTFT\nr", "TPOT\nr"] * 2


def test_draw_sweep_and_bench_concurrency():
    runs = [SimpleNamespace(output_throughput=10.0 * i, metrics=[_metrics(0.1 * i, [0.01])]) for i in (1, 2)]
    fig = viz.draw_sweep("max_num_seqs", [1, 8], runs)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "8"]
    assert [p.get_height() for p in ax.patches] == [10.0, 20.0]
    with pytest.raises(ValueError, match="one run per value"):
        viz.draw_sweep("block_size", [1], runs)

    def bench(c):
        keys = {f"{s}_{k}_ms": c * (1 + i) for i, s in enumerate(("mean", "median", "p99")) for k in ("ttft", "tpot")}
        return SimpleNamespace(summary={**keys, "output_throughput": 5.0 * c})

    fig = viz.draw_bench_concurrency([1, 4], [bench(1), bench(4)])
    assert [a.get_title() for a in fig.axes] == ["TTFT vs concurrency", "TPOT vs concurrency", "output throughput"]
    assert list(fig.axes[2].lines[0].get_ydata()) == [5.0, 20.0]
    with pytest.raises(ValueError, match="concurrencies for"):
        viz.draw_bench_concurrency([1], [])
