"""Chat on the Hugging Face path: chat template -> ``model.generate`` -> reply (+ reasoning).

- ``apply_chat_template``: messages -> a plain ``list[int]`` (whatever transformers returns).
- ``split_thinking``: ``<think>...</think>`` reasoning (Qwen3 / DeepSeek-R1) apart from the answer.
- ``PRESETS`` / ``generation_config``: greedy / balanced / creative sampling settings.
- ``Chat``: multi-turn history, ``send`` and ``stream`` (``TextIteratorStreamer`` in a thread).
- ``generate_text``: one prompt in, one reply out.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "THINK_START",
    "THINK_END",
    "PRESETS",
    "apply_chat_template",
    "render_chat_template",
    "split_thinking",
    "generation_config",
    "Chat",
    "generate_text",
]

THINK_START = "<think>"
THINK_END = "</think>"

# NOTE: the names are HF ``GenerationConfig`` fields. "greedy" spells out the neutral sampling values so a
# model's own sampling defaults (e.g. Qwen3's temperature=0.6) do not leak in and trigger
# "flags are not valid" warnings. top_k=0 means "no top-k filter" in transformers.
PRESETS: dict[str, dict[str, Any]] = {
    "greedy": {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0},
    "balanced": {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
    "creative": {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 0, "repetition_penalty": 1.0},
}


# --------------------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------------------


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"The tokenizer {name!r} has no chat template, so chat messages cannot be turned into a prompt. "
            "Either set one (tokenizer.chat_template = '<jinja template>', e.g. copied from the instruct "
            "version of the model's tokenizer_config.json), or use a base-model path with a raw prompt string "
            "(npukit.chat.generate_text(model, tokenizer, 'text', chat=False))."
        )


def _check_messages(messages) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        raise TypeError(
            "messages must be a list of {'role': ..., 'content': ...} dicts, not a string; "
            "wrap it: [{'role': 'user', 'content': text}]."
        )
    messages = list(messages)
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise TypeError(f"message {i} must be a dict with 'role' and 'content' keys, got {m!r}.")
    return messages


def render_chat_template(tokenizer, messages, add_generation_prompt: bool = True, **template_kwargs) -> str:
    """The prompt text the chat template builds (what ``apply_chat_template`` then tokenizes)."""
    _require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(
        _check_messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
    )


def apply_chat_template(tokenizer, messages, add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template, as a plain ``list[int]``.

    ``template_kwargs`` go to the template (e.g. ``enable_thinking=False`` for Qwen3).
    """
    _require_chat_template(tokenizer)
    out = tokenizer.apply_chat_template(
        _check_messages(messages), tokenize=True, add_generation_prompt=add_generation_prompt, **template_kwargs
    )
    # NOTE: transformers 5 returns a BatchEncoding (a Mapping) here; 4.x returned a list. Accept both,
    # and tensors / batched lists too.
    if isinstance(out, Mapping):
        out = out["input_ids"]
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    if out and isinstance(out[0], (list, tuple)):
        if len(out) != 1:
            raise ValueError(f"expected one conversation, the template returned {len(out)}.")
        out = out[0]
    return [int(t) for t in out]


def _prompt_opens_think(prompt_text: str) -> bool:
    """True when the prompt ends inside an open ``<think>`` block (the template already opened it)."""
    return prompt_text.rfind(THINK_START) > prompt_text.rfind(THINK_END)


def split_thinking(text: str, *, started_in_think: bool = False) -> tuple[str, str]:
    """Split a reply into ``(reasoning, content)``.

    - ``"<think>r</think>c"`` -> ``("r", "c")``
    - ``"r</think>c"`` (the template opened ``<think>`` in the prompt) -> ``("r", "c")``
    - ``"<think>r..."`` (still streaming, no ``</think>`` yet) -> ``("r...", "")``
    - ``"r..."`` with ``started_in_think=True`` (prompt opened the block, no tag seen yet) -> ``("r...", "")``
    - no tags -> ``("", text)`` with ``text`` unchanged.

    Both parts are stripped of surrounding whitespace whenever a think block was found.
    """
    end = text.find(THINK_END)
    if end >= 0:
        before, after = text[:end], text[end + len(THINK_END) :]
        start = before.find(THINK_START)
        if start >= 0:
            return before[start + len(THINK_START) :].strip(), (before[:start] + after).strip()
        return before.strip(), after.strip()
    start = text.find(THINK_START)
    if start >= 0:
        return text[start + len(THINK_START) :].strip(), text[:start].strip()
    if started_in_think:
        return text.strip(), ""
    return "", text


