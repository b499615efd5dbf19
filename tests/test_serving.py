"""npukit.serving: the OpenAI-compatible server, over the real engine (tiny-llama) with the official
`openai` client, plus lifecycle cases (auth, disconnects, shutdown) over a fake engine."""
import asyncio
import json
import math
import socket
import threading
import time
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from npukit.engine import LLM, SamplingParams
from npukit.serving import OpenAIError, ServerThread, build_serve_parser, create_app, run_serve, serve_main

MAX_MODEL_LEN = 128
MAX_TOKENS = 12
PROMPTS = [f"Request {i}: the weather today is" for i in range(64)]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)


def wait_for(cond, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# ---------------------------------------------------------------- the real engine (tiny-llama)


@pytest.fixture(scope="module")
def llm(tiny):
    model, tok = tiny
    return LLM(model, tok, num_kv_blocks=256, max_num_seqs=64, max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def refs(llm):
    """Greedy answers from llm.generate / llm.chat, computed before the server owns the engine."""
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    chat = llm.chat(CHAT, GREEDY, use_tqdm=False)[0]
    return {"text": [o.outputs[0].text for o in outs], "ids": [o.outputs[0].token_ids for o in outs],
            "prompt_len": [len(o.prompt_token_ids) for o in outs], "chat": chat.outputs[0].text,
            "chat_prompt_len": len(chat.prompt_token_ids)}


@pytest.fixture(scope="module")
def server(llm, refs):
    with ServerThread(create_app(llm, served_model_name="tiny")) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def test_models_lists_the_served_name(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["max_model_len"] == MAX_MODEL_LEN
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)


def test_completion_equals_greedy_generate_with_usage(client, refs):
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert r.object == "text_completion" and r.model == "tiny"
    assert r.choices[0].text == refs["text"][0]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == refs["prompt_len"][0]
    assert r.usage.completion_tokens == len(refs["ids"][0]) == MAX_TOKENS
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the chat API's name for the limit works here too (people send it to /v1/completions)
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], temperature=0,
                                  extra_body={"max_completion_tokens": 3})
    assert r.usage.completion_tokens == 3 and refs["text"][0].startswith(r.choices[0].text)


def test_health_and_stats(server, llm):
    assert httpx.get(server.url + "/health").status_code == 200
    stats = httpx.get(server.url + "/stats").json()
    assert stats["num_blocks_total"] == llm.stats().num_blocks_total == 256


def test_chat_uses_the_chat_template(client, refs):
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == refs["chat"]
    assert r.usage.prompt_tokens == refs["chat_prompt_len"]


def test_streaming_completion_and_chat(client, refs):
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == refs["text"][1]
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in text_chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS

    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == refs["chat"]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_stream_sends_nothing_before_the_first_token(server, llm, monkeypatch):
    """The role chunk goes out with the first token (as vLLM's does): clients stamp TTFT at the first chunk."""
    gate, real_step = threading.Event(), llm.step
    monkeypatch.setattr(llm, "step", lambda: (gate.wait(30), real_step())[1])
    chunks = []

    def read():
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 3, "stream": True}
        with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=60) as r:
            chunks.extend((time.monotonic(), line[6:]) for line in r.iter_lines() if line.startswith("data: "))

    reader = threading.Thread(target=read)
    reader.start()
    assert wait_for(lambda: llm.has_unfinished_requests(), timeout=10)  # accepted, waiting on its first step
    time.sleep(0.3)
    released = time.monotonic()
    gate.set()
    reader.join(60)
    first = json.loads(chunks[0][1])
    assert chunks[0][0] >= released, "a chunk went out before the engine ran a step"
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(chunks[1][1])["choices"][0]["delta"]["content"]  # the first token right after it
    assert chunks[-1][1] == "[DONE]"


def test_64_concurrent_clients_are_batched_and_exact(server, llm, refs):
    steps_before = llm.stats().num_steps

    async def main():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as ac:
            return await asyncio.gather(*[
                ac.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0) for p in PROMPTS])

    answers = asyncio.run(main())
    assert [a.choices[0].text for a in answers] == refs["text"]
    # One engine loop batches them: one request at a time would need 64 * MAX_TOKENS steps.
    assert llm.stats().num_steps - steps_before < 64 * MAX_TOKENS / 4


