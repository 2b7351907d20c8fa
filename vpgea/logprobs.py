"""``token_logprobs``: per-token log-probabilities (and entropies) straight from hidden states and the LM head.

Two implementations behind one function:

- ``impl="triton"``: the fused kernels in ``vpgea.kernels.token_logprobs`` (CUDA, or CPU under ``TRITON_INTERPRET=1``),
  wrapped as ``torch.library`` custom ops with fake implementations, so ``torch.compile`` traces through them.
- ``impl="torch"``: a chunked pure-PyTorch reference with its own autograd Function. It recomputes each chunk's logits
  in the backward, so its extra memory is one ``[chunk, V]`` fp32 block, never ``[N, V]``.

``impl="auto"`` picks Triton on CUDA and the torch reference elsewhere.

Options shared by both: a logit scale and final-logit softcapping (``softcap * tanh(z * scale / softcap)``, Gemma-2,
Cohere, Granite-style heads), a temperature, and a sampling support: per position, the token ids the sampler could
draw (after top-k / top-p), over which the distribution is renormalised. With a support only the kept columns enter
the computation (``O(N K D)`` gathered work, the same code for both impls), never ``[N, V]``.

``token_logprob_stats`` computes the no-gradient extras some trainers log (``log sum p^2``, the mean logit, whether
the target is the argmax) in one chunked pass; ``top_k_top_p_support`` builds a support from top-k / top-p.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from vpgea.kernels._utils import addmm_fp32_, mm_fp32

__all__ = ["token_logprobs", "token_logprob_stats", "top_k_top_p_support", "linear_logprob_loss", "bad_targets",
           "ROUTES", "STATS"]

_IMPLS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATS = ("log_sum_sq_probs", "mean_logits", "is_top1")  # what token_logprob_stats computes


@dataclass(frozen=True)
class _Params:
    """Non-tensor options that travel through ``autograd.Function.apply`` in one piece."""

    ignore_index: int
    inv_temp: float  # used when there is no per-token temperature tensor
    with_entropy: bool
    logit_scale: float = 1.0
    softcap: float | None = None


# --------------------------------------------------------------------------------------------------------------------
# validation


def _check_inputs(hidden, weight, targets, bias, temperature, impl, logit_scale=1.0, softcap=None,
                  support=None) -> None:
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
    if isinstance(logit_scale, torch.Tensor) or not math.isfinite(float(logit_scale)):
        raise ValueError(f"token_logprobs: logit_scale must be a finite float, got {logit_scale!r}")
    if softcap is not None and (isinstance(softcap, torch.Tensor) or not float(softcap) > 0.0
                                or not math.isfinite(float(softcap))):
        raise ValueError(f"token_logprobs: softcap must be None or a finite float > 0, got {softcap!r}")
    if support is not None:
        if not isinstance(support, torch.Tensor) or support.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token_logprobs: support must be an int64 (or int32) tensor of kept token ids, got "
                             f"{getattr(support, 'dtype', type(support))}")
        if support.dim() != targets.dim() + 1 or support.shape[:-1] != targets.shape or support.shape[-1] < 1:
            raise ValueError(
                f"token_logprobs: support must be [*targets.shape, K] = [{', '.join(map(str, targets.shape))}, K] "
                f"with K >= 1 (kept token ids per position, -1 pads), got shape {tuple(support.shape)}"
            )
        devices.add(support.device)
    if len(devices) != 1:
        raise ValueError(f"token_logprobs: all tensors must be on one device, got {sorted(map(str, devices))}")


def _check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int, temp: torch.Tensor | None) -> None:
    # Data-dependent checks sync the device; under torch.compile they are skipped. Nothing is then read out of bounds
    # (the kernels only compare a target with column indices; the reference clamps before its gather), and a bad
    # target's log-prob comes out NaN (``bad_targets``), so the error still shows instead of a plausible number.
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


def _check_support(support: torch.Tensor, targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Support ids in ``[0, V)`` or -1, no id twice in a row, and every scored target among its row's ids."""
    if torch.compiler.is_compiling():
        return
    bad = (support < -1) | (support >= vocab)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"token_logprobs: support ids must be in [0, {vocab}) or -1 (padding); found "
                         f"{int(support[row, col])} at flat position {row}, slot {col}")
    srt = support.sort(dim=-1).values
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if bool(dup.any()):
        row = int(dup.any(-1).nonzero()[0, 0])
        raise ValueError(f"token_logprobs: support lists a token id twice at flat position {row}; each row must "
                         f"list distinct kept ids (-1 pads)")
    scored = targets != ignore_index
    missing = scored & ~(support == targets[:, None]).any(-1)
    if bool(missing.any()):
        idx = int(missing.nonzero()[0, 0])
        raise ValueError(
            f"token_logprobs: target {int(targets[idx])} at flat position {idx} is not in its support "
            f"({int(missing.sum())} such positions): the sampler could not have drawn it; pass the kept set the "
            f"token was sampled from"
        )


