"""Figures from training runs and evaluations (``python -m vpgea.plot RUN_DIR [RUN_DIR ...] [--eval FILE ...]``).

Each RUN_DIR holds ``metrics.jsonl`` (a real run) or sub-directories that do (the toy run's ``vpgea/`` and
``grpo_lp/``); every run found is overlaid on the same axes, labelled by its sub-directory. Writes to ``--out``
(default ``RUN_DIR/plots``):

- ``lengths.png``: prior and posterior mean path length per step (the paper's Figure 4), with a rolling mean;
- ``reward_loss.png``: mean reward and loss per step;
- ``validation.png``: cross-view validation pass rate and gate fraction per step (VPG-EA runs only);
- ``frontier.png``: accuracy against average tokens, one point per (run, data set), from ``--eval`` files written by
  ``python -m vpgea.eval --output`` and from the ``summary.json`` of each RUN_DIR.

Missing or null metrics are skipped, and a figure with nothing to draw is not written. Needs matplotlib
(``pip install 'vpgea[plot]'``); it draws with the non-interactive Agg backend.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

__all__ = ["load_metrics", "find_runs", "load_points", "series", "main"]

# name, title, panels: (y label, [(metrics key, line style, legend suffix)])
FIGURES = [
    ("lengths.png", "Prior vs posterior path length",
     [("mean path length (tokens)", [("prior_len", "-", "prior"), ("posterior_len", "--", "posterior")])]),
    ("reward_loss.png", "Reward and loss",
     [("mean reward", [("reward_mean", "-", "")]), ("loss", [("loss", "-", "")])]),
    ("validation.png", "Cross-view validation",
     [("cross-view pass rate", [("cross_view_pass", "-", "")]), ("gate fraction", [("gate_frac", "-", "")])]),
]


def load_metrics(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file; an unreadable line raises ``ValueError`` naming ``file:line``."""
    from vpgea.data import iter_jsonl

    return [row for _, row in iter_jsonl(path)]


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


def load_points(path: str | Path) -> list[tuple[str, float, float]]:
    """``[(label, avg_tokens, acc)]`` from an eval JSON (label = data set) or a ``summary.json`` (label = key)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object")
    entries = obj["datasets"] if isinstance(obj.get("datasets"), dict) else obj
    return [(str(k), float(v["avg_tokens"]), float(v["acc"])) for k, v in entries.items()
            if isinstance(v, dict) and _number(v.get("acc")) and _number(v.get("avg_tokens"))]


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of ``key``, skipping rows where it is missing, null or not finite."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        if _number(row.get(key)):
            xs.append(row["step"] if _number(row.get("step")) else i + 1)
            ys.append(float(row[key]))
    return xs, ys


def _rolling(ys: list[float]) -> list[float]:
    w = max(1, min(50, len(ys) // 10))
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y - (ys[i - w] if i >= w else 0.0)
        out.append(total / min(i + 1, w))
    return out


def _new_figure(rows: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 1.0 + 3.0 * rows), layout="constrained")
    FigureCanvasAgg(fig)  # Agg: no display needed, no pyplot global state
    return fig


def _plot_steps(runs: dict[str, list[dict]], title: str, panels: list, path: Path) -> bool:
    """Draw one panel per entry of ``panels``; write ``path`` only when some series had data."""
    fig = _new_figure(len(panels))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    drawn = False
    for ax, (ylabel, keys) in zip(axes, panels):
        for i, (name, rows) in enumerate(runs.items()):
            for key, style, suffix in keys:
                xs, ys = series(rows, key)
                if xs:
                    color = f"C{i % 10}"
                    ax.plot(xs, ys, style, color=color, alpha=0.3, lw=0.8)
                    ax.plot(xs, _rolling(ys), style, color=color, lw=1.8, label=f"{name} {suffix}".strip())
        if ax.lines:
            drawn = True
            ax.legend(fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(title)
    if drawn:
        fig.savefig(path, dpi=120)
    return drawn


def _plot_frontier(sources: dict[str, list[tuple[str, float, float]]], path: Path) -> None:
    fig = _new_figure(1)
    ax = fig.subplots()
    for i, (source, points) in enumerate(sources.items()):
        ax.scatter([p[1] for p in points], [p[2] for p in points], color=f"C{i % 10}", label=source, zorder=3)
        for label, x, y in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("average tokens per response")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy vs tokens (efficiency frontier)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


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
        if _plot_steps(runs, title, panels, out / fname):
            written.append(out / fname)
        else:
            print(f"skipped {fname}: no data for it in the metrics", file=sys.stderr)
    if sources:
        _plot_frontier(sources, out / "frontier.png")
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
