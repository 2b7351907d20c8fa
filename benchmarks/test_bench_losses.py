"""Policy losses from hidden states: the fused linear VPG-EA loss and FusedLinearGRPOLoss against Liger and eager.

Shapes (issue 4): Qwen2.5-7B head (D = 3584, V = 152064), N = 16384 completion tokens, bf16.

- GRPO: B = 16 completions x T = 1024 tokens. Providers: ``vpgea.nn.FusedLinearGRPOLoss`` (Triton log-probs, only
  the unmasked tokens scored), ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` (when installed; its defaults,
  compiled=True, chunk_size=1) and the eager PyTorch reference (``[B, T, V]`` fp32 logits materialised). Loss type
  dapo, beta = 0.04 with reference log-probs given, old log-probs given. Run with all tokens unmasked and with half of
  each row masked: time should scale with unmasked tokens (target: half the tokens, about half the time).
- VPG-EA: the fused linear loss with T = N / 2 tokens per view (teacher and student), so the number of scored rows,
  2T = N, matches the GRPO case; two vpgea variants: the Triton log-prob kernels (forward, then a backward that
  recomputes the logits: 4 GEMM-equivalents) and ``grad_in_forward=True`` (the loss is linear in the log-probs, so
  the head gradient is produced in the forward sweep over chunked cuBLAS logits: 3 GEMMs, one fp32 logits chunk);
  against eager (materialised logits for both views). The faster one should become the default.
- The packed loss reduction alone (T = 16384, S = 64 paths): Triton kernel vs the CUDA C++ extension vs torch, which
  decides the default on CUDA.

Targets: FusedLinearGRPOLoss at least 3x faster than Liger's chunked GRPO loss at no more peak memory.

Run ``pytest benchmarks/test_bench_losses.py -s`` on a GPU; tables land in ``benchmarks/results/``.
"""

from __future__ import annotations

import time

import pytest
import torch

from _utils import (
    clear_grads,
    cuda_graph_time_us,
    cuda_time_ms,
    cuda_time_per_call_us,
    peak_extra_bytes,
    time_left_s,
    write_results,
)
from conftest import requires_cuda

from vpgea.grpo import grpo_fused_linear_reference
from vpgea.losses import vpgea_loss, vpgea_loss_fused_linear, vpgea_loss_reference
from vpgea.nn import FusedLinearGRPOLoss

MODEL, D, V = "Qwen2.5-7B", 3584, 152064
N = 16384
GRPO_B, GRPO_T = 16, 1024
GRPO_OPTS = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo", use_ref_model=True)


def _grpo_inputs(b, t, d, v, dtype, device, masked_frac=0.0, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(b, t, d, device=device, generator=g) * 0.5).to(dtype)
    w = (torch.randn(v, d, device=device, generator=g) * d**-0.5).to(dtype)
    ids = torch.randint(0, v, (b, t), device=device, generator=g)
    mask = torch.ones(b, t, device=device, dtype=torch.long)
    if masked_frac > 0:
        mask[:, int(t * (1 - masked_frac)):] = 0  # padded tails, as after early EOS
    adv = torch.randn(b, device=device, generator=g)
    with torch.no_grad():
        base = -torch.rand(b, t, device=device, generator=g) * 5
    old = base + 0.05 * torch.randn(b, t, device=device, generator=g)
    ref = base + 0.05 * torch.randn(b, t, device=device, generator=g)
    return x, w, ids, mask, adv, old, ref


def _grpo_providers() -> tuple[dict, dict]:
    skipped = {}
    providers = {
        "vpgea": FusedLinearGRPOLoss(**GRPO_OPTS, impl="triton"),
        "torch-eager": lambda *a, **k: grpo_fused_linear_reference(*a, **GRPO_OPTS, **k),
    }
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        providers["liger"] = LigerFusedLinearGRPOLoss(**GRPO_OPTS)
    except Exception as e:  # not installed or broken here: the table says which
        skipped["liger"] = f"{type(e).__name__}: {str(e)[:120]}"
    return providers, skipped


