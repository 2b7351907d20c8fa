"""GRPO family: FusedLinearGRPOLoss (Liger-compatible) and the packed grpo_loss against the padded torch reference."""

from __future__ import annotations

import importlib.util
import inspect
import math
from pathlib import Path

import pytest
import torch

from vpgea.grpo import grpo_fused_linear_reference, grpo_loss, grpo_loss_reference, k3_kl
from vpgea.nn import FusedLinearGRPOLoss

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
IMPLS = ["torch", "triton"]
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
NEW_TYPES = ["cispo", "sapo", "luspo", "vespo"]
# every (loss_type, importance_sampling_level) Liger accepts: cispo / sapo / vespo are token-level only
ALL_CASES = [(t, lv) for t in LOSS_TYPES + NEW_TYPES for lv in ("token", "sequence")
             if lv == "token" or t not in ("cispo", "sapo", "vespo")]
# Liger-style option sets per type: cispo's epsilon_high is the ratio cap itself; non-default sapo / vespo parameters
# so that a swapped or ignored parameter shows.
TYPE_OPTS = {"cispo": dict(epsilon_high=1.1), "sapo": dict(sapo_temperature_pos=0.9, sapo_temperature_neg=1.3),
             "vespo": dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.5)}
B, T, H, V = 4, 13, 32, 151  # odd sizes; row 2 is fully masked, row 0 has a hole


def make_batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g).to(DEVICE, dtype).requires_grad_(True)
    w = (torch.randn(V, H, generator=g) * 0.2).to(DEVICE, dtype).requires_grad_(True)
    b = (torch.randn(V, generator=g) * 0.1).to(DEVICE, dtype).requires_grad_(True)
    ids = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 4] = 0
    mask[0, 10:] = 0
    mask[1, 7:] = 0
    mask[2, :] = 0
    mask = mask.to(DEVICE)
    adv = torch.tensor([1.3, -0.7, 0.4, -1.1]).to(DEVICE)
    # old / ref log-probs near the current ones so that some ratios clip and some do not
    with torch.no_grad():
        cur = torch.log_softmax(((x @ w.t()) + b).float(), -1).gather(-1, ids[..., None])[..., 0]
    old = cur + 0.3 * torch.randn(B, T, generator=g).to(DEVICE)
    ref = cur + 0.2 * torch.randn(B, T, generator=g).to(DEVICE)
    ref_x = (x.detach() + 0.1 * torch.randn(B, T, H, generator=g).to(DEVICE, dtype))
    ref_w = (w.detach() + 0.01 * torch.randn(V, H, generator=g).to(DEVICE, dtype))
    return dict(x=x, w=w, b=b, ids=ids, mask=mask, adv=adv, old=old, ref=ref, ref_x=ref_x, ref_w=ref_w)


def run(fn, d, **fw):
    """Loss, metrics and gradients (input, weight, bias) of one call."""
    for t in (d["x"], d["w"], d["b"]):
        t.grad = None
    loss, metrics = fn(d["x"], d["w"], d["ids"], d["mask"], d["adv"], d["b"], **fw)
    loss.backward()
    return loss.detach(), tuple(m.detach() for m in metrics), [t.grad.clone() for t in (d["x"], d["w"], d["b"])]


def compare(got, want, rtol=1e-4, atol=1e-5):
    # fp32 fused log-probs against fp32 materialised logits (V = 151): a few ulps per log-prob, summed
    (lg, mg, gg), (lw, mw, gw) = got, want
    torch.testing.assert_close(lg, lw, rtol=rtol, atol=atol)
    assert len(mg) == len(mw)
    for a, b in zip(mg, mw):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------------------------------
