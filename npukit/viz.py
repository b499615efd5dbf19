"""Drawings for the notebooks: block tables and slots, request timelines, latency distributions, sweeps.

Every function draws on ``ax`` (or ``axes``) when given, else on a new ``Plot`` that it returns. A
``Plot`` is a matplotlib Figure that shows itself as a PNG when it ends a notebook cell, and is not
registered with pyplot (so it is never shown twice and needs no ``%matplotlib`` magic).

    draw_block_tables({"A": seq_a.block_table, "B": seq_b.block_table}, {"A": 40, "B": 33}, block_size=16)
    draw_timeline(*timeline_rows(result))          # result: npukit.bench.workload.WorkloadRun
    draw_latency_histograms(result.metrics)        # TTFT / TPOT / ITL histograms
    draw_sweep("max_num_seqs", [1, 4, 16], results)
"""
from __future__ import annotations

import io
from typing import Any, Sequence

from matplotlib.figure import Figure

from npukit.cjk import plot_text

# Colours that read on JupyterLab's light and dark themes.
PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b2", "#937860", "#da8bc3", "#8c8c8c", "#ccb974",
           "#64b5cd")
SHARED_COLOUR, FREE_COLOUR, IDLE_COLOUR = "#444444", "#eeeeee", "#d9d9d9"


class Plot(Figure):
    """A Figure that a notebook shows as a PNG (``_repr_png_``); ``png()`` gives the bytes."""

    def png(self, dpi: int = 96) -> bytes:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(self)
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()

    def _repr_png_(self) -> bytes:
        return self.png()


def new_plot(width: float = 8, height: float = 4, nrows: int = 1, ncols: int = 1):
    """(Plot, axes): a Plot with a grid of axes (a single Axes when 1 x 1)."""
    fig = Plot(figsize=(width, height), dpi=96, layout="constrained")
    axes = fig.subplots(nrows, ncols)
    return fig, axes


def _colours(n: int) -> list[str]:
    """n distinct colours: the palette, or matplotlib's tab20 when more are needed."""
    if n <= len(PALETTE):
        return list(PALETTE[:n])
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab20"]
    return [to_hex(cmap(i % 20)) for i in range(n)]


def _figure_of(ax, width: float, height: float):
    if ax is None:
        return new_plot(width, height)
    return ax.figure, ax


# ------------------------------------------------------------------------------------------------
# Paged KV cache: block tables and slots
# ------------------------------------------------------------------------------------------------


