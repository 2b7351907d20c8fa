"""Shared benchmark utilities: timing, peak memory, the matmul floor, and result tables.

Every table carries the device name and the torch / triton versions beside the numbers (results/<name>_<device>.md
and .json).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import re
import statistics
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton missing (CPU-only installs on other platforms)
        triton_version = None
    env = {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    for pkg in ("liger_kernel", "cut_cross_entropy", "transformers", "flash_attn"):
        try:
            from importlib.metadata import version

            env[pkg] = version(pkg.replace("_", "-"))
        except Exception:
            env[pkg] = None
    return env


def cuda_time_ms(fn: Callable[[], object], *, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of ``fn`` in milliseconds, measured with CUDA events (one sync per repetition)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak device memory allocated while ``fn`` runs, above what was allocated before it (its outputs included)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def matmul_tflops(m: int, n: int, k: int, dtype: torch.dtype, device="cuda") -> float:
    """Measured cuBLAS rate (TFLOP/s) of an ``[m, k] @ [k, n]`` GEMM, the floor's denominator."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    ms = cuda_time_ms(lambda: a @ b, warmup=3, reps=10)
    del a, b
    torch.cuda.empty_cache()
    return 2.0 * m * n * k / (ms * 1e-3) / 1e12


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def write_results(name: str, rows: list[dict], meta: dict | None = None, *, results_dir: Path | None = None) -> Path:
    """Write ``rows`` as ``<name>_<device>.json`` and a markdown table ``.md``; returns the markdown path.

    ``meta`` (shapes, targets, notes) is stored beside the environment. Columns are the union of the rows' keys, in
    first-seen order.
    """
    out_dir = Path(results_dir or os.environ.get("VPGEA_BENCH_RESULTS", RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    stem = f"{name}_{_slug(env['device'])}"
    payload = {"name": name, "environment": env, "meta": meta or {}, "rows": rows}
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)

    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return "" if x is None else str(x)

    lines = [f"# {name}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items() if v is not None]
    for k, v in (meta or {}).items():
        lines.append(f"- {k}: {v}")
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    md = out_dir / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")
    return md
