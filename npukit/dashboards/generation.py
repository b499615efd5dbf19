"""Generation parameters: every sampling knob, the reply streamed live, TTFT / TPOT / tok/s per run.

    dash = GenerationDashboard(model, tokenizer)       # or GenerationDashboard("smollm2-135m-instruct")
    dash                                                # show it; press Generate
    run = stream_chat(model, tokenizer, messages, on_text=print, temperature=0.7, do_sample=True, seed=0)

``stream_chat`` is the dashboard's engine room and works on its own: it applies the chat template,
runs ``model.generate`` with a streamer that stamps every token (for TTFT / TPOT) and hands finished
text pieces to ``on_text`` as they arrive, then splits ``<think>`` reasoning from the answer.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ipywidgets as widgets
import torch

from npukit import i18n
from npukit.chat import (
    PRESETS,
    THINK_END,
    THINK_START,
    apply_chat_template,
    generation_config,
    render_chat_template,
    split_thinking,
)
from npukit.cjk import plot_text
from npukit.i18n import t
from npukit.metrics import RequestMetrics, format_seconds

from .base import MUTED_COLOUR, Dashboard, action, figure_png, html_table, new_figure, resolve_model

BOX_STYLE = "border:1px solid #d0d7de;border-radius:6px;padding:6px;min-height:3em"
KNOBS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


@dataclass
class GenerationRun:
    """One reply: the text (reasoning split off), its token ids, the settings used and the timings."""

    text: str  # the raw reply, reasoning included
    content: str  # the answer
    reasoning: str  # what was inside <think>…</think> ("" for models that do not think)
    token_ids: list[int]
    metrics: RequestMetrics
    settings: dict[str, Any] = field(default_factory=dict)
    finish_reason: str = "length"  # "stop" (end-of-turn token) or "length" (max_new_tokens reached)

    def readout(self) -> str:
        m = self.metrics
        tps = m.output_tokens_per_s
        return (f"TTFT {format_seconds(m.ttft)} | TPOT {format_seconds(m.tpot)} | "
                f"{tps:.1f} tok/s | {m.num_prompt_tokens} prompt + {m.num_output_tokens} new tokens | "
                f"finish: {self.finish_reason}" if tps is not None else "no tokens generated")


def _streamer_class():
    from transformers import TextStreamer

    class TimedTextStreamer(TextStreamer):
        """A ``TextStreamer`` that stamps every new token into ``metrics`` and passes text to ``on_text``.

        NOTE: ``generate`` pushes the prompt first (skipped), then each new token; the token arrives already
        copied to the CPU, so the stamp is taken after the device finished computing it.
        """

        def __init__(self, tokenizer, metrics: RequestMetrics, on_text: Callable[[str], None],
                     on_token: Callable[[], None] | None = None):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.metrics, self.on_text, self.on_token = metrics, on_text, on_token

        def put(self, value: torch.Tensor) -> None:
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.metrics.record_token(num_tokens=int(value.numel()))
                if self.on_token:
                    self.on_token()
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                self.on_text(text)

    return TimedTextStreamer


def sampling_settings(*, do_sample: bool = False, temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
                      repetition_penalty: float = 1.0, max_new_tokens: int = 64) -> Any:
    """A ``GenerationConfig`` from the dashboard's knobs, with a clear error for values generate rejects."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty}")
    if not do_sample:
        # NOTE: greedy ignores temperature / top-k / top-p; passing neutral values keeps transformers from
        # warning that sampling flags are set while do_sample=False.
        return generation_config("greedy", repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling (use do_sample=False for greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no top-k filter), got {top_k}")
    return generation_config("greedy", do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens)


def stream_chat(model, tokenizer, messages: list[dict[str, str]], *, on_text: Callable[[str], None] | None = None,
                on_token: Callable[[], None] | None = None, seed: int | None = None, **knobs) -> GenerationRun:
    """Generate one assistant reply to ``messages``, streaming text pieces to ``on_text``.

    ``knobs``: do_sample, temperature, top_k, top_p, repetition_penalty, max_new_tokens (see
    ``sampling_settings``). ``seed`` seeds torch's generator first, so sampling is reproducible.
    """
    config = sampling_settings(**knobs)
    ids = apply_chat_template(tokenizer, messages)
    prompt_text = render_chat_template(tokenizer, messages)
    # A thinking template (Qwen3) may open <think> in the prompt itself: then the reply starts in reasoning.
    opened = prompt_text.rfind(THINK_START) > prompt_text.rfind(THINK_END)
    if config.pad_token_id is None and model.generation_config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if config.eos_token_id is None and model.generation_config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id

    pieces: list[str] = []

    def collect(text: str) -> None:
        pieces.append(text)
        if on_text:
            on_text(text)

    input_ids = torch.tensor([ids], device=model.device)
    metrics = RequestMetrics(arrival_time=time.perf_counter(), num_prompt_tokens=len(ids))
    streamer = _streamer_class()(tokenizer, metrics, collect, on_token)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                             streamer=streamer)
    metrics.finish()
    new_ids = out[0, len(ids):].tolist()
    text = "".join(pieces)
    reasoning, content = split_thinking(text, started_in_think=opened)
    eos = config.eos_token_id if config.eos_token_id is not None else model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    finish = "stop" if new_ids and new_ids[-1] in eos_ids else "length"
    settings = {k: getattr(config, k) for k in KNOBS} | {"max_new_tokens": config.max_new_tokens, "seed": seed}
    return GenerationRun(text, content, reasoning, new_ids, metrics, settings, finish)