def slot_of(block_table: Sequence[int], position: int, block_size: int) -> int:
    """The slot of token ``position``: ``block_table[position // block_size] * block_size + position % block_size``."""
    if position < 0 or position // block_size >= len(block_table):
        raise ValueError(f"position {position} is outside the {len(block_table)} blocks of {block_size} tokens "
                         "of this block table")
    return block_table[position // block_size] * block_size + position % block_size


def draw_block_tables(block_tables: dict[str, Sequence[int]], num_tokens: dict[str, int], block_size: int,
                      num_blocks: int | None = None, *, highlight: tuple[str, int] | None = None,
                      columns: int = 16, axes=None, title: str = ""):
    """Left: each sequence's block table (logical block i -> physical block id, shaded by how full it
    is). Right: the physical block pool, each block coloured by the sequence that owns it; blocks that
    several sequences share are dark and show how many. ``highlight=(name, position)`` marks the slot
    of one token in both views.
    """
    num_blocks = _check_block_tables(block_tables, num_tokens, block_size, num_blocks)
    names = list(block_tables)
    colours = _colours(len(names))
    colour = {n: colours[i] for i, n in enumerate(names)}
    owners: dict[int, list[str]] = {}
    for n, t in block_tables.items():
        for b in t:
            owners.setdefault(b, []).append(n)

    longest = max(len(t) for t in block_tables.values())
    rows = -(-num_blocks // columns)
    if axes is None:
        fig, (ax_l, ax_p) = new_plot(2.5 + 0.8 * max(longest, 4) + 0.4 * columns,
                                     max(1.2 + 0.55 * len(names), 0.8 + 0.5 * rows), 1, 2)
    else:
        ax_l, ax_p = axes
        fig = ax_l.figure
    _draw_logical(ax_l, block_tables, num_tokens, block_size, colour, owners)
    _draw_physical(ax_p, num_blocks, columns, colour, owners)
    if highlight is not None:
        _draw_highlight(ax_l, ax_p, block_tables, highlight, block_size, columns, rows)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def _check_block_tables(block_tables, num_tokens, block_size: int, num_blocks: int | None) -> int:
    """Validate draw_block_tables' input; returns the pool size (default: the largest block id + 1)."""
    if not block_tables:
        raise ValueError("block_tables is empty: pass {name: block_table} of at least one sequence")
    missing = [n for n in block_tables if n not in num_tokens]
    if missing:
        raise ValueError(f"num_tokens has no entry for {missing}: give the number of tokens of every sequence")
    for name, table in block_tables.items():
        if num_tokens[name] > len(table) * block_size:
            raise ValueError(f"{name}: {num_tokens[name]} tokens do not fit in {len(table)} blocks of {block_size}")
    used = sorted({b for t in block_tables.values() for b in t})
    num_blocks = num_blocks if num_blocks is not None else (max(used) + 1 if used else 1)
    if used and max(used) >= num_blocks:
        raise ValueError(f"block id {max(used)} is outside the pool of {num_blocks} blocks")
    return num_blocks


def _draw_logical(ax, block_tables, num_tokens, block_size: int, colour, owners) -> None:
    """One row per sequence: its logical blocks, each showing its physical id, shaded by how full it is."""
    from matplotlib.patches import Rectangle

    names = list(block_tables)
    longest = max(len(t) for t in block_tables.values())
    for r, name in enumerate(names):
        y = len(names) - 1 - r
        table, n = block_tables[name], num_tokens[name]
        for i, b in enumerate(table):
            filled = max(0, min(block_size, n - i * block_size)) / block_size
            shared = len(owners[b]) > 1
            ax.add_patch(Rectangle((i, y + 0.1), 0.95, 0.8, facecolor="white", edgecolor=colour[name], lw=1.5))
            ax.add_patch(Rectangle((i, y + 0.1), 0.95 * filled, 0.8, lw=0,
                                   facecolor=SHARED_COLOUR if shared else colour[name], alpha=0.55 if shared else 0.35))
            ax.text(i + 0.475, y + 0.5, str(b), ha="center", va="center", fontsize=9,
                    fontweight="bold" if shared else "normal")
    ax.set_xlim(-0.1, max(longest, 1) + 0.1)
    ax.set_ylim(-0.1, len(names) + 0.1)
    ax.set_xticks([i + 0.475 for i in range(longest)], [str(i) for i in range(longest)], fontsize=8)
    ax.set_yticks([len(names) - 0.5 - r for r in range(len(names))],
                  [f"{name} ({num_tokens[name]} tok)" for name in names], fontsize=9)
    for label, name in zip(ax.get_yticklabels(), names):
        label.set_color(colour[name])
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel(plot_text("viz.logical_block"))
    ax.set_title(plot_text("viz.block_tables", size=block_size), fontsize=10)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)


def _draw_physical(ax, num_blocks: int, columns: int, colour, owners) -> None:
    """The block pool in rows of `columns`: free, owned (the owner's colour) or shared (dark, ×count)."""
    from matplotlib.patches import Rectangle

    rows = -(-num_blocks // columns)
    for b in range(num_blocks):
        x, y = b % columns, rows - 1 - b // columns
        who = owners.get(b, [])
        face = FREE_COLOUR if not who else (SHARED_COLOUR if len(who) > 1 else colour[who[0]])
        ax.add_patch(Rectangle((x, y), 0.92, 0.88, facecolor=face, edgecolor="#999999", lw=0.5,
                               alpha=1.0 if len(who) > 1 else 0.75))
        label = f"{b}" + (f"\n×{len(who)}" if len(who) > 1 else "")
        ax.text(x + 0.46, y + 0.44, label, ha="center", va="center", fontsize=7,
                color="white" if who else "#777777")
    ax.set_xlim(-0.05, columns)
    ax.set_ylim(-0.05, rows)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(plot_text("viz.block_pool", used=len(owners), total=num_blocks), fontsize=10)


def _draw_highlight(ax_l, ax_p, block_tables, highlight: tuple[str, int], block_size: int, columns: int,
                    rows: int) -> None:
    """Mark one token's slot: a triangle in its logical block, a frame around its physical block."""
    from matplotlib.patches import Rectangle

    names = list(block_tables)
    name, pos = highlight
    table = block_tables[name]
    slot = slot_of(table, pos, block_size)
    i, off = divmod(pos, block_size)
    y = len(names) - 1 - names.index(name)
    ax_l.plot(i + 0.95 * (off + 0.5) / block_size, y + 0.05, marker="^", color="#cf222e", markersize=8)
    b = table[i]
    bx, by = b % columns, rows - 1 - b // columns
    ax_p.add_patch(Rectangle((bx - 0.05, by - 0.05), 1.02, 0.98, fill=False, edgecolor="#cf222e", lw=2))
    ax_l.set_title(plot_text("viz.block_tables", size=block_size) + "; " + plot_text(
        "viz.highlight", name=name, pos=pos, block=b, off=off, size=block_size, slot=slot), fontsize=9)


# ------------------------------------------------------------------------------------------------
# Timelines: static vs continuous batching
# ------------------------------------------------------------------------------------------------


def timeline_rows(result, x: str = "step") -> tuple[dict[str, list[float]], dict[str, list[tuple[float, float]]]]:
    """(tokens, held) of a run's step log (``npukit.bench.workload.WorkloadRun``):
    ``tokens[request]`` = when it got each token (the end of its step), ``held[request]`` = the (start, end)
    spans of consecutive steps in which it held a place in the batch (more than one span when it was
    preempted). ``x`` = "step" (step k spans [k, k + 1]) or "time" (seconds since the start).
    """
    if x not in ("step", "time"):
        raise ValueError(f"x must be 'step' or 'time', got {x!r}")
    tokens: dict[str, list[float]] = {rid: [] for rid in result.request_ids}
    held: dict[str, list[tuple[float, float]]] = {}
    last_step: dict[str, int] = {}
    prev_end = 0.0
    for s in result.steps:
        start, end = (float(s.step), float(s.step + 1)) if x == "step" else (prev_end, s.time)
        prev_end = end
        for rid in s.request_ids:
            tokens.setdefault(rid, []).append(end)
        for rid in s.slot_ids:
            spans = held.setdefault(rid, [])
            if spans and last_step[rid] == s.step - 1:  # NOTE: extend the span only over consecutive steps
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
            last_step[rid] = s.step
    return tokens, held


def draw_timeline(tokens: dict[str, Sequence[float]], held: dict[str, Sequence[tuple[float, float]]] | None = None,
                  *, ax=None, title: str = "", xlabel: str = "step", max_rows: int | None = None,
                  names: dict[str, str] | None = None):
    """One row per request: a light bar while it holds a place in the batch, a tick for every token.
    A bar with no ticks is a wasted place (the request is done but its batch is not); a gap between
    bars is time spent waiting in the queue (not admitted yet, or preempted)."""
    fig, ax = _figure_of(ax, 8, 0.6 + 0.32 * min(len(tokens), max_rows or len(tokens)))
    held = held or {}
    ids = list(tokens)[: max_rows] if max_rows else list(tokens)
    colours = _colours(len(ids))
    for r, rid in enumerate(ids):
        y = len(ids) - 1 - r
        if rid in held:
            ax.broken_barh([(a, b - a) for a, b in held[rid]], (y - 0.35, 0.7), facecolor=IDLE_COLOUR,
                           edgecolor="none")
        ts = list(tokens[rid])
        if ts:
            ax.scatter(ts, [y] * len(ts), marker="|", s=60, color=colours[r], linewidths=1.2)
            ax.plot([ts[-1]], [y], marker="o", color=colours[r], markersize=4)
    ax.set_yticks(range(len(ids)), [(names or {}).get(rid, f"req {rid}") for rid in reversed(ids)], fontsize=8)
    ax.set_ylim(-0.7, len(ids) - 0.3)
    ax.set_xlim(left=0)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title, fontsize=10)
    if max_rows and len(tokens) > max_rows:
        ax.text(1.0, -0.02, f"(first {max_rows} of {len(tokens)} requests)", transform=ax.transAxes, ha="right",
                va="top", fontsize=7)
    return fig


def draw_batching_comparison(results: Sequence[Any], x: str = "step", titles: Sequence[str] | None = None,
                             names: dict[str, str] | None = None):
    """Timelines of several runs one above the other, on the same x scale."""
    if not results:
        raise ValueError("pass at least one run")
    n_rows = max(len(r.metrics) for r in results)
    fig, axes = new_plot(9, sum(0.9 + 0.3 * len(r.metrics) for r in results), len(results), 1)
    axes = list(axes) if len(results) > 1 else [axes]
    end = 0.0
    for i, (r, ax) in enumerate(zip(results, axes)):
        tokens, held = timeline_rows(r, x)
        title = titles[i] if titles else r.label
        draw_timeline(tokens, held, ax=ax, title=title,
                      xlabel=plot_text("dash.engine.engine_step" if x == "step" else "dash.engine.seconds"),
                      max_rows=n_rows, names=names)
        end = max(end, max((b for spans in held.values() for _, b in spans), default=0.0))
    for ax in axes:
        ax.set_xlim(0, end * 1.02 if end else 1)
    return fig


# ------------------------------------------------------------------------------------------------
# Latency distributions
# ------------------------------------------------------------------------------------------------


def _latencies(metrics) -> dict[str, list[float]]:
    """ms lists of TTFT, TPOT (per request) and ITL (per token gap)."""
    ms = list(metrics)
    return {"TTFT": [m.ttft * 1e3 for m in ms if m.ttft is not None],
            "TPOT": [m.tpot * 1e3 for m in ms if m.tpot is not None],
            "ITL": [x * 1e3 for m in ms for x in m.itl]}


def draw_latency_histograms(metrics, *, axes=None, bins: int = 20, title: str = ""):
    """Histograms of TTFT, TPOT and ITL (ms) with mean, median and p99 marked. ``metrics``: a list of
    ``RequestMetrics`` (or a run with ``.metrics``)."""
    import numpy as np

    metrics = getattr(metrics, "metrics", metrics)
    data = _latencies(metrics)
    if not data["TTFT"]:
        raise ValueError("no finished requests with a first token: nothing to plot")
    if axes is None:
        fig, axes = new_plot(11, 3.2, 1, 3)
    else:
        fig = axes[0].figure
    for ax, (name, values), c in zip(axes, data.items(), PALETTE):
        if not values:
            ax.set_title(f"{name}: no data", fontsize=10)
            continue
        ax.hist(values, bins=bins, color=c, alpha=0.8)
        for stat, value, style in (("mean", np.mean(values), "-"), ("median", np.median(values), "--"),
                                   ("p99", np.percentile(values, 99), ":")):
            ax.axvline(value, color="#222222", linestyle=style, lw=1, label=f"{stat} {value:.1f} ms")
        ax.set(title=plot_text("viz.n_values", name=name, n=len(values)), xlabel="ms", ylabel=plot_text("viz.count"))
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def draw_latency_boxes(runs: Sequence[Any], *, ax=None, title: str | None = None):
    """Box plots of TTFT and TPOT (ms) for each run (objects with ``.label`` and ``.metrics``)."""
    fig, ax = _figure_of(ax, 6, 3.5)
    groups, labels, colours = [], [], []
    for i, r in enumerate(runs):
        lat = _latencies(r.metrics)
        for name in ("TTFT", "TPOT"):
            if lat[name]:
                groups.append(lat[name])
                labels.append(f"{name}\n{r.label}")
                colours.append(PALETTE[i % len(PALETTE)])
    if groups:
        box = ax.boxplot(groups, showmeans=True, patch_artist=True)
        for patch, c in zip(box["boxes"], colours):
            patch.set_facecolor(c)
            patch.set_alpha(0.5)
        ax.set_xticks(range(1, len(groups) + 1), labels, fontsize=7)
    ax.set(title=plot_text("viz.boxes_title") if title is None else title, ylabel="ms")
    return fig


# ------------------------------------------------------------------------------------------------
# Sweeps
# ------------------------------------------------------------------------------------------------


def draw_sweep(knob: str, values: Sequence[Any], runs: Sequence[Any], *, ax=None, title: str = ""):
    """Throughput (bars) and median TTFT / TPOT (lines, right axis) of runs made with ``knob`` = each value."""
    import numpy as np

    if len(values) != len(runs) or not runs:
        raise ValueError(f"got {len(values)} values for {len(runs)} runs: pass one run per value")
    fig, ax = _figure_of(ax, 5.5, 3.4)
    xs = range(len(values))
    ax.bar(xs, [r.output_throughput for r in runs], color=PALETTE[0], alpha=0.75, label="output tok/s")
    ax.set_xticks(list(xs), [str(v) for v in values])
    ax.set(xlabel=knob, ylabel="output tok/s", title=title or plot_text("viz.sweep_of", knob=knob))
    ax2 = ax.twinx()
    for name, c in (("TTFT", PALETTE[1]), ("TPOT", PALETTE[2])):
        ys = [np.median(v) if (v := _latencies(r.metrics)[name]) else np.nan for r in runs]
        ax2.plot(list(xs), ys, "o-", color=c, label=f"median {name}")
    ax2.set_ylabel("ms")
    ax2.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="lower right", framealpha=0.9)
    return fig


