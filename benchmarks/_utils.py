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
from collections.abc import Callable

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
        # fp32 matmuls (Liger's chunked losses upcast their GEMMs) run 3-8x faster with TF32: say which ran.
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    for pkg in ("liger_kernel", "cut_cross_entropy", "transformers", "flash_attn"):
        try:
            from importlib.metadata import version

            env[pkg] = version(pkg.replace("_", "-"))
        except Exception:
            env[pkg] = None
    return env


def time_left_s() -> float:
    """Seconds until ``VPGEA_BENCH_DEADLINE`` (a Unix time set by ``gpu_session.sh`` so that one device call ends with
    its tables written, not killed mid-row); infinity when unset. Benchmarks check it between shapes and providers."""
    import time

    deadline = os.environ.get("VPGEA_BENCH_DEADLINE")
    return float("inf") if not deadline else float(deadline) - time.time()


def cuda_time_ms(fn: Callable[[], object], *, warmup: int = 3, reps: int = 10, min_warmup_s: float = 0.0) -> float:
    """Median wall time of ``fn`` in milliseconds, measured with CUDA events (one sync per repetition).

    Warm-up: ``warmup`` calls, continued until ``min_warmup_s`` seconds have passed (a GPU at idle clocks makes the
    first short calls slow)."""
    import time

    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    while time.perf_counter() - t0 < min_warmup_s:
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


def cuda_time_per_call_us(fn: Callable[[], object], *, calls: int = 200, warmup: int = 10) -> float:
    """Microseconds per call of ``fn`` issued ``calls`` times back to back between one pair of CUDA events: for
    calls so short that one sync per call would measure the sync. Includes each call's host (launch) cost when the
    host is the bottleneck."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def cuda_graph_time_us(fn: Callable[[], object], *, replays: int = 200) -> float:
    """Device time per call of ``fn`` captured once in a CUDA graph and replayed: the kernels alone, no launch cost."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_time_per_call_us(graph.replay, calls=replays)


def clear_grads(*tensors: torch.Tensor) -> None:
    for t in tensors:
        t.grad = None


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak device memory allocated while ``fn`` runs, above what was allocated before it (its outputs included).

    Clear the inputs' gradients before calling it, so that the gradients ``fn`` produces count in every table."""
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
    ms = cuda_time_ms(lambda: a @ b, warmup=3, reps=10, min_warmup_s=0.5)
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
