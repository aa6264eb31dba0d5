"""What the reports share to write markdown tables and figures.

Numbers in a table are formatted by :func:`fmt` (one format for every report: "n/a" for a missing
value, a sign when asked, "mean ± half" with an interval), intervals by :func:`fmt_interval`,
p-values by :func:`fmt_p`. Figures are drawn with matplotlib's Agg backend (no display needed) and
written by :func:`save_figure`.
"""

from __future__ import annotations

import math

import numpy as np

from .stats import mean_ci


# --------------------------------------------------------------------------- markdown


def table(header, rows):
    """A markdown table: one header row, then ``rows`` (cells written with ``str``)."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)


def fmt(x, digits=3, signed=False, half=float("nan")):
    """``x`` to ``digits`` decimals ("n/a" if missing or not finite), with its sign if ``signed``,
    followed by "± half" where ``half`` (an interval's half width) is finite."""
    if x is None or not math.isfinite(x):
        return "n/a"
    text = f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    return text if half is None or not math.isfinite(half) else f"{text} ± {half:.{digits}f}"


def fmt_mean_ci(values, digits=3):
    """The mean of the finite ``values`` ± the half width of its 95% Student-t interval."""
    mean, half = mean_ci([v for v in values if math.isfinite(v)])
    return fmt(mean, digits, half=half)


def fmt_interval(interval, digits=3):
    """``[lo, hi]``, both signed."""
    return f"[{fmt(interval[0], digits, True)}, {fmt(interval[1], digits, True)}]"


def fmt_p(p):
    """A p-value: three decimals, or scientific notation below 0.001."""
    return "n/a" if not math.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


# --------------------------------------------------------------------------- figures


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    """Lay out, write (110 dpi) and close ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def group_curve(group_runs, rounds, fn):
    """Per round, the mean of ``fn(run, round)`` over ``group_runs`` and its 95% interval's half width
    (NaN where no run has a finite value)."""
    vals = np.array([[fn(run, r) for r in rounds] for run in group_runs], dtype=np.float64)
    stats = [mean_ci(vals[:, j][np.isfinite(vals[:, j])]) if np.isfinite(vals[:, j]).any() else
             (float("nan"), float("nan")) for j in range(len(rounds))]
    return np.array([s[0] for s in stats]), np.array([s[1] for s in stats])


__all__ = ["table", "fmt", "fmt_mean_ci", "fmt_interval", "fmt_p", "pyplot", "save_figure", "group_curve"]