def bad_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """``[N]`` bool: targets outside ``[0, vocab)`` that are not ``ignore_index``."""
    return ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)


# --------------------------------------------------------------------------------------------------------------------
# torch reference


def _chunk_rows(vocab: int) -> int:
    # Bound each chunk's fp32 logits block to about 64 MiB.
    return max(1, (64 << 20) // (4 * max(1, vocab)))


def _transform(raw: torch.Tensor, inv_t: torch.Tensor, logit_scale: float, softcap: float | None):
    """``(z, dz/draw)`` for fp32 raw logits ``raw: [n, K]``: ``z = softcap * tanh(raw * scale / softcap) / T`` (or
    ``raw * scale / T`` without a softcap); the derivative is what the backward multiplies by."""
    if softcap is None:
        factor = inv_t[:, None] * logit_scale
        return raw * factor, factor
    t = torch.tanh(raw * (logit_scale / softcap))
    return softcap * t * inv_t[:, None], (1.0 - t * t) * (inv_t[:, None] * logit_scale)


def _ref_chunk(h, weight, bias, y, inv_t, params: _Params):
    """Transformed fp32 logits ``[n, V]`` of one chunk, ``dz/draw``, the valid-row mask and the targets made safe to
    gather (ignored and out-of-range ones point at column 0; ``bad_targets`` marks the latter)."""
    logits = (h @ weight.t()).float()
    if bias is not None:
        logits = logits + bias.float()
    logits, dz_draw = _transform(logits, inv_t, params.logit_scale, params.softcap)
    valid = y != params.ignore_index
    safe = valid & ~bad_targets(y, weight.shape[0], params.ignore_index)
    return logits, dz_draw, valid, torch.where(safe, y, torch.zeros_like(y))


class _TorchTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temp, params: _Params):
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=torch.float32)
        ent = hidden.new_empty(n if params.with_entropy else 0, dtype=torch.float32)
        step = _chunk_rows(weight.shape[0])
        for i in range(0, n, step):
            logits, _, valid, y = _ref_chunk(hidden[i : i + step], weight, bias, targets[i : i + step],
                                             inv_temp[i : i + step], params)
            lse = torch.logsumexp(logits, dim=-1)
            lp = logits.gather(1, y[:, None])[:, 0] - lse
            lp = torch.where(bad_targets(targets[i : i + step], weight.shape[0], params.ignore_index), torch.nan, lp)
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
            logits, dz_draw, valid, y = _ref_chunk(h, weight, bias, targets[i : i + step], inv_temp[i : i + step],
                                                   params)
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
            dz *= dz_draw
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
    logit_scale: float = 1.0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(logp [N], entropy [N] or [0], lse [N], mu [N] or [0])``, fp32. ``softcap = 0`` means none."""
    from vpgea.kernels.token_logprobs import token_logprobs_forward

    tgt_logit, lse, mu, ent = token_logprobs_forward(
        hidden, weight, bias, targets, inv_temp, inv_temp_scalar, with_entropy, logit_scale=logit_scale,
        softcap=softcap or None,
    )
    valid = targets != ignore_index
    logp = torch.where(bad_targets(targets, weight.shape[0], ignore_index), torch.nan, tgt_logit - lse)
    logp = torch.where(valid, logp, 0.0)
    if with_entropy:
        ent = torch.where(valid, ent, 0.0)
    return logp, ent, lse, mu


@_triton_fwd.register_fake
def _(hidden, weight, bias, targets, inv_temp, inv_temp_scalar, ignore_index, with_entropy, logit_scale=1.0,
      softcap=0.0):
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
    logit_scale: float = 1.0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(d_hidden, d_weight, d_bias)`` in the input dtypes; an unrequested one is an empty tensor."""
    from vpgea.kernels.token_logprobs import token_logprobs_backward

    valid = targets != ignore_index
    g = torch.where(valid, grad_logp.float(), 0.0).contiguous()
    ge = torch.where(valid, grad_entropy.float(), 0.0).contiguous() if grad_entropy is not None else None
    dh, dw, db = token_logprobs_backward(
        hidden, weight, bias, targets, inv_temp, inv_temp_scalar, lse, mu if ge is not None else None, g, ge,
        need_hidden, need_weight, need_bias, logit_scale=logit_scale, softcap=softcap or None,
    )
    # Outputs may not alias each other: a fresh empty tensor for each one not requested.
    return (
        dh.to(hidden.dtype) if dh is not None else hidden.new_empty(0),
        dw.to(weight.dtype) if dw is not None else hidden.new_empty(0),
        db.to(bias.dtype) if db is not None else hidden.new_empty(0),
    )