# --------------------------------------------------------------------------------------------------
# Generation settings
# --------------------------------------------------------------------------------------------------


def generation_config(preset: str = "greedy", **overrides):
    """A ``transformers.GenerationConfig`` from a preset name plus overrides (``max_new_tokens=128`` ...).

    Unset fields (eos / pad ids ...) are filled by ``generate`` from the model's own generation config.
    """
    from transformers import GenerationConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} or pass the settings yourself.")
    defaults = GenerationConfig()
    unknown = [k for k in overrides if not hasattr(defaults, k)]
    if unknown:
        raise ValueError(
            f"unknown generation option(s) {unknown}; use transformers.GenerationConfig names such as "
            "max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, min_new_tokens."
        )
    return GenerationConfig(**{**PRESETS[preset], **overrides})


def _generate_inputs(model, tokenizer, input_ids: list[int]) -> dict[str, Any]:
    ids = torch.tensor([input_ids], dtype=torch.long, device=model.device)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    # NOTE: fill ids the model's generation config lacks, so generate stops at the tokenizer's end of
    # turn and does not warn about a missing pad token.
    gen = model.generation_config
    if gen.eos_token_id is None and tokenizer.eos_token_id is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    if gen.pad_token_id is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is not None:
            kwargs["pad_token_id"] = pad
    return kwargs


def _stop_criteria(stop: threading.Event):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _StopOnEvent(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_StopOnEvent()])


