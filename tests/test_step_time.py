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
