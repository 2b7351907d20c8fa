"""``token_logprobs``: per-token log-probabilities (and entropies) straight from hidden states and the LM head.

Two implementations behind one function:

- ``impl="triton"``: the fused kernels in ``vpgea.kernels.token_logprobs`` (CUDA, or CPU under ``TRITON_INTERPRET=1``),
  wrapped as ``torch.library`` custom ops with fake implementations, so ``torch.compile`` traces through them.
- ``impl="torch"``: a chunked pure-PyTorch reference with its own autograd Function. It recomputes each chunk's logits
  in the backward, so its extra memory is one ``[chunk, V]`` fp32 block, never ``[N, V]``.

``impl="auto"`` picks Triton on CUDA and the torch reference elsewhere.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["token_logprobs"]

_IMPLS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class _Params:
    """Non-tensor options that travel through ``autograd.Function.apply`` in one piece."""

    ignore_index: int
    inv_temp: float  # used when there is no per-token temperature tensor
    with_entropy: bool


# --------------------------------------------------------------------------------------------------------------------
# validation


def _check_inputs(hidden, weight, targets, bias, temperature, impl) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"token_logprobs: impl must be one of {_IMPLS}, got {impl!r}")
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("token_logprobs: hidden and weight must be tensors")
    if hidden.dim() < 1:
        raise ValueError(f"token_logprobs: hidden must be [..., D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"token_logprobs: weight must be [V, D], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"token_logprobs: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} disagree on D "
            f"({hidden.shape[-1]} != {weight.shape[1]})"
        )
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"token_logprobs: hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"token_logprobs: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"token_logprobs: targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] "
            f"{tuple(hidden.shape[:-1])}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_logprobs: targets must be int64 (or int32), got {targets.dtype}")
    devices = {hidden.device, weight.device, targets.device}
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"token_logprobs: bias must be [V] = ({weight.shape[0]},), got shape {tuple(bias.shape)}"
            )
        if bias.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"token_logprobs: bias must be a float tensor, got {bias.dtype}")
        devices.add(bias.device)
    if isinstance(temperature, torch.Tensor):
        if temperature.shape != targets.shape:
            raise ValueError(
                f"token_logprobs: a temperature tensor must have the targets' shape {tuple(targets.shape)}, "
                f"got {tuple(temperature.shape)}"
            )
        if not temperature.is_floating_point():
            raise ValueError(f"token_logprobs: temperature tensor must be float, got {temperature.dtype}")
        devices.add(temperature.device)
    else:
        if not float(temperature) > 0.0:
            raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    if len(devices) != 1:
        raise ValueError(f"token_logprobs: all tensors must be on one device, got {sorted(map(str, devices))}")


def _check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int, temp: torch.Tensor | None) -> None:
    # Data-dependent checks sync the device; under torch.compile they are skipped. Nothing is then read out of bounds
    # (the kernels only compare a target with column indices; the reference clamps before its gather), and a bad
    # target's log-prob comes out NaN (``_bad_targets``), so the error still shows instead of a plausible number.
    if torch.compiler.is_compiling():
        return
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"token_logprobs: targets must be in [0, {vocab}) or ignore_index={ignore_index}; "
            f"found {int(targets[idx])} at flat position {idx} ({int(bad.sum())} bad in all)"
        )
    if temp is not None and not bool((temp > 0).all()):
        raise ValueError("token_logprobs: every per-token temperature must be > 0")


def _bad_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """``[N]`` bool: targets outside ``[0, vocab)`` that are not ``ignore_index``."""
    return ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)


# --------------------------------------------------------------------------------------------------------------------
# torch reference


def _chunk_rows(vocab: int) -> int:
    # Bound each chunk's fp32 logits block to about 64 MiB.
    return max(1, (64 << 20) // (4 * max(1, vocab)))


def _ref_chunk(h, weight, bias, y, inv_t, ignore_index):
    """Scaled fp32 logits ``[n, V]`` of one chunk, the valid-row mask and the targets made safe to gather
    (ignored and out-of-range ones point at column 0; ``_bad_targets`` marks the latter)."""
    logits = (h @ weight.t()).float()
    if bias is not None:
        logits = logits + bias.float()
    logits = logits * inv_t[:, None]
    valid = y != ignore_index
    safe = valid & ~_bad_targets(y, weight.shape[0], ignore_index)
    return logits, valid, torch.where(safe, y, torch.zeros_like(y))


class _TorchTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp, params: _Params):
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=torch.float32)
        ent = hidden.new_empty(n if params.with_entropy else 0, dtype=torch.float32)
        step = _chunk_rows(weight.shape[0])
        for i in range(0, n, step):
            logits, valid, y = _ref_chunk(hidden[i : i + step], weight, bias, targets[i : i + step],
                                          inv_temp[i : i + step], params.ignore_index)
            lse = torch.logsumexp(logits, dim=-1)
            lp = logits.gather(1, y[:, None])[:, 0] - lse
            lp = torch.where(_bad_targets(targets[i : i + step], weight.shape[0], params.ignore_index), torch.nan, lp)
            logp[i : i + step] = torch.where(valid, lp, 0.0)
            if params.with_entropy:
                p = torch.softmax(logits, dim=-1)
                ent[i : i + step] = torch.where(valid, lse - (p * logits).sum(-1), 0.0)
        ctx.save_for_backward(hidden, weight, bias, targets, inv_temp)
        ctx.params = params
        if not params.with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, bias, targets, inv_temp = ctx.saved_tensors
        params: _Params = ctx.params
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        w32 = weight.float()
        dh = torch.zeros_like(hidden, dtype=torch.float32) if need_h else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        db = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_b else None
        step = _chunk_rows(weight.shape[0])
        for i in range(0, n, step):
            h = hidden[i : i + step]
            logits, valid, y = _ref_chunk(h, weight, bias, targets[i : i + step], inv_temp[i : i + step],
                                          params.ignore_index)
            p = torch.softmax(logits, dim=-1)
            g = torch.where(valid, grad_logp[i : i + step].float(), 0.0) if grad_logp is not None else None
            dz = torch.zeros_like(logits)
            if g is not None:
                dz -= g[:, None] * p
                dz.scatter_add_(1, y[:, None], g[:, None])
            if params.with_entropy and grad_ent is not None:
                ge = torch.where(valid, grad_ent[i : i + step].float(), 0.0)
                mu = (p * logits).sum(-1, keepdim=True)
                dz -= ge[:, None] * p * (logits - mu)
            dz *= inv_temp[i : i + step, None]
            if need_h:
                dh[i : i + step] = dz @ w32
            if need_w:
                dw += dz.t() @ h.float()
            if need_b:
                db += dz.sum(0)
        return (
            dh.to(hidden.dtype) if need_h else None,
            dw.to(weight.dtype) if need_w else None,
            db.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------------------------------------------------
# Triton path: custom ops (so torch.compile sees opaque, shape-known calls) with autograd registered on them.


@torch.library.custom_op("vpgea::token_logprobs_fwd", mutates_args=())
def _triton_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_temp: torch.Tensor | None,
    inv_temp_scalar: float,
    ignore_index: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(logp [N], entropy [N] or [0], lse [N], mu [N] or [0])``, fp32."""
    from vpgea.kernels.token_logprobs import token_logprobs_forward

    tgt_logit, lse, mu, ent = token_logprobs_forward(
        hidden, weight, bias, targets, inv_temp, inv_temp_scalar, with_entropy
    )
    valid = targets != ignore_index
    logp = torch.where(_bad_targets(targets, weight.shape[0], ignore_index), torch.nan, tgt_logit - lse)
    logp = torch.where(valid, logp, 0.0)
    if with_entropy:
        ent = torch.where(valid, ent, 0.0)
    return logp, ent, lse, mu


