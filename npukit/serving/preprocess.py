"""Request JSON -> engine inputs, off the event loop: parse, template, tokenise, build SamplingParams.

NOTE: these are the CPU-heavy parts of a request (a 10 MB prompt tokenises for seconds). They run on one
worker thread with the server's own copy of the tokenizer, never on the event loop (which must keep
answering /health) and never on the engine's tokenizer (which the engine thread decodes with). A prompt is
refused by its size in bytes before it is tokenised: no text longer than `max_model_len` tokens of the
vocabulary's longest token can fit.
"""
import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import protocol as p
from .protocol import OpenAIError


@dataclass
class Prepared:
    """One HTTP request made ready for the engine."""

    prompts: list[list[int]]
    params: object  # SamplingParams
    chat: bool


def _max_token_bytes(tokenizer) -> int:
    try:
        vocab = tokenizer.get_vocab()
        return max(4, max(len(t.encode("utf-8")) for t in vocab))
    except Exception:  # noqa: BLE001 - an odd tokenizer: assume long tokens
        return 64


class Preprocessor:
    def __init__(self, tokenizer, max_model_len: int | None, names: list[str],
                 trust_request_chat_template: bool = False):
        try:
            self.tokenizer = copy.deepcopy(tokenizer)
        except Exception:  # noqa: BLE001 - not copyable: share it (the engine's lock is not needed to encode)
            self.tokenizer = tokenizer
        self.max_model_len, self.names = max_model_len, names
        self.trust_request_chat_template = trust_request_chat_template
        self.max_prompt_bytes = (max_model_len or 1 << 20) * _max_token_bytes(tokenizer)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="npukit-preprocess")

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- worker thread -------------------------------------------------------------------------------
    def check_bytes(self, text: str, param: str) -> None:
        if len(text) > self.max_prompt_bytes or len(text.encode("utf-8")) > self.max_prompt_bytes:
            raise OpenAIError(f"the prompt is too long: more than {self.max_prompt_bytes} bytes cannot fit in "
                              f"this model's context of {self.max_model_len} tokens.", param=param)

    def encode(self, text: str, param: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        self.check_bytes(text, param)
        # NOTE: the same call the engine uses for a string prompt, so a server answer equals llm.generate's.
        kwargs = {} if add_special_tokens else {"add_special_tokens": False}
        return list(self.tokenizer(text, **kwargs)["input_ids"])

    def completion(self, raw: bytes) -> tuple[dict, Prepared]:
        body = p.parse_json(raw)
        p.check_common(body, self.names)
        if "prompt" not in body:
            raise OpenAIError("'prompt' is required.", param="prompt")
        prompts = [self.encode(x) if isinstance(x, str) else list(x) for x in p.completion_prompts(body["prompt"])]
        param = p.max_tokens_param(body)
        asked = body.get(param, p.DEFAULT_COMPLETION_MAX_TOKENS)
        # NOTE: with "max_tokens": null each prompt may use the rest of the context; one SamplingParams
        # serves all prompts, so take the smallest rest.
        filled = [p.check_length(self.max_model_len, len(ids), asked, param) for ids in prompts]
        max_tokens = asked if asked is not None else min((m for m in filled if m is not None), default=None)
        logprobs = p.check_type(body, "logprobs", (int,), "an integer (the number of top logprobs)")
        return body, Prepared(prompts, p.sampling_params(body, max_tokens=max_tokens, logprobs=logprobs), False)

    def chat(self, raw: bytes) -> tuple[dict, Prepared]:
        from npukit.chat import render_chat_template

        body = p.parse_json(raw)
        p.check_common(body, self.names)
        messages = p.chat_messages(body.get("messages"))
        for m in messages:
            self.check_bytes(m["content"], "messages")
        kwargs = p.chat_template_kwargs(body, self.trust_request_chat_template)
        add = p.check_type(body, "add_generation_prompt", (bool,), "true or false")
        try:
            text = render_chat_template(self.tokenizer, messages, add_generation_prompt=add is not False, **kwargs)
        except (ValueError, TypeError) as e:
            raise OpenAIError(str(e), param="messages") from None
        except Exception as e:  # noqa: BLE001 - jinja errors from the template (e.g. a role it refuses)
            raise OpenAIError(f"the chat template failed on these messages: {type(e).__name__}: {e}",
                              param="messages") from None
        if not isinstance(text, str):
            raise OpenAIError("the chat template did not produce text.", param="messages")
        # NOTE: apply_chat_template(tokenize=True) tokenises the rendered text without special tokens.
        ids = self.encode(text, "messages", add_special_tokens=False)
        param = p.max_tokens_param(body)
        max_tokens = p.check_length(self.max_model_len, len(ids), body.get(param), param)
        want = p.check_type(body, "logprobs", (bool,), "true or false")
        top = p.check_type(body, "top_logprobs", (int,), "an integer")
        if top is not None and not want:
            raise OpenAIError("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
        logprobs = (top or 0) if want else None
        return body, Prepared([ids], p.sampling_params(body, max_tokens=max_tokens, logprobs=logprobs), True)
