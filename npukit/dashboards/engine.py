"""Engine tuning: run one workload through npukit's engine (and, to compare, HF static batches) and see
throughput, latency and KV cache use change as you turn the engine's knobs.

    dash = EngineDashboard(model, tokenizer)      # knobs, workload, Run; a table row per run, four plots

The workloads and runs are ``npukit.bench.workload``'s (``make_workload``, ``run_workload``,
``run_static_batches``; notebooks 05-07 and ``npukit bench throughput`` use them too); this module only
wires them to widgets.
"""
from __future__ import annotations

import html
import math
from typing import Any

import ipywidgets as widgets

from npukit.bench.workload import (
    StepRecord,
    Workload,
    WorkloadRun,
    greedy_params,
    make_workload,
    run_static_batches,
    run_workload,
)
from npukit.cjk import plot_text
from npukit.engine.config import engine_fields
from npukit.i18n import t
from npukit.metrics import format_seconds

from .base import Dashboard, action, figure_png, html_table, new_figure, resolve_model

# ------------------------------------------------------------------------------------------------
# The dashboard
# ------------------------------------------------------------------------------------------------

ENGINE_COLOUR, STATIC_COLOUR = "#4c72b0", "#dd8452"


def _slider(cls, value, lo, hi, description, step=1):
    return cls(value=value, min=lo, max=hi, step=step, description=description,
               style={"description_width": "initial"}, layout=widgets.Layout(width="300px"))


# EngineConfig fields with a widget tuned for this dashboard (built in EngineDashboard.__init__), and those
# left to their defaults here: num_kv_blocks is set directly (no memory fraction), max_model_len follows
# the model, compile_sizes keeps its list (the enforce_eager checkbox switches graph mode). Any other field
# gets a generic widget from its type and default (engine_widgets).
TUNED = ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_kv_blocks", "enable_prefix_caching",
         "enable_chunked_prefill")
NOT_SHOWN = ("kv_cache_memory_fraction", "max_model_len", "compile_sizes")


def engine_widgets(tuned: dict[str, widgets.Widget]) -> dict[str, widgets.Widget]:
    """One widget per EngineConfig field (cli=True), in field order: the tuned ones, a generic one otherwise."""
    out = {}
    for f in engine_fields():
        if f.name in NOT_SHOWN or not f.metadata.get("cli", True):
            continue
        if f.name in tuned:
            out[f.name] = tuned[f.name]
        elif f.metadata.get("choices"):  # e.g. quantization: None or one of its methods
            out[f.name] = widgets.Dropdown(options=[("none", None)] + [(c, c) for c in f.metadata["choices"]],
                                           value=f.default, description=f.name,
                                           style={"description_width": "initial"})
        elif f.type in (bool, "bool"):
            out[f.name] = widgets.Checkbox(value=bool(f.default), description=f.name, indent=False)
        elif f.metadata.get("choices"):  # e.g. quantization: None or one of its methods
            options = [("none", None)] + [(c, c) for c in f.metadata["choices"]]
            out[f.name] = widgets.Dropdown(options=options, value=f.default, description=f.name,
                                           style={"description_width": "initial"})
        else:
            cls = widgets.FloatText if str(f.type).startswith("float") else widgets.IntText
            out[f.name] = cls(value=f.default or 0, description=f.name, style={"description_width": "initial"})
    return out