def test_n_samples_and_logprobs(client):
    r = client.completions.create(model="tiny", prompt="Colours:", max_tokens=5, temperature=0.9, seed=7, n=2,
                                  logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 10
    for c in r.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == 5
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
        # top-2 + the sampled token, keyed by text: two byte-level tokens may decode to the same text ("\ufffd")
        assert all(piece in top and 1 <= len(top) <= 3
                   for piece, top in zip(c.logprobs.tokens, c.logprobs.top_logprobs))
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    assert content[0].logprob == max(t.logprob for t in content[0].top_logprobs)  # greedy = the top token


@pytest.mark.parametrize("body, status, words", [
    (b'{"prompt": "hi", "max_tokens": ', 400, "not valid JSON"),
    (b'["not", "an", "object"]', 400, "JSON object"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "hi", "n": 0}, 400, "n must be"),
    ({"prompt": ""}, 400, "must not be empty"),
    ({"prompt": {"a": 1}}, 400, "'prompt' must be"),
    ({"max_tokens": 3}, 400, "'prompt' is required"),
    ({"prompt": "word " * 200}, 400, "maximum context length is 128"),
    ({"prompt": "hi", "max_tokens": 500}, 400, "maximum context length is 128"),
    ({"prompt": [10**9]}, 400, "token ids must be in"),
    ({"prompt": "hi", "echo": True}, 400, "'echo' is not supported"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "hi", "model": "nope"}, 404, "does not exist"),
])
def test_bad_completion_requests_get_openai_errors(server, client, refs, body, status, words):
    kw = ({"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes)
          else {"json": body})
    r = httpx.post(server.base_url + "/completions", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["code"] == status and set(err) == {"message", "type", "param", "code"}
    # the server keeps serving
    ok = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0)
    assert ok.choices[0].text == refs["text"][2]


def test_bad_chat_requests_get_400(server):
    for body, words in [({"messages": []}, "non-empty list"), ({"messages": [{"content": "x"}]}, "'role'"),
                        ({"messages": CHAT, "top_logprobs": 2}, "needs 'logprobs'"),
                        ({"messages": CHAT, "max_completion_tokens": 1000}, "max_completion_tokens")]:
        r = httpx.post(server.base_url + "/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_aborted_stream_frees_its_blocks(server, llm, monkeypatch):
    assert wait_for(lambda: llm.stats().num_running == 0)
    before = llm.stats()
    real_step = llm.step

    def slow_step():  # tiny-llama is so fast that 100 tokens would be done before the client hangs up
        time.sleep(0.02)
        return real_step()

    monkeypatch.setattr(llm, "step", slow_step)
    body = {"model": "tiny", "prompt": "A long story:", "max_tokens": 100, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.base_url + "/completions", json=body) as r:
            assert r.status_code == 200
            got = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got.append(line)
                if len(got) == 3:
                    break
            assert llm.stats().num_blocks_used > before.num_blocks_used
    # the client is gone: the server aborts the request and its blocks go back to the pool
    assert wait_for(lambda: llm.stats().num_running == 0 and llm.stats().num_blocks_used == before.num_blocks_used)
    assert llm.stats().num_generated_tokens - before.num_generated_tokens < 100


# ---------------------------------------------------------------- lifecycle, over a fake engine
#
# A fake engine with the serving interface of `LLM` (add_request / step / abort / has_unfinished_requests /
# tokenizer / stats / config.max_model_len): it answers each prompt with its own characters reversed,
# one character (token) per step, and counts KV blocks like a paged engine. No model needed.

EOS = 0


class CharTokenizer:
    """One token per character (id = code point); id 0 is EOS."""

    eos_token_id = EOS
    chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"

    def __call__(self, text: str) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i != EOS)

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=True, **kwargs):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        return self(text)["input_ids"] if tokenize else text


@dataclass
class _Out:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: object = None
    logprobs: list | None = None


@dataclass
class _ReqOut:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[_Out]
    finished: bool


@dataclass
class _Req:
    rid: str
    prompt: list[int]
    params: object
    out: list[int] = field(default_factory=list)


@dataclass
class FakeStats:
    num_free_blocks: int
    num_running: int


@dataclass
class _Config:
    max_model_len: int = 256


