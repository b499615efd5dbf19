"""The OpenAI wire format: request JSON -> (prompts, SamplingParams), response shapes, `OpenAIError`.

Everything here is plain functions over dicts: no event loop, no engine. The CPU-heavy parts (JSON
parsing, chat templating, tokenising) run off the event loop in `preprocess.Preprocessor`.

NOTE: validation is strict (vLLM's pydantic models are too): a field of the wrong type is a 400, never
coerced ("stream": "yes" is an error, not true), and every value the engine will use is checked here or
in `SamplingParams` / `LLM._prepare`, so nothing a client sends can raise inside an engine step.
"""
import json
import math
from dataclasses import dataclass, field
from typing import Any

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions
MAX_PROMPTS_PER_REQUEST = 128       # a /v1/completions prompt list becomes this many engine requests at most


class OpenAIError(Exception):
    """An error the client sees as `{"error": {"message", "type", "param", "code"}}` with `status_code`."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
             404: "NotFoundError", 405: "MethodNotAllowedError", 408: "RequestTimeoutError",
             413: "RequestTooLargeError", 415: "UnsupportedMediaTypeError", 422: "UnprocessableEntityError",
             500: "InternalServerError", 503: "ServiceUnavailableError"}

    def __init__(self, message: str, status_code: int = 400, param: str | None = None):
        if len(message) > 2000:  # e.g. a client's 4,000-digit number quoted back
            message = message[:2000] + " ..."
        super().__init__(message)
        self.message, self.status_code, self.param = message, status_code, param

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status_code, "Error"),
                          "param": self.param, "code": self.status_code}}


# --------------------------------------------------------------------------------------------------
# Request checks
# --------------------------------------------------------------------------------------------------

# OpenAI / vLLM request fields that map 1:1 onto SamplingParams (SamplingParams checks their values).
SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "min_tokens", "stop", "stop_token_ids",
                   "ignore_eos", "skip_special_tokens", "include_stop_str_in_output")

# Fields we refuse rather than silently ignore (value -> is it a use of the feature?).
UNSUPPORTED = {
    "echo": lambda v: v is not None and v is not False,
    "suffix": lambda v: v is not None,
    "logit_bias": lambda v: v is not None and v != {},
    "tools": lambda v: v is not None and v != [],
    "prompt_logprobs": lambda v: v is not None,
    "response_format": lambda v: v is not None and (not isinstance(v, dict) or v.get("type") != "text"),
}

# apply_chat_template's own parameters: a client may not set them through chat_template_kwargs.
RESERVED_TEMPLATE_KWARGS = {"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                            "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                            "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_type(body: dict, name: str, kinds: tuple, what: str) -> Any:
    """body[name] if it is None or one of `kinds` (bool is never an int here), else a 400."""
    v = body.get(name)
    if v is None or (isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)):
        return v
    raise OpenAIError(f"'{name}' must be {what}, got {json.dumps(v)[:80]}.", param=name)


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object (400 for anything else, deep nesting included)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise OpenAIError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise OpenAIError("the request body is nested too deeply.") from None
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object.")
    return body


def check_common(body: dict, names: list[str]) -> None:
    """The fields both endpoints share: model, stream, stream_options."""
    model = check_type(body, "model", (str,), "a string")
    if model is not None and model not in names:
        raise OpenAIError(f"The model `{model}` does not exist. This server serves: {', '.join(names)}.",
                          404, param="model")
    check_type(body, "stream", (bool,), "true or false")
    options = check_type(body, "stream_options", (dict,), "an object")
    if options is not None:
        if not body.get("stream"):
            raise OpenAIError("'stream_options' can only be set when 'stream' is true.", param="stream_options")
        check_type(options, "include_usage", (bool,), "true or false")


def sampling_params(body: dict, *, max_tokens: int | None, logprobs: int | None):
    from npukit.engine.sampling_params import SamplingParams

    for name, used in UNSUPPORTED.items():
        if name in body and used(body[name]):
            raise OpenAIError(f"'{name}' is not supported by npukit serve (vLLM supports more of the OpenAI API).",
                              param=name)
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise OpenAIError("'best_of' is not supported by npukit serve; use 'n'.", param="best_of")
    kwargs = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **kwargs)
    except (ValueError, TypeError) as e:
        raise OpenAIError(str(e)) from None


def check_length(max_model_len: int | None, num_prompt_tokens: int, max_tokens, max_tokens_param: str):
    """The request's max_tokens (filled in when None), or a 400 when prompt + completion cannot fit."""
    if max_tokens is not None and not is_int(max_tokens):
        raise OpenAIError(f"'{max_tokens_param}' must be an integer >= 1.", param=max_tokens_param)
    if max_model_len is None:
        return max_tokens
    if num_prompt_tokens >= max_model_len:
        raise OpenAIError(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{num_prompt_tokens} input tokens. Please reduce the length of the input.", param="prompt")
    if max_tokens is None:
        return max_model_len - num_prompt_tokens
    if num_prompt_tokens + max_tokens > max_model_len:
        raise OpenAIError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the input, {max_tokens} in the "
            f"completion). Please reduce the length of the input or of '{max_tokens_param}'.",
            param=max_tokens_param)
    return max_tokens