@_triton_bwd.register_fake
def _(hidden, weight, bias, targets, inv_temp, inv_temp_scalar, ignore_index, lse, mu, grad_logp, grad_entropy,
      need_hidden, need_weight, need_bias, logit_scale=1.0, softcap=0.0):
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else hidden.new_empty(0),
        torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty(0),
    )


def _fwd_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, inv_temp, inv_temp_scalar, ignore_index, with_entropy, logit_scale, softcap = inputs
    _, _, lse, mu = output
    ctx.save_for_backward(hidden, weight, bias, targets, inv_temp, lse, mu)
    ctx.opts = (inv_temp_scalar, ignore_index, with_entropy, logit_scale, softcap)


def _fwd_backward(ctx, grad_logp, grad_ent, _grad_lse, _grad_mu):
    hidden, weight, bias, targets, inv_temp, lse, mu = ctx.saved_tensors
    inv_temp_scalar, ignore_index, with_entropy, logit_scale, softcap = ctx.opts
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = bias is not None and ctx.needs_input_grad[2]
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if not with_entropy:
        grad_ent = None
    dh, dw, db = _triton_bwd(
        hidden, weight, bias, targets, inv_temp, inv_temp_scalar, ignore_index, lse, mu, grad_logp, grad_ent,
        need_h, need_w, need_b, logit_scale, softcap,
    )
    return (dh if need_h else None, dw if need_w else None, db if need_b else None, None, None, None, None, None,
            None, None)


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
    logit_scale: float = 1.0,
    softcap: float | None = None,
    support: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target under ``softmax(z)``, ``z = cap(logit_scale * (hidden @ weight.T + bias)) / T``.

    Args:
        hidden: ``[..., D]`` float32, bfloat16 or float16.
        weight: ``[V, D]``, same dtype as ``hidden`` (the LM head; for tied embeddings, the embedding matrix).
        targets: ``[...]`` int64, in ``[0, V)`` or equal to ``ignore_index``.
        bias: ``[V]`` or None.
        temperature: a float > 0, or a float tensor ``[...]`` with one temperature per token (no gradient).
        ignore_index: positions with this target return 0 (log-prob and entropy) and get zero gradient.
        return_entropy: also return the entropy of each position's distribution.
        logit_scale: multiplies the logits before the softcap (Cohere's ``logit_scale``; Granite's
            ``1 / logits_scaling``). A float.
        softcap: final-logit softcapping, ``cap(x) = softcap * tanh(x / softcap)`` (Gemma-2's
            ``final_logit_softcapping``), or None for none. Applied after the scale, before the temperature, as the
            models and samplers do.
        support: ``[..., K]`` int64 (or int32), or None: per position the token ids the sampler could draw (its kept
            set after top-k / top-p, any order, padded with -1). The distribution is renormalised over them: the
            log-prob is ``z_y - logsumexp_{j in support} z_j`` and the entropy is over the kept set. Each scored
            target must be in its row's support and no id may repeat (checked, with an error naming the position).
            Only the ``K`` kept columns are computed (``O(N K D)``, the same gathered code for both impls).
            ``top_k_top_p_support`` builds one from the logits; a sampler's own kept set (e.g. vLLM's top
            log-probs with ``logprobs_mode="processed_logprobs"``: the ids whose log-prob is finite) fits directly.
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
        return _token_logprobs(hidden, weight, targets, bias, temperature, ignore_index, return_entropy, impl,
                               logit_scale, softcap, support)


def _flatten(hidden, weight, targets, temperature):
    """``(h [N, D], w [V, D], y [N] int64, temperature tensor [N] or None, inv_t [N] or None, inv_t_scalar)``."""
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    if h.stride(-1) != 1:
        h = h.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = targets.reshape(-1).long().contiguous()
    temp_t = temperature.reshape(-1) if isinstance(temperature, torch.Tensor) else None
    inv_t = None if temp_t is None else (1.0 / temp_t.float()).contiguous()
    inv_t_scalar = 1.0 if temp_t is not None else 1.0 / float(temperature)
    return h, w, y, temp_t, inv_t, inv_t_scalar


