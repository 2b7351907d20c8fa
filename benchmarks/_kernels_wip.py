"""Candidate kernel designs measured by ``tune_token_logprobs.py`` before any of them enters ``vpgea.kernels``.

1. ``forward_gemm_fold``: the forward as cuBLAS GEMMs over [token chunk, vocab chunk] tiles (written to memory, fp32 or
   the input dtype) folded by a row-wise Triton kernel into the online log-sum-exp. It pays one write and one read of
   the logits (chunk by chunk) for cuBLAS's GEMM efficiency.
2. ``lse_dz``: the "known dL/dlog-prob" step of a one-sweep loss: given an fp32 logits block with whole rows and the
   per-row coefficient ``g = dL/dlogp``, one Triton kernel computes ``logp`` and ``dz = g (onehot - softmax) / t``
   in two reads of the block (the torch version makes ~10 passes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vpgea.kernels._utils import addmm_fp32_, mm_fp32


@triton.jit
def _fold_kernel(Z, stride_z, Y, M, L, T, n_cols, v_lo, BLOCK_C: tl.constexpr):
    """One row per program: fold ``Z[row, :n_cols]`` (vocab columns ``v_lo + j``) into (m, l, t) in place."""
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z
    y = tl.load(Y + row)
    m = tl.load(M + row)
    l = tl.load(L + row)
    t = tl.load(T + row)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = cols < n_cols
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        t += tl.sum(tl.where((cols + v_lo == y) & mask, z, 0.0), 0)
        m = m_new
    tl.store(M + row, m)
    tl.store(L + row, l)
    tl.store(T + row, t)


def forward_gemm_fold(h, w, y, *, token_chunk: int, vocab_chunk: int, fp32_logits: bool, block_c: int = 2048):
    """``(logp [N], lse [N])`` fp32 through cuBLAS tiles and the Triton fold."""
    n, v = h.shape[0], w.shape[0]
    m = torch.full((n,), float("-inf"), device=h.device)
    l = torch.zeros(n, device=h.device)
    t = torch.zeros(n, device=h.device)
    for r0 in range(0, n, token_chunk):
        r1 = min(n, r0 + token_chunk)
        hc = h[r0:r1]
        for c0 in range(0, v, vocab_chunk):
            c1 = min(v, c0 + vocab_chunk)
            z = mm_fp32(hc, w[c0:c1].t()) if fp32_logits else hc @ w[c0:c1].t()
            _fold_kernel[(r1 - r0,)](z, z.stride(0), y[r0:r1], m[r0:r1], l[r0:r1], t[r0:r1], c1 - c0, c0,
                                     BLOCK_C=block_c, num_warps=4)
    lse = m + torch.log(l)
    return t - lse, lse


@triton.jit
def _lse_dz_kernel(Z, stride_z, Y, G, LOGP, DZ, stride_dz, V, inv_t, BLOCK_C: tl.constexpr):
    """One row per program over an fp32 block of whole rows: logp of the target, then dz = g (onehot - p) * inv_t."""
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z
    y = tl.load(Y + row)
    g = tl.load(G + row)
    m = float("-inf")
    l = 0.0
    t = 0.0
    for c0 in range(0, V, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")) * inv_t
        m_new = tl.maximum(m, tl.max(z, 0))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        t += tl.sum(tl.where((cols == y) & mask, z, 0.0), 0)
        m = m_new
    lse = m + tl.log(l)
    tl.store(LOGP + row, t - lse)
    dz_row = DZ + row.to(tl.int64) * stride_dz
    for c0 in range(0, V, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")) * inv_t
        dz = (tl.where(cols == y, g, 0.0) - g * tl.exp(z - lse)) * inv_t
        tl.store(dz_row + cols, dz.to(DZ.dtype.element_ty), mask=mask)


def one_sweep_grads(h, w, y, coef, *, rows_per_chunk: int, inv_t: float = 1.0, block_c: int = 2048):
    """``(logp [N] fp32, dh [N, D], dW [V, D])`` of ``L = sum coef * logp`` in one sweep: per row chunk, cuBLAS fp32
    logits, the Triton lse/dz kernel, then ``dh = dz @ W`` and ``dW += dz.T @ h`` (3 GEMMs in all)."""
    n, d = h.shape
    v = w.shape[0]
    logp = torch.empty(n, device=h.device)
    dh = torch.empty_like(h)
    dw = torch.zeros(v, d, device=h.device)
    dz = torch.empty(min(n, rows_per_chunk), v, device=h.device, dtype=h.dtype)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        z = mm_fp32(h[r0:r1], w.t())
        _lse_dz_kernel[(r1 - r0,)](z, z.stride(0), y[r0:r1], coef[r0:r1], logp[r0:r1], dz, dz.stride(0), v, inv_t,
                                   BLOCK_C=block_c, num_warps=8)
        del z
        dzc = dz[: r1 - r0]
        dh[r0:r1] = mm_fp32(dzc, w).to(h.dtype)
        addmm_fp32_(dw, dzc.t(), h[r0:r1])
    return logp, dh, dw.to(w.dtype)