def max_tokens_param(body: dict) -> str:
    # NOTE: max_completion_tokens is the chat API name; accepted on /v1/completions too, as people send it to both
    return "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"


def completion_prompts(prompt) -> list[str | list[int]]:
    """`prompt` as the OpenAI API allows it: str, [str], [int] or [[int]] -> a list of texts / token id lists."""
    def is_ids(x) -> bool:
        return isinstance(x, list) and bool(x) and all(is_int(t) for t in x)

    if isinstance(prompt, str):
        prompts = [prompt]
    elif is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise OpenAIError("'prompt' must be a non-empty string, a list of strings, a list of token ids, or a "
                          "list of token id lists.", param="prompt")
    if len(prompts) > MAX_PROMPTS_PER_REQUEST:
        raise OpenAIError(f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(prompts)}.",
                          param="prompt")
    if any(isinstance(p, str) and not p for p in prompts):
        raise OpenAIError("'prompt' must not be empty.", param="prompt")
    return prompts


def chat_messages(messages) -> list[dict[str, Any]]:
    """Check OpenAI chat messages; content given as parts ([{"type": "text", "text": ...}]) is joined."""
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("'messages' must be a non-empty list of {'role': ..., 'content': ...} objects.",
                          param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise OpenAIError(f"messages[{i}] must be an object with a string 'role'.", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise OpenAIError(f"messages[{i}].content: only text parts are supported by npukit serve.",
                                      param="messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise OpenAIError(f"messages[{i}].content must be a string or a list of text parts.", param="messages")
        out.append({**m, "content": content})
    return out


def chat_template_kwargs(body: dict, trust_request_chat_template: bool) -> dict[str, Any]:
    """The template variables a chat request may set; a client's own template only when the server trusts it."""
    kwargs = dict(check_type(body, "chat_template_kwargs", (dict,), "an object") or {})
    template = check_type(body, "chat_template", (str,), "a string")
    if template is None:
        template = kwargs.pop("chat_template", None)
    if template is not None:
        if not trust_request_chat_template:
            raise OpenAIError("a request-supplied 'chat_template' is refused; start the server with "
                              "--trust-request-chat-template to allow it (as vLLM).", 403, param="chat_template")
        if not isinstance(template, str):
            raise OpenAIError("'chat_template' must be a string.", param="chat_template")
    bad = sorted(k for k in kwargs if k in RESERVED_TEMPLATE_KWARGS or not isinstance(k, str))
    if bad:
        raise OpenAIError(f"chat_template_kwargs may not set {bad}: those are apply_chat_template's own "
                          "parameters, not template variables.", param="chat_template_kwargs")
    if template is not None:
        kwargs["chat_template"] = template
    return kwargs


# --------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------


def finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf; vLLM sends -9999.0 too


def _sampled_logprob(lp: dict[int, float], token_id: int) -> float:
    return finite(float(lp.get(token_id, float("-inf"))))


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]], offset: int) -> dict:
    """The legacy completions logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, lp in zip(token_ids, logprobs):
        piece = tokenizer.decode([tid])
        tokens.append(piece)
        token_lps.append(_sampled_logprob(lp, tid))
        tops.append({tokenizer.decode([t]): finite(float(v)) for t, v in lp.items()})
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]], top: int) -> dict:
    def entry(tid: int, value: float) -> dict:
        s = tokenizer.decode([tid])
        return {"token": s, "logprob": finite(float(value)), "bytes": list(s.encode("utf-8"))}

    content = []
    for tid, lp in zip(token_ids, logprobs):
        ranked = sorted(lp.items(), key=lambda kv: kv[1], reverse=True)[:top]
        content.append({**entry(tid, _sampled_logprob(lp, tid)), "top_logprobs": [entry(t, v) for t, v in ranked]})
    return {"content": content}


def usage(num_prompt: int, num_completion: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass
class Choice:
    """A choice as it accumulates (non-streaming)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
