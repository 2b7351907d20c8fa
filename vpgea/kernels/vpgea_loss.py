"""Segment-reduction Triton kernels for the VPG-EA loss over packed reasoning paths.

Inputs are the per-token log-probs of S packed paths under the teacher view (``q: [T]``) and the student view
(``p: [T]``), the path boundaries ``cu_seqlens: [S+1]`` int32 and one advantage per path ``A: [S]``. With
``Q_i = sum_{t in i} q_t``, ``P_i = sum_{t in i} p_t``, the gate ``g_i = 1[A_i > 0]`` and a per-path weight ``c_i``
(the normaliser: ``1/S`` for "sum", ``1/(S n_i)`` for "token", ``1/T`` for "global-token"),

    loss     = sum_i c_i (-A_i Q_i + beta g_i (Q_i - P_i))          (Q_i in the second term is stop-gradient)
    kl       = sum_i c_i (Q_i - P_i)
    adv_logq = sum_i c_i A_i Q_i
    gate     = (1/S) sum_i g_i

Forward (``vpgea_loss_forward``): one program per path walks its tokens in ``BLOCK`` chunks, reduces ``Q_i`` and
``P_i`` in fp32 and writes the path's four contributions to ``partials: [4, S]``. The launcher sums the partials
(``[4, S] -> [4]``): a fixed-order sum, so the result is bitwise reproducible (atomics would not be).

Backward (``vpgea_loss_backward``): the loss is linear in the log-probs, so ``dL/dq_t = -g c_i A_i`` and
``dL/dp_t = -g c_i beta g_i`` for every token ``t`` of path ``i``; one program per path broadcasts them over its
tokens. ``g`` (the incoming gradient) is read from device memory, so no host sync happens.

Terms whose weight is zero (``A_i = 0``, a closed gate, a zero-length path) are selected away with ``where`` rather
than multiplied by zero, so a ``-inf`` log-prob in such a path cannot turn the loss into NaN. Token offsets are
64-bit: packed buffers can pass 2**31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import device_guard

__all__ = ["NORMALIZE_CODES", "vpgea_loss_forward", "vpgea_loss_backward"]

# Normalisation modes as kernel constexprs.
NORMALIZE_CODES = {"sum": 0, "token": 1, "global-token": 2}

_BLOCK = 256  # tokens per chunk of a path; paths are hundreds to thousands of tokens long


@triton.jit
def _path_weight(n, scale, NORMALIZE: tl.constexpr):
    """Per-path weight ``c_i``: ``scale`` (1/S or 1/T), or ``scale / n_i`` for "token" (0 for an empty path)."""
    if NORMALIZE == 1:
        c = tl.where(n > 0, scale / tl.maximum(n, 1).to(tl.float32), 0.0)
    else:
        c = scale + 0.0 * n.to(tl.float32)
    return c


@triton.jit
def _vpgea_loss_fwd_kernel(
    Q, P, A, CU,  # teacher logps [T], student logps [T], advantages [S] fp32, cu_seqlens [S+1] int32
    OUT,  # partials [4, S] fp32: loss, kl, adv_logq, gate
    S, beta, scale, inv_s,
    NORMALIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    start = tl.load(CU + pid).to(tl.int64)
    end = tl.load(CU + pid + 1).to(tl.int64)
    acc_q = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_p = tl.zeros((BLOCK,), dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK).to(tl.int64)
        m = idx < end
        acc_q += tl.load(Q + idx, mask=m, other=0.0).to(tl.float32)
        acc_p += tl.load(P + idx, mask=m, other=0.0).to(tl.float32)
    q = tl.sum(acc_q, axis=0)
    p = tl.sum(acc_p, axis=0)
    a = tl.load(A + pid).to(tl.float32)
    c = _path_weight(end - start, scale, NORMALIZE)
    gate = a > 0.0
    live = c != 0.0
    pg = -a * tl.where(live & (a != 0.0), q, 0.0)  # select before multiplying: no 0 * inf even in dead lanes
    kl = tl.where(live, q - p, 0.0)
    loss = c * (pg + tl.where(gate, beta * kl, 0.0))
    tl.store(OUT + pid, loss)
    tl.store(OUT + S + pid, c * kl)
    tl.store(OUT + 2 * S + pid, -c * pg)
    tl.store(OUT + 3 * S + pid, tl.where(gate, inv_s, 0.0))


@triton.jit
def _vpgea_loss_bwd_kernel(
    GQ, GP,  # outputs: d loss / d teacher logps [T], d loss / d student logps [T] (input dtypes)
    A, CU, G,  # advantages [S] fp32, cu_seqlens [S+1] int32, incoming gradient [1] fp32
    beta, scale,
    NORMALIZE: tl.constexpr, NEED_Q: tl.constexpr, NEED_P: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    start = tl.load(CU + pid).to(tl.int64)
    end = tl.load(CU + pid + 1).to(tl.int64)
    a = tl.load(A + pid).to(tl.float32)
    g = tl.load(G).to(tl.float32)
    c = _path_weight(end - start, scale, NORMALIZE)
    gq = -g * c * a
    gp = tl.where(a > 0.0, -g * c * beta, 0.0)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK).to(tl.int64)
        m = idx < end
        if NEED_Q:
            tl.store(GQ + idx, (gq + tl.zeros((BLOCK,), tl.float32)).to(GQ.dtype.element_ty), mask=m)
        if NEED_P:
            tl.store(GP + idx, (gp + tl.zeros((BLOCK,), tl.float32)).to(GP.dtype.element_ty), mask=m)


def _scale(normalize: str, num_seqs: int, num_tokens: int) -> float:
    if normalize == "global-token":
        return 1.0 / max(num_tokens, 1)
    return 1.0 / max(num_seqs, 1)


def vpgea_loss_forward(
    teacher_logps: torch.Tensor,
    student_logps: torch.Tensor,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor,
    beta: float,
    normalize: str,
) -> torch.Tensor:
    """Loss and metrics of the packed paths.

    Args:
        teacher_logps: ``[T]`` float (any float dtype, reduced in fp32), contiguous.
        student_logps: ``[T]`` float, contiguous.
        advantages: ``[S]`` float32, contiguous.
        cu_seqlens: ``[S+1]`` int32, validated by the caller (starts at 0, non-decreasing, ends at T).
        beta: weight of the gated distillation term.
        normalize: "sum", "token" or "global-token".

    Returns:
        ``[4]`` float32: loss, kl, adv_logq, gate_frac.
    """
    num_seqs = advantages.numel()
    if num_seqs == 0:
        return torch.zeros(4, device=teacher_logps.device, dtype=torch.float32)
    partials = torch.empty(4, num_seqs, device=teacher_logps.device, dtype=torch.float32)
    with device_guard(partials):
        _vpgea_loss_fwd_kernel[(num_seqs,)](
            teacher_logps, student_logps, advantages, cu_seqlens, partials,
            num_seqs, float(beta), _scale(normalize, num_seqs, teacher_logps.numel()), 1.0 / num_seqs,
            NORMALIZE=NORMALIZE_CODES[normalize], BLOCK=_BLOCK,
        )
    return partials.sum(dim=1)


def vpgea_loss_backward(
    grad_loss: torch.Tensor,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_tokens: int,
    beta: float,
    normalize: str,
    teacher_dtype: torch.dtype | None,
    student_dtype: torch.dtype | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the loss with respect to the teacher and student log-probs.

    Args:
        grad_loss: ``[]`` or ``[1]`` float, the incoming gradient of the scalar loss (stays on the device).
        advantages: ``[S]`` float32; cu_seqlens: ``[S+1]`` int32.
        num_tokens: T.
        teacher_dtype / student_dtype: dtype of each returned gradient, or None to skip it.

    Returns:
        ``(d_teacher [T] or None, d_student [T] or None)``.
    """
    device = advantages.device
    gq = torch.empty(num_tokens, device=device, dtype=teacher_dtype) if teacher_dtype is not None else None
    gp = torch.empty(num_tokens, device=device, dtype=student_dtype) if student_dtype is not None else None
    num_seqs = advantages.numel()
    if num_seqs == 0 or num_tokens == 0 or (gq is None and gp is None):
        return gq, gp
    g = grad_loss.reshape(1).to(torch.float32).contiguous()
    dummy = g  # pointer placeholder for an unrequested output (never written: NEED_* is False)
    with device_guard(g):
        _vpgea_loss_bwd_kernel[(num_seqs,)](
            gq if gq is not None else dummy, gp if gp is not None else dummy, advantages, cu_seqlens, g,
            float(beta), _scale(normalize, num_seqs, num_tokens),
            NORMALIZE=NORMALIZE_CODES[normalize], NEED_Q=gq is not None, NEED_P=gp is not None, BLOCK=_BLOCK,
        )
    return gq, gp
