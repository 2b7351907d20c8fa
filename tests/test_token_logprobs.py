"""vpgea.token_logprobs against a float64 reference, both impls, odd shapes, with gradients.

Tolerance rule (flash-attention's): an impl's error against the float64 gold may be at most ``_FACTOR`` times
PyTorch's own error in the same dtype (eager: ``F.linear`` in that dtype, fp32 log-softmax, gather), plus a floor
``_FLOOR[dtype]`` scaled by the output's magnitude, for cases where PyTorch's error happens to be ~0.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import vpgea
from tests.conftest import requires_cuda

_FACTOR = 2.0
# Floors relative to the largest |value| of each output, for outputs PyTorch happens to get (almost) exactly: fp32
# rounding of a length-n reduction (n ~ D for logits, ~N rows for the weight and bias gradients) leaves ~n ulps even
# for an exact algorithm; measured worst need at factor 2 over these tests: 48 ulps (d_bias, a sum over ~100 rows).
# bf16: one bf16 ulp of the largest value (on the CPU the interpreter upcasts bf16 dot operands, so none is needed
# there; tensor-core accumulation order on a GPU differs from cuBLAS's).
_FLOOR = {torch.float32: 64 * 2.0**-24, torch.bfloat16: 2.0**-8}

IMPLS = ["torch", "triton"]


def _reference(h, w, b, y, temp, ignore_index, dtype64=torch.float64):
    """Per-token log-probs and entropies computed in ``dtype64`` from the given (possibly low-precision) inputs."""
    z = F.linear(h.to(dtype64), w.to(dtype64), None if b is None else b.to(dtype64))
    t = temp.to(dtype64)[..., None] if isinstance(temp, torch.Tensor) else temp
    ls = torch.log_softmax(z / t, dim=-1)
    valid = y != ignore_index
    lp = ls.gather(-1, torch.where(valid, y, 0)[..., None])[..., 0]
    ent = -(ls.exp() * ls).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


def _eager_same_dtype(h, w, b, y, temp, ignore_index):
    """What a PyTorch user writes: logits in the input dtype, then an fp32 log-softmax."""
    z = F.linear(h, w, b).float()
    t = temp.float()[..., None] if isinstance(temp, torch.Tensor) else temp
    ls = torch.log_softmax(z / t, dim=-1)
    valid = y != ignore_index
    lp = ls.gather(-1, torch.where(valid, y, 0)[..., None])[..., 0]
    ent = -(ls.exp() * ls).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


def _run(fn, h, w, b, y, temp, ignore_index, g_lp, g_ent, grads):
    """Forward + backward with fixed upstream gradients; returns outputs and the requested input gradients."""
    leaves = []
    for x, need in zip((h, w, b), grads):
        if x is None:
            leaves.append(None)
            continue
        leaves.append(x.detach().clone().requires_grad_(need))
    lp, ent = fn(leaves[0], leaves[1], leaves[2], y, temp, ignore_index)
    loss = (lp.double() * g_lp).sum() + (ent.double() * g_ent).sum()
    outs = [lp.detach().double(), ent.detach().double()]
    if loss.requires_grad:
        loss.backward()
    for x, need in zip(leaves, grads):
        if x is not None and need:
            outs.append(x.grad.double())
    return outs


def _check_close(got, gold, ref_err_src, dtype, names):
    for name, a, g, r in zip(names, got, gold, ref_err_src):
        scale = g.abs().max().item() + 1e-12
        err = (a - g).abs().max().item()
        torch_err = (r - g).abs().max().item()
        bound = _FACTOR * torch_err + _FLOOR[dtype] * scale
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (torch's own {torch_err:.3e}, scale {scale:.3e})"


# The Triton path runs natively where a GPU exists, else under TRITON_INTERPRET=1 on CPU (set by conftest).
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _make(n_shape, v, d, dtype, *, bias, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*n_shape, d, generator=g).to(dtype).to(device)
    w = (torch.randn(v, d, generator=g) * d**-0.5 * 3).to(dtype).to(device)
    b = (torch.randn(v, generator=g)).to(dtype).to(device) if bias else None
    y = torch.randint(0, v, n_shape, generator=g).to(device)
    return h, w, b, y


def _case(impl, n_shape, v, d, dtype, *, bias=True, temp=1.0, ignore=True, grads=(True, True, True), entropy=True,
          device=DEV):
    h, w, b, y = _make(n_shape, v, d, dtype, bias=bias, device=device)
    ignore_index = -100
    if ignore:
        y.view(-1)[::5] = ignore_index
    if temp == "per-token":
        temp = (torch.rand(n_shape, generator=torch.Generator().manual_seed(1)) + 0.5).to(device)
    gen = torch.Generator().manual_seed(2)
    g_lp = torch.randn(n_shape, generator=gen, dtype=torch.float64).to(device)
    g_ent = (torch.randn(n_shape, generator=gen, dtype=torch.float64) if entropy else torch.zeros(n_shape,
             dtype=torch.float64)).to(device)

    def fused(h_, w_, b_, y_, t_, ii):
        lp, ent = vpgea.token_logprobs(h_, w_, y_, bias=b_, temperature=t_, ignore_index=ii, return_entropy=True,
                                       impl=impl)
        assert lp.dtype == torch.float32 and ent.dtype == torch.float32
        assert lp.shape == y_.shape and ent.shape == y_.shape
        return lp, ent

    got = _run(fused, h, w, b, y, temp, ignore_index, g_lp, g_ent, grads)
    gold = _run(lambda *a: _reference(*a), h, w, b, y, temp, ignore_index, g_lp, g_ent, grads)
    eager = _run(_eager_same_dtype, h, w, b, y, temp, ignore_index, g_lp, g_ent, grads)
    names = ["logp", "entropy"] + [n for n, x, need in zip(("d_hidden", "d_weight", "d_bias"), (h, w, b), grads)
                                   if x is not None and need]
    assert len(got) == len(gold) == len(names)
    _check_close(got, gold, eager, dtype, names)
    return h, w, b, y


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_shape,v,d", [((37,), 203, 48), ((3, 7), 1013, 24), ((1,), 17, 16)])
def test_matches_float64(impl, dtype, n_shape, v, d):
    _case(impl, n_shape, v, d, dtype, temp=0.7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grads", [g for g in itertools.product([False, True], repeat=3) if any(g)])
def test_every_requires_grad_combination(impl, grads):
    _case(impl, (19,), 131, 40, torch.float32, temp="per-token", grads=grads)


@pytest.mark.parametrize("impl", IMPLS)
def test_per_token_temperature_no_bias_no_entropy_grad(impl):
    _case(impl, (23,), 97, 32, torch.bfloat16, bias=False, temp="per-token", entropy=False)


@pytest.mark.parametrize("impl", IMPLS)
def test_ignore_index_zero_value_and_gradient(impl):
    h, w, b, y = _make((12,), 50, 16, torch.float32, bias=True)
    y[[0, 5, 11]] = -1
    h.requires_grad_()
    lp, ent = vpgea.token_logprobs(h, w, y, bias=b, ignore_index=-1, return_entropy=True, impl=impl)
    assert torch.all(lp[[0, 5, 11]] == 0) and torch.all(ent[[0, 5, 11]] == 0)
    assert torch.all(lp[y != -1] < 0)
    (lp.sum() + ent.sum()).backward()
    assert torch.all(h.grad[[0, 5, 11]] == 0)
    assert h.grad[1].abs().sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_without_entropy_returns_tensor(impl):
    h, w, b, y = _make((9,), 33, 16, torch.float32, bias=False)
    lp = vpgea.token_logprobs(h, w, y, impl=impl)
    assert isinstance(lp, torch.Tensor) and lp.shape == (9,)
    gold, _ = _reference(h, w, None, y, 1.0, -100)
    torch.testing.assert_close(lp.double(), gold, atol=1e-5, rtol=1e-5)


def test_triton_vocab_splits_and_backward_chunks_agree():
    """Several vocab splits in the forward and several workspace chunks in the backward give the same numbers."""
    from vpgea.kernels.token_logprobs import token_logprobs_backward, token_logprobs_forward

    h, w, b, y = _make((21,), 301, 24, torch.float32, bias=True)
    inv_t = (torch.rand(21) + 0.5).to(DEV)
    outs = [token_logprobs_forward(h, w, b, y, inv_t, 1.0, True, num_splits=s) for s in (1, 2, 5)]
    # Same math, another fp32 summation order across splits: a few ulps of |lse| (~6 here), and the entropy
    # (lse - mu) inherits them.
    for o in outs[1:]:
        for a, r in zip(o, outs[0]):
            torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    _, lse, mu, _ = outs[0]
    g, ge = torch.randn(21).to(DEV), torch.randn(21).to(DEV)
    full = token_logprobs_backward(h, w, b, y, inv_t, 1.0, lse, mu, g, ge, True, True, True)
    # 21 rows x 32 fp32 columns per chunk -> 10 chunks over V=301.
    chunked = token_logprobs_backward(h, w, b, y, inv_t, 1.0, lse, mu, g, ge, True, True, True,
                                      workspace_bytes=21 * 4 * 32)
    for a, r in zip(chunked, full):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_methods_agree_with_float64(dtype, monkeypatch):
    """The "gemm" forward (cuBLAS tiles + Triton fold) and the "fused" one compute the same statistics: several row
    and vocab tiles, bias, per-token temperatures, entropy, ignored and out-of-range targets."""
    from vpgea.kernels import token_logprobs as K

    monkeypatch.setattr(K, "GEMM_ROWS", 16)  # 3 row tiles over N = 41
    h, w, b, y = _make((41,), 517, 24, dtype, bias=True)
    y[[3, 9]] = -100
    y[4] = 517  # out of range: target logit 0 on both paths (the public op rejects or NaNs it before)
    inv_t = (torch.rand(41) + 0.5).to(DEV)
    gemm = K.token_logprobs_forward(h, w, b, y, inv_t, 1.0, True, method="gemm", workspace_bytes=16 * 4 * 128)
    fused = K.token_logprobs_forward(h, w, b, y, inv_t, 1.0, True, method="fused")
    z = (F.linear(h.double(), w.double(), b.double()) * inv_t.double()[:, None])
    lse = torch.logsumexp(z, -1)
    tgt = torch.where((y >= 0) & (y < 517), z.gather(-1, y.clamp(0, 516)[:, None])[:, 0], 0.0)
    ent = lse - (torch.softmax(z, -1) * z).sum(-1)
    for out in (gemm, fused):
        t, l, _, e = (x.double() for x in out)
        # fp32 arithmetic on logits of magnitude ~10: a few fp32 ulps
        torch.testing.assert_close(l, lse, atol=2e-5, rtol=2e-6)
        torch.testing.assert_close(t, tgt, atol=2e-5, rtol=2e-6)
        torch.testing.assert_close(e, ent, atol=5e-5, rtol=2e-5)
    # With a logit scale and a softcap (Gemma-2 style) the two methods still agree.
    capped = [K.token_logprobs_forward(h, w, b, y, inv_t, 1.0, True, method=m, logit_scale=0.7, softcap=5.0,
                                       workspace_bytes=16 * 4 * 128) for m in ("gemm", "fused")]
    for a, r in zip(*capped):
        torch.testing.assert_close(a, r, atol=5e-5, rtol=5e-6)
    zc = 5.0 * torch.tanh(F.linear(h.double(), w.double(), b.double()) * 0.7 / 5.0) * inv_t.double()[:, None]
    torch.testing.assert_close(capped[0][1].double(), torch.logsumexp(zc, -1), atol=2e-5, rtol=2e-6)
    with pytest.raises(ValueError, match="method must be"):
        K.token_logprobs_forward(h, w, b, y, inv_t, 1.0, True, method="tiles")


@pytest.mark.parametrize("method", ["gemm", "fused"])
def test_public_op_through_each_forward_method(method, monkeypatch):
    """The public op (forward, backward, entropy, ignore_index) against float64 through each forward method."""
    from vpgea.kernels import token_logprobs as K

    monkeypatch.setattr(K, "FORWARD_METHOD", method)
    monkeypatch.setattr(K, "GEMM_ROWS", 16)
    if method == "fused" or DEV == "cpu":
        # fp32 through "gemm" on a GPU: cuBLAS's fp32 logits differ in rounding from the backward's Triton recompute,
        # which put the gradients 1.2x over this bound on an H200; fp32 therefore defaults to "fused" there.
        _case("triton", (3, 11), 389, 40, torch.float32, temp="per-token")
    _case("triton", (29,), 203, 48, torch.bfloat16, temp=0.7)


@pytest.mark.parametrize("v", [151936, 50257])
def test_triton_real_vocab_sizes_forward(v):
    """Real vocab sizes (not multiples of any block): padding columns never enter the log-sum-exp."""
    h, w, b, y = _make((2,), v, 16, torch.float32, bias=False)
    y[0] = v - 1
    lp, ent = vpgea.token_logprobs(h, w, y, return_entropy=True, impl="triton")
    gold_lp, gold_ent = _reference(h, w, None, y, 1.0, -100)
    torch.testing.assert_close(lp.double(), gold_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), gold_ent, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs(impl):
    h, w, b, y = _make((4,), 10, 8, torch.float32, bias=True)
    with pytest.raises(ValueError, match="disagree on D"):
        vpgea.token_logprobs(h, w[:, :7], y, impl=impl)
    with pytest.raises(ValueError, match="targets shape"):
        vpgea.token_logprobs(h, w, y[:3], impl=impl)
    with pytest.raises(ValueError, match="dtype"):
        vpgea.token_logprobs(h, w.double(), y, impl=impl)
    with pytest.raises(ValueError, match="bias must be"):
        vpgea.token_logprobs(h, w, y, bias=b[:5], impl=impl)
    with pytest.raises(ValueError, match="temperature"):
        vpgea.token_logprobs(h, w, y, temperature=0.0, impl=impl)
    with pytest.raises(ValueError, match="temperature tensor"):
        vpgea.token_logprobs(h, w, y, temperature=torch.ones(3, device=DEV), impl=impl)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 10\).*found 10 at flat position 2"):
        vpgea.token_logprobs(h, w, torch.tensor([1, 2, 10, -100], device=DEV), impl=impl)
    with pytest.raises(ValueError, match="found -3"):
        vpgea.token_logprobs(h, w, torch.tensor([1, -3, 0, 0], device=DEV), impl=impl)
    with pytest.raises(ValueError, match="impl must be"):
        vpgea.token_logprobs(h, w, y, impl="cuda")


def test_custom_ops_pass_opcheck_and_compile():
    """The Triton path is a registered custom op: fake impl, schema and autograd registration are consistent, and
    torch.compile traces it in one graph."""
    from vpgea.logprobs import _triton_fwd

    h, w, b, y = _make((11,), 45, 16, torch.float32, bias=True)
    inv_t = (torch.rand(11) + 0.5).to(DEV)
    args = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), y, inv_t, 1.0, -100, True)
    torch.library.opcheck(_triton_fwd, args, test_utils=("test_schema", "test_faketensor",
                                                         "test_autograd_registration"))

    def f(h_, w_, b_):
        lp, ent = vpgea.token_logprobs(h_, w_, y, bias=b_, temperature=inv_t, return_entropy=True, impl="triton")
        return lp.sum() + ent.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(h, w, b)
    ref = f(h, w, b)
    torch.testing.assert_close(got, ref)
    (gh,) = torch.autograd.grad(got, h)
    (rh,) = torch.autograd.grad(ref, h)
    torch.testing.assert_close(gh, rh)


# --------------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_shape,v,d", [((1029,), 32003, 257), ((4, 333), 151936, 128)])
def test_cuda_matches_float64(dtype, n_shape, v, d):
    if dtype == torch.float16:
        _FLOOR.setdefault(torch.float16, 2e-3)
    _case("triton", n_shape, v, d, dtype, temp="per-token", device="cuda")


@requires_cuda
def test_cuda_no_nv_sized_allocation():
    """The fused path's peak extra memory stays far below the fp32 [N, V] logits."""
    n, v, d = 4096, 151936, 256
    h, w, b, y = _make((n,), v, d, torch.bfloat16, bias=False, device="cuda")
    h.requires_grad_()
    w.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp = vpgea.token_logprobs(h, w, y, impl="triton")
    lp.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = h.grad.numel() * 2 + w.grad.numel() * 2
    assert extra - grads < 0.02 * n * v * 4, f"extra {extra / 2**20:.1f} MiB"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fp32_gemm_helpers(dtype):
    """mm_fp32 / addmm_fp32_ (the backward's GEMMs) accumulate in fp32 on this torch, whichever path it allows."""
    from vpgea.kernels._utils import addmm_fp32_, mm_fp32

    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(300, 517, generator=g).to(dtype) for _ in range(2))
    acc = torch.randn(300, 300, generator=g)
    want = acc.double() + a.double() @ b.double().t()
    got = acc.cuda()
    addmm_fp32_(got, a.cuda(), b.cuda().t())
    prod = mm_fp32(a.cuda(), b.cuda().t())
    assert got.dtype == prod.dtype == torch.float32
    # fp32 accumulation over K = 517 exact products: far below one bf16/fp16 ulp of the result.
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(prod.cpu().double(), want - acc.double(), rtol=1e-5, atol=1e-4)