def _token_logprobs(hidden, weight, targets, bias, temperature, ignore_index, return_entropy, impl,
                    logit_scale=1.0, softcap=None, support=None):
    _check_inputs(hidden, weight, targets, bias, temperature, impl, logit_scale, softcap, support)
    logit_scale = float(logit_scale)
    softcap = None if softcap is None else float(softcap)
    if impl == "auto":
        impl = "triton" if hidden.is_cuda else "torch"
    if impl == "triton" and support is None:
        from vpgea.kernels._utils import triton_runnable

        if not triton_runnable(hidden.device):
            raise RuntimeError(
                f"token_logprobs(impl='triton') needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                f"imported for CPU tensors; got device {hidden.device}. Use impl='torch' or impl='auto'."
            )
    batch_shape = targets.shape
    h, w, y, temp_t, inv_t, inv_t_scalar = _flatten(hidden, weight, targets, temperature)
    _check_target_range(y, w.shape[0], ignore_index, temp_t)
    params = _Params(ignore_index, inv_t_scalar, return_entropy, logit_scale, softcap)
    if inv_t is None and (impl == "torch" or support is not None):
        inv_t = torch.full((h.shape[0],), inv_t_scalar, device=h.device, dtype=torch.float32)

    if support is not None:
        sup = support.reshape(-1, support.shape[-1]).long().contiguous()
        _check_support(sup, y, w.shape[0], ignore_index)
        logp, ent = _SupportLogprobs.apply(h, w, bias, y, sup, inv_t, params)
    elif impl == "triton":
        logp, ent, _, _ = _triton_fwd(
            h, w, bias.contiguous() if bias is not None else None, y, inv_t, inv_t_scalar, ignore_index,
            return_entropy, logit_scale, softcap or 0.0,
        )
    else:
        logp, ent = _TorchTokenLogprobs.apply(h, w, bias, y, inv_t, params)
    logp = logp.reshape(batch_shape)
    if return_entropy:
        return logp, ent.reshape(batch_shape)
    return logp


# --------------------------------------------------------------------------------------------------------------------
# sampling support: the distribution renormalised over each row's kept token ids (gathered, O(N K D))


def _support_rows(k: int, d: int) -> int:
    # Bound each chunk's gathered fp32 head rows [n, K, D] to about 64 MiB.
    return max(1, (64 << 20) // (4 * max(1, k * d)))


def _support_chunk(h, weight, bias, ids, inv_t, params: _Params):
    """``(z [n, K] fp32 with -inf at padding, dz/draw [n, K], kept [n, K] bool, W_kept [n, K, D] fp32)``."""
    kept = ids >= 0
    safe = torch.where(kept, ids, torch.zeros_like(ids))
    w_k = weight.index_select(0, safe.reshape(-1)).float().view(*ids.shape, weight.shape[1])  # [n, K, D]
    raw = torch.bmm(w_k, h.float()[:, :, None])[:, :, 0]  # [n, K]
    if bias is not None:
        raw = raw + bias.float()[safe]
    z, dz_draw = _transform(raw, inv_t, params.logit_scale, params.softcap)
    return z.masked_fill(~kept, float("-inf")), dz_draw, kept, w_k


class _SupportLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, support, inv_temp, params: _Params):
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=torch.float32)
        ent = hidden.new_empty(n if params.with_entropy else 0, dtype=torch.float32)
        mu = hidden.new_empty(n, dtype=torch.float32)
        lse_all = hidden.new_empty(n, dtype=torch.float32)
        step = _support_rows(support.shape[1], hidden.shape[1])
        for i in range(0, n, step):
            sl = slice(i, i + step)
            z, _, kept, _ = _support_chunk(hidden[sl], weight, bias, support[sl], inv_temp[sl], params)
            y = targets[sl]
            valid = y != params.ignore_index
            lse = torch.logsumexp(z, dim=-1)
            is_y = support[sl] == y[:, None]
            found = is_y.any(-1)
            lp = torch.where(is_y, z, 0.0).sum(-1) - lse
            # A target outside its support (only possible where the check cannot run, under torch.compile): NaN.
            logp[sl] = torch.where(valid, torch.where(found, lp, torch.nan), 0.0)
            p = torch.softmax(z, dim=-1)
            m = (p * torch.where(kept, z, 0.0)).sum(-1)  # 0 * -inf would be NaN at padding
            mu[sl], lse_all[sl] = m, lse
            if params.with_entropy:
                ent[sl] = torch.where(valid, lse - m, 0.0)
        ctx.save_for_backward(hidden, weight, bias, targets, support, inv_temp, lse_all, mu)
        ctx.params = params
        if not params.with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, bias, targets, support, inv_temp, lse_all, mu = ctx.saved_tensors
        params: _Params = ctx.params
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, d = hidden.shape
        dh = torch.zeros_like(hidden, dtype=torch.float32) if need_h else None
        dw = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        db = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_b else None
        step = _support_rows(support.shape[1], d)
        for i in range(0, n, step):
            sl = slice(i, i + step)
            ids = support[sl]
            z, dz_draw, kept, w_k = _support_chunk(hidden[sl], weight, bias, ids, inv_temp[sl], params)
            valid = targets[sl] != params.ignore_index
            p = torch.exp(z - lse_all[sl, None])  # 0 at padding
            dz = torch.zeros_like(z)
            if grad_logp is not None:
                g = torch.where(valid, grad_logp[sl].float(), 0.0)[:, None]
                dz += g * ((ids == targets[sl, None]).float() - p)
            if params.with_entropy and grad_ent is not None:
                ge = torch.where(valid, grad_ent[sl].float(), 0.0)[:, None]
                dz -= ge * p * torch.where(kept, z - mu[sl, None], 0.0)
            dz = torch.where(kept, dz * dz_draw, 0.0)  # [n, K] d loss / d raw kept logit
            if need_h:
                dh[sl] = torch.bmm(dz[:, None, :], w_k)[:, 0]
            flat = torch.where(kept, ids, torch.zeros_like(ids)).reshape(-1)
            if need_w:
                dw.index_add_(0, flat, (dz[:, :, None] * hidden[sl].float()[:, None, :]).reshape(-1, d))
            if need_b:
                db.index_add_(0, flat, dz.reshape(-1))
        return (
            dh.to(hidden.dtype) if need_h else None,
            dw.to(weight.dtype) if need_w else None,
            db.to(bias.dtype) if need_b else None,
            None, None, None, None,
        )


