"""Figures from training runs and evaluations (``python -m vpgea.plot RUN_DIR [RUN_DIR ...] [--eval FILE ...]``).

Each RUN_DIR holds ``metrics.jsonl`` (a real run) or sub-directories that do (the toy run's ``vpgea/`` and
``grpo_lp/``); every run found is overlaid on the same axes, labelled by its sub-directory. Writes to ``--out``
(default ``RUN_DIR/plots``):

- ``lengths.png``: prior, posterior and gated (distilled) path lengths per step (the paper's Figure 4), and U of the
  prior and posterior paths;
- ``reward_loss.png``: mean reward (one panel per run: each method has its own reward), gradient norm and loss;
- ``validation.png``: cross-view validation pass rate (all posterior paths, and split into paths whose own answer is
  right, wrong, or (toy) that copy the hint) and gate fraction per step (VPG-EA runs only);
- ``frontier.png``: accuracy against average tokens, one point per (run, data set or mode), with the standard error
  of the accuracy as an error bar and eps3 contours dotted, on axes that start at 0, from ``--eval`` files written by
  ``python -m vpgea.eval`` and from the ``summary.json`` of each RUN_DIR (every mode of a ``--modes`` run).

Per-step figures draw each step as a thin line and a rolling mean as a thick one (the legend says which).

Missing or null metrics are skipped, and a figure with nothing to draw is not written. Needs matplotlib
(``pip install 'vpgea[plot]'``); it draws with the non-interactive Agg backend.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FIGURES", "Panel", "find_runs", "load_metrics", "load_points", "main", "plot_frontier", "plot_steps",
           "series"]



@dataclass(frozen=True)
class Panel:
    """One row of a figure: ``lines`` are ``(metrics key, line style, legend suffix)``. ``per_run``: one row per run,
    each on its own y scale (for quantities that mean different things in different runs). ``note``: a line under
    the y label's panel title saying how to read it."""

    ylabel: str
    lines: tuple
    per_run: bool = False
    note: str = ""


FIGURES = [
    ("lengths.png", "Student-view (prior) vs teacher-view (posterior) path length",
     [Panel("mean path length (tokens)", (("prior_len", "-", "prior"), ("posterior_len", "--", "posterior"),
                                          ("gated_len", ":", "gated (A > 0: distilled)")),
            note="the paper's Figure 4: the prior falls toward (and below) the posterior as VPG-EA distils it"),
      Panel("U (answer log-prob, student view)", (("u_prior", "-", "prior paths"), ("u_post", "--", "posterior")),
            note="U = log P(y* | x, z): how well a path lets the student view derive the answer")]),
    ("reward_loss.png", "Reward, gradient norm and loss",
     [Panel("mean reward", (("reward_mean", "-", ""),), per_run=True,
            note="each run's own reward on its own scale (VPG-EA: R * eta; grpo-lp: correct - length penalty)"),
      Panel("gradient norm", (("grad_norm", "-", ""),), note="before clipping: how hard each step pushes"),
      Panel("loss", (("loss", "-", ""),),
            note="policy-gradient surrogate, about 0 by construction (centred advantages): flat is not idle")]),
    ("validation.png", "Cross-view validation",
     [Panel("cross-view pass rate", (("cross_view_pass", "-", "all"), ("pass_correct", "--", "own answer right"),
                                     ("pass_wrong", ":", "own answer wrong"),
                                     ("pass_leak", "-.", "hint copied (toy)"),
                                     ("pass_correct_easy", (0, (1, 4)), "own answer right, all prior paths right")),
            note="the share of posterior paths that pass, by kind: leaks and wrong paths should not"),
      Panel("gate fraction", (("gate_frac", "-", ""),))]),
]