def test_fp32_accumulator_probe_is_cuda_only():
    from vpgea.kernels._utils import addmm_fp32_, addmm_fp32_accumulator_ok

    assert not addmm_fp32_accumulator_ok(torch.device("cpu"), torch.bfloat16)
    acc = torch.zeros(3, 2)
    a, b = torch.randn(3, 5).bfloat16(), torch.randn(5, 2).bfloat16()
    addmm_fp32_(acc, a, b)  # the CPU path: an fp32 product added in
    torch.testing.assert_close(acc, a.float() @ b.float())


@pytest.mark.parametrize("impl", IMPLS)
def test_no_rows(impl):
    # N = 0 (e.g. every completion token masked): empty outputs and zero gradients, no launch of an empty grid.
    h = torch.randn(0, 16, device=DEV, requires_grad=True)
    w = torch.randn(37, 16, device=DEV, requires_grad=True)
    b = torch.randn(37, device=DEV, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=DEV)
    lp, ent = vpgea.token_logprobs(h, w, y, bias=b, return_entropy=True, impl=impl)
    assert lp.shape == ent.shape == (0,) and lp.dtype == torch.float32
    (lp.sum() + ent.sum()).backward()
    assert h.grad.shape == (0, 16) and w.grad.shape == (37, 16)
    assert not w.grad.any() and not b.grad.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_targets_under_compile_are_nan_not_numbers(impl):
    # Under torch.compile the (device-syncing) range check does not run; a bad target must still not pass as a
    # plausible log-prob: it comes out NaN, and in-range and ignored positions are unaffected.
    h, w, _, _ = _make((5,), 10, 16, torch.float32, bias=False)
    y = torch.tensor([3, 10, -100, 45, -2], device=DEV)

    def f(h_, w_, y_):
        return vpgea.token_logprobs(h_, w_, y_, impl=impl)

    got = torch.compile(f, backend="aot_eager", fullgraph=impl == "triton")(h, w, y)
    assert torch.isnan(got[[1, 3, 4]]).all()
    assert got[2] == 0.0
    gold, _ = _reference(h, w, None, torch.tensor([3, 0, -100, 0, 0], device=DEV), 1.0, -100)
    torch.testing.assert_close(got[0].double(), gold[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# logit scale, final-logit softcapping, sampling support


def _transformed(z, temp, scale, softcap):
    """Logits after the scale, the softcap and the temperature, in z's dtype (float64 gold or fp32 eager)."""
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    t = temp.to(z.dtype)[..., None] if isinstance(temp, torch.Tensor) else temp
    return z / t


def _masked_logsoftmax(z, keep):
    return torch.log_softmax(z if keep is None else z.masked_fill(~keep, float("-inf")), dim=-1)


def _lp_ent(ls, y, ignore_index, keep):
    valid = y != ignore_index
    lp = ls.gather(-1, torch.where(valid, y, 0)[..., None])[..., 0]
    p_ls = ls.exp() * (ls if keep is None else ls.masked_fill(~keep, 0.0))  # 0 * -inf would be NaN
    return torch.where(valid, lp, 0.0), torch.where(valid, -p_ls.sum(-1), 0.0)


def _keep_mask(support, v):
    """``[..., V]`` bool from ``[..., K]`` kept ids (-1 pads)."""
    keep = torch.zeros(*support.shape[:-1], v + 1, dtype=torch.bool, device=support.device)
    keep.scatter_(-1, torch.where(support >= 0, support, v), True)
    return keep[..., :v]


def _case_ext(impl, n_shape, v, d, dtype, *, scale=1.0, softcap=None, temp=0.8, support=None, grads=(True,) * 3):
    """``_case`` with a logit scale, a softcap and an optional support: fused against a float64 gold, within twice
    eager PyTorch's own error in the same dtype (``F.linear`` in ``dtype``, then fp32)."""
    h, w, b, y = _make(n_shape, v, d, dtype, bias=True, seed=3)
    ignore_index = -100
    keep = None
    if support == "top-k/top-p":
        # The sampler's kept set from top-k = 9 / top-p = 0.8 of the float64 logits, and a target drawn from it.
        z64 = _transformed(F.linear(h.double(), w.double(), b.double()), temp, scale, softcap)
        order = z64.argsort(dim=-1, descending=True)
        p = torch.softmax(z64.gather(-1, order[..., :9]), -1)
        kept = torch.where(torch.cumsum(p, -1) - p < 0.8, order[..., :9], -1)
        support = kept.flip(-1)  # any order, padding anywhere
        y = kept[..., 0].clone()
        keep = _keep_mask(support, v)
    y.view(-1)[::4] = ignore_index
    gen = torch.Generator().manual_seed(2)
    g_lp = torch.randn(n_shape, generator=gen, dtype=torch.float64).to(DEV)
    g_ent = torch.randn(n_shape, generator=gen, dtype=torch.float64).to(DEV)

    def fused(h_, w_, b_, y_, t_, ii):
        return vpgea.token_logprobs(h_, w_, y_, bias=b_, temperature=t_, ignore_index=ii, return_entropy=True,
                                    logit_scale=scale, softcap=softcap, support=support, impl=impl)

    def gold(h_, w_, b_, y_, t_, ii):
        z = _transformed(F.linear(h_.double(), w_.double(), b_.double()), t_, scale, softcap)
        return _lp_ent(_masked_logsoftmax(z, keep), y_, ii, keep)

    def eager(h_, w_, b_, y_, t_, ii):
        z = _transformed(F.linear(h_, w_, b_).float(), t_, scale, softcap)
        return _lp_ent(_masked_logsoftmax(z, keep), y_, ii, keep)

    runs = [_run(f, h, w, b, y, temp, ignore_index, g_lp, g_ent, grads) for f in (fused, gold, eager)]
    names = ["logp", "entropy"] + [n for n, need in zip(("d_hidden", "d_weight", "d_bias"), grads) if need]
    _check_close(*runs, dtype, names)
    return runs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale,softcap", [(0.37, None), (1.0, 2.5), (3.0, 30.0)])
@pytest.mark.parametrize("n_shape,v,d", [((29,), 131, 40), ((3, 5), 67, 24)])
def test_scale_and_softcap_match_float64(impl, scale, softcap, n_shape, v, d):
    # fp32 under the interpreter (on a GPU the same shapes run the compiled kernels). softcap 2.5 saturates most
    # logits (|scaled logit| ~ 3-9), where tanh' = 1 - t^2 is small and most easily wrong; 30 is Gemma-2's.
    _case_ext(impl, n_shape, v, d, torch.float32, scale=scale, softcap=softcap)


@pytest.mark.parametrize("impl", IMPLS)
def test_softcap_bf16_per_token_temperature(impl):
    temp = (torch.rand(17, generator=torch.Generator().manual_seed(4)) + 0.5).to(DEV)
    _case_ext(impl, (17,), 97, 32, torch.bfloat16, scale=0.5, softcap=4.0, temp=temp)


def test_scale_without_softcap_is_a_temperature():
    # Without a softcap the scale folds into the inverse temperature: scale s at temperature T is temperature T / s.
    h, w, b, y = _make((11,), 53, 16, torch.float32, bias=True)
    for impl in IMPLS:
        a = vpgea.token_logprobs(h, w, y, bias=b, temperature=0.9, logit_scale=0.3, impl=impl)
        r = vpgea.token_logprobs(h, w, y, bias=b, temperature=0.9 / 0.3, impl=impl)
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_support_matches_float64(impl, dtype):
    # Renormalised over a top-k/top-p kept set (the target drawn from it), with a softcap: log-softmax over the kept
    # columns in float64 is the gold; gradients reach only the kept head rows.
    fused, gold, _ = _case_ext(impl, (6, 7), 89, 24, dtype, scale=1.3, softcap=5.0, support="top-k/top-p")
    d_w = fused[3]
    assert (d_w.abs().sum(-1) > 0).sum() <= 6 * 7 * 9  # at most the kept rows of the head get a gradient
    assert torch.all(fused[0] <= 0)


def test_support_of_everything_is_the_full_softmax():
    h, w, b, y = _make((13,), 41, 16, torch.float32, bias=True)
    everything = torch.arange(41).flip(0).expand(13, 41).to(DEV)
    full = vpgea.token_logprobs(h, w, y, bias=b, softcap=3.0, return_entropy=True, impl="torch")
    kept = vpgea.token_logprobs(h, w, y, bias=b, softcap=3.0, return_entropy=True, support=everything)
    for a, r in zip(kept, full):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_top_k_top_p_support_matches_transformers_warpers():
    # The kept sets are those of transformers' TopK and TopP warpers (the samplers' reference semantics), applied to
    # the same transformed logits.
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from vpgea.logprobs import top_k_top_p_support

    h, w, b, _ = _make((2, 9), 211, 24, torch.float32, bias=True)
    for top_k, top_p in ((None, 0.7), (12, None), (12, 0.9), (1, 0.5), (None, 1.0)):
        sup = top_k_top_p_support(h, w, bias=b, top_k=top_k, top_p=top_p, temperature=0.6, softcap=4.0)
        assert sup.shape[:-1] == (2, 9) and sup.dtype == torch.int64
        scores = _transformed(F.linear(h, w, b).reshape(18, 211), 0.6, 1.0, 4.0)
        if top_k is not None:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p is not None and top_p < 1.0:
            scores = TopPLogitsWarper(top_p)(None, scores)
        want = torch.isfinite(scores)
        assert torch.equal(_keep_mask(sup.reshape(18, -1), 211), want)
        # kept ids come first in descending logit order, then the -1 padding
        assert torch.all((sup[..., 1:] == -1) | (sup[..., :-1] >= 0))


def test_support_bad_inputs():
    h, w, b, y = _make((4,), 10, 8, torch.float32, bias=True)
    y = torch.tensor([1, 2, 3, -100], device=DEV)
    ok = torch.tensor([[1, 5, -1], [2, -1, -1], [3, 4, 0], [-1, -1, -1]], device=DEV)
    vpgea.token_logprobs(h, w, y, support=ok)
    with pytest.raises(ValueError, match=r"support must be .* = \[4, K\].*got shape \(3, 3\)"):
        vpgea.token_logprobs(h, w, y, support=ok[:3])
    with pytest.raises(ValueError, match="int64"):
        vpgea.token_logprobs(h, w, y, support=ok.float())
    with pytest.raises(ValueError, match=r"support ids must be in \[0, 10\) or -1.*found 10 at flat position 1"):
        vpgea.token_logprobs(h, w, y, support=torch.tensor([[1, -1], [2, 10], [3, 0], [-1, -1]], device=DEV))
    with pytest.raises(ValueError, match="twice at flat position 2"):
        vpgea.token_logprobs(h, w, y, support=torch.tensor([[1, -1], [2, -1], [3, 3], [-1, -1]], device=DEV))
    with pytest.raises(ValueError, match="target 2 at flat position 1 is not in its support"):
        vpgea.token_logprobs(h, w, y, support=torch.tensor([[1, -1], [5, -1], [3, 0], [-1, -1]], device=DEV))
    with pytest.raises(ValueError, match="softcap must be None or a finite float > 0"):
        vpgea.token_logprobs(h, w, y, softcap=0.0)
    with pytest.raises(ValueError, match="logit_scale must be a finite float"):
        vpgea.token_logprobs(h, w, y, logit_scale=float("inf"))
    from vpgea.logprobs import top_k_top_p_support

    with pytest.raises(ValueError, match="top_p must be in"):
        top_k_top_p_support(h, w, top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be an int"):
        top_k_top_p_support(h, w, top_k=0)


def test_stats_match_float64():
    from vpgea.logprobs import token_logprob_stats

    h, w, b, y = _make((5, 7), 73, 24, torch.float32, bias=True)
    z = _transformed(F.linear(h.double(), w.double(), b.double()), 0.7, 2.0, 3.0)
    y[0, :4] = z[0, :4].argmax(-1)  # some targets are the argmax
    y[1, 0] = -100
    got = token_logprob_stats(h, w, y, bias=b, temperature=0.7, logit_scale=2.0, softcap=3.0)
    ls = torch.log_softmax(z, -1)
    valid = y != -100
    torch.testing.assert_close(got["log_sum_sq_probs"].double(),
                               torch.where(valid, torch.logsumexp(2 * ls, -1), 0.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["mean_logits"].double(), torch.where(valid, z.mean(-1), 0.0), rtol=1e-5, atol=1e-5)
    assert torch.equal(got["is_top1"], valid & (z.argmax(-1) == y))
    assert got["is_top1"][0, :4].all() and not got["is_top1"][1, 0]
    assert set(token_logprob_stats(h, w, y, stats=("is_top1",))) == {"is_top1"}
    with pytest.raises(ValueError, match="stats must be among"):
        token_logprob_stats(h, w, y, stats=("entropy",))


def test_softcap_custom_op_passes_opcheck():
    from vpgea.logprobs import _triton_fwd

    h, w, b, y = _make((9,), 37, 16, torch.float32, bias=True)
    args = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), y, None, 1.25, -100, True, 0.8, 6.0)
    torch.library.opcheck(_triton_fwd, args, test_utils=("test_schema", "test_faketensor",
                                                         "test_autograd_registration"))


def test_softcap_kernels_lower_to_tensor_cores():
    # The HAS_SOFTCAP variants compile for sm_90 with wgmma and pipelined loads (the fast path's PTX is unchanged:
    # the flags are constexpr and default off).
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(root / "tests" / "_aot_compile.py"), "--softcap"], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ASTSource" in proc.stderr and "ImportError" in proc.stderr:
        pytest.skip("this triton has no ahead-of-time compile API")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in json.loads(proc.stdout):
        assert r["softcap"] and r["wgmma"] > 0 and r["cp_async"] > 0 and r["shared"] <= 227 * 1024, r