def top_k_top_p_support(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    top_k: int | None = None,
    top_p: float | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """The kept token ids of top-k / top-p sampling at each position, as ``token_logprobs(support=...)`` takes them.

    Follows the usual sampler order (vLLM's, and transformers' warpers): logits transformed (scale, softcap) and
    divided by ``temperature``; top-k keeps every token whose logit is at least the k-th largest (ties kept); top-p then
    keeps, in descending probability of the top-k-renormalised distribution, each token whose preceding mass is
    below ``top_p`` (so the smallest prefix reaching ``top_p``, at least one token).

    Args:
        hidden: ``[..., D]``; weight: ``[V, D]``; bias: ``[V]`` or None.
        top_k: int >= 1 or None (no top-k). top_p: float in (0, 1] or None (no top-p).

    Returns:
        ``[..., K]`` int64 kept ids, in descending logit order, padded with -1; ``K`` is the largest kept count of any
        position. No gradient. Each chunk of rows materialises its ``[rows, V]`` fp32 logits (about 64 MiB).
    """
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k_top_p_support: top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_k_top_p_support: top_p must be in (0, 1] or None, got {top_p!r}")
    dummy = torch.zeros(hidden.shape[:-1], dtype=torch.long, device=hidden.device)
    _check_inputs(hidden, weight, dummy, bias, temperature, "torch", logit_scale, softcap)
    h, w, _, _, _, inv_t_scalar = _flatten(hidden, weight, dummy, temperature)
    params = _Params(-100, inv_t_scalar, False, float(logit_scale), None if softcap is None else float(softcap))
    n, v = h.shape[0], w.shape[0]
    rows = []
    with torch.no_grad():
        for i in range(0, n, _chunk_rows(v)):
            hc = h[i : i + _chunk_rows(v)]
            inv_t = torch.full((hc.shape[0],), inv_t_scalar, device=h.device, dtype=torch.float32)
            z, _, _, _ = _ref_chunk(hc, w, bias, torch.zeros(hc.shape[0], dtype=torch.long, device=h.device), inv_t,
                                    params)
            zs, order = z.sort(dim=-1, descending=True)
            keep = torch.ones_like(zs, dtype=torch.bool)
            if top_k is not None and top_k < v:
                keep &= zs >= zs[:, top_k - 1 : top_k]
            if top_p is not None and top_p < 1.0:
                p = torch.softmax(zs.masked_fill(~keep, float("-inf")), dim=-1)
                before = torch.cumsum(p, dim=-1) - p  # mass strictly ahead of each token
                keep &= before < top_p
                keep[:, 0] = True
            rows.append(torch.where(keep, order, -1))
    k_max = max([int(r.ne(-1).sum(-1).max()) for r in rows if r.numel()] + [1])
    out = torch.cat([r[:, :k_max] for r in rows]) if rows else h.new_empty((0, k_max), dtype=torch.long)
    return out.reshape(*hidden.shape[:-1], k_max)


# --------------------------------------------------------------------------------------------------------------------
# no-gradient extras


def token_logprob_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    stats: tuple[str, ...] = STATS,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token statistics of the same distribution as ``token_logprobs`` (same arguments), without gradient.

    ``stats`` names any of:
    - ``"log_sum_sq_probs"``: ``log sum_v p_v^2`` (float32);
    - ``"mean_logits"``: the mean over the vocabulary of the transformed, temperature-divided logits (float32);
    - ``"is_top1"``: whether the target is the argmax, the first one on ties (bool).

    Returns ``{name: [...]}``; ignored positions hold 0 / False. One chunked pass over the vocabulary (each chunk of
    rows materialises its ``[rows, V]`` fp32 logits, about 64 MiB, never ``[N, V]``): the cost of one extra forward
    GEMM, paid only by trainers that log these.
    """
    unknown = [s for s in stats if s not in STATS]
    if unknown:
        raise ValueError(f"token_logprob_stats: stats must be among {STATS}, got {unknown}")
    _check_inputs(hidden, weight, targets, bias, temperature, "torch", logit_scale, softcap)
    (hidden, weight, bias), guard = autocast_inputs(hidden, weight, bias)
    h, w, y, temp_t, inv_t, inv_t_scalar = _flatten(hidden, weight, targets, temperature)
    _check_target_range(y, w.shape[0], ignore_index, temp_t)
    if inv_t is None:
        inv_t = torch.full((h.shape[0],), inv_t_scalar, device=h.device, dtype=torch.float32)
    params = _Params(ignore_index, inv_t_scalar, False, float(logit_scale), None if softcap is None else float(softcap))
    n, v = h.shape[0], w.shape[0]
    out = {"log_sum_sq_probs": h.new_zeros(n, dtype=torch.float32), "mean_logits": h.new_zeros(n, dtype=torch.float32),
           "is_top1": torch.zeros(n, dtype=torch.bool, device=h.device)}
    step = _chunk_rows(v)
    with torch.no_grad(), guard or contextlib.nullcontext():
        for i in range(0, n, step):
            sl = slice(i, i + step)
            z, _, valid, yc = _ref_chunk(h[sl], w, bias, y[sl], inv_t[sl], params)
            if "log_sum_sq_probs" in stats:
                # relative to the row max: the two log-sum-exps are then O(log V), not O(max logit), so their
                # difference does not cancel away the last digits
                zc = z - z.amax(dim=-1, keepdim=True)
                lss = torch.logsumexp(2.0 * zc, dim=-1) - 2.0 * torch.logsumexp(zc, dim=-1)
                out["log_sum_sq_probs"][sl] = torch.where(valid, lss, 0.0)
            if "mean_logits" in stats:
                out["mean_logits"][sl] = torch.where(valid, z.mean(dim=-1), 0.0)
            if "is_top1" in stats:
                out["is_top1"][sl] = valid & (z.argmax(dim=-1) == yc)
    return {k: out[k].reshape(targets.shape) for k in stats}


# --------------------------------------------------------------------------------------------------------------------
# the "known dL/dlog-prob" op: a loss linear in the log-probs, with the head gradient in the same sweep


# Rows per chunk of the one-sweep route: its fp32 [rows, V] logits block stays under this many bytes (1 GiB:
# 1765 rows at V = 152k). Larger chunks amortise the fp32 dW read-modify-write (one per chunk, 2.2 GB at the 7B
# head); on an H200 the sweep took 126 / 117 / 98 ms at 512 / 1024 / 2048 rows (benchmarks/NOTES.md, v2).
_SWEEP_CHUNK_BYTES = 1 << 30


@torch.library.custom_op("vpgea::logprobs_dlogits_rows", mutates_args=())
def _rows_op(
    logits: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, coef: torch.Tensor, inv_temp: float,
    dz_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp [R] fp32, dz [R, V] dz_dtype)`` of an fp32 logits block through the Triton row kernel (a custom op, so
    torch.compile treats the launch as one opaque call)."""
    from vpgea.kernels.token_logprobs import logprobs_dlogits_rows

    dz = torch.empty(logits.shape, device=logits.device, dtype=dz_dtype)
    return logprobs_dlogits_rows(logits, bias, targets, coef, inv_temp, dz), dz


@_rows_op.register_fake
def _(logits, bias, targets, coef, inv_temp, dz_dtype):
    return logits.new_empty(logits.shape[0]), logits.new_empty(logits.shape, dtype=dz_dtype)


@dataclass(frozen=True)
class _SweepParams:
    inv_temp: float
    ignore_index: int
    row_kernel: bool  # the Triton lse/dz kernel over each logits block (else torch ops)
    grad_enabled: bool  # grad mode at the call: under no_grad no gradient is produced (needs_input_grad ignores it)


def _linear_terms(coefs: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``sum coefs * logp`` where a zero coefficient contributes exactly 0 (a -inf log-prob must not make it NaN),
    while a NaN log-prob (a bad target under torch.compile) still makes the sum NaN."""
    terms = torch.where(coefs != 0, coefs * logp, 0.0).sum()
    return terms + torch.where(torch.isnan(logp).any(), float("nan"), 0.0)


class _LinearSweep(torch.autograd.Function):
    """``(hidden [N, D], weight [V, D], bias [V] | None, targets [N], coefs [N] fp32) -> (loss, logp [N])``, with
    ``loss = sum_t coefs_t logp_t`` and ``logp`` fp32 (not differentiable: the gradient flows through ``loss``).

    One sweep over row chunks: fp32 logits of the chunk (``[rows, V]``, cuBLAS), the log-sum-exp and log-probs, and at
    once ``dz = coef (onehot - softmax) / temperature``, ``dh = dz @ W``, ``dW += dz.T @ h``: three GEMMs per chunk
    instead of the four of a forward plus a backward that recomputes the logits. The backward only scales the stored
    gradients by the incoming one.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, coefs, params: _SweepParams):
        rows_total, dim = hidden.shape
        vocab = weight.shape[0]
        need_h = params.grad_enabled and ctx.needs_input_grad[0]
        need_w = params.grad_enabled and ctx.needs_input_grad[1]
        need_b = params.grad_enabled and bias is not None and ctx.needs_input_grad[2]
        need_any = need_h or need_w or need_b
        logp = hidden.new_empty(rows_total, dtype=torch.float32)
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(vocab, dim, device=weight.device, dtype=torch.float32) if need_w else None
        db = torch.zeros(vocab, device=weight.device, dtype=torch.float32) if need_b else None
        step = max(1, _SWEEP_CHUNK_BYTES // (4 * max(vocab, 1)))
        inv_t = params.inv_temp
        for i in range(0, rows_total, step):
            h = hidden[i : i + step]
            y = targets[i : i + step]
            bad = bad_targets(y, vocab, params.ignore_index)  # only under torch.compile (the eager check raises)
            valid = (y != params.ignore_index) & ~bad
            yc = torch.where(valid, y, 0)[:, None]  # never an out-of-range index into gather/scatter
            g = torch.where(valid, coefs[i : i + step].float(), 0.0)[:, None]
            z = mm_fp32(h, weight.t())  # [rows, V] fp32
            dz = None
            if params.row_kernel:
                # One Triton kernel, two reads of the block: logp, and dz in the GEMM dtype (fp32 where the bias
                # gradient sums it over rows).
                lp, dz = _rows_op(z, bias, yc[:, 0], g[:, 0].contiguous(), inv_t,
                                  torch.float32 if need_b else hidden.dtype)
                logp[i : i + step] = torch.where(bad, float("nan"), torch.where(valid, lp, 0.0))
                if need_b:
                    db += dz.sum(0)
                    dz = dz.to(hidden.dtype)
            else:
                if bias is not None:
                    z += bias.float()
                z *= inv_t
                lse = torch.logsumexp(z, dim=-1, keepdim=True)
                logp[i : i + step] = torch.where(bad, float("nan"),
                                                 torch.where(valid, (z.gather(1, yc) - lse)[:, 0], 0.0))
                if need_any:
                    # z becomes dz in place: -g p, plus g at the target, times 1/temperature
                    z.sub_(lse).exp_().mul_(-g)
                    z.scatter_add_(1, yc, g)
                    z.mul_(inv_t)
                    if need_b:
                        db += z.sum(0)
                    dz = z.to(hidden.dtype)
            del z
            if need_h:
                dh[i : i + step] = (mm_fp32(dz, weight)).to(hidden.dtype)
            if need_w:
                addmm_fp32_(dw, dz.t(), h)  # no [V, D] fp32 temporary where torch allows
            del dz
        ctx.save_for_backward(dh, dw.to(weight.dtype) if need_w else None, db.to(bias.dtype) if need_b else None)
        ctx.mark_non_differentiable(logp)
        return _linear_terms(coefs, logp), logp

    @staticmethod
    def backward(ctx, grad_loss, grad_logp):
        dh, dw, db = ctx.saved_tensors
        scale = lambda t: None if t is None else t * grad_loss.to(t.dtype)  # noqa: E731
        return scale(dh), scale(dw), scale(db), None, None, None


ROUTES = ("sweep", "two-pass")


def linear_logprob_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    coefs: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    route: str = "sweep",
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The "known dL/dlog-prob" op: ``L = sum_t coefs_t log p(targets_t | hidden_t)`` for coefficients fixed before
    the call. Every on-policy loss with one update per batch has this form once its advantages are known (VPG-EA's
    two terms, GRPO's surrogate at ratio 1, weighted SFT); the trainer's training pass goes through it.

    Args:
        hidden: ``[N, D]`` (final norm applied); weight: ``[V, D]`` head; bias: ``[V]`` or None.
        targets: ``[N]`` int64 in ``[0, V)`` or ``ignore_index``; coefs: ``[N]`` float, ``dL/dlogp`` of each row.
        temperature: float > 0 (logits are divided by it).
        route: ``"sweep"``: the hidden, head and bias gradients are produced while the log-probs are computed (three
            GEMMs, fp32 logits of at most 1 GiB of rows at a time; the backward only scales them); ``"two-pass"``:
            ``token_logprobs`` forward, logits recomputed in the backward (four GEMMs, a bounded workspace).
        impl: as ``token_logprobs``: for the sweep's lse/dz step, ``"triton"`` is the Triton row kernel (CUDA, or the
            CPU interpreter), ``"torch"`` torch ops, ``"auto"`` Triton on CUDA and torch elsewhere.

    Returns:
        ``(loss, logps)``: the 0-d fp32 loss (differentiable) and the ``[N]`` fp32 log-probs (detached; 0 where the
        target is ``ignore_index``). Both routes give the same loss and gradients up to fp32 rounding. Under
        ``torch.autocast`` the inputs are cast to the autocast dtype first, as for ``token_logprobs``.
    """
    name = "linear_logprob_loss"
    if route not in ROUTES:
        raise ValueError(f"{name}: route must be one of {ROUTES}, got {route!r}")
    if isinstance(temperature, torch.Tensor) or not float(temperature) > 0:
        raise ValueError(f"{name}: temperature must be a float > 0, got {temperature!r}")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or coefs.shape != hidden.shape[:1]:
        raise ValueError(f"{name}: hidden must be [N, D] with targets and coefs [N]; got hidden "
                         f"{tuple(hidden.shape)}, targets {tuple(targets.shape)}, coefs {tuple(coefs.shape)}")
    (h, w, b), guard = autocast_inputs(hidden, weight, bias)
    with guard or contextlib.nullcontext():
        if route == "two-pass":
            logp = token_logprobs(h, w, targets, bias=b, temperature=temperature, ignore_index=ignore_index,
                                  impl=impl)
            return _linear_terms(coefs.float(), logp), logp.detach()
        if w.dim() != 2 or w.shape[1] != h.shape[1] or w.dtype != h.dtype:
            raise ValueError(f"{name}: weight must be [V, D] with D = {h.shape[1]} and dtype {h.dtype}, got "
                             f"{tuple(w.shape)} {w.dtype}")
        if not torch.compiler.is_compiling():
            bad = bad_targets(targets, w.shape[0], ignore_index)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"{name}: targets must be in [0, {w.shape[0]}) or ignore_index={ignore_index}; "
                                 f"targets[{i}] = {int(targets[i])}")
        from vpgea.kernels._utils import triton_runnable

        # As token_logprobs: "auto" is Triton on CUDA and torch elsewhere; "triton" also runs under the interpreter.
        row_kernel = triton_runnable(h.device) and (impl == "triton" or (impl == "auto" and h.is_cuda))
        params = _SweepParams(1.0 / float(temperature), ignore_index, row_kernel, torch.is_grad_enabled())
        return _LinearSweep.apply(h, w, b, targets.long(), coefs.float().contiguous(), params)
