"""python -m vpgea.plot: loaders and PNG figures from synthetic toy-layout runs and evaluation JSON."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("matplotlib")

from vpgea import plot  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 30


def _row(step: int, vpgea: bool) -> dict:
    return {
        "step": step, "loss": 1.0 / step, "reward_mean": 0.02 * step, "prior_len": 100.0 - step,
        "posterior_len": 85.0 - 0.2 * step if vpgea else None,
        "cross_view_pass": 0.5 + 0.01 * step if vpgea else None, "gate_frac": 0.3 if vpgea else None,
        "kl": 0.01, "tokens_per_s": 1000.0, "step_time": 1.0, "acc_prior": 0.5, "acc_posterior": 0.6 if vpgea else None,
    }


@pytest.fixture
def toy_run(tmp_path):
    """The toy layout: summary.json at the top, one metrics.jsonl per mode in sub-directories."""
    run = tmp_path / "toy"
    for mode, vpgea in (("vpgea", True), ("grpo_lp", False)):
        (run / mode).mkdir(parents=True)
        rows = [_row(s, vpgea) for s in range(1, STEPS + 1)]
        if not vpgea:
            del rows[3]["loss"]  # a missing key is skipped like a null
        (run / mode / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = lambda acc, tok: {"acc": acc, "avg_tokens": tok, "eps3": acc * acc / tok}  # noqa: E731
    summary = {"before": stats(0.4, 120.0), "vpgea": stats(0.7, 80.0), "grpo_lp": stats(0.65, 95.0), "wall_time_s": 3.0}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def eval_file(tmp_path):
    path = tmp_path / "ckpt500.json"
    path.write_text(json.dumps({"model": "/models/ckpt500", "samples": 1, "datasets": {
        "math500": {"acc": 0.72, "avg_tokens": 610.5, "eps3": 0.00085},
        "gsm8k": {"acc": 0.9, "avg_tokens": 250.0, "eps3": 0.00324}}}))
    return path


def _assert_png(path):
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, (path, len(data))  # a drawn figure, not an empty image


def test_find_runs_toy_layout(toy_run):
    runs = plot.find_runs(toy_run)
    assert runs == {"grpo_lp": toy_run / "grpo_lp" / "metrics.jsonl", "vpgea": toy_run / "vpgea" / "metrics.jsonl"}
    assert plot.find_runs(toy_run / "vpgea") == {"vpgea": toy_run / "vpgea" / "metrics.jsonl"}


def test_load_metrics_and_series(toy_run):
    vp = plot.load_metrics(toy_run / "vpgea" / "metrics.jsonl")
    lp = plot.load_metrics(toy_run / "grpo_lp" / "metrics.jsonl")
    assert len(vp) == len(lp) == STEPS
    steps, post = plot.series(vp, "posterior_len")
    assert steps == list(range(1, STEPS + 1))
    assert post == pytest.approx([85.0 - 0.2 * s for s in steps])
    assert plot.series(lp, "posterior_len") == ([], [])  # all null in grpo-lp mode
    assert plot.series(lp, "gate_frac") == ([], [])
    loss_steps, _ = plot.series(lp, "loss")
    assert loss_steps == [s for s in range(1, STEPS + 1) if s != 4]  # the row without "loss" is skipped


def test_load_points(toy_run, eval_file):
    assert plot.load_points(eval_file) == [("math500", 610.5, 0.72, None), ("gsm8k", 250.0, 0.9, None)]
    # summary.json: every key with acc and avg_tokens is a point; wall_time_s is not
    assert plot.load_points(toy_run / "summary.json") == [("before", 120.0, 0.4, None), ("vpgea", 80.0, 0.7, None),
                                                          ("grpo_lp", 95.0, 0.65, None)]


def test_main_writes_figures(toy_run, eval_file, tmp_path, capsys):
    out = tmp_path / "figs"
    assert plot.main([str(toy_run), "--eval", str(eval_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    names = ("lengths.png", "reward_loss.png", "validation.png", "frontier.png")
    assert printed == [str(out / n) for n in names]
    for n in names:
        _assert_png(out / n)


def test_main_default_out_and_grpo_only(toy_run, capsys):
    # only the grpo-lp run: no cross-view/gate data, so validation.png is skipped; frontier comes from summary.json
    assert plot.main([str(toy_run / "grpo_lp")]) == 0
    captured = capsys.readouterr()
    out = toy_run / "grpo_lp" / "plots"
    assert captured.out.split() == [str(out / "lengths.png"), str(out / "reward_loss.png")]
    assert "skipped validation.png" in captured.err
    assert not (out / "validation.png").exists()
    _assert_png(out / "lengths.png")


def test_malformed_line_names_file_and_line(toy_run, capsys):
    path = toy_run / "vpgea" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[6] = lines[6][:25]  # a truncated line 7
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:7: not valid JSON"):
        plot.load_metrics(path)
    assert plot.main([str(toy_run), "--out", str(toy_run / "p")]) == 2
    assert f"{path}:7:" in capsys.readouterr().err
    assert not (toy_run / "p" / "lengths.png").exists()


def test_empty_directory_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot.find_runs(empty)
    assert plot.main([str(empty)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert not (empty / "plots").exists()


def test_missing_matplotlib_message(toy_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert plot.main([str(toy_run)]) == 1
    assert "pip install 'vpgea[plot]'" in capsys.readouterr().err


def test_figures_read_as_intended(toy_run, tmp_path):
    runs = {name: plot.load_metrics(p) for name, p in plot.find_runs(toy_run).items()}
    _, title, panels = next(f for f in plot.FIGURES if f[0] == "reward_loss.png")
    fig = plot.plot_steps(runs, title, panels, tmp_path / "rl.png")
    # One reward panel per run, each on its own scale (the two methods' rewards mean different things) ...
    reward_axes = [ax for ax in fig.axes if ax.get_ylabel().startswith("mean reward")]
    assert sorted(ax.get_ylabel() for ax in reward_axes) == ["mean reward (grpo_lp)", "mean reward (vpgea)"]
    for ax in reward_axes:  # only its own run's lines, on a y axis shared with no other panel
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [ax.get_ylabel()[len("mean reward ("):-1]]
        assert len(ax.get_shared_y_axes().get_siblings(ax)) == 1
    # ... the gradient norm beside the loss, whose panel says why it sits near 0, and the thick lines are explained.
    assert any(ax.get_ylabel() == "gradient norm" for ax in fig.axes)
    loss_ax = next(ax for ax in fig.axes if ax.get_ylabel() == "loss")
    assert "about 0 by construction" in loss_ax.get_title(loc="left")
    assert "thick lines: rolling mean over" in fig._suptitle.get_text()
    points = {"toy": [("before", 50.0, 0.62, 600), ("vpgea", 48.0, 0.65, 600)]}
    ax = plot.plot_frontier(points, tmp_path / "f.png").axes[0]
    assert ax.get_ylim() == (0.0, 1.0) and ax.get_xlim()[0] == 0.0  # not zoomed into the noise
    assert len(ax.containers) == 2 and all(bars.has_yerr for bars in ax.containers)  # the standard errors are drawn
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["before", "vpgea"]  # told apart by the legend
    two = {"seed 0": points["toy"], "seed 1": [("before", 51.0, 0.6, 600), ("vpgea", 30.0, 0.7, 600)]}
    ax = plot.plot_frontier(two, tmp_path / "g.png").axes[0]
    assert len(ax.containers) == 4
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["seed 0", "seed 1", "before", "vpgea"]
