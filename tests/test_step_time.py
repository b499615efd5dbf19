import pytest

from npukit import viz
from npukit.step_time import StepTime, bend, decode_step_times


def test_decode_step_times_measures_each_batch(tiny):
    model, tokenizer = tiny
    points = decode_step_times(model, tokenizer, batch_sizes=(1, 4, 16), context_len=20, repeats=3)
    assert [p.batch for p in points] == [1, 4, 16]
    for p in points:
        assert len(p.times) == 3 and all(t > 0 for t in p.times)
        assert p.min <= p.median <= p.max
        assert p.tokens_per_s == pytest.approx(p.batch / p.median)
        assert f"batch {p.batch:>3}" in str(p) and "n=3" in str(p)
    fig = viz.draw_step_times(points)
    assert fig.axes[0].get_xlabel() == "sequences decoding together" and fig.png()[:4] == b"\x89PNG"


def test_bend_is_the_first_batch_past_the_tolerance():
    pts = [StepTime(b, 32, [t]) for b, t in ((1, 0.010), (8, 0.012), (32, 0.016), (64, 0.030))]
    assert bend(pts) == 32            # 0.016 > 1.5 * 0.010
    assert bend(pts, tolerance=2.0) == 64
    assert bend(pts[:2]) is None      # all within 1.5x: memory-bound throughout


def test_bad_arguments_are_refused(tiny):
    with pytest.raises(ValueError):
        decode_step_times(*tiny, batch_sizes=(0,))
    with pytest.raises(ValueError):
        decode_step_times(*tiny, repeats=0)


def test_step_gaps_count_engine_steps_between_tokens():
    from types import SimpleNamespace

    from npukit.step_time import step_gaps

    rec = lambda step, *ids: SimpleNamespace(step=step, request_ids=list(ids))  # noqa: E731
    result = SimpleNamespace(steps=[rec(0, "0", "1"), rec(1, "0", "1"), rec(2, "0"), rec(3, "0"), rec(4, "1"),
                                    rec(5, "1")])
    assert step_gaps(result) == {"0": 1, "1": 3}  # request 1 waited steps 2 and 3 out


def test_step_gaps_on_a_real_preempting_run(tiny):
    from npukit.bench.workload import Workload, run_workload
    from npukit.engine import LLM
    from npukit.step_time import step_gaps

    model, tok = tiny
    workload = Workload([[100 + i] * 8 for i in range(4)], [24] * 4)
    roomy = run_workload(LLM(model, tok, num_kv_blocks=64, max_num_seqs=4), workload)
    tight = run_workload(LLM(model, tok, num_kv_blocks=6, max_num_seqs=4), workload)
    assert set(step_gaps(roomy).values()) == {1}
    assert tight.num_preemptions > 0
    assert all(step_gaps(tight)[rid] > 1 for rid in tight.preempted)
