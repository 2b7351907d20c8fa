"""vpgea.integrations.verl: verl's ``linear_cross_entropy`` contract against its math in float64.

verl itself (Ray, vLLM, Megatron) is too heavy for the dev extra; its kernel's contract is small and fixed: per-token
``log softmax(hidden @ weight.T / T)[label]`` and the entropy, flattened to ``[N]``, the log-probs optionally summed or
averaged, and with a tensor-parallel group a vocabulary split over ranks (rank r holds rows ``[r V/tp, (r+1) V/tp)``)
whose global results every rank returns, each rank getting its own shard's gradients.
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from vpgea.integrations import verl as vv


def _gold(h, w, y, temperature):
    ls = torch.log_softmax(F.linear(h.double(), w.double()) / temperature, -1)
    return ls.gather(-1, y[..., None])[..., 0].reshape(-1), -(ls.exp() * ls).sum(-1).reshape(-1)


def _make(shape, v, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) * d**-0.5 * 3).to(dtype)
    y = torch.randint(0, v, shape, generator=g)
    return h, w, y


def _grads(fn, h, w, y, g_lp, g_ent):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = fn(h, w, y)
    loss = (lp.double() * g_lp).sum() + (ent.double() * g_ent).sum()
    loss.backward()
    return [lp.detach().double(), ent.detach().double(), h.grad.double(), w.grad.double()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7), (1, 29)])
def test_matches_verl_math(dtype, shape):
    """Outputs (flattened, as verl's kernel returns them) and gradients within twice eager PyTorch's own error in
    the same dtype against the float64 gold, plus a floor of a few ulps of each value."""
    h, w, y = _make(shape, 131, 48, dtype)
    n = y.numel()
    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)

    def ours(h_, w_, y_):
        lp, ent = vv.linear_cross_entropy(h_, w_, y_, 0.7, "none")
        assert lp.shape == ent.shape == (n,) and lp.dtype == ent.dtype == torch.float32
        return lp, ent

    def eager(h_, w_, y_):  # logits in the input dtype, fp32 softmax
        ls = torch.log_softmax(F.linear(h_, w_).float() / 0.7, -1)
        return ls.gather(-1, y_[..., None])[..., 0].reshape(-1), -(ls.exp() * ls).sum(-1).reshape(-1)

    got, ref, gold = (_grads(f, h, w, y, g_lp, g_ent) for f in (ours, eager, _gold_fn(0.7)))
    floor = (8 * 2**-24) if dtype == torch.float32 else 2**-8
    for name, a, r, gg in zip(("log_probs", "entropy", "d_hidden", "d_weight"), got, ref, gold):
        err, torch_err = (a - gg).abs().max().item(), (r - gg).abs().max().item()
        assert err <= 2 * torch_err + floor * gg.abs().max().item(), (name, err, torch_err)


def _gold_fn(temperature):
    return lambda h, w, y: _gold(h, w, y, temperature)


def test_reductions_and_errors():
    h, w, y = _make((2, 5), 37, 16, torch.float32)
    lp, ent = vv.linear_cross_entropy(h, w, y, 1.0)
    s, ent_s = vv.linear_cross_entropy(h, w, y, 1.0, "sum")
    m, _ = vv.linear_cross_entropy(h, w, y, 1.0, "MEAN")
    assert s.shape == m.shape == () and ent_s.shape == (10,)
    torch.testing.assert_close(s, lp.sum())
    torch.testing.assert_close(m, lp.mean())
    gold_lp, _ = _gold(h, w, y, 1.0)
    torch.testing.assert_close(lp.double(), gold_lp, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        vv.linear_cross_entropy(h, w, y, 1.0, "max")
    with pytest.raises(TypeError, match="temperature must be a float"):
        vv.linear_cross_entropy(h, w, y, torch.tensor(1.0))
    with pytest.raises(ValueError, match="labels .* must match hidden"):
        vv.linear_cross_entropy(h, w, y[:, :3])
    with pytest.raises(ValueError, match=r"targets must be in \[0, 37\)"):
        vv.linear_cross_entropy(h, w, torch.full_like(y, 37))


# ---------------------------------------------------------------------------------------------------------------------
# tensor parallel: 2 ranks over gloo


def _tp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        h, w, y = _make((3, 5), 2 * 37, 24, torch.float32, seed=4)
        g = torch.Generator().manual_seed(5)
        g_lp, g_ent = torch.randn(15, generator=g), torch.randn(15, generator=g)
        shard = w[rank * 37:(rank + 1) * 37].clone().requires_grad_()
        h = h.clone().requires_grad_()
        lp, ent = vv.linear_cross_entropy(h, shard, y, 0.9, "none", torch.distributed.group.WORLD)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        torch.save({"lp": lp.detach(), "ent": ent.detach(), "d_h": h.grad, "d_w": shard.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_vocab_parallel_over_gloo(tmp_path):
    """Two ranks, each with half the head: both return the global log-probs and entropies; each rank's head
    gradient is its half of the full one, and the ranks' partial hidden gradients sum to the full one."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_tp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    h, w, y = _make((3, 5), 2 * 37, 24, torch.float32, seed=4)
    g = torch.Generator().manual_seed(5)
    g_lp, g_ent = torch.randn(15, generator=g), torch.randn(15, generator=g)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    lp, ent = _gold(h64, w64, y, 0.9)
    ((lp * g_lp.double()).sum() + (ent * g_ent.double()).sum()).backward()
    for r, o in enumerate(outs):
        torch.testing.assert_close(o["lp"].double(), lp.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o["ent"].double(), ent.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o["d_w"].double(), w64.grad[r * 37:(r + 1) * 37], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((outs[0]["d_h"] + outs[1]["d_h"]).double(), h64.grad, rtol=1e-5, atol=1e-5)


def test_patch_verl_replaces_every_binding(monkeypatch):
    """verl imports the kernel as ``from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy`` (at
    module level in its Megatron forwards, at call time in its HF forwards): both see vpgea's after patch_verl.
    Stand-in modules with that layout (verl itself is not installed here)."""
    def verls_kernel(*args):
        raise AssertionError("verl's kernel was called")

    kernel_mod = types.ModuleType("verl.utils.kernel.linear_cross_entropy")
    kernel_mod.linear_cross_entropy = verls_kernel
    forward_mod = types.ModuleType("verl.models.mcore.model_forward_fused")
    forward_mod.linear_cross_entropy = verls_kernel
    for name in ("verl", "verl.utils", "verl.utils.kernel", "verl.models", "verl.models.mcore"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, kernel_mod.__name__, kernel_mod)
    monkeypatch.setitem(sys.modules, forward_mod.__name__, forward_mod)
    sys.modules.pop("vpgea.integrations.verl_patch", None)
    import vpgea.integrations.verl_patch as verl_patch  # the external_lib module: patches on import

    assert set(verl_patch.REPLACED) == {"verl.utils.kernel.linear_cross_entropy.linear_cross_entropy",
                                        "verl.models.mcore.model_forward_fused.linear_cross_entropy"}
    assert kernel_mod.linear_cross_entropy is vv.linear_cross_entropy is forward_mod.linear_cross_entropy
    h, w, y = _make((1, 6), 19, 16, torch.float32)
    lp, ent = forward_mod.linear_cross_entropy(h, w, y, 1.0, "none")
    torch.testing.assert_close(lp.double(), _gold(h, w, y, 1.0)[0], rtol=1e-5, atol=1e-5)
    assert vv.patch_verl() == {}  # a second call finds it done
    sys.modules.pop("vpgea.integrations.verl_patch", None)


def test_patch_verl_without_verl(monkeypatch):
    monkeypatch.setitem(sys.modules, "verl", None)  # import verl -> ImportError
    with pytest.raises(ImportError, match="patch_verl: verl is not installed"):
        vv.patch_verl()
