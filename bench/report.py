"""The bench's table (plain text and Markdown) and chart."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Row:
    measure: str
    mta: float | None
    peer_name: str = ""
    peer: float | None = None
    target: str = ""
    # ("ratio" or "value", "<=" | ">=" | "<", bound); None: for information
    rule: tuple[str, str, float] | None = None
    fmt: str = "{:.0f}"
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.mta is None or self.peer is None or not self.peer or math.isnan(self.peer):
            return None
        return self.mta / self.peer

    @property
    def met(self) -> str:
        if self.rule is None:
            return ""
        kind, op, limit = self.rule
        value = self.ratio if kind == "ratio" else self.mta
        if value is None or math.isnan(value):
            return "not measured"
        ok = {"<=": value <= limit, ">=": value >= limit, "<": value < limit}[op]
        if ok:
            return "met"
        if op == ">=":
            return f"missed (short by {(1 - value / limit) * 100:.0f}%)"
        over = value / limit if limit else float("inf")
        if over >= 2:
            return f"missed ({over:.1f}x the limit)"
        return f"missed (over by {(over - 1) * 100:.0f}%)"

    def cells(self) -> list[str]:
        def show(x: float | None) -> str:
            return "n/a" if x is None or math.isnan(x) else self.fmt.format(x)
        ratio = self.ratio
        return [self.measure, show(self.mta), self.peer_name,
                show(self.peer) if self.peer_name else "",
                f"{ratio:.2f}x" if ratio is not None else "",
                self.target, self.met]


HEADER = ["measure", "mta", "peer", "peer's", "mta/peer", "target", "met?"]


def text_table(rows: list[Row]) -> str:
    cells = [HEADER] + [r.cells() for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = []
    for n, c in enumerate(cells):
        lines.append("  ".join(x.ljust(w) if i in (0, 2, 5, 6) else x.rjust(w)
                               for i, (x, w) in enumerate(zip(c, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    out = ["| " + " | ".join(HEADER) + " |",
           "|---|--:|---|--:|--:|---|---|"]
    for r in rows:
        out.append("| " + " | ".join(x.replace("|", "\\|") for x in r.cells()) + " |")
    return "\n".join(out)


def chart(path: Path, systems: list[str], sessions: list[int],
          runs: dict[tuple[str, int], list[float]], title: str) -> None:
    """Grouped bars: median msgs/s per system at each session count, min-max whiskers."""
    import matplotlib
    matplotlib.use("Agg")
    import statistics

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    width = 0.8 / len(systems)
    colours = ["#2a6fdb", "#d9822b", "#3a9e5c", "#888888", "#b04a9e"]
    for i, system in enumerate(systems):
        xs, ys, lo, hi = [], [], [], []
        for j, n in enumerate(sessions):
            values = runs.get((system, n), [])
            if not values:
                continue
            median = statistics.median(values)
            xs.append(j + (i - (len(systems) - 1) / 2) * width)
            ys.append(median)
            lo.append(median - min(values))
            hi.append(max(values) - median)
        ax.bar(xs, ys, width * 0.95, yerr=[lo, hi], capsize=3, label=system,
               color=colours[i % len(colours)])
        for x, y, up in zip(xs, ys, hi):
            ax.annotate(f"{y:.0f}", (x, y + up), xytext=(0, 3), textcoords="offset points",
                        ha="center", fontsize=8)
    ax.set_xticks(range(len(sessions)))
    ax.set_xticklabels([f"{n} session{'s' if n != 1 else ''}" for n in sessions])
    ax.set_ylabel("messages per second (median; whiskers: min-max of rounds)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
