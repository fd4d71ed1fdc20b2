"""PNG plots of evaluation results (matplotlib, no display): grouped bars, length histograms and
per-layer error bars.

Every function writes one PNG of a fixed size (``figsize x DPI`` pixels, no ``bbox_inches``
cropping) and returns what it drew, ``{"file", "kind", ...}``, so callers and tests read the plotted
values instead of pixels. Figures are built on `matplotlib.figure.Figure` with the Agg canvas (no
pyplot, no global backend switch) under matplotlib's default style (a user's matplotlibrc does not
change the output); the PNG carries no ``Software`` text chunk and matplotlib writes no date into
PNGs, so the same data give the same bytes with the same matplotlib. A missing value (None) draws
no bar. See docs/architecture.md, "Reports".
"""
from __future__ import annotations

import math
import os
from pathlib import Path

DPI = 100
FIGSIZE = (8.0, 4.5)        # 800 x 450 pixels
WIDE_FIGSIZE = (12.0, 4.5)  # 1200 x 450 pixels: per-layer errors


def _figure(figsize, rows: int = 1, cols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, path: Path) -> None:
    """Write atomically (a temporary file renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    os.replace(tmp, path)


def _nan(v) -> float:
    return math.nan if v is None else float(v)


def _heights(container) -> list:
    """The bar heights a bar container holds, None where no bar is drawn (NaN)."""
    return [None if math.isnan(h) else float(h) for h in (bar.get_height() for bar in container)]


def _style():
    import matplotlib.style

    return matplotlib.style.context("default")


def grouped_bars(path: str | os.PathLike, groups: list[str], series: dict[str, list], *, title: str,
                 ylabel: str) -> dict:
    """Bars of ``series[label][i]`` at group ``groups[i]``, one colour per label, side by side."""
    path = Path(path)
    labels = list(series)
    width = 0.8 / max(1, len(labels))
    with _style():
        fig, axes = _figure(FIGSIZE)
        ax = axes[0][0]
        for j, label in enumerate(labels):
            xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(groups))]
            ax.bar(xs, [_nan(v) for v in series[label]], width=width, label=label)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if len(labels) > 1:
            ax.legend()
        _save(fig, path)
        drawn = {c.get_label(): _heights(sorted(c, key=lambda bar: bar.get_x())) for c in ax.containers}
        ticks = [t.get_text() for t in ax.get_xticklabels()]
    return {"file": path.name, "kind": "bars", "title": title, "groups": ticks, "series": drawn}


def histograms(path: str | os.PathLike, panels: dict[str, dict[str, dict]], *, title: str, xlabel: str) -> dict:
    """One panel per key of ``panels`` (a CoT mode), each with one step histogram per label from its
    ``{"edges", "counts"}`` (as `qnpu.eval.code.metrics.distribution` writes them)."""
    path = Path(path)
    names = list(panels) or ["-"]
    drawn: dict = {}
    with _style():
        fig, axes = _figure(FIGSIZE, 1, len(names))
        for ax, name in zip(axes[0], names):
            drawn[name] = {}
            for label, hist in panels.get(name, {}).items():
                if hist["counts"]:
                    ax.stairs(hist["counts"], hist["edges"], label=label)
            drawn[name] = {p.get_label(): [float(v) for v in p.get_data().values] for p in ax.patches}
            ax.set_title(name)
            ax.set_xlabel(xlabel)
        axes[0][0].set_ylabel("samples")
        if any(len(v) > 1 for v in drawn.values()):
            axes[0][-1].legend()
        fig.suptitle(title)
        _save(fig, path)
    return {"file": path.name, "kind": "histograms", "title": title, "panels": drawn}


def layer_bars(path: str | os.PathLike, layers: list[str], errors: list, *, title: str) -> dict:
    """One bar per linear in the given order, coloured by the linear's name (``q_proj``, ...), with
    the decoder-block index under the first linear of each block."""
    path = Path(path)
    kinds = list(dict.fromkeys(layer.rsplit(".", 1)[-1] for layer in layers))
    with _style():
        fig, axes = _figure(WIDE_FIGSIZE)
        ax = axes[0][0]
        colors = {kind: f"C{i % 10}" for i, kind in enumerate(kinds)}
        bars = ax.bar(range(len(layers)), [_nan(e) for e in errors], width=0.8,
                      color=[colors[layer.rsplit(".", 1)[-1]] for layer in layers])
        ticks, names, seen = [], [], set()
        for i, layer in enumerate(layers):
            block = _block(layer)
            if block not in seen:
                seen.add(block)
                ticks.append(i)
                names.append(block)
        if len(ticks) > 40:  # keep the axis readable: every n-th block
            step = math.ceil(len(ticks) / 40)
            ticks, names = ticks[::step], names[::step]
        ax.set_xticks(ticks, names)
        ax.set_xlabel("decoder block")
        ax.set_ylabel("relative output error")
        ax.set_title(title)
        if 1 < len(kinds) <= 12:
            ax.legend([bars[[layer.rsplit(".", 1)[-1] for layer in layers].index(k)] for k in kinds], kinds,
                      fontsize="small", ncols=min(len(kinds), 7))
        _save(fig, path)
        heights = _heights(sorted(bars, key=lambda bar: bar.get_x()))
    return {"file": path.name, "kind": "layers", "title": title, "layers": list(layers), "heights": heights}


def _block(label: str) -> str:
    """The decoder-block index in a linear's label (``model.layers.3.mlp.up_proj`` -> ``3``)."""
    digits = [part for part in label.split(".") if part.isdigit()]
    return digits[0] if digits else label.rsplit(".", 1)[0]


def code_plots(folder: str | os.PathLike, modes: dict[str, dict], prefix: str = "") -> list[dict]:
    """The code benchmark's plots of one or more runs: ``modes`` maps a run label to its CoT modes,
    each ``{"pass_at_1", "repetition_rate", "histogram"}`` (`qnpu.eval.compare.normalise_code`).
    Writes ``<prefix>pass_at_1.png`` (pass@1 per mode, a bar per run), ``<prefix>repetition_rate.png``
    and ``<prefix>length_tokens.png`` (the answers' token-length histograms, a panel per mode)."""
    folder = Path(folder)
    names = list(dict.fromkeys(name for per_run in modes.values() for name in per_run))

    def values(key):
        return {label: [(per_run.get(name) or {}).get(key) for name in names] for label, per_run in modes.items()}

    return [
        grouped_bars(folder / f"{prefix}pass_at_1.png", names, values("pass_at_1"),
                     title="pass@1 per CoT mode", ylabel="pass@1"),
        grouped_bars(folder / f"{prefix}repetition_rate.png", names, values("repetition_rate"),
                     title="repetition failures per CoT mode", ylabel="share of samples"),
        histograms(folder / f"{prefix}length_tokens.png",
                   {name: {label: per_run[name]["histogram"] for label, per_run in modes.items() if name in per_run}
                    for name in names},
                   title="answer length per CoT mode", xlabel="tokens"),
    ]
