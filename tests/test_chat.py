"""npukit.chat: chat template ids, thinking split, presets, multi-turn Chat with send / stream."""
from __future__ import annotations

import copy

import pytest
import torch

from npukit.chat import (
    PRESETS,
    Chat,
    apply_chat_template,
    generate_text,
    generation_config,
    render_chat_template,
    split_thinking,
)

MSGS = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "hello there"},
]


@pytest.fixture
def no_template(tiny):
    tok = copy.deepcopy(tiny[1])
    tok.chat_template = None
    return tok


def spy_generate(monkeypatch, model):
    """Record the input_ids every model.generate call receives."""
    seen = []
    real = model.generate

    def generate(*args, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return seen


# ---------------------------------------------------------------- chat template


def test_template_ids_equal_the_tokenizers_own(tiny):
    _, tok = tiny
    ids = apply_chat_template(tok, MSGS)
    assert isinstance(ids, list) and all(type(t) is int for t in ids)
    own = tok.apply_chat_template(MSGS, tokenize=True, add_generation_prompt=True)
    own = own["input_ids"] if not isinstance(own, list) else own
    assert ids == list(own)
    text = render_chat_template(tok, MSGS)
    assert text.endswith("<|im_start|>assistant\n")
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    no_prompt = apply_chat_template(tok, MSGS, add_generation_prompt=False)
    assert ids[: len(no_prompt)] == no_prompt and len(ids) > len(no_prompt)


def test_missing_chat_template_is_a_clear_error(tiny, no_template):
    model, _ = tiny
    with pytest.raises(ValueError, match="no chat template.*tokenizer.chat_template.*raw prompt"):
        apply_chat_template(no_template, MSGS)
    with pytest.raises(ValueError, match="no chat template"):
        Chat(model, no_template)
    # A raw prompt still works without a template.
    assert isinstance(generate_text(model, no_template, "hello", max_new_tokens=3), str)


def test_bad_messages(tiny):
    _, tok = tiny
    with pytest.raises(TypeError, match="not a string"):
        apply_chat_template(tok, "hello")
    with pytest.raises(TypeError, match="message 0 must be a dict with 'role' and 'content'"):
        apply_chat_template(tok, [{"text": "hello"}])


# ---------------------------------------------------------------- split_thinking


@pytest.mark.parametrize(
    "text, kwargs, expected",
    [
        ("<think>\nadd 2 and 2\n</think>\n\nIt is 4.", {}, ("add 2 and 2", "It is 4.")),
        # the template opened <think> in the prompt: the reply starts inside it
        ("add 2 and 2\n</think>\n\nIt is 4.", {}, ("add 2 and 2", "It is 4.")),
        # still streaming: no closing tag yet
        ("<think>\nadd 2 and", {}, ("add 2 and", "")),
        ("add 2 and", {"started_in_think": True}, ("add 2 and", "")),
        # Qwen3 with enable_thinking=False emits an empty block
        ("<think>\n\n</think>\n\nIt is 4.", {}, ("", "It is 4.")),
        # no tags: content untouched, whitespace included
        ("  It is 4.\n", {}, ("", "  It is 4.\n")),
        ("", {}, ("", "")),
    ],
)
def test_split_thinking(text, kwargs, expected):
    assert split_thinking(text, **kwargs) == expected


# ---------------------------------------------------------------- presets


def test_presets_and_generation_config():
    from transformers import GenerationConfig

    assert set(PRESETS) == {"greedy", "balanced", "creative"}
    for name, values in PRESETS.items():
        assert set(values) == {"do_sample", "temperature", "top_p", "top_k", "repetition_penalty"}
        cfg = generation_config(name)
        assert isinstance(cfg, GenerationConfig)
        assert {k: getattr(cfg, k) for k in values} == values
    cfg = generation_config("balanced", temperature=0.3, max_new_tokens=7)
    assert cfg.temperature == 0.3 and cfg.max_new_tokens == 7 and cfg.top_p == PRESETS["balanced"]["top_p"]
    assert PRESETS["balanced"]["temperature"] != 0.3  # overrides do not mutate the preset


def test_unknown_preset_and_option_errors(tiny):
    with pytest.raises(ValueError, match=r"unknown preset 'wild'.*\['balanced', 'creative', 'greedy'\]"):
        generation_config("wild")
    with pytest.raises(ValueError, match=r"unknown generation option\(s\) \['temprature'\]"):
        generation_config("greedy", temprature=0.5)
    with pytest.raises(ValueError, match="unknown preset"):
        Chat(*tiny, preset="wild")


# ---------------------------------------------------------------- Chat on the tiny model


def test_stream_pieces_equal_send(tiny):
    model, tok = tiny
    reply = Chat(model, tok, max_new_tokens=24).send("hello there")
    chat = Chat(model, tok, max_new_tokens=24)
    pieces = list(chat.stream("hello there"))
    assert len(pieces) > 1
    assert "".join(pieces) == reply
    assert chat.last_reply == reply and chat.history[-1] == {"role": "assistant", "content": reply}


def test_send_is_greedy_generate(tiny):
    model, tok = tiny
    chat = Chat(model, tok, max_new_tokens=10)
    ids = chat.prompt_ids("hi")
    reply = chat.send("hi", min_new_tokens=10)
    t = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=10, min_new_tokens=10,
                             do_sample=False)
    assert reply == tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_multi_turn_history_is_in_the_prompt(tiny, monkeypatch):
    model, tok = tiny
    seen = spy_generate(monkeypatch, model)
    chat = Chat(model, tok, system="You are brief.", max_new_tokens=8)
    first = chat.send("first question")
    assert chat.history == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": first},
    ]
    second = "".join(chat.stream("second question"))
    assert len(chat.history) == 4 and chat.history[3]["content"] == second == chat.last_reply
    assert chat.messages[0] == {"role": "system", "content": "You are brief."}
    assert len(chat.messages) == 5

    assert len(seen) == 2
    expected = apply_chat_template(
        tok,
        [{"role": "system", "content": "You are brief."},
         {"role": "user", "content": "first question"},
         {"role": "assistant", "content": first},
         {"role": "user", "content": "second question"}],
    )
    assert seen[1] == expected
    assert seen[1][: len(seen[0])] == seen[0]  # the second prompt starts with the whole first prompt
    second_prompt = tok.decode(seen[1])
    assert "first question" in second_prompt and first in second_prompt

    chat.reset()
    assert chat.history == [] and chat.last_reply == "" and len(chat.messages) == 1


