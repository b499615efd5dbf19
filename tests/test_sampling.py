"""SamplingParams validation and the Sampler (on hand-made logits; no model needed)."""
import math

import pytest
import torch

from npukit.engine.sampling import Sampler
from npukit.engine.sampling_params import SamplingParams
from npukit.engine.sequence import Sequence


def seq(params, prompt=(1, 2, 3), output=(), index=0):
    s = Sequence("r", list(prompt) + list(output), params, num_prompt_tokens=len(prompt), index=index)
    return s


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature must be >= 0 (0 = greedy), got -1"),
    (dict(temperature=float("inf")), "temperature must be finite"),
    (dict(temperature="hot"), "temperature must be a number"),
    (dict(n=0), "n must be an int >= 1, got 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_k=-2), "top_k must be -1 or 0 (off) or an int >= 1, got -2"),
    (dict(min_p=1.5), "min_p must be in [0, 1]"),
    (dict(repetition_penalty=0), "repetition_penalty must be in [0.0001, 10000]"),
    (dict(repetition_penalty=1e-300), "repetition_penalty must be in"),
    (dict(temperature=2**1100), "temperature is out of range"),
    (dict(top_k=2**70), "top_k must be"),
    (dict(seed=2**70), "seed must be None or an int in [-2**63, 2**64 - 1]"),
    (dict(stop=5), "stop must be a non-empty string"),
    (dict(stop=["x"] * 65), "at most 64 strings"),
    (dict(stop_token_ids=list(range(1025))), "at most 1024 ids"),
    (dict(presence_penalty=3), "presence_penalty must be in [-2, 2]"),
    (dict(frequency_penalty=-2.5), "frequency_penalty must be in [-2, 2]"),
    (dict(seed="42"), "seed must be None or an int"),
    (dict(max_tokens=0), "max_tokens must be None or an int >= 1, got 0"),
    (dict(min_tokens=-1), "min_tokens must be an int >= 0"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens (5) must be <= max_tokens (4)"),
    (dict(stop=""), "stop must be a non-empty string or a list of non-empty strings"),
    (dict(stop=["ok", 3]), "stop must be a non-empty string"),
    (dict(stop_token_ids=[-1]), "stop_token_ids must be a list of non-negative ints"),
    (dict(logprobs=-1), "logprobs must be None or an int in [0, 20]"),
    (dict(logprobs=21), "logprobs must be None or an int in [0, 20], got 21"),
    (dict(ignore_eos="yes"), "ignore_eos must be a bool"),
])
def test_invalid_params_are_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert message in str(e.value)


def test_params_normalise():
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=(7, 8), temperature=0)
    assert p.top_k == 0 and p.stop_list == ["###"] and p.stop_token_ids == [7, 8] and p.greedy
    assert not SamplingParams().greedy and SamplingParams().max_tokens == 16
    assert SamplingParams(seed=3).seed_for(0) == 3 and SamplingParams(seed=3).seed_for(1) != 3


def test_greedy_is_argmax_and_nonfinite_rows_are_reported():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    logits[1, 3] = float("nan")
    logits[2, 5] = float("inf")
    seqs = [seq(SamplingParams(temperature=0)) for _ in range(4)]
    out = Sampler()(logits, seqs)
    assert out.ok == [True, False, False, True]
    assert out.token_ids[0] == logits[0].argmax().item() and out.token_ids[3] == logits[3].argmax().item()
    all_masked = torch.full((1, 50), float("-inf"))
    assert Sampler()(all_masked, [seq(SamplingParams(temperature=0.7))]).ok == [False]


def test_temperature_sampling_follows_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    rows = 4000
    params = SamplingParams(temperature=0.8)
    out = Sampler()(logits.repeat(rows, 1), [seq(params) for _ in range(rows)])
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / rows
    expected = torch.softmax(logits / 0.8, dim=-1)
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


@pytest.mark.parametrize("kwargs, allowed", [
    (dict(top_k=2), {0, 1}),
    (dict(top_p=0.6), {0, 1}),       # probs ~ [.5, .3, .2]: mass before token 1 is .5 < .6
    (dict(top_p=0.4), {0}),
    (dict(min_p=0.5), {0, 1}),       # keeps p >= 0.5 * 0.5
    (dict(top_k=1), {0}),
])
def test_truncation_keeps_only_allowed_tokens(kwargs, allowed):
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().repeat(300, 1)
    out = Sampler()(logits, [seq(SamplingParams(temperature=1.0, **kwargs)) for _ in range(300)])
    assert set(out.token_ids) == allowed