# every loss type x importance-sampling level x KL source against the eager padded reference


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type,level", ALL_CASES)
def test_module_matches_reference(impl, loss_type, level):
    d = make_batch(seed=1)
    opts = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=T,
                importance_sampling_level=level)
    opts.update(TYPE_OPTS.get(loss_type, {}))
    module = FusedLinearGRPOLoss(temperature=0.9, use_ref_model=True, impl=impl, **opts)
    fw = dict(ref_per_token_logps=d["ref"], old_per_token_logps=d["old"])
    got = run(module, d, **fw)
    want = run(lambda *a, **k: grpo_fused_linear_reference(*a, temperature=0.9, use_ref_model=True, **k, **opts),
               d, **fw)
    assert len(got[1]) == 2  # (kl, clip_ratio)
    compare(got, want)
    assert torch.all(got[2][0][2] == 0)  # the fully masked row gets no gradient
    assert torch.all(got[2][0][0, 4] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_error_within_twice_eager(impl):
    # bf16 inputs: the fused path's error against an fp32 gold computed from the same bf16-rounded inputs is at most
    # 2x that of eager bf16 (materialised bf16 logits, as a bf16 model computes them), plus a small floor.
    d16 = make_batch(seed=11)
    d32 = dict(d16)
    for k in ("x", "w", "b"):
        d16[k] = d16[k].detach().bfloat16().requires_grad_(True)
        d32[k] = d16[k].detach().float().requires_grad_(True)
    opts = dict(beta=0.04, loss_type="grpo", importance_sampling_level="token")
    fw = dict(ref_per_token_logps=d32["ref"], old_per_token_logps=d32["old"])
    gold = run(lambda *a, **k: grpo_fused_linear_reference(*a, **opts, **k), d32, **fw)

    def eager16(x, w, ids, mask, adv, b, **k):  # bf16 logits, then fp32 softmax
        logits = (x @ w.t() + b).float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
        return grpo_loss_reference(lp, mask, adv, **opts, **k)

    eager = run(eager16, d16, **fw)
    fused = run(FusedLinearGRPOLoss(impl=impl, **opts), d16, **fw)
    err = lambda a, b: (a.float() - b.float()).abs().max().item()  # noqa: E731
    # the scalar loss is a sum with cancellations, so its error is compared with bf16's unit roundoff instead
    assert err(fused[0], gold[0]) <= 2**-8 * abs(gold[0].item()) + 1e-5
    for gf, ge, gg in zip(fused[2], eager[2], gold[2]):
        assert gf.dtype == torch.bfloat16
        assert err(gf, gg) <= 2 * err(ge, gg) + 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_ref_from_ref_input_and_beta_zero(impl):
    d = make_batch(seed=2)
    # KL against reference log-probs computed from ref_input / ref_weight
    module = FusedLinearGRPOLoss(beta=0.1, use_ref_model=True, loss_type="bnpo", impl=impl)
    fw = dict(old_per_token_logps=d["old"], ref_input=d["ref_x"], ref_weight=d["ref_w"], ref_bias=d["b"].detach())
    got = run(module, d, **fw)
    want = run(lambda *a, **k: grpo_fused_linear_reference(*a, beta=0.1, loss_type="bnpo", **k), d, **fw)
    compare(got, want)
    assert got[1][0].item() > 0  # a real KL
    # beta = 0: metrics are (clip_ratio,) only, and no reference model is needed
    module = FusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo", impl=impl)
    got = run(module, d, old_per_token_logps=d["old"])
    want = run(lambda *a, **k: grpo_fused_linear_reference(*a, beta=0.0, use_ref_model=False, loss_type="dapo",
                                                           **k), d, old_per_token_logps=d["old"])
    assert len(got[1]) == 1
    compare(got, want)


def test_on_policy_defaults():
    # No old log-probs: ratio 1, nothing clipped, gradient of -A * logp / normaliser; use_ref_model=False: KL 0.
    d = make_batch(seed=3)
    module = FusedLinearGRPOLoss(beta=0.04, use_ref_model=False, loss_type="grpo", impl="torch")
    got = run(module, d)
    want = run(lambda *a, **k: grpo_fused_linear_reference(*a, beta=0.04, use_ref_model=False, loss_type="grpo",
                                                           **k), d)
    compare(got, want)
    kl, clip = got[1]
    assert kl.item() == 0.0 and clip.item() == 0.0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_extra_liger_options(level):
    d = make_batch(seed=4)
    opts = dict(beta=0.05, loss_type="dapo", importance_sampling_level=level, delta=1.1, use_bias_correction_kl=True)
    is_ratio = torch.rand(B, T, generator=torch.Generator().manual_seed(5)).to(DEVICE) + 0.5
    for ratio in (is_ratio, is_ratio[:, :1], is_ratio[:, 0]):
        fw = dict(ref_per_token_logps=d["ref"], old_per_token_logps=d["old"], vllm_is_ratio=ratio,
                  num_items_in_batch=57)
        got = run(FusedLinearGRPOLoss(impl="torch", **opts), d, **fw)
        want = run(lambda *a, **k: grpo_fused_linear_reference(*a, **opts, **k), d, **fw)
        compare(got, want)


def test_gradients_against_finite_differences():
    # float64 torch path against central differences of the padded reference on the log-probs
    g = torch.Generator().manual_seed(6)
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float64)
    lp = (-torch.rand(3, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = lp.detach() + 0.05 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    ref = lp.detach() + 0.1 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    # cispo and vespo are left out on purpose: their coefficients are stop-gradient, so the finite differences of
    # the loss value are not their gradient.
    for loss_type, level in [c for c in ALL_CASES if c[0] not in ("cispo", "vespo")]:
        def f(x):
            return grpo_loss_reference(x, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old, beta=0.3,
                                       loss_type=loss_type, max_completion_length=4,
                                       importance_sampling_level=level)[0].double()
        assert torch.autograd.gradcheck(f, (lp,), eps=1e-6, atol=1e-6)
    # cispo / vespo: the gradient is the coefficient times the log-prob's, coefficient held fixed (by hand)
    for loss_type in ("cispo", "vespo"):
        (gr,) = torch.autograd.grad(grpo_loss_reference(lp, mask, adv, old_per_token_logps=old, beta=0.0,
                                                        loss_type=loss_type, epsilon_high=1.02)[0], lp)
        w = torch.exp(lp.detach() - old)
        if loss_type == "cispo":
            coef = torch.clamp(w, max=1.02)
        else:  # phi(w_seq) with the default (k, lambda) = (2, 3) for A >= 0 and (3, 2) for A < 0
            w_seq = torch.exp(((lp.detach() - old) * mask).sum(-1, keepdim=True))
            k = torch.where(adv[:, None] >= 0, 2.0, 3.0).double()
            lam = torch.where(adv[:, None] >= 0, 3.0, 2.0).double()
            coef = torch.exp(lam) * w_seq**k * torch.exp(-lam * w_seq)
        torch.testing.assert_close(gr, -coef * adv[:, None] * mask / mask.sum())


# ---------------------------------------------------------------------------------------------------------------------
# the packed grpo_loss (grpo-lp baseline) and its metrics


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_packed_grpo_loss_matches_padded(loss_type):
    d = make_batch(seed=7)
    mask = d["mask"].bool()
    lengths = mask.sum(1)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=DEVICE)
    cu[1:] = lengths.cumsum(0)
    lp_pad = (-torch.rand(B, T, generator=torch.Generator().manual_seed(8))).to(DEVICE).requires_grad_(True)
    lp = lp_pad[mask]
    loss, metrics = grpo_loss(lp, d["adv"], cu, old_logps=d["old"][mask], ref_logps=d["ref"][mask], beta=0.2,
                              loss_type=loss_type, max_completion_length=T)
    (grad,) = torch.autograd.grad(loss, lp_pad)
    ref_loss, ref_metrics = grpo_loss_reference(lp_pad, d["mask"], d["adv"], ref_per_token_logps=d["ref"],
                                                old_per_token_logps=d["old"], beta=0.2, loss_type=loss_type,
                                                max_completion_length=T)
    (ref_grad,) = torch.autograd.grad(ref_loss, lp_pad)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(metrics["kl"], ref_metrics[0])
    torch.testing.assert_close(metrics["clip_ratio"], ref_metrics[1])
    torch.testing.assert_close(grad, ref_grad)


def test_k3_and_clip_metric_by_hand():
    assert k3_kl(torch.tensor(0.3), torch.tensor(0.3)).item() == 0.0
    assert math.isclose(k3_kl(torch.tensor(0.0), torch.tensor(1.0)).item(), math.exp(-1) + 1 - 1, rel_tol=1e-6)
    # ratios e^{0.5} (clipped high, A > 0: counts), e^{-0.5} (clipped low but A > 0: does not count), 1 (no clip)
    lp = torch.tensor([0.5, -0.5, 0.0])
    cu = torch.tensor([0, 3], dtype=torch.int32)
    _, m = grpo_loss(lp, torch.tensor([1.0]), cu, old_logps=torch.zeros(3), loss_type="bnpo")
    assert math.isclose(m["clip_ratio"].item(), 1 / 3, rel_tol=1e-6) and "kl" not in m


def test_errors():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        FusedLinearGRPOLoss(loss_type="ppo")
    with pytest.raises(ValueError, match="'sequence' is not supported for loss_type='sapo'"):
        FusedLinearGRPOLoss(loss_type="sapo", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="sapo_temperature_neg must be positive"):
        FusedLinearGRPOLoss(loss_type="sapo", sapo_temperature_neg=0.0)
    with pytest.raises(ValueError, match="max_completion_length must be provided"):
        FusedLinearGRPOLoss(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        FusedLinearGRPOLoss(importance_sampling_level="segment")
    d = make_batch(seed=9)
    with pytest.raises(ValueError, match="use_ref_model=True needs"):
        FusedLinearGRPOLoss(use_ref_model=True)(d["x"], d["w"], d["ids"], d["mask"], d["adv"])
    with pytest.raises(ValueError, match=r"advantages must be \[B\] = \(4,\) or \[B, T\] = \(4, 13\)"):
        FusedLinearGRPOLoss(use_ref_model=False)(d["x"], d["w"], d["ids"], d["mask"], d["adv"][:2])
    with pytest.raises(ValueError, match="vespo.*pass advantages \\[B\\], not \\[B, T\\]"):
        FusedLinearGRPOLoss(use_ref_model=False, loss_type="vespo")(d["x"], d["w"], d["ids"], d["mask"],
                                                                    torch.ones(B, T, device=DEVICE))
    with pytest.raises(ValueError, match="end at N"):
        grpo_loss(torch.zeros(3), torch.ones(1), torch.tensor([0, 2], dtype=torch.int32))


def test_liger_signature_parity():
    # Constructor and forward parameter names and order follow Liger v0.8's LigerFusedLinearGRPOLoss.
    init = list(inspect.signature(FusedLinearGRPOLoss.__init__).parameters)[1:]
    assert init[:18] == ["beta", "compiled", "use_ref_model", "chunk_size", "epsilon_low", "epsilon_high", "loss_type",
                         "max_completion_length", "importance_sampling_level", "sapo_temperature_pos",
                         "sapo_temperature_neg", "temperature", "delta", "use_bias_correction_kl", "vespo_k_pos",
                         "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"]
    fwd = list(inspect.signature(FusedLinearGRPOLoss.forward).parameters)[1:]
    assert fwd == ["_input", "lin_weight", "selected_token_ids", "attention_mask", "advantages", "bias",
                   "ref_per_token_logps", "old_per_token_logps", "ref_input", "ref_weight", "ref_bias",
                   "vllm_is_ratio", "num_items_in_batch"]
    if importlib.util.find_spec("liger_kernel") is not None:  # and against the installed Liger, defaults included
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        ours = inspect.signature(FusedLinearGRPOLoss.__init__).parameters
        for name, p in inspect.signature(LigerFusedLinearGRPOLoss.__init__).parameters.items():
            assert name in ours and ours[name].default == p.default, name
        assert fwd == list(inspect.signature(LigerFusedLinearGRPOLoss.forward).parameters)[1:]


def _example():
    spec = importlib.util.spec_from_file_location("trl_grpo_swap", ROOT / "examples" / "trl_grpo_swap.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
def test_swap_module_keeps_liger_settings():
    # examples/trl_grpo_swap.py's swap_module turns a built Liger loss (TRL 1.8-1.13's trainer.liger_loss) into
    # vpgea's with every setting, and the two agree on a batch.
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    liger = LigerFusedLinearGRPOLoss(beta=0.05, compiled=False, loss_type="sapo", epsilon_high=0.3, temperature=0.7,
                                     sapo_temperature_pos=0.8, sapo_temperature_neg=1.4, use_ref_model=True)
    swapped = _example().swap_module(liger, impl="torch")
    assert isinstance(swapped, FusedLinearGRPOLoss)
    assert (swapped.loss_type, swapped.temperature, swapped.sapo_temperature_neg) == ("sapo", 0.7, 1.4)
    d = make_batch(seed=16)
    fw = dict(ref_per_token_logps=d["ref"], old_per_token_logps=d["old"])
    compare(run(swapped, d, **fw), run(liger, d, **fw))


# Liger's chunked GRPO loss is plain PyTorch (compiled=False skips torch.compile), so the parity check runs on the CPU
# too; liger-kernel is in the dev extra.
needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")


@needs_liger
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type,level", ALL_CASES)
def test_against_liger(impl, loss_type, level):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    d = make_batch(seed=10)
    if loss_type == "luspo":
        # Liger sums luspo's per-token loss over the whole padded [B, T] grid, padding included (see vpgea.grpo):
        # compared where there is no padding; test_luspo_against_liger_with_padding covers the padded setup they share.
        d["mask"] = torch.ones_like(d["mask"])
    opts = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=T,
                importance_sampling_level=level, temperature=0.9, use_ref_model=True)
    opts.update(TYPE_OPTS.get(loss_type, {}))
    is_ratio = torch.rand(B, T, generator=torch.Generator().manual_seed(5)).to(DEVICE) + 0.5
    for fw in (dict(ref_per_token_logps=d["ref"], old_per_token_logps=d["old"]),  # off-policy, given reference
               dict(ref_input=d["ref_x"], ref_weight=d["ref_w"]),  # on-policy, reference from hidden states
               dict(ref_per_token_logps=d["ref"], old_per_token_logps=d["old"], vllm_is_ratio=is_ratio,
                    num_items_in_batch=61)):
        got = run(FusedLinearGRPOLoss(**opts, impl=impl), d, **fw)
        want = run(LigerFusedLinearGRPOLoss(compiled=False, **opts), d, **fw)
        compare(got, want, rtol=2e-4, atol=2e-5)


@needs_liger
def test_luspo_against_liger_with_padding():
    # The recommended LUSPO setup (sequence-level weights, no KL, per-sequence correction): Liger's [B, 1] grid has no
    # padded positions, so the padded batch agrees.
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    d = make_batch(seed=14)
    opts = dict(beta=0.0, use_ref_model=False, loss_type="luspo", importance_sampling_level="sequence")
    for fw in (dict(old_per_token_logps=d["old"]), dict(old_per_token_logps=d["old"], vllm_is_ratio=d["adv"].abs())):
        compare(run(FusedLinearGRPOLoss(**opts, impl="torch"), d, **fw),
                run(LigerFusedLinearGRPOLoss(compiled=False, **opts), d, **fw))


@needs_liger
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
def test_token_advantages_against_liger(loss_type):
    # [B, T] advantages: one per token, as Liger reads them with its default chunk_size=1 (Liger's token-level cases;
    # its sequence-level and sapo paths fail to broadcast [B, T]; those are checked against the padded reference).
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    d = make_batch(seed=12)
    d["adv"] = torch.randn(B, T, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    opts = dict(beta=0.04, loss_type=loss_type, temperature=0.9, max_completion_length=T, **TYPE_OPTS.get(loss_type, {}))
    fw = dict(old_per_token_logps=d["old"], ref_per_token_logps=d["ref"])
    compare(run(FusedLinearGRPOLoss(**opts, impl="torch"), d, **fw),
            run(LigerFusedLinearGRPOLoss(compiled=False, **opts), d, **fw))


@pytest.mark.parametrize("loss_type,level", [("sapo", "token"), ("grpo", "sequence"), ("luspo", "token")])
def test_token_advantages_against_reference(loss_type, level):
    d = make_batch(seed=12)
    d["adv"] = torch.randn(B, T, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    opts = dict(beta=0.04, loss_type=loss_type, importance_sampling_level=level, **TYPE_OPTS.get(loss_type, {}))
    fw = dict(old_per_token_logps=d["old"], ref_per_token_logps=d["ref"])
    got = run(FusedLinearGRPOLoss(**opts, impl="torch"), d, **fw)
    compare(got, run(lambda *a, **k: grpo_fused_linear_reference(*a, **opts, **k), d, **fw))
    # and per-token advantages equal to the per-sequence ones give the per-sequence loss
    d_seq = dict(d, adv=d["adv"][:, 0].contiguous())
    d_tok = dict(d, adv=d_seq["adv"][:, None].expand(B, T).contiguous())
    compare(run(FusedLinearGRPOLoss(**opts, impl="torch"), d_tok, **fw),
            run(FusedLinearGRPOLoss(**opts, impl="torch"), d_seq, **fw))


@needs_liger
@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_dtypes_against_liger(impl):
    # bf16 hidden states with an fp32 head (a bf16 model with fp32 master weights, as Liger takes it): the head is cast
    # to bf16 for the product in both; gradients come back in each input's dtype. Errors against an fp32 gold (same
    # bf16-rounded hidden, fp32 head) within twice Liger's own, plus one bf16 ulp of the largest value.
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    d = make_batch(seed=13)
    d["x"] = d["x"].detach().bfloat16().requires_grad_(True)
    opts = dict(beta=0.04, loss_type="dapo", temperature=0.9)
    fw = dict(old_per_token_logps=d["old"], ref_per_token_logps=d["ref"])
    got = run(FusedLinearGRPOLoss(**opts, impl=impl), d, **fw)
    liger = run(LigerFusedLinearGRPOLoss(compiled=False, **opts), d, **fw)
    d32 = dict(d, x=d["x"].detach().float().requires_grad_(True))
    gold = run(lambda *a, **k: grpo_fused_linear_reference(*a, **opts, **k), d32, **fw)
    assert [g.dtype for g in got[2]] == [torch.bfloat16, torch.float32, torch.float32]
    err = lambda a, b: (a.float() - b.float()).abs().max().item()  # noqa: E731
    assert err(got[0], gold[0]) <= 2 * err(liger[0], gold[0]) + 2**-8 * abs(gold[0].item())
    for g, lg, gg in zip(got[2], liger[2], gold[2]):
        assert err(g, gg) <= 2 * err(lg, gg) + 2**-8 * gg.abs().max().item()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_advantages_rejected(bad):
    d = make_batch(seed=15)
    mod = FusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo", impl="torch")
    adv = d["adv"].clone()
    adv[1] = bad
    with pytest.raises(ValueError, match=r"advantages must be finite; found (nan|inf) at completion 1"):
        mod(d["x"], d["w"], d["ids"], d["mask"], adv, d["b"])
    tok = torch.zeros(B, T, device=DEVICE)
    tok[2, 3] = bad  # completion 2 is fully masked: a NaN there is never used, so it is accepted
    assert torch.isfinite(mod(d["x"], d["w"], d["ids"], d["mask"], tok, d["b"])[0])
    tok[0, 2] = bad
    with pytest.raises(ValueError, match="at token 2 of completion 0"):
        mod(d["x"], d["w"], d["ids"], d["mask"], tok, d["b"])


@pytest.mark.parametrize("impl", IMPLS)
def test_all_tokens_masked(impl):
    # Every completion token masked: a defined, finite zero loss and zero gradients (as Liger's), on either path.
    d = make_batch(seed=5)
    mod = FusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo", impl=impl)
    loss, metrics = mod(d["x"], d["w"], d["ids"], torch.zeros_like(d["mask"]), d["adv"], d["b"])
    assert loss.item() == 0.0 and all(torch.isfinite(m) for m in metrics)
    loss.backward()
    assert not d["x"].grad.any() and not d["w"].grad.any()