def draw_bench_concurrency(concurrencies: Sequence[int], results: Sequence[Any], *, axes=None, title: str = ""):
    """TTFT / TPOT (mean, median, p99) and output throughput against ``--max-concurrency`` from
    ``npukit.bench.ServingBenchmarkResult``s (one per concurrency)."""
    if len(concurrencies) != len(results) or not results:
        raise ValueError(f"got {len(concurrencies)} concurrencies for {len(results)} results")
    if axes is None:
        fig, axes = new_plot(11, 3.2, 1, 3)
    else:
        fig = axes[0].figure
    for ax, key in zip(axes, ("ttft", "tpot")):
        for stat, style in (("mean", "o-"), ("median", "s--"), ("p99", "^:")):
            ax.plot(concurrencies, [r.summary[f"{stat}_{key}_ms"] for r in results], style, label=stat)
        ax.set(title=plot_text("viz.vs_concurrency", key=key.upper()), xlabel=plot_text("viz.max_concurrency"),
               ylabel="ms")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    axes[2].plot(concurrencies, [r.summary["output_throughput"] for r in results], "o-", color=PALETTE[2])
    axes[2].set(title=plot_text("viz.output_throughput"), xlabel=plot_text("viz.max_concurrency"), ylabel="tok/s")
    axes[2].set_ylim(bottom=0)
    for ax in axes:
        ax.set_xticks(list(concurrencies))
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def draw_step_times(points: Sequence[Any], *, ax=None, title: str = "", tolerance: float = 1.5):
    """Median decode step time per batch size (range as error bars), on log-2 batch axis, with the
    memory-bound region (step time within ``tolerance`` × batch 1's) shaded and the compute-bound rest named."""
    from npukit.step_time import bend

    if not points:
        raise ValueError("no points: run npukit.step_time.decode_step_times first")
    fig, ax = _figure_of(ax, 6.5, 3.6)
    xs = [p.batch for p in points]
    med = [p.median * 1e3 for p in points]
    err = [[m - p.min * 1e3 for m, p in zip(med, points)], [p.max * 1e3 - m for m, p in zip(med, points)]]
    ax.errorbar(xs, med, yerr=err, fmt="o-", color=PALETTE[0], capsize=3, label="decode step (median, range)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set(xlabel="sequences decoding together", ylabel="ms per step", ylim=(0, max(p.max for p in points) * 1.15e3),
           title=title or "one decode step vs batch size")
    knee = bend(points, tolerance)
    last_flat = max((p.batch for p in points if knee is None or p.batch < knee), default=xs[0])
    ax.axvspan(xs[0] / 1.3, last_flat * 1.3, color=PALETTE[2], alpha=0.12)
    ax.text(xs[0], ax.get_ylim()[1] * 0.93, "memory-bound:\nextra sequences almost free", fontsize=8, va="top")
    if knee is not None:
        ax.text(knee, ax.get_ylim()[1] * 0.93, "compute-bound:\ntime grows with batch", fontsize=8, va="top")
    ax2 = ax.twinx()
    ax2.plot(xs, [p.tokens_per_s for p in points], "s--", color=PALETTE[1], label="decode tok/s")
    ax2.set_ylabel("tok/s")
    ax2.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="lower right", framealpha=0.9)
    return fig