MEMORY = "peak extra memory above the inputs during fwd+bwd, the gradients it produces included"


def _measure(step, leaves):
    """fwd+bwd median ms and peak extra memory of ``step`` (a closure that runs forward and backward)."""
    ms = cuda_time_ms(step, warmup=2, reps=5)
    clear_grads(*leaves)
    mem = peak_extra_bytes(step)
    return ms, mem


def _try(rows: list[dict], base: dict, name: str, run) -> dict | None:
    """``run()`` -> a result dict appended to ``rows``; out of memory or a peer's error becomes a row with a note."""
    if time_left_s() < 15:
        rows.append(dict(base, provider=name, note="not run: device-call deadline"))
        return None
    try:
        result = run()
    except torch.cuda.OutOfMemoryError:
        rows.append(dict(base, provider=name, note="out of memory"))
    except Exception as e:  # a peer failing on this shape is a result, not a crash
        rows.append(dict(base, provider=name, note=f"error: {type(e).__name__}: {str(e)[:80]}"))
    else:
        rows.append(dict(base, provider=name, **result))
        return rows[-1]
    finally:
        torch.cuda.empty_cache()
    return None


def _skip_if_deadline_took_all(rows: list[dict]) -> None:
    """A device call's deadline that left no row measured is a skip (the table says why), not a failure."""
    if rows and all(str(r.get("note", "")).startswith("not run: device-call deadline") for r in rows):
        pytest.skip("device-call deadline: no row measured")