class FakeLLM:
    """Reverses the prompt, one token per step; `step_delay` seconds per step; blocks of 4 tokens."""

    block_size = 4

    def __init__(self, num_blocks: int = 1000, step_delay: float = 0.002, max_model_len: int = 256):
        self.tokenizer = CharTokenizer()
        self.config = _Config(max_model_len)
        self.num_blocks = num_blocks
        self.step_delay = step_delay
        self.requests: dict[str, _Req] = {}
        self.engine_threads: set[str] = set()  # which threads called the engine (must be one)
        self.max_batch = 0

    def _touch(self) -> None:
        self.engine_threads.add(threading.current_thread().name)

    def _blocks(self, r: _Req) -> int:
        return math.ceil((len(r.prompt) + len(r.out)) / self.block_size)

    def stats(self) -> FakeStats:
        used = sum(self._blocks(r) for r in list(self.requests.values()))
        return FakeStats(num_free_blocks=self.num_blocks - used, num_running=len(self.requests))

    def add_request(self, prompt, sampling_params=None, request_id=None, arrival_time=None) -> str:
        self._touch()
        if "!" in self.tokenizer.decode(prompt):
            raise ValueError("the fake engine refuses prompts with '!'")
        self.requests[request_id] = _Req(request_id, list(prompt), sampling_params)
        return request_id

    def abort(self, request_id: str) -> bool:
        self._touch()
        return self.requests.pop(request_id, None) is not None

    def has_unfinished_requests(self) -> bool:
        self._touch()
        return bool(self.requests)

    def step(self) -> list[_ReqOut]:
        self._touch()
        time.sleep(self.step_delay)
        self.max_batch = max(self.max_batch, len(self.requests))
        outs = []
        for rid, r in list(self.requests.items()):
            rev = r.prompt[::-1]
            r.out.append(rev[len(r.out) % len(rev)])
            done = len(r.out) >= r.params.max_tokens
            n = r.params.n
            outs.append(_ReqOut(rid, r.prompt, [
                _Out(i, self.tokenizer.decode(r.out), list(r.out), "length" if done else None,
                     logprobs=[{t: -0.5, 1: -2.0} for t in r.out] if r.params.logprobs is not None else None)
                for i in range(n)], done))
            if done:
                del self.requests[rid]
        return outs



@pytest.fixture
def fake():
    return FakeLLM(step_delay=0.005)


def test_api_key(fake):
    with ServerThread(create_app(fake, served_model_name="fake", api_key="s3cret")) as s:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.post(s.base_url + "/completions", json={"prompt": "hi"}, headers=headers)
            assert r.status_code == 401 and "Unauthorized" in r.json()["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.base_url, api_key="wrong", max_retries=0).models.list()
        assert httpx.get(s.url + "/health").status_code == 200  # health needs no key
        c = openai.OpenAI(base_url=s.base_url, api_key="s3cret", max_retries=0)
        assert c.completions.create(model="fake", prompt="abc", max_tokens=3).choices[0].text == "cba"


def test_engine_rejection_is_a_400_and_only_the_engine_thread_touches_the_engine(fake):
    with ServerThread(create_app(fake, served_model_name="fake")) as s:
        r = httpx.post(s.base_url + "/completions", json={"prompt": ["good", "bad!"], "max_tokens": 2})
        assert r.status_code == 400 and "refuses" in r.json()["error"]["message"]
        r = httpx.post(s.base_url + "/completions", json={"prompt": ["ab", "xyz"], "max_tokens": 2})
        assert [c["text"] for c in r.json()["choices"]] == ["ba", "zy"]
    assert fake.engine_threads == {"npukit-engine"}
    assert fake.requests == {}  # the accepted half of the rejected request was aborted


def test_client_disconnect_on_a_non_streaming_request_aborts_it(fake):
    fake.step_delay = 0.05
    with ServerThread(create_app(fake, served_model_name="fake")) as s:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.base_url + "/completions", json={"prompt": "abc", "max_tokens": 200}, timeout=0.5)
        assert wait_for(lambda: not fake.requests), "the request kept running after its client left"


