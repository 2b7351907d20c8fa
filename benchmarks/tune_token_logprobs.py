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
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vpgea.kernels import token_logprobs as K  # noqa: E402

SHAPES = [("1.5B", 4096, 1536, 151936), ("1.5B", 16384, 1536, 151936), ("7B", 4096, 3584, 152064),
          ("7B", 16384, 3584, 152064)]

FWD_CONFIGS = [
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=4, num_stages=4),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=128, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=4),
    dict(BLOCK_N=256, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=256, BLOCK_D=64, num_warps=4, num_stages=4),
    dict(BLOCK_N=128, BLOCK_V=64, BLOCK_D=64, num_warps=4, num_stages=4),
]
BWD_CONFIGS = [
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=4, num_stages=4),
    dict(BLOCK_N=256, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
]
WORKSPACE_MIB = [16, 64, 256]


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=120, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer configs (a smoke run)")
    args = ap.parse_args()
    fwd_cfgs = FWD_CONFIGS[:2] if args.quick else FWD_CONFIGS
    bwd_cfgs = BWD_CONFIGS[:1] if args.quick else BWD_CONFIGS
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for model, n, d, v in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        h = (torch.randn(n, d, device="cuda", generator=g) * 0.5).bfloat16()
        w = (torch.randn(v, d, device="cuda", generator=g) * d**-0.5).bfloat16()
        y = torch.randint(0, v, (n,), device="cuda", generator=g)
        a = torch.randn(n, d, device="cuda").bfloat16()
        b = torch.randn(d, v, device="cuda").bfloat16()
        floor = bench(lambda a=a, b=b: a @ b)
        del a, b
        ref_rows = 256
        z = (h[:ref_rows].double() @ w.double().t())
        ref_lse = torch.logsumexp(z, -1)
        ref_t = z.gather(-1, y[:ref_rows, None])[:, 0]
        del z
        print(f"== {model} N={n} D={d} V={v}: cuBLAS GEMM {floor:.3f} ms", flush=True)
        for cfg in fwd_cfgs:
            n_blocks = triton.cdiv(n, cfg["BLOCK_N"])
            v_tiles = triton.cdiv(v, cfg["BLOCK_V"])
            auto = K._default_splits(h.device, n_blocks, v_tiles, cfg["BLOCK_N"] * d * 2)
            cands = sorted({auto} | {max(1, triton.cdiv(k * sms, n_blocks)) for k in (1, 2, 4)})
            for splits in cands:
                try:
                    t, lse, _, _ = K.token_logprobs_forward(h, w, None, y, None, 1.0, False, splits, cfg)
                    err = max((lse[:ref_rows].double() - ref_lse).abs().max().item(),
                              (t[:ref_rows].double() - ref_t).abs().max().item())
                    ms = bench(lambda h=h, w=w, y=y, splits=splits, cfg=cfg:
                               K.token_logprobs_forward(h, w, None, y, None, 1.0, False, splits, cfg))
                except Exception as e:  # out of resources and the like: a result of the sweep
                    print(f"  fwd {cfg} splits={splits}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                    continue
                results.append(dict(model=model, N=n, pass_="fwd", cfg=cfg, splits=splits, ms=ms, floor_ms=floor,
                                    ratio=ms / floor, max_err=err, auto_splits=splits == auto))
                print(f"  fwd {cfg} splits={splits}{'*' if splits == auto else ''}: {ms:.3f} ms "
                      f"({ms / floor:.2f}x floor) err {err:.1e}", flush=True)
        t, lse, _, _ = K.token_logprobs_forward(h, w, None, y, None, 1.0, False)
        gl = torch.randn(n, device="cuda")
        for cfg in bwd_cfgs:
            for ws in WORKSPACE_MIB:
                try:
                    ms = bench(lambda h=h, w=w, y=y, lse=lse, gl=gl, ws=ws, cfg=cfg: K.token_logprobs_backward(
                        h, w, None, y, None, 1.0, lse, None, gl, None, True, True, False, ws << 20, cfg))
                except Exception as e:
                    print(f"  bwd {cfg} ws={ws}MiB: {type(e).__name__}: {str(e)[:100]}", flush=True)
                    continue
                results.append(dict(model=model, N=n, pass_="bwd", cfg=cfg, workspace_mib=ws, ms=ms,
                                    floor_ms=3 * floor, ratio=ms / (3 * floor)))
                print(f"  bwd {cfg} ws={ws}MiB: {ms:.3f} ms ({ms / (3 * floor):.2f}x 3-GEMM floor)", flush=True)
        del h, w, y
        torch.cuda.empty_cache()
    print("\nbest per shape:")
    for model, n, _, _ in SHAPES:
        for pas in ("fwd", "bwd"):
            rs = [r for r in results if r["model"] == model and r["N"] == n and r["pass_"] == pas]
            if rs:
                best = min(rs, key=lambda r: r["ms"])
                print(f"  {model} N={n} {pas}: {best['ms']:.3f} ms = {best['ratio']:.2f}x floor  {best['cfg']} "
                      f"{ {k: best[k] for k in ('splits', 'workspace_mib') if k in best} }")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