class EngineDashboard(Dashboard):
    """Turn the engine's knobs, run a workload, compare runs (and HF static batching)."""

    title_key = "dash.engine.title"

    def __init__(self, model="smollm2-135m-instruct", tokenizer=None, *, device: str = "auto", dtype: str = "auto",
                 max_num_seqs: int = 8, max_num_batched_tokens: int = 512, block_size: int = 16,
                 num_kv_blocks: int = 64, enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 num_requests: int = 12, prompt_len: int = 32, output_len: int = 16, shared_prefix_len: int = 0,
                 compare_static: bool = False, seed: int = 0):
        super().__init__()
        self.model, self.tokenizer, self.model_name = resolve_model(model, tokenizer, device=device, dtype=dtype)
        self.seed = seed
        self.runs: list[WorkloadRun] = []           # every engine run, in order (the table's rows)
        self.static: WorkloadRun | None = None      # the last static-batching run
        self._static_warm = False                 # HF generate's first call is slow: warm it up once
        self.last: WorkloadRun | None = None        # the last engine run
        # engine knobs: one widget per EngineConfig field (a generic one for fields not tuned below)
        self.max_num_seqs = _slider(widgets.IntSlider, max_num_seqs, 1, 256, "max_num_seqs")
        self.max_num_batched_tokens = _slider(widgets.IntSlider, max_num_batched_tokens, 16, 8192,
                                              "max_num_batched_tokens", step=16)
        self.block_size = widgets.Dropdown(options=[1, 2, 4, 8, 16, 32, 64, 128], value=block_size,
                                           description="block_size", style={"description_width": "initial"},
                                           layout=widgets.Layout(width="180px"))
        self.num_kv_blocks = _slider(widgets.IntSlider, num_kv_blocks, 1, 4096, "num_kv_blocks")
        narrow = widgets.Layout(width="150px")
        self.prefix_caching = widgets.Checkbox(value=enable_prefix_caching, description=t("dash.engine.prefix_caching"),
                                               indent=False,
                                               layout=narrow)
        self.chunked_prefill = widgets.Checkbox(value=enable_chunked_prefill,
                                                description=t("dash.engine.chunked_prefill"),
                                                indent=False, layout=narrow)
        self.engine_widgets = engine_widgets({
            "max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
            "block_size": self.block_size, "num_kv_blocks": self.num_kv_blocks,
            "enable_prefix_caching": self.prefix_caching, "enable_chunked_prefill": self.chunked_prefill})
        # workload
        self.num_requests = _slider(widgets.IntSlider, num_requests, 1, 256, t("dash.engine.requests"))
        self.prompt_len = _slider(widgets.IntSlider, prompt_len, 1, 2048, t("dash.engine.prompt_len"))
        self.output_len = _slider(widgets.IntSlider, output_len, 1, 512, t("dash.engine.output_len"))
        self.shared_prefix_len = _slider(widgets.IntSlider, shared_prefix_len, 0, 2048, t("dash.engine.shared_prefix"))
        self.compare_static = widgets.Checkbox(value=compare_static, description=t("dash.engine.compare_static"),
                                               indent=False)
        self.run_button = widgets.Button(description=t("dash.run"), button_style="primary", icon="play")
        self.run_button.on_click(lambda _: self.run())
        self.clear_button = widgets.Button(description=t("dash.engine.clear"), icon="trash")
        self.clear_button.on_click(lambda _: self.clear())
        self.capacity = widgets.HTML()
        for w in (self.block_size, self.num_kv_blocks, self.max_num_seqs, self.prompt_len, self.output_len):
            w.observe(lambda _: self._update_capacity(), names="value")
        self._update_capacity()
        self.table = widgets.HTML()
        self.chart = widgets.Image(format="png", layout=widgets.Layout(max_width="960px"))
        self.widget = self._layout()

    def _layout(self) -> widgets.VBox:
        dtype_name = str(self.model.dtype).removeprefix("torch.")
        return widgets.VBox([
            self.header(t("dash.on_device", model=self.model_name, dtype=dtype_name, device=self.model.device)),
            widgets.HTML(f"<b>{t('dash.engine.engine')}</b>"),
            widgets.HBox([self.max_num_seqs, self.max_num_batched_tokens]),
            widgets.HBox([self.num_kv_blocks, self.block_size, self.prefix_caching, self.chunked_prefill]),
            *([widgets.HBox(extra)] if (extra := [w for name, w in self.engine_widgets.items() if name not in TUNED])
              else []),
            self.capacity,
            widgets.HTML("<b>workload</b> (greedy, every request generates exactly its output length)"),
            widgets.HBox([self.num_requests, self.shared_prefix_len]),
            widgets.HBox([self.prompt_len, self.output_len]),
            widgets.HBox([self.compare_static, self.run_button, self.clear_button, self.progress]),
            self.status, self.table, self.chart,
        ])

    def describe(self) -> str:
        return f"EngineDashboard(model={self.model_name!r})"

    def buttons(self) -> list[widgets.Button]:
        return [self.run_button, self.clear_button]

    # --- inputs ------------------------------------------------------------------------------------
    def knobs(self) -> dict[str, Any]:
        """The engine knobs as set in the widgets (LLM keyword arguments: EngineConfig's fields)."""
        return {name: w.value for name, w in self.engine_widgets.items()}

    def workload(self) -> Workload:
        """The workload as set in the widgets: lengths uniform in [max/2, max] (at least the shared prefix + 1)."""
        p_hi, o_hi, shared = self.prompt_len.value, self.output_len.value, self.shared_prefix_len.value
        if shared >= p_hi:
            raise ValueError(f"shared prefix tokens ({shared}) must be fewer than prompt tokens ({p_hi}): "
                             "each prompt needs tokens of its own")
        p_lo = max(shared + 1, (p_hi + 1) // 2)
        return make_workload(self.tokenizer, self.num_requests.value, (p_lo, p_hi), ((o_hi + 1) // 2, o_hi),
                             shared_prefix_len=shared, seed=self.seed)

    def _update_capacity(self) -> None:
        from npukit.engine.kv_cache import kv_bytes_per_block
        from npukit.metrics import format_bytes

        bs, blocks = self.block_size.value, self.num_kv_blocks.value
        per_block = kv_bytes_per_block(self.model.config, bs, self.model.dtype)
        longest = self.prompt_len.value + self.output_len.value
        per_seq = math.ceil(longest / bs)
        fit = blocks // per_seq
        head = (f"KV cache: {blocks} blocks × {bs} tokens = {blocks * bs:,} token slots, "
                f"{format_bytes(blocks * per_block)}; the longest request needs {per_seq} blocks, so ")
        if fit == 0:
            head += "not even one fits whole (it will be cut short or rejected): raise num_kv_blocks"
        else:
            head += f"about {fit} of them fit at once (max_num_seqs={self.max_num_seqs.value})"
        self.capacity.value = html.escape(head)

    # --- actions -----------------------------------------------------------------------------------
    def build_llm(self):
        """A fresh LLM with the widgets' knobs (raises ValueError on a bad combination)."""
        from npukit.engine import LLM

        return LLM(self.model, self.tokenizer, **self.knobs())

    @action("dash.engine.running")
    def run(self) -> WorkloadRun:
        workload = self.workload()
        longest = max(len(p) for p in workload.prompts)
        if not self.chunked_prefill.value and longest > self.max_num_batched_tokens.value:
            # NOTE: the engine would say "more than max_model_len" (it caps max_model_len at the token budget
            # without chunked prefill); say which knob to turn instead.
            raise ValueError(f"chunked prefill is off, so a whole prompt must fit in one step: the longest prompt "
                             f"has {longest} tokens but max_num_batched_tokens={self.max_num_batched_tokens.value}; "
                             "raise max_num_batched_tokens or turn chunked prefill on")
        llm = self.build_llm()
        llm.generate([workload.prompts[0][:4]], greedy_params(2), use_tqdm=False)  # warm-up
        compare = self.compare_static.value
        total = workload.num_requests + (1 if compare else 0)
        self.start_progress(total, t("dash.engine.requests"))

        def on_step(record: StepRecord, finished: int) -> None:
            self.progress.value = finished
            if record.step % 4 == 0:
                self.set_status(t("dash.engine.step", step=record.step, finished=finished,
                                  total=workload.num_requests, kv=record.kv_cache_usage))

        result = run_workload(llm, workload, label=f"run {len(self.runs) + 1}", on_step=on_step)
        self.runs.append(result)
        self.last = result
        if compare:
            self.set_status(t("dash.engine.static", size=self.max_num_seqs.value))
            if not self._static_warm:
                run_static_batches(self.model, self.tokenizer, Workload([workload.prompts[0][:4]], [2]), 1)
                self._static_warm = True
            self.static = run_static_batches(self.model, self.tokenizer, workload, self.max_num_seqs.value)
            self.step_progress()
        self.end_progress()
        self.refresh()
        msg = t("dash.engine.done", result=result)
        if self.static is not None and compare:
            msg += t("dash.engine.done_static", rate=self.static.output_throughput,
                     ratio=result.output_throughput / self.static.output_throughput)
        self.set_status(msg, "ok")
        return result

    @action("dash.engine.clearing")
    def clear(self) -> None:
        self.runs, self.static, self.last = [], None, None
        self.table.value, self.chart.value = "", b""
        self.set_status(t("dash.ready"), "info")

    # --- rendering ---------------------------------------------------------------------------------
    def refresh(self) -> None:
        self.table.value = self._table_html()
        self.chart.value = self._figure_png()

    def _table_html(self) -> str:
        header = [t("dash.engine.run_col"), "max_num_seqs", t("dash.engine.col_batched"), "block",
                  t("dash.engine.col_kv_blocks"), t("dash.engine.col_prefix"), t("dash.engine.col_chunked"), "tok/s",
                  "TTFT p50", "TPOT p50", t("dash.engine.col_steps"), t("dash.engine.col_preempted"),
                  t("dash.engine.col_kv_peak"), t("dash.engine.col_prefix_hits")]
        rows, on, off = [], t("dash.engine.on"), t("dash.engine.off")
        for r in self.runs + ([self.static] if self.static is not None else []):
            s = r.summary()
            c = r.config
            engine = r.stats is not None
            rows.append([r.label, c.get("max_num_seqs", c.get("batch_size")),
                         c.get("max_num_batched_tokens", "—"), c.get("block_size", "—"), c.get("num_kv_blocks", "—"),
                         on if c.get("enable_prefix_caching") else (off if engine else "—"),
                         on if c.get("enable_chunked_prefill") else (off if engine else "—"),
                         f"{r.output_throughput:.1f}", format_seconds(s["ttft"].median),
                         format_seconds(s["tpot"].median) if s["tpot"] else "n/a", r.num_steps,
                         r.num_preemptions if engine else "—",
                         f"{max(x.kv_cache_usage for x in r.steps):.0%}" if engine else "—",
                         f"{r.stats.prefix_cache_hit_rate:.0%}" if engine else "—"])
        # NOTE: a wide table scrolls inside the dashboard instead of being cut off by the notebook's width.
        return f"<div style='overflow-x:auto;font-size:90%'>{html_table(header, rows)}</div>"

    def _figure_png(self) -> bytes:
        from npukit.viz import draw_latency_boxes, draw_timeline, timeline_rows

        fig = new_figure(10, 6.4)
        (ax_tp, ax_lat), (ax_kv, ax_tl) = fig.subplots(2, 2)
        labels = [r.label for r in self.runs]
        ax_tp.bar(labels, [r.output_throughput for r in self.runs], color=ENGINE_COLOUR,
                  label=plot_text("dash.engine.engine"))
        if self.static is not None:
            ax_tp.axhline(self.static.output_throughput, color=STATIC_COLOUR, linestyle="--",
                          label=plot_text("dash.engine.static_label", size=self.static.config["batch_size"]))
        ax_tp.set(title=plot_text("dash.engine.throughput_title"), ylabel="tok/s")
        ax_tp.tick_params(axis="x", labelsize=8, rotation=30)
        ax_tp.legend(fontsize=8)
        last = self.last
        if last is not None:
            shown = [last] + ([self.static] if self.static is not None else [])
            draw_latency_boxes(shown, ax=ax_lat)
            xs = [s.step for s in last.steps]
            ax_kv.plot(xs, [s.kv_cache_usage * 100 for s in last.steps], color=ENGINE_COLOUR,
                       label=plot_text("dash.engine.blocks_used"))
            ax_kv.plot(xs, [s.kv_utilization * 100 for s in last.steps], color="#55a868",
                       label=plot_text("dash.engine.slots_filled"))
            ax2 = ax_kv.twinx()
            ax2.plot(xs, [len(s.slot_ids) for s in last.steps], color="#8172b2", linestyle=":",
                     label=plot_text("dash.engine.running_label"))
            ax2.set_ylabel(plot_text("dash.engine.running_requests"))
            for p in [s.step for a, s in zip(last.steps, last.steps[1:]) if s.num_preemptions > a.num_preemptions]:
                ax_kv.axvline(p, color="#cf222e", alpha=0.4)
            ax_kv.set(title=plot_text("dash.engine.kv_title", label=last.label),
                      xlabel=plot_text("dash.engine.engine_step"), ylabel="%", ylim=(0, 105))
            lines = ax_kv.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
            ax_kv.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="lower right")
            draw_timeline(*timeline_rows(last, x="time"), ax=ax_tl,
                          title=plot_text("dash.engine.timeline_title", label=last.label),
                          xlabel=plot_text("dash.engine.seconds"), max_rows=24)
        return figure_png(fig)