def test_seeded_sampling_ignores_the_rest_of_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(6, 100)
    target = logits[2].clone()

    # alone, 8 draws in a row
    alone = seq(SamplingParams(temperature=1.0, seed=1234))
    solo = [Sampler()(target[None], [alone]).token_ids[0] for _ in range(8)]
    # in a batch of others (at another row, others unseeded), same 8 draws
    mixed = seq(SamplingParams(temperature=1.0, seed=1234))
    got = []
    for _ in range(8):
        others = [seq(SamplingParams(temperature=0.5)) for _ in range(5)]
        batch = torch.cat([torch.randn(3, 100), target[None], torch.randn(2, 100)])
        got.append(Sampler()(batch, others[:3] + [mixed] + others[3:]).token_ids[3])
    assert got == solo
    assert len(set(solo)) > 1  # really sampling
    other_seed = seq(SamplingParams(temperature=1.0, seed=99))
    assert [Sampler()(target[None], [other_seed]).token_ids[0] for _ in range(8)] != solo


def test_repetition_penalty_covers_prompt_and_output():
    logits = torch.tensor([[3.0, 2.9, -1.0, -1.1]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    # token 0 in the prompt: 3.0 / 2 = 1.5 < 2.9 -> token 1
    assert Sampler()(logits, [seq(p, prompt=[0])]).token_ids == [1]
    # token 0 in the output: same
    assert Sampler()(logits, [seq(p, prompt=[3], output=[0])]).token_ids == [1]
    # negative logits are multiplied: -1.0 * 2 = -2.0 < -1.1
    neg = torch.tensor([[-1.0, -1.1, -5.0, -5.0]])
    assert Sampler()(neg, [seq(p, prompt=[0])]).token_ids == [1]


def test_presence_and_frequency_penalties_cover_output_only():
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    pres = SamplingParams(temperature=0, presence_penalty=1.0)
    assert Sampler()(logits, [seq(pres, prompt=[0, 0, 0])]).token_ids == [0]  # prompt not penalised
    assert Sampler()(logits, [seq(pres, prompt=[2], output=[0])]).token_ids == [1]  # 3 - 1 < 2.5
    freq = SamplingParams(temperature=0, frequency_penalty=0.3)
    assert Sampler()(logits, [seq(freq, prompt=[2], output=[0])]).token_ids == [0]  # 3 - .3 > 2.5
    assert Sampler()(logits, [seq(freq, prompt=[2], output=[0, 0])]).token_ids == [1]  # 3 - .6 < 2.5


def test_min_tokens_masks_stop_tokens_until_reached():
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    p = SamplingParams(temperature=0, min_tokens=2)
    assert Sampler()(logits, [seq(p, output=[1])], stop_ids=[[0]]).token_ids == [1]
    assert Sampler()(logits, [seq(p, output=[1, 1])], stop_ids=[[0]]).token_ids == [0]


def test_logprobs_are_raw_topk_plus_sampled():
    torch.manual_seed(2)
    logits = torch.randn(3, 30)
    seqs = [seq(SamplingParams(temperature=0, logprobs=3)),
            seq(SamplingParams(temperature=5.0, logprobs=0, seed=7)),
            seq(SamplingParams(temperature=0))]
    out = Sampler()(logits, seqs)
    ref = torch.log_softmax(logits, -1)
    top3 = ref[0].topk(3)
    assert out.logprobs[0] == pytest.approx(dict(zip(top3.indices.tolist(), top3.values.tolist())))
    assert list(out.logprobs[1]) == [out.token_ids[1]]
    assert out.logprobs[1][out.token_ids[1]] == pytest.approx(ref[1, out.token_ids[1]].item())
    assert out.logprobs[2] is None
    assert math.isclose(out.sampled_logprobs[0], ref[0].max().item(), rel_tol=1e-6)


def reference_allowed(row, top_k, top_p, min_p):
    """The tokens a row may sample, by the book: min_p, then top_k, then top_p over a full sort."""
    probs = torch.softmax(row, -1)
    x = row.masked_fill(probs < min_p * probs.max(), float("-inf"))
    order = x.argsort(descending=True)
    sorted_x = x[order]
    if top_k:
        sorted_x[top_k:] = float("-inf")
    sp = torch.softmax(sorted_x, -1)
    keep = ((sp.cumsum(-1) - sp) < top_p) & (sorted_x > float("-inf"))
    return set(order[keep].tolist())


@pytest.mark.parametrize("top_k, top_p, min_p", [(0, 0.5, 0.0), (0, 0.9, 0.05), (300, 0.95, 0.0), (40, 1.0, 0.0)])
def test_truncation_on_a_large_flat_vocabulary_matches_a_full_sort(top_k, top_p, min_p):
    # a flat distribution: top_p needs far more than the first 256 candidates
    g = torch.Generator().manual_seed(0)
    row = torch.randn(4000, generator=g) * 0.5
    allowed = reference_allowed(row, top_k, top_p, min_p)
    rows = 600
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p)
    got = set(Sampler()(row.repeat(rows, 1), [seq(params) for _ in range(rows)]).token_ids)
    assert got <= allowed
    ranks = {t: r for r, t in enumerate(row.argsort(descending=True).tolist())}
    assert max(ranks[t] for t in got) > min(256, len(allowed) // 2)  # really sampled deep into the set