# ------------------------------------------------------------------------------------------------
# Fit and split: the memory bill per tensor-parallel size, and how TP cuts a layer
# ------------------------------------------------------------------------------------------------


def draw_memory_bill(plan, *, ax=None, title: str | None = None):
    """Stacked bars per tensor-parallel size of an ``npukit.plan`` result: weights, activations, workspace and
    the KV cache that is left, against the device memory and the ``gpu_memory_utilization`` budget (GiB)."""
    fig, ax = _figure_of(ax, 8, 4)
    gib = 1024 ** 3
    tps = [str(p.tensor_parallel_size) for p in plan.plans]
    parts = [("weights", [p.weight_bytes_per_device for p in plan.plans]),
             ("activations", [p.activation_bytes_per_device for p in plan.plans]),
             ("workspace", [plan.workspace_bytes_per_device] * len(tps)),
             ("KV cache", [p.kv_cache_bytes_per_device for p in plan.plans])]
    bottom = [0.0] * len(tps)
    for (name, values), colour in zip(parts, _colours(len(parts))):
        v = [x / gib for x in values]
        ax.bar(tps, v, bottom=bottom, label=name, color=colour)
        bottom = [b + x for b, x in zip(bottom, v)]
    mem = plan.device.memory_bytes / gib
    ax.axhline(mem, color=SHARED_COLOUR, lw=1.5, label=f"{plan.device.name} memory")
    ax.axhline(mem * plan.gpu_memory_utilization, color=SHARED_COLOUR, lw=1, ls="--",
               label=f"x {plan.gpu_memory_utilization:g} (gpu-memory-utilization)")
    for i, p in enumerate(plan.plans):
        if not p.fits:
            ax.text(i, bottom[i], "does not fit", ha="center", va="bottom", color=PALETTE[3], fontsize=9)
    ax.set_xlabel(plot_text("viz.tp_size"))
    ax.set_ylabel(plot_text("viz.gib_per_device"))
    ax.set_title(title or f"{plan.model} ({plan.dtype}) on {plan.device.name}")
    ax.legend(fontsize=8, loc="upper right")
    return fig