def _pre(text: str, style: str = "") -> str:
    return f"<div style='white-space:pre-wrap;{style}'>{html.escape(text)}</div>"


class GenerationDashboard(Dashboard):
    """Every sampling knob, a streamed reply, and TTFT / TPOT / tok/s for each run."""

    title_key = "dash.generation.title"
    MAX_RUNS_SHOWN = 8

    def __init__(self, model="smollm2-135m-instruct", tokenizer=None, *, device: str = "auto",
                 dtype: str = "auto", prompt: str | None = None, system: str = "",
                 max_new_tokens: int = 48):
        super().__init__()
        self.model, self.tokenizer, self.model_name = resolve_model(model, tokenizer, device=device, dtype=dtype)
        prompt = i18n.prompt("capital") if prompt is None else prompt
        self.history: list[dict[str, str]] = []
        self.runs: list[GenerationRun] = []

        def knob() -> dict:  # one Layout per widget: a shared Layout would tie their sizes together
            return {"style": {"description_width": "120px"}, "layout": widgets.Layout(width="340px")}

        self.prompt = widgets.Textarea(value=prompt, description=t("dash.prompt"), layout=widgets.Layout(width="660px"))
        self.system = widgets.Text(value=system, description=t("dash.generation.system"),
                                   placeholder=t("dash.generation.system_placeholder"),
                                   layout=widgets.Layout(width="660px"))
        self.preset = widgets.Dropdown(options=list(PRESETS), value="greedy", description=t("dash.generation.preset"),
                                       **knob())
        self.do_sample = widgets.Checkbox(value=False, description=t("dash.generation.do_sample"), **knob())
        self.temperature = widgets.FloatSlider(value=1.0, min=0.05, max=2.0, step=0.05, description="temperature",
                                               **knob())
        self.top_k = widgets.IntSlider(value=50, min=0, max=200, description="top_k", **knob())
        self.top_p = widgets.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="top_p", **knob())
        self.repetition_penalty = widgets.FloatSlider(value=1.0, min=0.8, max=2.0, step=0.05,
                                                      description=t("dash.generation.rep_penalty"), **knob())
        self.max_new_tokens = widgets.IntSlider(value=max_new_tokens, min=1, max=512, description="max_new_tokens",
                                                **knob())
        self.seed = widgets.IntText(value=0, description=t("dash.generation.seed"),
                                    style={"description_width": "120px"},
                                    layout=widgets.Layout(width="220px"))
        self.keep_history = widgets.Checkbox(value=False, description=t("dash.generation.keep_history"), **knob())
        self.generate_button = widgets.Button(description=t("dash.generation.generate"), button_style="primary",
                                              icon="play")
        self.reset_button = widgets.Button(description=t("dash.generation.reset"), icon="trash",
                                           layout=widgets.Layout(width="auto"))
        self.generate_button.on_click(lambda _: self.generate())
        self.reset_button.on_click(lambda _: self.reset())
        self.preset.observe(lambda change: self.apply_preset(change["new"]), names="value")
        self.do_sample.observe(lambda _: self._sync_enabled(), names="value")

        self.output = widgets.HTML(value=self._conversation_html(""), layout=widgets.Layout(width="660px"))
        self.readout = widgets.HTML(value=f"<span style='color:{MUTED_COLOUR}'>{t('dash.generation.no_run')}</span>")
        self.runs_table = widgets.HTML()
        self.apply_preset("greedy")
        self.widget = widgets.VBox([
            self.header(self.model_name),
            self.prompt, self.system,
            widgets.HBox([self.preset, self.max_new_tokens, self.seed]),
            widgets.HBox([self.do_sample, self.temperature, self.top_k]),
            widgets.HBox([self.repetition_penalty, self.top_p]),
            widgets.HBox([self.keep_history, self.generate_button, self.reset_button, self.progress]),
            self.status, self.output, self.readout, self.runs_table,
        ])

    def describe(self) -> str:
        return f"GenerationDashboard(model={self.model_name!r})"

    def buttons(self) -> list[widgets.Button]:
        return [self.generate_button, self.reset_button]

    # --- knobs -----------------------------------------------------------------------------------
    def apply_preset(self, name: str) -> None:
        """Set the knobs to a preset of ``npukit.chat.PRESETS`` (top_k=0 there means "off")."""
        p = PRESETS[name]
        self.do_sample.value = p["do_sample"]
        self.temperature.value = p["temperature"]
        self.top_k.value = p["top_k"]
        self.top_p.value = p["top_p"]
        self.repetition_penalty.value = p["repetition_penalty"]
        self._sync_enabled()

    def _sync_enabled(self) -> None:
        for w in (self.temperature, self.top_k, self.top_p):
            w.disabled = not self.do_sample.value

    def knobs(self) -> dict[str, Any]:
        return {"do_sample": self.do_sample.value, "temperature": self.temperature.value, "top_k": self.top_k.value,
                "top_p": self.top_p.value, "repetition_penalty": self.repetition_penalty.value,
                "max_new_tokens": self.max_new_tokens.value}

    def messages(self, text: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system.value}] if self.system.value.strip() else []
        history = self.history if self.keep_history.value else []
        return system + history + [{"role": "user", "content": text}]

    # --- rendering -------------------------------------------------------------------------------
    def _conversation_html(self, reply: str, user: str = "", opened: bool = False) -> str:
        turns = []
        for m in (self.history if self.keep_history.value else []):
            who = t("dash.generation.you") if m["role"] == "user" else t("dash.generation.assistant")
            turns.append(f"<b>{who}:</b>" + _pre(m["content"]))
        if user:
            turns.append(f"<b>{t('dash.generation.you')}:</b>" + _pre(user))
            reasoning, content = split_thinking(reply, started_in_think=opened)
            if reasoning:
                turns.append(f"<b>{t('dash.generation.thinking')}:</b>"
                             + _pre(reasoning, f"color:{MUTED_COLOUR};font-style:italic"))
            turns.append(f"<b>{t('dash.generation.assistant')}:</b>" + _pre(content if reasoning else reply))
        body = "".join(turns) or f"<span style='color:{MUTED_COLOUR}'>{t('dash.generation.streams_here')}</span>"
        return f"<div style='{BOX_STYLE}'>{body}</div>"

    def _runs_html(self) -> str:
        header = ["#", t("dash.generation.sampling"), "T", "top_k", "top_p", "rep", t("dash.generation.new_tok"),
                  "TTFT", "TPOT", "tok/s", t("dash.generation.finish")]
        rows = []
        for i, r in list(enumerate(self.runs, 1))[-self.MAX_RUNS_SHOWN:]:
            s, m = r.settings, r.metrics
            sampling = t("dash.generation.yes") if s["do_sample"] else t("dash.generation.greedy")
            rows.append([i, sampling, f"{s['temperature']:.2f}", s["top_k"],
                         f"{s['top_p']:.2f}", f"{s['repetition_penalty']:.2f}", m.num_output_tokens,
                         format_seconds(m.ttft), format_seconds(m.tpot),
                         f"{m.output_tokens_per_s:.1f}" if m.output_tokens_per_s else "n/a", r.finish_reason])
        return html_table(header, rows)

    # --- actions ---------------------------------------------------------------------------------
    @action("dash.generation.generating")
    def generate(self) -> GenerationRun:
        """Generate one reply with the current knobs; the text streams into ``self.output``."""
        text = self.prompt.value
        if not text.strip():
            raise ValueError(t("dash.generation.empty_prompt"))
        messages = self.messages(text)
        prompt_text = render_chat_template(self.tokenizer, messages)
        opened = prompt_text.rfind(THINK_START) > prompt_text.rfind(THINK_END)
        reply: list[str] = []

        def on_text(piece: str) -> None:
            reply.append(piece)
            self.output.value = self._conversation_html("".join(reply), text, opened)

        self.start_progress(self.max_new_tokens.value, t("dash.generation.tokens"))
        run = stream_chat(self.model, self.tokenizer, messages, on_text=on_text, on_token=self.step_progress,
                          seed=self.seed.value if self.do_sample.value else None, **self.knobs())
        self.end_progress()
        self.output.value = self._conversation_html(run.text, text, opened)
        if self.keep_history.value:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": run.content}]
        self.runs.append(run)
        self.readout.value = f"<b>{html.escape(run.readout())}</b>"
        self.runs_table.value = self._runs_html()
        turns = t("dash.generation.turns", n=len(self.history) // 2) if self.keep_history.value else ""
        self.set_status(t("dash.generation.done", tokens=run.metrics.num_output_tokens, reason=run.finish_reason,
                          turns=turns), "ok")
        return run

    @action("dash.generation.resetting")
    def _snapshot_png(self) -> bytes:
        """The last reply's token stream: when each token arrived (its TTFT, then one point per token)."""
        if not self.runs:
            return b""
        m = self.runs[-1].metrics
        times = [stamp - m.arrival_time for stamp in m.token_times]
        fig = new_figure(7, 2.6)
        ax = fig.subplots()
        ax.plot(range(1, len(times) + 1), [x * 1e3 for x in times], "o-", ms=3)
        if times:
            ax.annotate("TTFT", (1, times[0] * 1e3), textcoords="offset points", xytext=(8, -4), fontsize=8)
        ax.set(xlabel=plot_text("dash.output_token"), ylabel=plot_text("dash.generation.ms_since"),
               title=plot_text("dash.generation.stream_title"), ylim=(0, None))
        return figure_png(fig)

    def reset(self) -> None:
        """Forget the conversation (the runs table stays)."""
        self.history.clear()
        self.output.value = self._conversation_html("")
        self.set_status(t("dash.generation.cleared"), "ok")