def load_metrics(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file (a partial last line, from a run writing it right now, is left out); an
    unreadable line elsewhere raises ``ValueError`` naming ``file:line``."""
    from vpgea.data import read_jsonl_log

    return read_jsonl_log(path)


def find_runs(run_dir: str | Path) -> dict[str, Path]:
    """``{label: metrics.jsonl}``: the directory's own file, else those in its sub-directories (label = sub-path)."""
    d = Path(run_dir)
    if d.is_file():
        return {d.resolve().parent.name: d}
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such run directory")
    if (d / "metrics.jsonl").is_file():
        return {d.resolve().name: d / "metrics.jsonl"}
    found = sorted(d.rglob("metrics.jsonl"))
    if not found:
        raise FileNotFoundError(f"{d}: no metrics.jsonl in it or in its sub-directories")
    return {p.parent.relative_to(d).as_posix(): p for p in found}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_points(path: str | Path) -> list[tuple[str, float, float, int | None]]:
    """``[(label, avg_tokens, acc, responses)]`` from an eval JSON (label = data set) or a ``summary.json`` (label =
    key); ``responses`` (``num_responses``, for the error bar) is None where the file does not say."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object")
    entries = obj["datasets"] if isinstance(obj.get("datasets"), dict) else obj
    return [(str(k), float(v["avg_tokens"]), float(v["acc"]),
             int(v["num_responses"]) if _number(v.get("num_responses")) and v["num_responses"] > 0 else None)
            for k, v in entries.items()
            if isinstance(v, dict) and _number(v.get("acc")) and _number(v.get("avg_tokens"))]


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of ``key``, skipping rows where it is missing, null or not finite."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        if _number(row.get(key)):
            xs.append(row["step"] if _number(row.get("step")) else i + 1)
            ys.append(float(row[key]))
    return xs, ys


def _window(n: int) -> int:
    """The rolling-mean window for a series of ``n`` steps."""
    return max(1, min(50, n // 10))


def _rolling(ys: list[float], w: int | None = None) -> list[float]:
    w = w or _window(len(ys))
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y - (ys[i - w] if i >= w else 0.0)
        out.append(total / min(i + 1, w))
    return out


def _new_figure(rows: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 1.2 + 2.8 * rows), layout="constrained")
    FigureCanvasAgg(fig)  # Agg: no display needed, no pyplot global state
    return fig


def plot_steps(runs: dict[str, list[dict]], title: str, panels: list[Panel], path: Path):
    """Draw the panels (a ``per_run`` panel once per run); write ``path`` and return the figure only when some series
    had data (else None)."""
    rows: list[tuple[Panel, dict[str, list[dict]]]] = []
    for panel in panels:
        rows += [(panel, {name: data}) for name, data in runs.items()] if panel.per_run else [(panel, runs)]
    fig = _new_figure(len(rows))
    axes = fig.subplots(len(rows), 1, sharex=True, squeeze=False)[:, 0]
    colors = {name: f"C{i % 10}" for i, name in enumerate(runs)}
    w = _window(max((len(data) for data in runs.values()), default=0))
    drawn = False
    for i, (ax, (panel, these)) in enumerate(zip(axes, rows)):
        for name, data in these.items():
            for key, style, suffix in panel.lines:
                xs, ys = series(data, key)
                if xs:
                    ax.plot(xs, ys, linestyle=style, color=colors[name], alpha=0.3, lw=0.8)
                    ax.plot(xs, _rolling(ys, w), linestyle=style, color=colors[name], lw=1.8,
                            label=f"{name} {suffix}".strip())
        if ax.lines:
            drawn = True
            ax.legend(fontsize=8)
        label = panel.ylabel + (f" ({next(iter(these))})" if panel.per_run else "")
        ax.set_ylabel(label, fontsize=9)
        if panel.note and (i == 0 or rows[i - 1][0] is not panel):  # a per-run panel's note once, on its first row
            ax.set_title(panel.note, fontsize=8, loc="left")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(f"{title}\nthin lines: each step; thick lines: rolling mean over {w} steps", fontsize=10)
    if not drawn:
        return None
    fig.savefig(path, dpi=120)
    return fig


def _color(i: int):
    """Matplotlib's ten default colours, then black and greys, so the 11 modes of a comparison stay distinct."""
    return f"C{i}" if i < 10 else ("black", "0.45", "0.7")[(i - 10) % 3]


def plot_frontier(sources: dict[str, list[tuple[str, float, float, int | None]]], path: Path):
    """Accuracy against tokens, one point per (source, label), with one-standard-error bars; writes ``path`` and
    returns the figure. Points are told apart by the legend, not by text beside them (a cluster of methods at similar
    lengths makes labels overprint): with one source each label has its own colour and marker; with several, the
    colour names the source and the marker the label."""
    from matplotlib.lines import Line2D

    fig = _new_figure(1)
    ax = fig.subplots()
    markers = "osD^vP*XhpH<>d8"
    labels = list(dict.fromkeys(p[0] for pts in sources.values() for p in pts))
    single = len(sources) == 1
    for i, (source, points) in enumerate(sources.items()):
        for label, x, y, n in points:
            j = labels.index(label)
            # Standard error of a mean of n Bernoulli outcomes (samples of one problem are counted as independent).
            err = math.sqrt(y * (1 - y) / n) if n else 0.0
            ax.errorbar([x], [y], yerr=[err], fmt=markers[j % len(markers)], capsize=3, zorder=3,
                        color=_color(j if single else i), label=label if single else None)
    handles = None  # one source: the points' own labels
    if not single:
        handles = [Line2D([], [], color=_color(i), marker="o", ls="", label=src) for i, src in enumerate(sources)]
        handles += [Line2D([], [], color="black", marker=markers[j % len(markers)], ls="", label=lab)
                    for j, lab in enumerate(labels)]
    ax.legend(handles=handles, fontsize=7, ncol=2, loc="lower right")
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1)  # accuracy on its whole range: a zoomed axis makes noise look like a frontier
    # eps3 = ACC^2 / A.Tok contours through the points' range: acc = sqrt(eps3 * tokens)
    xmax = max((p[1] for pts in sources.values() for p in pts), default=1.0) * 1.1
    eps = sorted(p[2] ** 2 / p[1] for pts in sources.values() for p in pts if p[1] > 0)
    if eps:
        import numpy as np

        xs = np.linspace(xmax / 200, xmax, 200)
        for level in np.geomspace(eps[0], eps[-1], 4) if eps[-1] > eps[0] else eps[:1]:
            ax.plot(xs, np.sqrt(level * xs), ":", color="grey", lw=0.8, zorder=1)
            x_label = min(xmax, 0.95 ** 2 / level)  # where the contour leaves the plot: its right edge or the top
            ax.annotate(f"eps3 {level:.3g}", (x_label, float(np.sqrt(level * x_label))), fontsize=7, color="grey",
                        ha="right", va="bottom")
        ax.set_xlim(0, xmax)
    ax.set_xlabel("average tokens per response")
    ax.set_ylabel("accuracy (error bars: one standard error)")
    ax.set_title("Accuracy vs tokens (efficiency frontier)")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)
    return fig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vpgea.plot", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory (or a metrics.jsonl file)")
    p.add_argument("--eval", nargs="+", action="extend", default=[], metavar="FILE",
                   help="evaluation JSON from `python -m vpgea.eval --output` (or a summary.json)")
    p.add_argument("--out", help="output directory (default: the first RUN_DIR/plots)")
    return p