def test_shutdown_aborts_in_flight_requests(fake):
    fake.step_delay = 0.05
    s = ServerThread(create_app(fake, served_model_name="fake"), graceful_timeout=0.5).start()
    got = []

    def reader():
        try:
            with httpx.stream("POST", s.base_url + "/completions", timeout=30,
                              json={"prompt": "abc", "max_tokens": 200, "stream": True}) as r:
                for line in r.iter_lines():
                    got.append(line)
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=reader)
    t.start()
    assert wait_for(lambda: len(got) >= 2)
    s.stop()
    t.join(10)
    assert not t.is_alive() and fake.requests == {}
    assert s.app.state.engine.is_running is False


def test_run_steps_the_engine_in_the_calling_thread_until_the_app_shuts_down(fake):
    app = create_app(fake, served_model_name="fake")
    engine, server = app.state.engine, ServerThread(app)
    driver = threading.Thread(target=engine.run, kwargs={"on_ready": server.start}, name="model-loader")
    driver.start()
    assert wait_for(lambda: server.server is not None and server.server.started)
    r = httpx.post(server.base_url + "/completions", json={"prompt": "abc", "max_tokens": 3})
    assert r.json()["choices"][0]["text"] == "cba" and engine.is_running
    with pytest.raises(RuntimeError, match="already running"):
        engine.run()
    server.stop()  # the app's shutdown stops the engine: run() returns
    driver.join(10)
    assert not driver.is_alive() and not engine.is_running
    assert fake.engine_threads == {"model-loader"}


def test_npukit_serve_ctrl_c_lets_the_stream_in_flight_finish():
    import os
    import re
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "npukit", "serve", "tiny-llama", "--port", "0", "--dtype", "float32",
                             "--log-level", "warning"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NPUKIT_DEVICE": "cpu"})
    try:
        url = None
        for line in proc.stderr:
            if m := re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line):
                url = m.group(1)
                break
        assert url, "no banner"
        assert wait_for(lambda: httpx.get(url + "/health").status_code == 200, timeout=60)
        body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 200, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGINT)  # Ctrl-C: graceful, the stream in flight runs to its end
            events = [first] + [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
        assert "npukit serve: stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_openai_error_shape():
    e = OpenAIError("nope", 404, param="model")
    assert e.to_dict() == {"error": {"message": "nope", "type": "NotFoundError", "param": "model", "code": 404}}


def test_port_in_use_is_a_clear_error(fake):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match="another --port"):
            ServerThread(create_app(fake), port=port).start()


def test_cli_flags_are_named_like_vllm_serve(capsys):
    args = build_serve_parser().parse_args(
        ["tiny-llama", "--port", "0", "--max-num-seqs", "8", "--num-gpu-blocks-override", "64", "--block-size", "32",
         "--no-enable-prefix-caching", "--served-model-name", "a", "b", "--api-key", "k"])
    assert (args.model_tag, args.port, args.max_num_seqs, args.num_kv_blocks, args.block_size) == \
        ("tiny-llama", 0, 8, 64, 32)
    assert args.enable_prefix_caching is False and args.enable_chunked_prefill is None
    assert args.served_model_name == ["a", "b"] and args.host == "127.0.0.1"
    assert serve_main(["tiny-llama", "--gpu-memory-utilization", "0.9"]) == 2
    assert "--kv-cache-memory-fraction" in capsys.readouterr().err
    assert run_serve(build_serve_parser().parse_args(["x", "--model", "y"])) == 2
    assert "two models" in capsys.readouterr().err


def test_engine_step_failure_fails_requests_and_keeps_serving(fake):
    plan = ["boom"]  # what the next steps do: a message raises it, None runs the real step
    real_step = fake.step

    def flaky_step():
        if plan and (message := plan.pop(0)):
            raise RuntimeError(message)
        return real_step()

    fake.step = flaky_step
    with ServerThread(create_app(fake, served_model_name="fake")) as s:
        r = httpx.post(s.base_url + "/completions", json={"prompt": "abc", "max_tokens": 2})
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        assert fake.requests == {}
        r = httpx.post(s.base_url + "/completions", json={"prompt": "abc", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "cb"
        # a stream that fails mid-way ends with an error event, then [DONE]
        plan[:] = [None, None, "late boom"]
        with httpx.stream("POST", s.base_url + "/completions",
                          json={"prompt": "abcdef", "max_tokens": 10, "stream": True}) as r:
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert [json.loads(e)["choices"][0]["text"] for e in events[:2]] == ["f", "e"]
        assert "late boom" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
