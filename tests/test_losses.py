"""VPG-EA loss: Triton / CUDA / torch paths against a float64 loop over paths, gradients, bad input, fused linear."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vpgea.losses import vpgea_loss, vpgea_loss_fused_linear, vpgea_loss_reference

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
IMPLS = ["torch", "triton"]
NORMALIZE = ["sum", "token", "global-token"]


# ---------------------------------------------------------------------------------------------------------------------
# float64 oracle: the formula of the issue, one path at a time


def oracle(q, p, adv, cu, beta, normalize):
    """Loss, metrics and the analytic gradients d loss / d q, d loss / d p, in float64 Python."""
    q, p, adv, cu = q.double().cpu(), p.double().cpu(), adv.double().cpu(), cu.long().cpu().tolist()
    num_seqs, num_tokens = len(cu) - 1, q.numel()
    loss = kl = adv_logq = gates = 0.0
    gq, gp = torch.zeros_like(q), torch.zeros_like(p)
    for i in range(num_seqs):
        s, e = cu[i], cu[i + 1]
        n = e - s
        if normalize == "sum":
            c = 1.0 / num_seqs
        elif normalize == "token":
            c = 1.0 / (num_seqs * n) if n > 0 else 0.0
        else:
            c = 1.0 / max(num_tokens, 1)
        log_q, log_pi = float(q[s:e].sum()), float(p[s:e].sum())
        a = float(adv[i])
        gate = 1.0 if a > 0 else 0.0
        loss += c * (-a * log_q + beta * gate * (log_q - log_pi))
        kl += c * (log_q - log_pi)
        adv_logq += c * a * log_q
        gates += gate
        gq[s:e] = -c * a
        gp[s:e] = -c * beta * gate
    metrics = {"kl": kl, "adv_logq": adv_logq, "gate_frac": gates / max(num_seqs, 1)}
    return loss, metrics, gq, gp


def make_paths(lengths, seed=0, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    num_tokens = sum(lengths)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    q = (-torch.rand(num_tokens, generator=g) * 3).to(device=device, dtype=dtype)
    p = (-torch.rand(num_tokens, generator=g) * 3).to(device=device, dtype=dtype)
    adv = torch.randn(len(lengths), generator=g).to(device)
    return q, p, adv, cu.to(device)


# Odd lengths, an empty path, one path longer than the kernels' 256-token block.
LENGTHS = [7, 0, 113, 1, 300, 59]


# ---------------------------------------------------------------------------------------------------------------------
# values and gradients


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_matches_oracle_fp32(impl, normalize):
    q, p, adv, cu = make_paths(LENGTHS, seed=1)
    q.requires_grad_(True)
    p.requires_grad_(True)
    beta = 0.37
    loss, metrics = vpgea_loss(q, p, adv, cu, beta=beta, normalize=normalize, impl=impl)
    loss.backward()
    ref_loss, ref_metrics, ref_gq, ref_gp = oracle(q.detach(), p.detach(), adv, cu, beta, normalize)
    # fp32 sums of a few hundred log-probs of size ~1: relative error ~1e-6
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert math.isclose(loss.item(), ref_loss, rel_tol=1e-5, abs_tol=1e-5)
    assert set(metrics) == {"gate_frac", "kl", "adv_logq"}
    for k, v in ref_metrics.items():
        assert not metrics[k].requires_grad
        assert math.isclose(metrics[k].item(), v, rel_tol=1e-5, abs_tol=1e-5), k
    # the gradient is a constant per path: exact up to fp32 rounding of c_i * A_i
    torch.testing.assert_close(q.grad.double().cpu(), ref_gq, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p.grad.double().cpu(), ref_gp, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_triton_bf16_matches_fp32_gold(normalize):
    # bf16 log-probs: the kernel reduces in fp32, so its error against the fp64 gold of the *same bf16 values* is
    # fp32 rounding only; the gradient comes back in bf16 (one rounding of a per-path constant).
    q, p, adv, cu = make_paths(LENGTHS, seed=2, dtype=torch.bfloat16)
    q.requires_grad_(True)
    p.requires_grad_(True)
    loss, metrics = vpgea_loss(q, p, adv, cu, beta=0.5, normalize=normalize, impl="triton")
    loss.backward()
    ref_loss, _, ref_gq, ref_gp = oracle(q.detach(), p.detach(), adv, cu, 0.5, normalize)
    assert math.isclose(loss.item(), ref_loss, rel_tol=1e-5, abs_tol=1e-5)
    assert q.grad.dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16
    torch.testing.assert_close(q.grad.double().cpu(), ref_gq, rtol=2**-7, atol=0)  # bf16: 8 significant bits
    torch.testing.assert_close(p.grad.double().cpu(), ref_gp, rtol=2**-7, atol=0)


def test_gradient_separation():
    # The teacher gets gradient only from -A log q, the student only from the gated distillation term.
    q, p, adv, cu = make_paths([5, 6, 7], seed=3)
    adv = torch.tensor([1.5, -2.0, 0.0], device=DEVICE)
    for impl in IMPLS:
        qq, pp = q.clone().requires_grad_(True), p.clone().requires_grad_(True)
        loss, _ = vpgea_loss(qq, pp, adv, cu, beta=0.0, impl=impl)
        loss.backward()
        assert torch.all(pp.grad == 0)  # beta = 0: no distillation
        qq, pp = q.clone().requires_grad_(True), p.clone().requires_grad_(True)
        loss, _ = vpgea_loss(qq, pp, torch.zeros_like(adv), cu, beta=2.0, impl=impl)
        loss.backward()
        assert torch.all(qq.grad == 0) and torch.all(pp.grad == 0)  # all gates closed, A = 0
        qq, pp = q.clone().requires_grad_(True), p.clone().requires_grad_(True)
        loss, _ = vpgea_loss(qq, pp, adv, cu, beta=2.0, impl=impl)
        loss.backward()
        # teacher: -A_i / S; student: -beta * 1[A_i > 0] / S (only path 0 is gated)
        torch.testing.assert_close(qq.grad[:5].cpu(), torch.full((5,), -1.5 / 3))
        torch.testing.assert_close(qq.grad[5:11].cpu(), torch.full((6,), 2.0 / 3))
        assert torch.all(qq.grad[11:] == 0)
        torch.testing.assert_close(pp.grad[:5].cpu(), torch.full((5,), -2.0 / 3))
        assert torch.all(pp.grad[5:] == 0)


def test_torch_reference_autograd_matches_oracle():
    q, p, adv, cu = make_paths([4, 0, 9], seed=4, device="cpu")
    q64, p64 = q.double().requires_grad_(True), p.double().requires_grad_(True)
    loss, _ = vpgea_loss_reference(q64, p64, adv.double(), cu, beta=0.2, normalize="token")
    loss.backward()
    _, _, gq, gp = oracle(q, p, adv, cu, 0.2, "token")
    torch.testing.assert_close(q64.grad, gq)
    torch.testing.assert_close(p64.grad, gp)


def test_grad_output_scaling_and_retain():
    # backward with a non-unit upstream gradient (loss * 3) scales every gradient.
    q, p, adv, cu = make_paths([10, 20], seed=5)
    for impl in IMPLS:
        qq = q.clone().requires_grad_(True)
        loss, _ = vpgea_loss(qq, p, adv, cu, beta=0.1, impl=impl)
        (3.0 * loss).backward()
        _, _, gq, _ = oracle(q, p, adv, cu, 0.1, "sum")
        torch.testing.assert_close(qq.grad.double().cpu(), 3.0 * gq)


# ---------------------------------------------------------------------------------------------------------------------
# degenerate but valid input: finite, zero contribution


@pytest.mark.parametrize("impl", IMPLS)
def test_degenerate_inputs_are_finite(impl):
    q, p, adv, cu = make_paths([0, 0, 0], seed=6)  # all paths empty, T = 0
    q.requires_grad_(True)
    loss, metrics = vpgea_loss(q, p, adv, cu, beta=1.0, normalize="token", impl=impl)
    loss.backward()
    assert loss.item() == 0.0 and all(math.isfinite(v.item()) for v in metrics.values())
    empty = torch.zeros(0, device=DEVICE)
    loss, metrics = vpgea_loss(empty, empty, empty, torch.zeros(1, dtype=torch.int32, device=DEVICE), beta=1.0,
                               normalize="global-token", impl=impl)
    assert loss.item() == 0.0 and metrics["gate_frac"].item() == 0.0

    q, p, _, cu = make_paths([3, 4], seed=7)
    zero_adv = torch.zeros(2, device=DEVICE)
    loss, metrics = vpgea_loss(q, p, zero_adv, cu, beta=1.0, impl=impl)
    assert loss.item() == 0.0 and metrics["gate_frac"].item() == 0.0  # all A = 0: zero loss
    closed = torch.tensor([-1.0, -2.0], device=DEVICE)
    loss, metrics = vpgea_loss(q, p, closed, cu, beta=5.0, impl=impl)
    ref, _, _, _ = oracle(q, p, closed, cu, 5.0, "sum")
    assert math.isclose(loss.item(), ref, rel_tol=1e-5) and metrics["gate_frac"].item() == 0.0

    # a -inf log-prob (a zero-probability token) in a path with A = 0 and a closed gate stays out of the loss
    q_inf = q.clone()
    q_inf[0] = float("-inf")
    loss, _ = vpgea_loss(q_inf, p, torch.tensor([0.0, 1.0], device=DEVICE), cu, beta=1.0, impl=impl)
    assert math.isfinite(loss.item())


# ---------------------------------------------------------------------------------------------------------------------
# bad input: clear errors


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_input_errors(impl):
    q, p, adv, cu = make_paths([3, 4], seed=8)
    with pytest.raises(ValueError, match="teacher_logps has 7 tokens but student_logps has 6"):
        vpgea_loss(q, p[:6], adv, cu, beta=1.0, impl=impl)
    with pytest.raises(ValueError, match="S \\+ 1 = 3 entries"):
        vpgea_loss(q, p, adv, cu[:2], beta=1.0, impl=impl)
    with pytest.raises(ValueError, match="non-decreasing; cu_seqlens\\[1\\] = 5 > cu_seqlens\\[2\\] = 3"):
        vpgea_loss(q[:3], p[:3], adv, torch.tensor([0, 5, 3], dtype=torch.int32, device=DEVICE), beta=1.0, impl=impl)
    with pytest.raises(ValueError, match="must end at T = 7"):
        vpgea_loss(q, p, adv, torch.tensor([0, 3, 6], dtype=torch.int32, device=DEVICE), beta=1.0, impl=impl)
    with pytest.raises(ValueError, match="must start at 0"):
        vpgea_loss(q, p, adv, torch.tensor([1, 3, 7], dtype=torch.int32, device=DEVICE), beta=1.0, impl=impl)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match=r"advantages must be finite; advantages\[1\]"):
            vpgea_loss(q, p, torch.tensor([0.5, bad], device=DEVICE), cu, beta=1.0, impl=impl)
    with pytest.raises(ValueError, match="normalize must be one of"):
        vpgea_loss(q, p, adv, cu, beta=1.0, normalize="mean", impl=impl)
    with pytest.raises(ValueError, match="cu_seqlens must be int32"):
        vpgea_loss(q, p, adv, cu.float(), beta=1.0, impl=impl)
    with pytest.raises(ValueError, match="must be 1-D"):
        vpgea_loss(q[None], p[None], adv, cu, beta=1.0, impl=impl)


def test_impl_errors():
    q, p, adv, cu = make_paths([3], seed=9, device="cpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        vpgea_loss(q, p, adv, cu, beta=1.0, impl="fast")
    with pytest.raises(RuntimeError, match="impl='cuda'"):
        vpgea_loss(q, p, adv, cu, beta=1.0, impl="cuda")


def test_ext_loader_returns_none_without_cuda():
    from vpgea import _ext

    if HAS_CUDA:
        pytest.skip("CPU-only behaviour")
    assert _ext.load_loss_ext() is None
    assert "CUDA" in _ext.load_error()


# ---------------------------------------------------------------------------------------------------------------------
# fused linear form


def _eager_logps(hidden, weight, targets, bias, temperature):
    logits = (hidden.double() @ weight.double().t())
    if bias is not None:
        logits = logits + bias.double()
    return torch.log_softmax(logits / temperature, dim=-1).gather(1, targets[:, None])[:, 0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("normalize", ["sum", "token"])
def test_fused_linear_matches_eager(impl, normalize):
    torch.manual_seed(10)
    lengths = [5, 0, 17, 9]
    num_tokens, dim, vocab = sum(lengths), 32, 203
    cu = torch.tensor([0, 5, 5, 22, 31], dtype=torch.int32, device=DEVICE)
    th = torch.randn(num_tokens, dim, device=DEVICE, requires_grad=True)
    sh = torch.randn(num_tokens, dim, device=DEVICE, requires_grad=True)
    w = (torch.randn(vocab, dim, device=DEVICE) * 0.3).requires_grad_(True)
    b = (torch.randn(vocab, device=DEVICE) * 0.1).requires_grad_(True)
    tgt = torch.randint(0, vocab, (num_tokens,), device=DEVICE)
    adv = torch.tensor([0.7, 1.0, -1.2, 0.3], device=DEVICE)
    loss, metrics = vpgea_loss_fused_linear(th, sh, w, tgt, tgt, adv, cu, beta=0.25, bias=b, temperature=0.8,
                                            normalize=normalize, impl=impl)
    loss.backward()
    got = [t.grad.clone() for t in (th, sh, w, b)]
    for t in (th, sh, w, b):
        t.grad = None
    q = _eager_logps(th, w, tgt, b, 0.8)
    p = _eager_logps(sh, w, tgt, b, 0.8)
    ref_loss, ref_metrics = vpgea_loss_reference(q, p, adv.double(), cu, beta=0.25, normalize=normalize)
    ref_loss.backward()
    # fp32 kernels against an fp64 eager oracle: logits of size ~3 over V = 203 columns
    assert math.isclose(loss.item(), ref_loss.item(), rel_tol=1e-4, abs_tol=1e-5)
    for k in ref_metrics:
        assert math.isclose(metrics[k].item(), ref_metrics[k].item(), rel_tol=1e-4, abs_tol=1e-5), k
    for g, t in zip(got, (th, sh, w, b)):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_fused_linear_grad_in_forward_matches(impl, normalize, monkeypatch):
    # The one-sweep variant (gradients computed in the forward) against the two-pass path: same loss, metrics and
    # gradients, with ignored rows, a bias, a temperature and an upstream gradient other than 1; 7 rows per chunk
    # (9 chunks over the 2T = 60 rows), through the Triton lse/dz row kernel except for impl="torch".
    import vpgea.logprobs as L

    monkeypatch.setattr(L, "_SWEEP_CHUNK_BYTES", 7 * 4 * 157)
    torch.manual_seed(12)
    cu = torch.tensor([0, 6, 6, 19, 30], dtype=torch.int32, device=DEVICE)
    num_tokens, dim, vocab = 30, 24, 157
    th = torch.randn(num_tokens, dim, device=DEVICE)
    sh = torch.randn(num_tokens, dim, device=DEVICE)
    w = torch.randn(vocab, dim, device=DEVICE) * 0.3
    b = torch.randn(vocab, device=DEVICE) * 0.1
    tt = torch.randint(0, vocab, (num_tokens,), device=DEVICE)
    st = tt.clone()
    tt[3] = -100
    st[20] = -100
    adv = torch.tensor([0.9, 0.5, -1.1, 0.2], device=DEVICE)
    results = []
    for gif in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (th, sh, w, b)]
        loss, metrics = vpgea_loss_fused_linear(leaves[0], leaves[1], leaves[2], tt, st, adv, cu, beta=0.4,
                                                bias=leaves[3], temperature=1.3, normalize=normalize, impl=impl,
                                                grad_in_forward=gif)
        (2.5 * loss).backward()
        results.append((loss.detach(), metrics, [t.grad for t in leaves]))
    (l0, m0, g0), (l1, m1, g1) = results
    # fp32 both ways; different summation orders (chunked GEMMs vs kernels)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for k in m0:
        torch.testing.assert_close(m1[k], m0[k], rtol=1e-5, atol=1e-6)
    for a, c in zip(g1, g0):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="student_targets\\[2\\] = 157"):
        bad = st.clone()
        bad[2] = vocab
        vpgea_loss_fused_linear(th, sh, w, tt, bad, adv, cu, beta=0.4, impl=impl, grad_in_forward=True)


@pytest.mark.parametrize("gif", [False, True])
def test_fused_linear_under_autocast_is_the_linear_in_the_autocast_dtype(gif):
    # fp32 master weights under bf16 autocast (the single-GPU trainer; a TRL model under AMP): the op behaves as the
    # F.linear it replaces, i.e. as if given the bf16 casts, and the gradients reach the fp32 leaves in fp32. Without
    # the cast the one-sweep path crashed (autocast turned its fp32 GEMM bf16, then scatter_add_ met fp32).
    torch.manual_seed(13)
    cu = torch.tensor([0, 7, 7, 20], dtype=torch.int32)
    th, sh = torch.randn(20, 16), torch.randn(20, 16)
    w, b = torch.randn(61, 16) * 0.3, torch.randn(61) * 0.1
    y = torch.randint(0, 61, (20,))
    adv = torch.tensor([0.8, 0.3, -0.6])
    kw = dict(beta=0.3, temperature=1.1, impl="torch", grad_in_forward=gif)
    leaves = [t.clone().requires_grad_(True) for t in (th, sh, w, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = vpgea_loss_fused_linear(leaves[0], leaves[1], leaves[2], y, y, adv, cu, bias=leaves[3], **kw)
    loss.backward()
    half = [t.bfloat16().requires_grad_(True) for t in (th, sh, w, b)]
    ref, ref_metrics = vpgea_loss_fused_linear(half[0], half[1], half[2], y, y, adv, cu, bias=half[3], **kw)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for k in metrics:
        torch.testing.assert_close(metrics[k], ref_metrics[k])
    for leaf, h in zip(leaves, half):
        assert leaf.grad.dtype == torch.float32
        torch.testing.assert_close(leaf.grad, h.grad.float())


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_grad_in_forward_bad_targets_under_compile_are_nan(impl):
    # Under torch.compile the range check cannot run: an out-of-range target must neither index out of bounds (a
    # device-side assert on CUDA) nor give a plausible number; its log-prob is NaN, so the loss is NaN.
    cu = torch.tensor([0, 3, 5], dtype=torch.int32, device=DEVICE)
    h, w = torch.randn(5, 16, device=DEVICE), torch.randn(11, 16, device=DEVICE)
    good = torch.tensor([1, 2, 3, -100, 4], device=DEVICE)
    bad = torch.tensor([1, 2, 11, -100, -3], device=DEVICE)
    adv = torch.tensor([0.5, -0.5], device=DEVICE)

    def f(y):
        return vpgea_loss_fused_linear(h, h, w, y, y, adv, cu, beta=0.3, impl=impl, grad_in_forward=True)[0]

    compiled = torch.compile(f, backend="aot_eager")
    assert torch.isfinite(compiled(good))
    assert torch.isnan(compiled(bad))


def test_more_than_int32_tokens_is_an_error():
    big = torch.zeros(1).expand(2**31)  # a view: no memory behind the 2**31 elements
    with pytest.raises(ValueError, match="at most 2\\*\\*31 - 1 packed tokens"):
        vpgea_loss(big, big, torch.ones(1), torch.tensor([0, 2**31]), beta=0.1, impl="torch")


def test_grad_in_forward_under_no_grad_computes_no_gradient(monkeypatch):
    # Under torch.no_grad the one-sweep variant must not pay for gradients it will never return: one GEMM per
    # chunk (the logits), not three, and no [V, D] gradient buffer.
    import vpgea.logprobs as L

    calls = []
    real = L.mm_fp32
    real_acc = L.addmm_fp32_
    monkeypatch.setattr(L, "mm_fp32", lambda a, b: calls.append((tuple(a.shape), tuple(b.shape))) or real(a, b))
    monkeypatch.setattr(L, "addmm_fp32_", lambda c, a, b: calls.append((tuple(a.shape), tuple(b.shape)))
                        or real_acc(c, a, b))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    h = torch.randn(7, 8)
    w = torch.randn(11, 8, requires_grad=True)
    y = torch.randint(0, 11, (7,))
    adv = torch.tensor([0.5, -0.5])
    with torch.no_grad():
        loss_ng, _ = vpgea_loss_fused_linear(h, h, w, y, y, adv, cu, beta=0.3, impl="torch", grad_in_forward=True)
    assert calls == [((14, 8), (8, 11))]
    calls.clear()
    loss, _ = vpgea_loss_fused_linear(h, h, w, y, y, adv, cu, beta=0.3, impl="torch", grad_in_forward=True)
    assert calls == [((14, 8), (8, 11)), ((11, 14), (14, 8))]  # logits and dW (hidden does not require grad)
    torch.testing.assert_close(loss_ng, loss.detach())


def test_fused_linear_shape_errors():
    h = torch.randn(4, 8)
    w = torch.randn(11, 8)
    y = torch.zeros(4, dtype=torch.long)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    adv = torch.ones(1)
    with pytest.raises(ValueError, match="same shape"):
        vpgea_loss_fused_linear(h, h[:3], w, y, y, adv, cu, beta=1.0, impl="torch")
    with pytest.raises(ValueError, match="student_targets must be"):
        vpgea_loss_fused_linear(h, h, w, y, y[:3], adv, cu, beta=1.0, impl="torch")


def test_public_exports():
    import vpgea

    assert vpgea.vpgea_loss is vpgea_loss
    assert vpgea.vpgea_loss_fused_linear is vpgea_loss_fused_linear


# ---------------------------------------------------------------------------------------------------------------------
# CUDA C++ extension


def _nvcc_flags(tmp_path: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    flags = ["-std=c++20", "-D_GLIBCXX_USE_CXX11_ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI))]
    flags += [f"-I{p}" for p in include_paths()]
    macros = Path(include_paths()[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not macros.is_file():
        # CPU wheels of torch ship the c10/cuda headers but not this generated one; its content is one define.
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        flags.append(f"-I{tmp_path / 'stub'}")
    return flags


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.skipif(os.environ.get("VPGEA_TEST_NVCC") != "1", reason="~20 s compile; set VPGEA_TEST_NVCC=1 (CI does)")
def test_cuda_source_compiles(tmp_path):
    """CI guard: the CUDA C++ source must compile (no GPU needed), so a syntax error cannot land."""
    cmd = ["nvcc", "-c", str(ROOT / "csrc" / "vpgea_loss.cu"), "-o", str(tmp_path / "vpgea_loss.o"),
           *_nvcc_flags(tmp_path), "-diag-suppress", "3306", "-Xcompiler", "-Wno-c++20-extensions"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr[-4000:]}"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_cuda_ext_matches_triton(dtype, normalize):
    from vpgea._ext import load_error, load_loss_ext, nvcc_path

    if load_loss_ext() is None:
        if nvcc_path() is not None and os.environ.get("VPGEA_NO_EXT") != "1":
            # With a GPU and nvcc the extension must build: a build failure is a failure, not a skip.
            pytest.fail(f"CUDA and nvcc are present but the extension did not build: {load_error()}")
        pytest.skip(f"CUDA extension unavailable: {load_error()}")
    q, p, adv, cu = make_paths(LENGTHS * 20, seed=11, dtype=dtype)
    results = {}
    for impl in ("triton", "cuda"):
        qq, pp = q.clone().requires_grad_(True), p.clone().requires_grad_(True)
        loss, metrics = vpgea_loss(qq, pp, adv, cu, beta=0.3, normalize=normalize, impl=impl)
        loss.backward()
        results[impl] = (loss, metrics, qq.grad, pp.grad)
    (lt, mt, gqt, gpt), (lc, mc, gqc, gpc) = results["triton"], results["cuda"]
    # different fp32 summation orders over ~12k tokens
    torch.testing.assert_close(lc, lt, rtol=1e-5, atol=1e-5)
    for k in mt:
        torch.testing.assert_close(mc[k], mt[k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gqc, gqt)
    torch.testing.assert_close(gpc, gpt)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("route", ["sweep", "two-pass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprob_loss_matches_float64(impl, route, dtype, monkeypatch):
    # L = sum_t c_t log p(y_t | h_t) against float64 autograd: odd shapes, a bias, a temperature, ignored rows, zero
    # coefficients; several row chunks for the sweep. Tolerance: twice PyTorch's own error in the same dtype (eager
    # logits in that dtype, fp32 log-softmax) plus a floor of a few fp32 ulps of the largest value.
    import vpgea.logprobs as L
    from vpgea.logprobs import linear_logprob_loss

    monkeypatch.setattr(L, "_SWEEP_CHUNK_BYTES", 5 * 4 * 211)  # 5 rows per chunk
    g = torch.Generator().manual_seed(21)
    n, d, v = 23, 40, 211
    h = torch.randn(n, d, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(v, d, generator=g) * 0.4).to(dtype).to(DEVICE)
    b = (torch.randn(v, generator=g) * 0.2).to(dtype).to(DEVICE)
    y = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    y[[2, 11]] = -100
    c = torch.randn(n, generator=g).to(DEVICE)
    c[[4, 5]] = 0.0
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    loss, logp = linear_logprob_loss(leaves[0], leaves[1], y, c, bias=leaves[2], temperature=0.8, route=route,
                                     impl=impl)
    (1.7 * loss).backward()

    def ref(hh, ww, bb, cast):
        z = (cast(hh) @ cast(ww).t() + cast(bb)).double() / 0.8
        lp = torch.log_softmax(z, -1).gather(-1, y.clamp(min=0)[:, None])[:, 0]
        lp = torch.where(y != -100, lp, 0.0)
        return (c.double() * lp).sum(), lp

    gold_leaves = [t.double().requires_grad_(True) for t in (h, w, b)]
    gold, gold_lp = ref(*gold_leaves, cast=lambda t: t)
    (1.7 * gold).backward()
    eager_leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    eager, eager_lp = ref(*eager_leaves, cast=lambda t: t)  # logits in the input dtype
    (1.7 * eager).backward()
    floor = 64 * 2.0**-24 if dtype == torch.float32 else 2.0**-8
    for name, got, want, theirs in [("loss", loss, gold, eager), ("logp", logp, gold_lp, eager_lp),
                                    *[(f"grad{i}", a.grad, gl.grad, e.grad)
                                      for i, (a, gl, e) in enumerate(zip(leaves, gold_leaves, eager_leaves))]]:
        err = (got.double() - want.detach()).abs().max().item()
        torch_err = (theirs.detach().double() - want.detach()).abs().max().item()
        scale = want.detach().abs().max().item()
        assert err <= 2 * torch_err + floor * scale, (name, err, torch_err, scale)
    assert logp.requires_grad is False and logp.dtype == torch.float32


def test_linear_logprob_loss_routes_agree_and_refuse_bad_input():
    from vpgea.logprobs import linear_logprob_loss

    h, w = torch.randn(9, 16, device=DEVICE), torch.randn(31, 16, device=DEVICE)
    y = torch.randint(0, 31, (9,), device=DEVICE)
    c = torch.randn(9, device=DEVICE)
    grads = []
    for route in ("sweep", "two-pass"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, _ = linear_logprob_loss(hh, ww, y, c, route=route)
        loss.backward()
        grads.append((loss.detach(), hh.grad, ww.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="route must be"):
        linear_logprob_loss(h, w, y, c, route="three-pass")
    with pytest.raises(ValueError, match=r"targets\[3\] = 31"):
        linear_logprob_loss(h, w, torch.tensor([1, 2, 3, 31, 0, 0, 0, 0, 0], device=DEVICE), c)
    with pytest.raises(ValueError, match="coefs"):
        linear_logprob_loss(h, w, y, c[:5])