def test_abandoned_stream_stops_and_leaves_history(tiny):
    model, tok = tiny
    chat = Chat(model, tok, max_new_tokens=200)
    gen = chat.stream("hello")
    next(gen)
    gen.close()  # stops generate at its next step and joins the thread
    assert chat.history == []


def test_stream_surfaces_generate_errors(tiny):
    chat = Chat(*tiny, max_new_tokens=5)
    with pytest.raises(ValueError, match="beam search"):
        list(chat.stream("hello", num_beams=2))  # raised in the generate thread, re-raised here
    assert chat.history == []


def test_send_stream_true_prints(tiny, capsys):
    model, tok = tiny
    chat = Chat(model, tok, max_new_tokens=8)
    reply = chat.send("hello", stream=True)
    assert capsys.readouterr().out == reply + "\n"


def test_sampling_preset_runs(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    a = Chat(model, tok, preset="creative", max_new_tokens=6).send("hello")
    torch.manual_seed(0)
    b = Chat(model, tok, preset="creative", max_new_tokens=6).send("hello")
    assert a == b  # seeded sampling is reproducible


def test_template_that_opens_think_puts_reply_into_reasoning(tiny):
    model, tok = tiny
    tok = copy.deepcopy(tok)
    # like DeepSeek-R1's template: the generation prompt already opens the think block
    tok.chat_template = tok.chat_template + "{% if add_generation_prompt %}<think>\n{% endif %}"
    assert render_chat_template(tok, MSGS).endswith("<think>\n")
    chat = Chat(model, tok, max_new_tokens=6)
    reply = chat.send("hello", min_new_tokens=6)
    # the random model never closes the block: everything it said is still reasoning
    assert reply == "" and chat.last_reasoning != ""


def test_send_rejects_non_text(tiny):
    with pytest.raises(TypeError, match="as a str"):
        Chat(*tiny).send(["hello"])


def test_generate_text(tiny):
    model, tok = tiny
    via_template = generate_text(model, tok, "hello", max_new_tokens=6)
    assert via_template == Chat(model, tok, max_new_tokens=6).send("hello")
    assert generate_text(model, tok, [{"role": "user", "content": "hello"}], max_new_tokens=6) == via_template
    raw = generate_text(model, tok, "hello", chat=False, max_new_tokens=6, min_new_tokens=6)
    assert isinstance(raw, str) and raw != ""


# ---------------------------------------------------------------- the real instruct model


@pytest.mark.slow
def test_smollm2_knows_paris(smol):
    chat = Chat(*smol, max_new_tokens=32)
    assert "Paris" in chat.send("What is the capital of France?")