def _run(args: argparse.Namespace) -> int:
    runs: dict[str, list[dict]] = {}
    sources: dict[str, list[tuple[str, float, float]]] = {}
    multi = len(args.run_dirs) > 1
    for d in map(Path, args.run_dirs):
        name = d.resolve().name
        for label, mpath in find_runs(d).items():
            runs[f"{name}/{label}" if multi and label != name else label] = load_metrics(mpath)
        summary = (d.parent if d.is_file() else d) / "summary.json"
        if summary.is_file() and (points := load_points(summary)):
            sources[name] = points
    for f in args.eval:
        if not (points := load_points(f)):
            raise ValueError(f"{f}: no entries with 'acc' and 'avg_tokens'")
        sources[Path(f).stem] = points
    first = Path(args.run_dirs[0])
    out = Path(args.out) if args.out else (first.parent if first.is_file() else first) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, title, panels in FIGURES:
        if plot_steps(runs, title, panels, out / fname) is not None:
            written.append(out / fname)
        else:
            print(f"skipped {fname}: no data for it in the metrics", file=sys.stderr)
    if sources:
        plot_frontier(sources, out / "frontier.png")
        written.append(out / "frontier.png")
    for path in written:
        print(path)
    return 0 if written else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("vpgea.plot needs matplotlib: pip install 'vpgea[plot]'", file=sys.stderr)
        return 1
    try:
        return _run(args)
    except (OSError, ValueError) as e:
        print(f"vpgea.plot: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