@_triton_fwd.register_fake
def _(hidden, weight, bias, targets, inv_temp, inv_temp_scalar, ignore_index, with_entropy):
    n = hidden.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    k = n if with_entropy else 0
    return hidden.new_empty(n, **f32), hidden.new_empty(k, **f32), hidden.new_empty(n, **f32), hidden.new_empty(k, **f32)


@torch.library.custom_op("vpgea::token_logprobs_bwd", mutates_args=())
def _triton_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_temp: torch.Tensor | None,
    inv_temp_scalar: float,
    ignore_index: int,
    lse: torch.Tensor,
    mu: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(d_hidden, d_weight, d_bias)`` in the input dtypes; an unrequested one is an empty tensor."""
    from vpgea.kernels.token_logprobs import token_logprobs_backward

    valid = targets != ignore_index
    g = torch.where(valid, grad_logp.float(), 0.0).contiguous()
    ge = torch.where(valid, grad_entropy.float(), 0.0).contiguous() if grad_entropy is not None else None
    dh, dw, db = token_logprobs_backward(
        hidden, weight, bias, targets, inv_temp, inv_temp_scalar, lse, mu if ge is not None else None, g, ge,
        need_hidden, need_weight, need_bias,
    )
    # Outputs may not alias each other: a fresh empty tensor for each one not requested.
    return (
        dh.to(hidden.dtype) if dh is not None else hidden.new_empty(0),
        dw.to(weight.dtype) if dw is not None else hidden.new_empty(0),
        db.to(bias.dtype) if db is not None else hidden.new_empty(0),
    )


@_triton_bwd.register_fake
def _(hidden, weight, bias, targets, inv_temp, inv_temp_scalar, ignore_index, lse, mu, grad_logp, grad_entropy,
      need_hidden, need_weight, need_bias):
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else hidden.new_empty(0),
        torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty(0),
    )


def _fwd_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, inv_temp, inv_temp_scalar, ignore_index, with_entropy = inputs
    _, _, lse, mu = output
    ctx.save_for_backward(hidden, weight, bias, targets, inv_temp, lse, mu)
    ctx.opts = (inv_temp_scalar, ignore_index, with_entropy)


def _fwd_backward(ctx, grad_logp, grad_ent, _grad_lse, _grad_mu):
    hidden, weight, bias, targets, inv_temp, lse, mu = ctx.saved_tensors
    inv_temp_scalar, ignore_index, with_entropy = ctx.opts
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = bias is not None and ctx.needs_input_grad[2]
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if not with_entropy:
        grad_ent = None
    dh, dw, db = _triton_bwd(
        hidden, weight, bias, targets, inv_temp, inv_temp_scalar, ignore_index, lse, mu, grad_logp, grad_ent,
        need_h, need_w, need_b,
    )
    return (dh if need_h else None, dw if need_w else None, db if need_b else None, None, None, None, None, None)


torch.library.register_autograd("vpgea::token_logprobs_fwd", _fwd_backward, setup_context=_fwd_setup_context)


# --------------------------------------------------------------------------------------------------------------------
# public function


def autocast_inputs(*tensors: torch.Tensor | None):
    """``(tensors, guard)``. Under autocast on the first tensor's device, the float tensors cast to the autocast dtype
    (what autocast does to a linear layer's inputs) and ``guard`` a context that turns autocast off, so the fused ops'
    own fp32 arithmetic (log-sum-exp, fp32-output GEMMs) is not recast inside them. Otherwise the tensors unchanged
    and ``guard`` None."""
    dev = tensors[0].device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return tensors, None
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        return t if t is None or t.dtype in (dt, torch.float64) or not t.is_floating_point() else t.to(dt)

    return tuple(cast(t) for t in tensors), torch.autocast(dev, enabled=False)


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[..., D]`` float32, bfloat16 or float16.
        weight: ``[V, D]``, same dtype as ``hidden`` (the LM head; for tied embeddings, the embedding matrix).
        targets: ``[...]`` int64, in ``[0, V)`` or equal to ``ignore_index``.
        bias: ``[V]`` or None.
        temperature: a float > 0, or a float tensor ``[...]`` with one temperature per token (no gradient).
        ignore_index: positions with this target return 0 (log-prob and entropy) and get zero gradient.
        return_entropy: also return the entropy of each position's distribution.
        impl: ``"triton"`` (fused kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (chunked
            reference) or ``"auto"`` (Triton on CUDA, torch otherwise).

    Returns:
        ``logprobs: [...]`` float32, or ``(logprobs, entropy)`` with ``return_entropy=True``. Differentiable with
        respect to ``hidden``, ``weight`` and ``bias``; gradients accumulate in fp32 and come back in the input dtype.

    Under ``torch.autocast`` the inputs are cast to the autocast dtype first, as autocast casts the ``F.linear`` this
    op replaces (fp32 master weights then run on tensor cores); the gradients flow back through the casts.
    """
    (hidden, weight, bias), guard = autocast_inputs(hidden, weight, bias)
    with guard or contextlib.nullcontext():
        return _token_logprobs(hidden, weight, targets, bias, temperature, ignore_index, return_entropy, impl)


def _token_logprobs(hidden, weight, targets, bias, temperature, ignore_index, return_entropy, impl):
    _check_inputs(hidden, weight, targets, bias, temperature, impl)
    if impl == "auto":
        impl = "triton" if hidden.is_cuda else "torch"
    if impl == "triton":
        from vpgea.kernels._utils import triton_runnable

        if not triton_runnable(hidden.device):
            raise RuntimeError(
                f"token_logprobs(impl='triton') needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                f"imported for CPU tensors; got device {hidden.device}. Use impl='torch' or impl='auto'."
            )
    batch_shape = targets.shape
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    if h.stride(-1) != 1:
        h = h.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = targets.reshape(-1).long().contiguous()
    temp_t = temperature if isinstance(temperature, torch.Tensor) else None
    inv_t = None if temp_t is None else (1.0 / temp_t.reshape(-1).float()).contiguous()
    inv_t_scalar = 1.0 if temp_t is not None else 1.0 / float(temperature)
    _check_target_range(y, w.shape[0], ignore_index, temp_t)

    if impl == "triton":
        logp, ent, _, _ = _triton_fwd(
            h, w, bias.contiguous() if bias is not None else None, y, inv_t, inv_t_scalar, ignore_index,
            return_entropy,
        )
    else:
        if inv_t is None:
            inv_t = torch.full((h.shape[0],), inv_t_scalar, device=h.device, dtype=torch.float32)
        logp, ent = _TorchTokenLogprobs.apply(
            h, w, bias, y, inv_t, _Params(ignore_index, inv_t_scalar, return_entropy)
        )
    logp = logp.reshape(batch_shape)
    if return_entropy:
        return logp, ent.reshape(batch_shape)
    return logp
