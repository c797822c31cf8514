"""The paper-style heatmap of a sweep: λ_p up the side, λ_r along the bottom, one metric per cell.

Finished runs show their value, coloured so that better is brighter (viridis, reversed for metrics
where lower is better); the best one is framed in red. A failed run's cell is hatched and says
"failed"; running, stopped and not-started runs say so on grey (their values are not final and are
not compared); skipped grid points stay white. Written as PNG and SVG with matplotlib (no pyplot
state: the Agg canvas directly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from wit_megatron.sweep.collect import Table

BEST_EDGE = "#ff0000"  # pure red: no colour of viridis, the hatching or the text comes near it
FAILED_FACE, FAILED_HATCH = "#e6e6e6", "#555555"
WAITING_FACE = "#f2f2f2"


@dataclass
class Heatmap:
    png: Path
    svg: Path
    best: Optional[tuple[float, float]]  # (λ_p, λ_r) of the best finished run
    cells: dict = field(default_factory=dict)  # (λ_p, λ_r) -> (what the cell shows, pixel box x0, y0, x1, y1 in the PNG)


def draw(table: Table, metric: str, out_prefix: Path, higher_is_better: Optional[bool] = None, dpi: int = 100) -> Heatmap:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if metric not in table.columns:
        raise KeyError(f"no column {metric!r}; the table has: {', '.join(table.columns)}")
    if higher_is_better is None:
        higher_is_better = table.higher_is_better.get(metric)
    if higher_is_better is None:
        raise ValueError(f"whether higher {metric!r} is better is not known: say --higher-is-better or --lower-is-better")
    ps, rs = table.lambda_prompt, table.lambda_response
    by_point = {(row["lambda_prompt"], row["lambda_response"]): row for row in table.rows}
    finished = {point: row[metric] for point, row in by_point.items()
                if row["status"] == "finished" and isinstance(row.get(metric), (int, float)) and math.isfinite(row[metric])}
    best = (max if higher_is_better else min)(finished, key=finished.get) if finished else None

    fig = Figure(figsize=(2.2 + 1.1 * len(rs), 1.6 + 0.75 * len(ps)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = "viridis" if higher_is_better else "viridis_r"
    values = list(finished.values())
    norm = Normalize(min(values), max(values)) if values else Normalize(0, 1)
    if values and norm.vmin == norm.vmax:
        norm = Normalize(norm.vmin - 0.5, norm.vmax + 0.5)
    # Enough significant digits (4 to 7) that different values read differently.
    digits = next((d for d in range(4, 8) if len({f"{v:.{d}g}" for v in values}) == len(set(values))), 7)
    shown = {}
    for i, p in enumerate(ps):
        for j, r in enumerate(rs):
            row = by_point.get((p, r))
            if (p, r) in finished:
                value = finished[(p, r)]
                face = _colour(cmap, norm, value)
                text, text_colour = f"{value:.{digits}g}", _contrast(face)
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=face, edgecolor="white", linewidth=1))
                shown[(p, r)] = "value"
            elif row is None:
                text, text_colour = "skipped", "#999999"
                shown[(p, r)] = "skipped"
            elif row["status"] == "failed":
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=FAILED_FACE, edgecolor=FAILED_HATCH, hatch="xx",
                                       linewidth=0))
                text, text_colour = "failed", "black"
                shown[(p, r)] = "failed"
            else:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=WAITING_FACE, edgecolor="white", linewidth=1))
                text = row["status"] if row["status"] != "finished" else "no value"
                text_colour = "#555555"
                shown[(p, r)] = text
            bold = (p, r) == best
            ax.text(j, i, text, ha="center", va="center", color=text_colour, fontsize=10 if bold else 9,
                    fontweight="bold" if bold else "normal",
                    bbox=dict(facecolor="white", edgecolor="none", pad=1) if shown[(p, r)] == "failed" else None)
    if best is not None:
        i, j = ps.index(best[0]), rs.index(best[1])
        ax.add_patch(Rectangle((j - 0.5 + 0.04, i - 0.5 + 0.04), 0.92, 0.92, fill=False, edgecolor=BEST_EDGE, linewidth=3,
                               gid="best-cell"))
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric)
    ax.set_xlim(-0.5, len(rs) - 0.5)
    ax.set_ylim(-0.5, len(ps) - 0.5)
    ax.set_xticks(range(len(rs)), [f"{r:g}" for r in rs])
    ax.set_yticks(range(len(ps)), [f"{p:g}" for p in ps])
    ax.set_xlabel("λ_r (response weight)")
    ax.set_ylabel("λ_p (prompt weight)")
    direction = "higher" if higher_is_better else "lower"
    title = f"{metric} ({direction} is better)"
    if best is not None:
        title += f"\nbest: λ_p {best[0]:g}, λ_r {best[1]:g}: {finished[best]:.{digits}g}"
    ax.set_title(title, fontsize=10)

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    png, svg = out_prefix.with_name(out_prefix.name + ".png"), out_prefix.with_name(out_prefix.name + ".svg")
    fig.savefig(png, dpi=dpi)  # layout is computed at draw time: the boxes below are read after it
    fig.savefig(svg)
    height = fig.get_size_inches()[1] * dpi
    cells = {}
    for i, p in enumerate(ps):
        for j, r in enumerate(rs):
            (x0, y0), (x1, y1) = ax.transData.transform([(j - 0.5, i - 0.5), (j + 0.5, i + 0.5)])
            cells[(p, r)] = (shown[(p, r)], (x0, height - y1, x1, height - y0))
    return Heatmap(png, svg, best, cells)


def _colour(cmap: str, norm, value: float):
    from matplotlib import colormaps

    return colormaps[cmap](norm(value))


def _contrast(rgba) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