def draw_tp_split(tensor_parallel_size: int = 2, *, ax=None):
    """One decoder layer under Megatron tensor parallelism: which weights are cut by columns (output
    features: heads, MLP rows), which by rows (input features), and where the all-reduces go."""
    from matplotlib.patches import Rectangle

    tp = tensor_parallel_size
    fig, ax = _figure_of(ax, 10, 3.2)
    colours = _colours(tp)
    # (label, x, width, height, split): split "col" cuts the height (outputs), "row" cuts the width (inputs)
    boxes = [("q/k/v_proj", 0.0, 1.0, 2.0, "col"), ("attention\n(own heads)", 1.4, 0.9, 2.0, "col"),
             ("o_proj", 2.7, 2.0, 1.0, "row"), ("gate/up_proj", 5.6, 1.0, 2.0, "col"),
             ("down_proj", 7.0, 2.0, 1.0, "row")]
    for label, x, w, h, split in boxes:
        for r in range(tp):
            if split == "col":
                rect = Rectangle((x, h - (r + 1) * h / tp), w, h / tp)
            else:
                rect = Rectangle((x + r * w / tp, 0), w / tp, h)
            rect.set(facecolor=colours[r], edgecolor="white", alpha=0.85)
            ax.add_patch(rect)
        ax.text(x + w / 2, -0.25, label, ha="center", va="top", fontsize=9)
    for x in (4.9, 9.2):
        ax.annotate("all-reduce", (x, 0.5), xytext=(x + 0.05, 1.6), fontsize=9, ha="center",
                    arrowprops=dict(arrowstyle="->", color=SHARED_COLOUR))
    for r in range(tp):
        ax.add_patch(Rectangle((0.2 + 1.3 * r, 2.45), 0.25, 0.2, facecolor=colours[r]))
        ax.text(0.5 + 1.3 * r, 2.55, f"rank {r}", va="center", fontsize=9)
    ax.set_xlim(-0.3, 10.2)
    ax.set_ylim(-0.9, 2.8)
    ax.axis("off")
    ax.set_title(f"One decoder layer at tensor-parallel size {tp}: columns (heads) split, rows split + all-reduce")
    return fig
