"""Sweep tile configurations of the token_logprobs kernels on a GPU (not a test: run it by hand, one call).

    python benchmarks/tune_token_logprobs.py [--out FILE.json] [--quick]

For each benchmark shape (Qwen2.5-1.5B / 7B heads, N = 4096 / 16384, bf16) it times the forward kernel over tile
configs and vocab-split counts, and the backward over dlogits tile configs and workspace widths, checks each result
against eager PyTorch on the first rows, and prints the best configs beside the cuBLAS floor. The chosen defaults go
into ``kernels/token_logprobs.py::_config``; the history goes into ``benchmarks/NOTES.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vpgea.kernels import token_logprobs as K  # noqa: E402

import _kernels_wip as W  # noqa: E402  (benchmarks/ is this script's folder, first on sys.path)

FWD_CONFIGS = [
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=4, num_stages=4),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=128, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=4),
    dict(BLOCK_N=256, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=256, BLOCK_D=64, num_warps=4, num_stages=4),
    dict(BLOCK_N=128, BLOCK_V=64, BLOCK_D=64, num_warps=4, num_stages=4),
    dict(BLOCK_N=256, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=4),
    dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=32, num_warps=8, num_stages=5),
]
BWD_CONFIGS = [
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=256, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
]
WORKSPACE_MIB = [64, 256]


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=120, return_mode="median")


class Recorder:
    """Results appended to a JSON file after every measurement (a device call cut short keeps them)."""

    def __init__(self, path: str | None, deadline: float | None):
        self.path, self.deadline, self.rows = path, deadline, []

    def add(self, **row) -> None:
        self.rows.append(row)
        print("  " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
        if self.path:
            Path(self.path).write_text(json.dumps(self.rows, indent=1, default=str))

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()


def _inputs(n, d, v):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(n, d, device="cuda", generator=g) * 0.5).bfloat16()
    w = (torch.randn(v, d, device="cuda", generator=g) * d**-0.5).bfloat16()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    return h, w, y


def _gold(h, w, y, rows=256):
    z = h[:rows].double() @ w.double().t()
    lse = torch.logsumexp(z, -1)
    return lse, z.gather(-1, y[:rows, None])[:, 0] - lse


def sweep_forward(rec, model, n, d, v, cfgs, sms):
    h, w, y = _inputs(n, d, v)
    a, b = torch.randn(n, d, device="cuda").bfloat16(), torch.randn(d, v, device="cuda").bfloat16()
    floor = bench(lambda a=a, b=b: a @ b)
    del a, b
    lse64, logp64 = _gold(h, w, y)
    rec.add(exp="floor", model=model, N=n, ms=floor)
    t, lse, _, _ = K.token_logprobs_forward(h, w, None, y, None, 1.0, False)
    ms = bench(lambda: K.token_logprobs_forward(h, w, None, y, None, 1.0, False))
    rec.add(exp="fwd-default", model=model, N=n, ms=ms, ratio=ms / floor,
            err=((t - lse)[:256].double() - logp64).abs().max().item())
    # candidate 1: cuBLAS tiles + Triton fold
    for tc, vc, f32 in ((4096, 32768, False), (4096, 32768, True), (16384, 4096, True), (4096, 8192, True),
                        (2048, 16384, True), (8192, 8192, False)):
        if rec.time_left() < 30:
            return
        tc = min(tc, n)
        try:
            lp, _ = W.forward_gemm_fold(h, w, y, token_chunk=tc, vocab_chunk=vc, fp32_logits=f32)
            err = (lp[:256].double() - logp64).abs().max().item()
            ms = bench(lambda: W.forward_gemm_fold(h, w, y, token_chunk=tc, vocab_chunk=vc, fp32_logits=f32))
        except Exception as e:
            rec.add(exp="fwd-gemm-fold", model=model, N=n, token_chunk=tc, vocab_chunk=vc, fp32=f32,
                    error=f"{type(e).__name__}: {str(e)[:100]}")
            continue
        rec.add(exp="fwd-gemm-fold", model=model, N=n, token_chunk=tc, vocab_chunk=vc, fp32=f32, ms=ms,
                ratio=ms / floor, err=err)
    # fused Triton forward: tile configs x vocab splits
    for cfg in cfgs:
        n_blocks = triton.cdiv(n, cfg["BLOCK_N"])
        v_tiles = triton.cdiv(v, cfg["BLOCK_V"])
        auto = K._default_splits(h.device, n_blocks, v_tiles, cfg["BLOCK_N"] * d * 2)
        for splits in sorted({auto} | {max(1, triton.cdiv(k * sms, n_blocks)) for k in (1, 2)}):
            if rec.time_left() < 30:
                return
            try:
                t, lse, _, _ = K.token_logprobs_forward(h, w, None, y, None, 1.0, False, splits, cfg, method="fused")
                err = ((t - lse)[:256].double() - logp64).abs().max().item()
                ms = bench(lambda: K.token_logprobs_forward(h, w, None, y, None, 1.0, False, splits, cfg,
                                                            method="fused"))
            except Exception as e:  # out of resources and the like: a result of the sweep
                rec.add(exp="fwd-cfg", model=model, N=n, cfg=cfg, splits=splits,
                        error=f"{type(e).__name__}: {str(e)[:100]}")
                continue
            rec.add(exp="fwd-cfg", model=model, N=n, cfg=cfg, splits=splits, auto=splits == auto, ms=ms,
                    ratio=ms / floor, err=err)


def sweep_one_sweep(rec, model, n, d, v):
    """One-sweep (3 GEMMs, gradients in the forward) vs the two-pass forward + backward (4 GEMM-equivalents)."""
    h, w, y = _inputs(n, d, v)
    coef = torch.randn(n, device="cuda") / n
    a, b = torch.randn(n, d, device="cuda").bfloat16(), torch.randn(d, v, device="cuda").bfloat16()
    floor = bench(lambda a=a, b=b: a @ b)
    del a, b
    _, logp64 = _gold(h, w, y)

    def two_pass():
        t, lse, _, _ = K.token_logprobs_forward(h, w, None, y, None, 1.0, False)
        dh, dw, _ = K.token_logprobs_backward(h, w, None, y, None, 1.0, lse, None, coef, None, True, True, False)
        return t - lse, dh, dw

    lp2, dh2, dw2 = two_pass()
    ms = bench(two_pass)
    rec.add(exp="two-pass", model=model, N=n, ms=ms, vs_3gemm_floor=ms / (3 * floor),
            err=(lp2[:256].double() - logp64).abs().max().item())
    for rows in (512, 1024, 2048):
        if rec.time_left() < 20:
            return
        try:
            lp1, dh1, dw1 = W.one_sweep_grads(h, w, y, coef, rows_per_chunk=rows)
            rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
            ms = bench(lambda: W.one_sweep_grads(h, w, y, coef, rows_per_chunk=rows))
        except Exception as e:
            rec.add(exp="one-sweep", model=model, N=n, rows=rows, error=f"{type(e).__name__}: {str(e)[:100]}")
            continue
        rec.add(exp="one-sweep", model=model, N=n, rows=rows, ms=ms, vs_3gemm_floor=ms / (3 * floor),
                err=(lp1[:256].double() - logp64).abs().max().item(), dh_rel_vs_two_pass=rel(dh1, dh2),
                dw_rel_vs_two_pass=rel(dw1, dw2), peak_note=f"fp32 block {rows * v * 4 / 2**20:.0f} MiB")


def sweep_backward(rec, model, n, d, v, cfgs):
    h, w, y = _inputs(n, d, v)
    t, lse, _, _ = K.token_logprobs_forward(h, w, None, y, None, 1.0, False)
    gl = torch.randn(n, device="cuda")
    for cfg in cfgs:
        for ws in WORKSPACE_MIB:
            if rec.time_left() < 20:
                return
            try:
                ms = bench(lambda: K.token_logprobs_backward(
                    h, w, None, y, None, 1.0, lse, None, gl, None, True, True, False, ws << 20, cfg))
            except Exception as e:
                rec.add(exp="bwd-cfg", model=model, N=n, cfg=cfg, ws_mib=ws, error=f"{type(e).__name__}: {e}"[:120])
                continue
            rec.add(exp="bwd-cfg", model=model, N=n, cfg=cfg, ws_mib=ws, ms=ms)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="JSON file, rewritten after every measurement")
    ap.add_argument("--seconds", type=float, default=None, help="stop starting new measurements after this long")
    ap.add_argument("--quick", action="store_true", help="fewer configs (a smoke run)")
    args = ap.parse_args()
    rec = Recorder(args.out, None if args.seconds is None else time.time() + args.seconds)
    fwd_cfgs = FWD_CONFIGS[:2] if args.quick else FWD_CONFIGS
    bwd_cfgs = BWD_CONFIGS[:1] if args.quick else BWD_CONFIGS
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    heads = {"1.5B": (1536, 151936), "7B": (3584, 152064)}
    print("== forward, 7B N=16384", flush=True)
    sweep_forward(rec, "7B", 16384, *heads["7B"], fwd_cfgs, sms)
    print("== one sweep vs two passes, 7B N=16384", flush=True)
    sweep_one_sweep(rec, "7B", 16384, *heads["7B"])
    print("== forward, 1.5B N=4096", flush=True)
    sweep_forward(rec, "1.5B", 4096, *heads["1.5B"], fwd_cfgs, sms)
    print("== backward, 7B N=16384", flush=True)
    sweep_backward(rec, "7B", 16384, *heads["7B"], bwd_cfgs)
    print("\nbest per experiment:")
    for key in sorted({(r["exp"], r["model"], r["N"]) for r in rec.rows}):
        rs = [r for r in rec.rows if (r["exp"], r["model"], r["N"]) == key and "ms" in r]
        if rs:
            best = min(rs, key=lambda r: r["ms"])
            print("  ", key, {k: v for k, v in best.items() if k not in ("exp", "model", "N")})


if __name__ == "__main__":
    main()