def _stream_generate(model, tokenizer, input_ids: list[int], config) -> Iterator[str]:
    """Yield decoded text pieces while ``generate`` runs in a thread."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()
    error: list[BaseException] = []
    kwargs = _generate_inputs(model, tokenizer, input_ids)
    # NOTE: pass eos / pad overrides through the config, not as extra kwargs next to generation_config.
    for key in ("eos_token_id", "pad_token_id"):
        if key in kwargs:
            setattr(config, key, kwargs.pop(key))

    def run() -> None:
        try:
            with torch.inference_mode():
                model.generate(**kwargs, generation_config=config, streamer=streamer,
                               stopping_criteria=_stop_criteria(stop))
        except BaseException as e:  # surface it in the caller's thread, and unblock the iterator
            error.append(e)
            streamer.end()

    thread = threading.Thread(target=run, name="npukit-chat-generate", daemon=True)
    thread.start()
    try:
        for piece in streamer:
            if piece:
                yield piece
    finally:
        # NOTE: if the caller stops iterating early, ask generate to stop at its next step and wait for it.
        stop.set()
        thread.join()
    if error:
        raise error[0]


def _generate(model, tokenizer, input_ids: list[int], config) -> str:
    kwargs = _generate_inputs(model, tokenizer, input_ids)
    for key in ("eos_token_id", "pad_token_id"):
        if key in kwargs:
            setattr(config, key, kwargs.pop(key))
    with torch.inference_mode():
        out = model.generate(**kwargs, generation_config=config)
    return tokenizer.decode(out[0, len(input_ids) :].tolist(), skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------
# Chat
# --------------------------------------------------------------------------------------------------


class Chat:
    """A multi-turn conversation with an HF model.

    >>> chat = Chat(model, tokenizer, system="You are concise.")
    >>> chat.send("What is the capital of France?")
    >>> for piece in chat.stream("And of Italy?"): print(piece, end="")

    ``history`` holds the user / assistant turns (the system message is kept apart); ``messages`` is
    what the template sees. A thinking model's reasoning goes to ``last_reasoning``; only the answer is
    returned and kept in the history (as Qwen3's own template drops old reasoning).
    """

    def __init__(
        self,
        model,
        tokenizer,
        system: str | None = None,
        preset: str = "greedy",
        max_new_tokens: int = 256,
        **template_kwargs,
    ):
        _require_chat_template(tokenizer)
        generation_config(preset)  # fail now on a bad preset name, not at the first send
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.preset = preset
        self.max_new_tokens = max_new_tokens
        self.template_kwargs = template_kwargs
        self.history: list[dict[str, str]] = []
        self.last_reasoning = ""
        self.last_reply = ""

    @property
    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [dict(m) for m in self.history]

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()
        self.last_reasoning = ""
        self.last_reply = ""

    def prompt_ids(self, text: str) -> list[int]:
        """The token ids the model would see if ``text`` were sent now."""
        messages = self.messages + [{"role": "user", "content": text}]
        return apply_chat_template(self.tokenizer, messages, **self.template_kwargs)

    def _prepare(self, text: str, gen_overrides: dict[str, Any]):
        if not isinstance(text, str):
            raise TypeError(f"send / stream take the user's message as a str, got {type(text).__name__}.")
        messages = self.messages + [{"role": "user", "content": text}]
        input_ids = apply_chat_template(self.tokenizer, messages, **self.template_kwargs)
        opened = _prompt_opens_think(render_chat_template(self.tokenizer, messages, **self.template_kwargs))
        gen_overrides.setdefault("max_new_tokens", self.max_new_tokens)
        config = generation_config(self.preset, **gen_overrides)
        return input_ids, opened, config

    def _finish(self, text: str, raw_reply: str, opened: bool) -> str:
        self.last_reasoning, reply = split_thinking(raw_reply, started_in_think=opened)
        self.last_reply = reply
        # NOTE: the history only grows once a reply is complete, so an error or an abandoned stream
        # leaves the conversation as it was.
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return reply

    def send(self, text: str, stream: bool = False, **gen_overrides) -> str:
        """Send one user message, return the assistant's reply (its answer, without reasoning).

        ``stream=True`` prints the pieces as they arrive (handy in a notebook or a terminal).
        """
        if stream:
            for piece in self.stream(text, **gen_overrides):
                print(piece, end="", flush=True)
            print()
            return self.last_reply
        input_ids, opened, config = self._prepare(text, gen_overrides)
        return self._finish(text, _generate(self.model, self.tokenizer, input_ids, config), opened)

    def stream(self, text: str, **gen_overrides) -> Iterator[str]:
        """Yield the reply's text pieces as they are generated.

        The pieces are the raw model text (reasoning included); they concatenate to exactly what
        ``send`` returns for a model that does not think. The history is updated when the stream ends.
        """
        input_ids, opened, config = self._prepare(text, gen_overrides)
        pieces: list[str] = []
        for piece in _stream_generate(self.model, self.tokenizer, input_ids, config):
            pieces.append(piece)
            yield piece
        self._finish(text, "".join(pieces), opened)

    def __repr__(self) -> str:
        return f"Chat(turns={len(self.history) // 2}, preset={self.preset!r}, max_new_tokens={self.max_new_tokens})"


def generate_text(
    model,
    tokenizer,
    prompt,
    preset: str = "greedy",
    *,
    chat: bool | None = None,
    max_new_tokens: int = 256,
    **overrides,
) -> str:
    """Generate once and return the decoded new text (reasoning included, see ``split_thinking``).

    ``prompt`` is a string or a list of chat messages. A string goes through the chat template as one user
    message when the tokenizer has one (``chat=None``) or when ``chat=True``; ``chat=False`` uses it raw.
    """
    if not isinstance(prompt, str):
        input_ids = apply_chat_template(tokenizer, prompt)
    else:
        use_template = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        if use_template:
            input_ids = apply_chat_template(tokenizer, [{"role": "user", "content": prompt}])
        else:
            input_ids = tokenizer(prompt)["input_ids"]
    config = generation_config(preset, max_new_tokens=max_new_tokens, **overrides)
    return _generate(model, tokenizer, input_ids, config)