@requires_cuda
def test_bench_vpgea_fused_linear():
    dtype = torch.bfloat16
    t = N // 2
    g = torch.Generator(device="cuda").manual_seed(0)
    th = (torch.randn(t, D, device="cuda", generator=g) * 0.5).to(dtype)
    sh = (torch.randn(t, D, device="cuda", generator=g) * 0.5).to(dtype)
    w = (torch.randn(V, D, device="cuda", generator=g) * D**-0.5).to(dtype)
    y = torch.randint(0, V, (t,), device="cuda", generator=g)
    lengths = torch.full((64,), t // 64)
    cu = torch.zeros(65, dtype=torch.int32, device="cuda")
    cu[1:] = lengths.cumsum(0).cuda()
    adv = torch.randn(64, device="cuda", generator=g)

    def eager(th, sh, w):
        logps = [torch.log_softmax((h @ w.t()).float(), -1).gather(-1, y[:, None])[:, 0] for h in (th, sh)]
        return vpgea_loss_reference(logps[0], logps[1], adv, cu, beta=0.1)

    providers = {
        "vpgea-triton": lambda th, sh, w: vpgea_loss_fused_linear(th, sh, w, y, y, adv, cu, beta=0.1, impl="triton"),
        "vpgea-grad-in-forward": lambda th, sh, w: vpgea_loss_fused_linear(th, sh, w, y, y, adv, cu, beta=0.1,
                                                                           impl="triton", grad_in_forward=True),
        "torch-eager": eager,
    }
    rows = []

    def save():
        mine = next((r for r in rows if r["provider"] == "vpgea-triton" and "fwd_bwd_ms" in r), None)
        for r in rows:
            if mine and "fwd_bwd_ms" in r and r is not mine:
                r["time_vs_vpgea_triton"] = r["fwd_bwd_ms"] / mine["fwd_bwd_ms"]  # < 1: faster than the Triton path
        return write_results("vpgea_loss_fused_linear", rows,
                             meta=dict(model=MODEL, dtype="bf16", D=D, V=V, paths=64, beta=0.1, memory=MEMORY))

    for name, fn in providers.items():
        thr, shr, wr = (a.detach().clone().requires_grad_() for a in (th, sh, w))

        def step(fn=fn, thr=thr, shr=shr, wr=wr):
            clear_grads(thr, shr, wr)
            loss, _ = fn(thr, shr, wr)
            loss.backward()
            return loss

        def run(step=step, leaves=(thr, shr, wr)):
            loss = step().item()
            ms, mem = _measure(step, leaves)
            return dict(T_per_view=t, rows_scored=2 * t, fwd_bwd_ms=ms, peak_extra_mib=mem / 2**20, loss=loss)

        _try(rows, {}, name, run)
        del thr, shr, wr, step, run
        save()
    print(save().read_text())
    _skip_if_deadline_took_all(rows)
    assert any(r["provider"] == "vpgea-triton" and "fwd_bwd_ms" in r for r in rows)


@requires_cuda
def test_bench_grpo_loss():
    dtype = torch.bfloat16
    rows = []
    providers, skipped = _grpo_providers()
    full, half = GRPO_B * GRPO_T, GRPO_B * GRPO_T // 2

    def save():  # after every row: a run cut short still leaves its table
        by = {(r["provider"], r["unmasked"]): r for r in rows if "fwd_bwd_ms" in r}
        for r in rows:
            mine = by.get(("vpgea", r["unmasked"]))
            if mine and "fwd_bwd_ms" in r and r["provider"] != "vpgea":
                r["vpgea_speedup"] = r["fwd_bwd_ms"] / mine["fwd_bwd_ms"]
                r["vpgea_mem_ratio"] = mine["peak_extra_mib"] / max(r["peak_extra_mib"], 1e-9)
            if r["unmasked"] == half and (r["provider"], full) in by and "fwd_bwd_ms" in r:
                r["time_vs_unmasked_run"] = r["fwd_bwd_ms"] / by[(r["provider"], full)]["fwd_bwd_ms"]
        return write_results(
            "grpo_loss", rows,
            meta=dict(dtype="bf16", D=D, V=V, options=str(GRPO_OPTS), memory=MEMORY, skipped=skipped or "none",
                      targets=">= 3x faster than Liger at <= its peak memory; half the tokens masked: ~0.5x time"),
        )

    for masked_frac in (0.0, 0.5):
        x, w, ids, mask, adv, old, ref = _grpo_inputs(GRPO_B, GRPO_T, D, V, dtype, "cuda", masked_frac)
        base = dict(model=MODEL, B=GRPO_B, T=GRPO_T, unmasked=int(mask.sum()))
        for name, fn in providers.items():
            xr = x.detach().clone().requires_grad_()
            wr = w.detach().clone().requires_grad_()

            def step(fn=fn, xr=xr, wr=wr, ids=ids, mask=mask, adv=adv, ref=ref, old=old):
                clear_grads(xr, wr)
                loss, _ = fn(xr, wr, ids, mask, adv, None, ref, old)
                loss.backward()
                return loss

            def run(step=step, xr=xr, wr=wr, n=base["unmasked"]):
                loss = step().item()
                ms, mem = _measure(step, (xr, wr))
                return dict(fwd_bwd_ms=ms, peak_extra_mib=mem / 2**20, loss=loss, tokens_per_s=n / (ms * 1e-3))

            _try(rows, base, name, run)
            del xr, wr, step, run
            save()
        del x, w
        torch.cuda.empty_cache()
    print(save().read_text())
    _skip_if_deadline_took_all(rows)
    assert any(r["provider"] == "vpgea" and r["unmasked"] == full and "fwd_bwd_ms" in r for r in rows)


@requires_cuda
def test_bench_loss_reduction():
    """Packed loss reduction alone: Triton vs the CUDA C++ extension vs torch (decides the CUDA default).

    Two times per implementation: ``call_us``, the public ``vpgea_loss`` forward+backward issued back to back (input
    validation with its host sync, autograd and launches included: what a trainer pays), and ``device_us``, the raw
    forward and backward ops captured in a CUDA graph and replayed (the kernels alone)."""
    from vpgea._ext import load_error, load_loss_ext

    impls = ["triton", "torch"] + (["cuda"] if load_loss_ext() is not None else [])
    rows = []

    def save():
        return write_results("vpgea_loss_reduction", rows, meta=dict(
            note="call_us: public fwd+bwd incl. validation (one host sync) and launches, 200 calls back to back; "
                 "device_us: raw fwd+bwd ops in a CUDA graph; GB/s counts q, p read and dq, dp written, at device_us",
            cuda_ext=load_error() or "built"))

    for num_tokens, num_seqs in ((16384, 64), (262144, 1024), (4194304, 4096)):
        g = torch.Generator(device="cuda").manual_seed(0)
        q = -torch.rand(num_tokens, device="cuda", generator=g)
        p = -torch.rand(num_tokens, device="cuda", generator=g)
        cuts = torch.sort(torch.randint(0, num_tokens, (num_seqs - 1,), device="cuda", generator=g)).values
        cu = torch.cat([torch.zeros(1, device="cuda", dtype=torch.long), cuts,
                        torch.full((1,), num_tokens, device="cuda")]).int()
        adv = torch.randn(num_seqs, device="cuda", generator=g)
        grad = torch.ones(1, device="cuda")
        for impl in impls:
            qq, pp = q.clone().requires_grad_(), p.clone().requires_grad_()

            def step(impl=impl, qq=qq, pp=pp, adv=adv, cu=cu):
                clear_grads(qq, pp)
                loss, _ = vpgea_loss(qq, pp, adv, cu, beta=0.1, impl=impl)
                loss.backward()

            def raw(impl=impl, q=q, p=p, adv=adv, cu=cu, grad=grad, n=num_tokens):
                torch.ops.vpgea.vpgea_loss_fwd(q, p, adv, cu, 0.1, "sum", impl)
                torch.ops.vpgea.vpgea_loss_bwd(grad, adv, cu, n, 0.1, "sum", impl, q.dtype, p.dtype)

            def run(step=step, raw=raw, impl=impl, n=num_tokens):
                out = dict(call_us=cuda_time_per_call_us(step))
                if impl != "torch":  # the torch reference is plain autograd, no raw op pair
                    try:
                        out["device_us"] = cuda_graph_time_us(raw)
                        out["gb_per_s"] = n * 4 * 4 / (out["device_us"] * 1e-6) / 1e9
                    except Exception as e:  # capture unsupported here: keep the end-to-end number
                        out["note"] = f"graph capture failed: {type(e).__name__}: {str(e)[:60]}"
                return out

            _try(rows, dict(T=num_tokens, S=num_seqs), impl, run)
            save()
    print(save().read_text())
    _skip_if_deadline_took_all(rows)
    assert any("call_us" in r for r in rows)


def test_bench_harness_cpu_smoke(tmp_path):
    """The benchmark's providers end to end on tiny CPU shapes (torch paths), so a broken harness shows in CI."""
    x, w, ids, mask, adv, old, ref = _grpo_inputs(3, 9, 16, 67, torch.float32, "cpu", masked_frac=0.3)
    rows = []
    for name, fn in {"vpgea-torch": FusedLinearGRPOLoss(**GRPO_OPTS, impl="torch"),
                     "torch-eager": lambda *a, **k: grpo_fused_linear_reference(*a, **GRPO_OPTS, **k)}.items():
        xr = x.clone().requires_grad_()
        t0 = time.perf_counter()
        loss, metrics = fn(xr, w, ids, mask, adv, None, ref, old)
        loss.backward()
        rows.append(dict(provider=name, fwd_bwd_ms=(time.perf_counter() - t0) * 1e3, loss=loss.item(),
                         kl=metrics[0].item(), clip_ratio=metrics[1].item()))
    md = write_results("grpo_loss_smoke", rows, meta=dict(note="cpu smoke"), results_dir=tmp_path)
    assert "vpgea-torch" in md.read_text()
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-4, abs=1e-6)
