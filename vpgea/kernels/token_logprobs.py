"""Fused linear -> log-softmax -> gather (and entropy) Triton kernels.

For hidden states ``h: [N, D]``, a head ``W: [V, D]`` (and optional bias ``b: [V]``), targets ``y: [N]`` and inverse
temperatures ``s: [N]`` (or one scalar), the logits are ``z = (h @ W.T + b) * s`` and we want, per row,

    logp = z[y] - lse(z)        entropy = lse(z) - sum_j p_j z_j        (p = softmax(z))

without ever materialising ``z: [N, V]``.

Forward (``token_logprobs_forward``), two methods computing the same fp32 statistics: an online log-sum-exp (running
max ``m``, scaled sum ``l``), the scaled first moment ``sum e^{z-m} z`` for the entropy, and the target logit.

- ``"gemm"`` (the default on CUDA for bf16/fp16): cuBLAS computes fp32 logits for one [token chunk, vocab chunk] tile at a time into a
  bounded workspace, and a row-wise Triton kernel folds each tile into the running statistics. One write and one read
  of the logits per tile, in exchange for cuBLAS's GEMM efficiency: on an H200 (bf16, Qwen2.5-7B head, N = 16384) it
  ran at 1.16x the cuBLAS floor against 1.44x for the fused kernel, at the same fp32 accuracy
  (``benchmarks/NOTES.md``). The workspace is sized to the backward's own extra memory, so the op's peak is unchanged.
- ``"fused"``: a grid over (row blocks, vocab splits). Each program walks its vocab split in ``BLOCK_V`` tiles; per tile
  it computes the ``[BLOCK_N, BLOCK_V]`` logits with a K-loop of ``tl.dot`` over D and folds them into the statistics in
  registers; nothing of ``[N, V]`` size is written. The per-split partials ``[splits, N]`` are merged afterwards
  (O(N * splits) work). Vocab splits exist so that small N still fills the GPU.

Backward (``token_logprobs_backward``): with ``lse`` and ``mu = sum p z`` saved from the forward,

    dz_j = g (1[j = y] - p_j) - g_H p_j (z_j - mu),        dlogits_j = dz_j * s

A Triton kernel recomputes the logits for one vocab chunk at a time and writes ``dlogits[:, chunk]`` into a bounded
workspace; two GEMMs then produce ``dW[chunk] = dlogits.T @ h`` (complete, K = N) and ``dh += dlogits @ W[chunk]``
(fp32 accumulator). The chunk width is chosen so the workspace stays a small fraction of the ``[N, V]`` fp32 logits.

Offsets are 64-bit: ``N * V`` passes 2**31 at real sizes (16384 x 151936). Columns past ``V`` are masked to ``-inf``
before the log-sum-exp, so vocab sizes that are multiples of nothing are exact. Targets are only compared with the
indices of valid columns, never used as addresses, so an out-of-range target cannot read out of bounds (its target
logit comes out 0; ``vpgea.token_logprobs`` rejects such targets, or marks them NaN where the check cannot run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, addmm_fp32_, device_guard, mm_fp32, next_pow2


@triton.jit
def _tanh(x):
    """fp32 tanh within a few ulps (no libdevice: the interpreter has none). The exp form ``(1 - e) / (1 + e)``,
    ``e = exp(-2|x|)``, loses relative accuracy as ``|x| -> 0`` (``1 - e`` cancels), so below ``|x| = 0.25`` the odd
    Taylor polynomial to ``x^9`` is used instead (its truncation there is < 1e-8 relative)."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    x2 = a * a
    small = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits_tile(
    H, W, B, rows, row_mask, cols, col_mask, D, stride_h, stride_w, inv_t, cap_pre, cap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``[BLOCK_N, BLOCK_V]`` tile of transformed logits in fp32; columns outside ``col_mask`` are ``-inf``.

    Without softcapping ``z = (h W^T + b) * inv_t`` (a logit scale is folded into ``inv_t`` by the launcher); with it
    ``z = cap * tanh((h W^T + b) * cap_pre) * inv_t``, ``cap_pre = logit_scale / cap``."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_ptrs = H + rows.to(tl.int64)[:, None] * stride_h
    w_ptrs = W + cols.to(tl.int64)[:, None] * stride_w
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        h = tl.load(h_ptrs + dd[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + dd[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            # fp32 inputs: full-precision products, as PyTorch's default fp32 matmul (no TF32).
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    if HAS_BIAS:
        bias = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    if HAS_SOFTCAP:
        acc = cap * _tanh(acc * cap_pre)
    z = acc * inv_t[:, None]
    return tl.where(col_mask[None, :], z, float("-inf"))


@triton.jit
def _token_logprobs_fwd_kernel(
    H, W, B, Y, S,  # hidden [N, D], weight [V, D], bias [V], targets [N] int64, inverse temperatures [N] fp32
    M_out, L_out, T_out, E_out,  # partials [SPLITS, N] fp32: running max, sum e^{z-m}, target logit, sum e^{z-m} z
    N, V, D, stride_h, stride_w, inv_t_scalar, v_per_split, NUM_SPLITS,
    HAS_BIAS: tl.constexpr, HAS_TEMP: tl.constexpr, WITH_ENTROPY: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    cap_pre=1.0, cap=1.0, HAS_SOFTCAP: tl.constexpr = False,
):
    # 1-D grid, split index fastest: the programs resident at one time cover few row blocks (their hidden blocks
    # stay in L2 across the whole vocab walk) and several vocab splits (each W tile is read by all of them).
    pid = tl.program_id(0)
    pid_n = pid // NUM_SPLITS
    pid_s = pid % NUM_SPLITS
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = tl.load(Y + rows, mask=row_mask, other=-1)
    if HAS_TEMP:
        inv_t = tl.load(S + rows, mask=row_mask, other=1.0)
    else:
        inv_t = tl.zeros((BLOCK_N,), dtype=tl.float32) + inv_t_scalar

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    e = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z = _logits_tile(H, W, B, rows, row_mask, cols, col_mask, D, stride_h, stride_w, inv_t, cap_pre, cap,
                         HAS_BIAS, HAS_SOFTCAP, DOT_FP32, IEEE, BLOCK_N, BLOCK_V, BLOCK_D)
        # Every tile has at least one valid column (v0 < v_end), so m_new is finite and exp(m - m_new) is 0, not NaN,
        # on the first tile.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if WITH_ENTROPY:
            e = e * alpha + tl.sum(p * tl.where(col_mask[None, :], z, 0.0), axis=1)  # 0 * -inf would be NaN
        t += tl.sum(tl.where((cols[None, :] == y[:, None]) & col_mask[None, :], z, 0.0), axis=1)
        m = m_new

    out = pid_s.to(tl.int64) * N + rows
    tl.store(M_out + out, m, mask=row_mask)
    tl.store(L_out + out, l, mask=row_mask)
    tl.store(T_out + out, t, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(E_out + out, e, mask=row_mask)


@triton.jit
def _token_logprobs_fold_kernel(
    Z, B, Y, S,  # logits tile [rows, n_cols] (fp32, raw: before bias and temperature), bias [V], targets, inv temps
    M, L, T, E,  # running statistics [rows] fp32, updated in place
    n_cols, v_lo, stride_z, inv_t_scalar,
    HAS_BIAS: tl.constexpr, HAS_TEMP: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_C: tl.constexpr,
    cap_pre=1.0, cap=1.0, HAS_SOFTCAP: tl.constexpr = False,
):
    """One row per program: fold columns ``[v_lo, v_lo + n_cols)`` of the row's logits into (m, l, t, e), with the
    same transform as ``_logits_tile`` (bias, then the softcap when there is one, then the inverse temperature)."""
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z
    y = tl.load(Y + row)
    if HAS_TEMP:
        inv_t = tl.load(S + row)
    else:
        inv_t = inv_t_scalar
    m = tl.load(M + row)
    l = tl.load(L + row)
    t = tl.load(T + row)
    e = 0.0
    if WITH_ENTROPY:
        e = tl.load(E + row)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = cols < n_cols
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(B + v_lo + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = cap * _tanh(z * cap_pre)
        z = tl.where(mask, z * inv_t, float("-inf"))
        # m starts at -inf and every block has a valid column, so m_new is finite: exp(m - m_new) is 0, not NaN.
        m_new = tl.maximum(m, tl.max(z, 0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new)
        l = l * alpha + tl.sum(p, 0)
        if WITH_ENTROPY:
            e = e * alpha + tl.sum(p * tl.where(mask, z, 0.0), 0)  # 0 * -inf would be NaN
        t += tl.sum(tl.where((cols + v_lo == y) & mask, z, 0.0), 0)
        m = m_new
    tl.store(M + row, m)
    tl.store(L + row, l)
    tl.store(T + row, t)
    if WITH_ENTROPY:
        tl.store(E + row, e)


@triton.jit
def _token_logprobs_dlogits_kernel(
    H, W, B, Y, S, LSE, MU, G, GE,  # G, GE: upstream grads [N] fp32 (already zero on ignored rows)
    DZ,  # workspace [N, chunk] in the GEMM dtype: d loss / d raw logits for columns [v_lo, v_lo + chunk)
    N, D, stride_h, stride_w, stride_dz, inv_t_scalar, v_lo, v_hi,
    HAS_BIAS: tl.constexpr, HAS_TEMP: tl.constexpr, WITH_ENTROPY: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    cap_pre=1.0, cap=1.0, logit_scale=1.0, HAS_SOFTCAP: tl.constexpr = False,
):
    # Vocab tiles fastest: the chunk's W slice (chunk x D) stays in L2 and each hidden block is read once per chunk.
    pid_v = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v_lo + local
    col_mask = cols < v_hi
    y = tl.load(Y + rows, mask=row_mask, other=-1)
    if HAS_TEMP:
        inv_t = tl.load(S + rows, mask=row_mask, other=1.0)
    else:
        inv_t = tl.zeros((BLOCK_N,), dtype=tl.float32) + inv_t_scalar
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    g = tl.load(G + rows, mask=row_mask, other=0.0)

    z = _logits_tile(H, W, B, rows, row_mask, cols, col_mask, D, stride_h, stride_w, inv_t, cap_pre, cap,
                     HAS_BIAS, HAS_SOFTCAP, DOT_FP32, IEEE, BLOCK_N, BLOCK_V, BLOCK_D)
    p = tl.exp(z - lse[:, None])  # masked columns: exp(-inf) = 0
    dz = tl.where(cols[None, :] == y[:, None], g[:, None], 0.0) - g[:, None] * p
    if WITH_ENTROPY:
        mu = tl.load(MU + rows, mask=row_mask, other=0.0)
        ge = tl.load(GE + rows, mask=row_mask, other=0.0)
        dz -= ge[:, None] * p * tl.where(col_mask[None, :], z - mu[:, None], 0.0)
    dz = dz * inv_t[:, None]
    if HAS_SOFTCAP:
        # d z / d raw = inv_t * logit_scale * (1 - t^2), t = tanh(raw * cap_pre) = z / (cap * inv_t): t from the
        # output, as PyTorch's tanh backward does. Masked columns (z = -inf) are never stored; 0 keeps them finite.
        t = z / (cap * inv_t[:, None])
        dz = dz * tl.where(col_mask[None, :], (1.0 - t * t) * logit_scale, 0.0)
    ptrs = DZ + rows.to(tl.int64)[:, None] * stride_dz + local[None, :]
    tl.store(ptrs, dz.to(DZ.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _logprobs_dlogits_rows_kernel(
    Z, B, Y, G,  # raw logits [rows, V] fp32 (whole rows), bias [V], targets [rows], dL/dlogp [rows] fp32
    LOGP, DZ,  # out: log-prob of the target [rows] fp32, dL/d raw logits [rows, V] in DZ's dtype
    V, stride_z, stride_dz, inv_t,
    HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One row per program, two reads of the row: the log-sum-exp and the target logit, then
    ``dz = g (onehot(y) - softmax(z)) * inv_t`` with ``z = (raw + bias) * inv_t``."""
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
        z = tl.load(z_row + cols, mask=mask, other=0.0)
        if HAS_BIAS:
            z += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        z = tl.where(mask, z * inv_t, float("-inf"))
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
        z = tl.load(z_row + cols, mask=mask, other=0.0)
        if HAS_BIAS:
            z += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        dz = (tl.where(cols == y, g, 0.0) - g * tl.exp(z * inv_t - lse)) * inv_t
        tl.store(dz_row + cols, dz.to(DZ.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------------
# launchers


def logprobs_dlogits_rows(
    logits: torch.Tensor,  # [R, V] fp32 raw logits (h @ W.T), whole rows
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [R] int64; rows outside [0, V) get target logit 0
    coef: torch.Tensor,  # [R] fp32: dL/dlogp of each row (0 on ignored rows)
    inv_temp: float,
    dz_out: torch.Tensor,  # [R, V] (any float dtype): receives dL/d raw logits
) -> torch.Tensor:
    """The "known dL/dlog-prob" step of a one-sweep loss: returns ``logp [R]`` fp32 and fills ``dz_out`` with
    ``coef (onehot - softmax) / temperature`` in two reads of ``logits`` (torch ops take ~10 passes)."""
    r, v = logits.shape
    logp = torch.empty(r, device=logits.device, dtype=torch.float32)
    if r == 0:
        return logp
    with device_guard(logits):
        _logprobs_dlogits_rows_kernel[(r,)](
            logits, bias if bias is not None else logits, targets, coef, logp, dz_out,
            v, logits.stride(0), dz_out.stride(0), float(inv_temp),
            HAS_BIAS=bias is not None, BLOCK_C=64 if INTERPRET else 2048, num_warps=8,
        )
    return logp


def _config(n: int, v: int, d: int, dtype: torch.dtype, backward: bool = False) -> dict:
    if INTERPRET:
        # The interpreter runs every program serially in numpy: small tiles keep odd test shapes cheap. tl.dot needs
        # each dimension >= 16.
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=max(16, min(64, next_pow2(d))), num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_N=128 if n >= 128 else 64, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3)
    # H200 sweep (benchmarks/NOTES.md, v2): 128 x 256 tiles beat 128 x 128 in the dlogits kernel (85 vs 94 ms for the
    # 7B head at N = 16384); the fused forward keeps 128 x 128, whose automatic split count was measured best.
    block_v = 256 if backward else 128
    return dict(BLOCK_N=128 if n >= 128 else 64, BLOCK_V=block_v, BLOCK_D=64, num_warps=8, num_stages=3)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# L2 bytes we let the resident programs' hidden blocks occupy (H100: 50 MB L2; leave room for the W tiles).
_L2_HIDDEN_BUDGET = 24 << 20


def _default_splits(device: torch.device, n_blocks: int, v_tiles: int, hidden_block_bytes: int) -> int:
    """Vocab splits for the forward: enough programs to fill the GPU when N is small, and few enough distinct row
    blocks resident at once (about 2 programs per SM) that their hidden blocks fit in L2 for the whole vocab walk."""
    resident = 2 * _num_sms(device)
    fill = triton.cdiv(resident, n_blocks)
    l2 = triton.cdiv(resident * hidden_block_bytes, _L2_HIDDEN_BUDGET)
    return max(1, min(v_tiles, max(fill, l2)))


def _transform_args(inv_temp, inv_temp_scalar, logit_scale, softcap):
    """``(inv_temp, inv_temp_scalar, kernel kwargs)`` for a logit scale and softcap. Without a softcap the scale is a
    plain factor and is folded into the inverse temperature, so the kernels run their unchanged fast path; with one
    it must act before the tanh, so the kernels get ``HAS_SOFTCAP`` and ``cap_pre = logit_scale / softcap``."""
    if softcap is None:
        if logit_scale != 1.0:
            if inv_temp is not None:
                inv_temp = inv_temp * float(logit_scale)
            inv_temp_scalar = inv_temp_scalar * float(logit_scale)
        return inv_temp, inv_temp_scalar, {}
    return inv_temp, inv_temp_scalar, dict(cap_pre=float(logit_scale) / float(softcap), cap=float(softcap),
                                           HAS_SOFTCAP=True)


def token_logprobs_forward(
    hidden: torch.Tensor,  # [N, D]
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [N] int64
    inv_temp: torch.Tensor | None,  # [N] fp32, or None to use inv_temp_scalar
    inv_temp_scalar: float,
    with_entropy: bool,
    num_splits: int | None = None,
    config: dict | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    method: str | None = None,
    workspace_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(target_logit, lse, mu, entropy)``, each fp32 ``[N]`` (``mu``/``entropy`` empty without entropy).

    ``target_logit`` is the transformed logit of the target column (0 when the target is outside ``[0, V)``). The
    logits are ``softcap * tanh(raw * logit_scale / softcap) * inv_temp`` with a softcap, else
    ``raw * logit_scale * inv_temp`` (``raw = h W^T + b``).
    ``method``: ``"gemm"`` (cuBLAS tiles folded by Triton; the default on CUDA for bf16/fp16) or ``"fused"`` (logits
    never leave the chip; fp32 and the CPU interpreter). ``num_splits`` and ``config`` apply to ``"fused"``,
    ``workspace_bytes`` (the fp32 logits tile) to ``"gemm"``.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    if n == 0:  # no rows, no programs (a zero-size grid is an error)
        empty = hidden.new_empty(0, dtype=torch.float32)
        return empty, empty.clone(), empty.clone(), empty.clone()
    if method is None:
        # fp32 inputs stay on the fused kernel: its IEEE dots give the logits bit for bit as the backward recomputes
        # them, while cuBLAS's fp32 GEMM sums in another order, and that lse/recompute mismatch put the fp32 gradients
        # 1.2-1.5x over the test bound on an H200 (bf16/fp16 stay far inside theirs). fp32 GEMMs gain nothing from
        # cuBLAS tiles anyway (no tensor cores without TF32).
        method = FORWARD_METHOD or ("gemm" if hidden.is_cuda and hidden.dtype != torch.float32 else "fused")
    if method not in ("gemm", "fused"):
        raise ValueError(f"token_logprobs_forward: method must be 'gemm' or 'fused', got {method!r}")
    if method == "gemm":
        inv_temp, inv_temp_scalar, cap_args = _transform_args(inv_temp, inv_temp_scalar, logit_scale, softcap)
        stats = _forward_gemm(hidden, weight, bias, targets, inv_temp, inv_temp_scalar, with_entropy, workspace_bytes,
                              cap_args)
        return _finish(*stats, with_entropy)
    cfg = dict(config) if config else _config(n, v, d, hidden.dtype)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    n_blocks = triton.cdiv(n, bn)
    v_tiles = triton.cdiv(v, bv)
    if num_splits is None:
        num_splits = _default_splits(hidden.device, n_blocks, v_tiles, bn * d * hidden.element_size())
    num_splits = max(1, min(int(num_splits), v_tiles))
    v_per_split = triton.cdiv(v_tiles, num_splits) * bv
    num_splits = triton.cdiv(v, v_per_split)

    inv_temp, inv_temp_scalar, cap_args = _transform_args(inv_temp, inv_temp_scalar, logit_scale, softcap)
    f32 = dict(device=hidden.device, dtype=torch.float32)
    m = torch.empty((num_splits, n), **f32)
    l = torch.empty((num_splits, n), **f32)
    t = torch.empty((num_splits, n), **f32)
    e = torch.empty((num_splits, n), **f32) if with_entropy else m
    grid = (n_blocks * num_splits,)
    with device_guard(hidden):
        _token_logprobs_fwd_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, targets, inv_temp if inv_temp is not None else m,
            m, l, t, e,
            n, v, d, hidden.stride(0), weight.stride(0), float(inv_temp_scalar), v_per_split, num_splits,
            HAS_BIAS=bias is not None, HAS_TEMP=inv_temp is not None, WITH_ENTROPY=with_entropy, DOT_FP32=INTERPRET,
            IEEE=hidden.dtype == torch.float32, **cap_args, **cfg,
        )
    # Merge the per-split partials: O(N * splits).
    m_all = m.max(dim=0).values
    scale = torch.exp(m - m_all)
    return _finish(m_all, (l * scale).sum(dim=0), t.sum(dim=0), (e * scale).sum(dim=0) if with_entropy else None,
                   with_entropy)


def _finish(m, l, t, e, with_entropy):
    """(running max, scaled sum, target logit, scaled first moment) -> (target_logit, lse, mu, entropy)."""
    lse = m + torch.log(l)
    if with_entropy:
        mu = e / l
        return t, lse, mu, lse - mu
    return t, lse, lse.new_empty(0), lse.new_empty(0)


# The forward method when the caller names none: None picks by device ("gemm" on CUDA, "fused" under the CPU
# interpreter, where its numpy GEMM would gain nothing). Tests set it to run every public path through each method.
FORWARD_METHOD: str | None = None
# Tokens per logits tile of the "gemm" forward: enough for cuBLAS to run near its peak on a [rows, D] x [D, cols] GEMM.
GEMM_ROWS = 4096


def _gemm_tiles(n: int, v: int, d: int, workspace_bytes: int | None) -> tuple[int, int]:
    """(token chunk, vocab chunk) of the fp32 logits tile of the ``"gemm"`` forward. By default the tile may use what
    the backward allocates anyway (its fp32 ``dh`` accumulator plus its dlogits workspace), so the op's peak memory
    does not grow; 4096 tokens per tile keep cuBLAS efficient."""
    if workspace_bytes is None:
        workspace_bytes = max(32 << 20, n * d * 4 + (n * v * 4) // 200)
    rows = min(n, GEMM_ROWS)
    cols = max(128, (workspace_bytes // (4 * rows)) // 128 * 128)
    return rows, min(cols, v)


def _forward_gemm(hidden, weight, bias, targets, inv_temp, inv_temp_scalar, with_entropy, workspace_bytes, cap_args):
    n, d = hidden.shape
    v = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    m = torch.full((n,), float("-inf"), **f32)
    l = torch.zeros(n, **f32)
    t = torch.zeros(n, **f32)
    e = torch.zeros(n, **f32) if with_entropy else None
    rows, cols = _gemm_tiles(n, v, d, workspace_bytes)
    block_c = 1024 if not INTERPRET else 64
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        h = hidden[r0:r1]
        for c0 in range(0, v, cols):
            c1 = min(v, c0 + cols)
            z = mm_fp32(h, weight[c0:c1].t())  # [rows, cols] fp32 (fp32 accumulation, fp32 output)
            with device_guard(hidden):
                _token_logprobs_fold_kernel[(r1 - r0,)](
                    z, bias if bias is not None else z, targets[r0:r1],
                    inv_temp[r0:r1] if inv_temp is not None else m,
                    m[r0:r1], l[r0:r1], t[r0:r1], e[r0:r1] if with_entropy else m,
                    c1 - c0, c0, z.stride(0), float(inv_temp_scalar),
                    HAS_BIAS=bias is not None, HAS_TEMP=inv_temp is not None, WITH_ENTROPY=with_entropy,
                    BLOCK_C=block_c, num_warps=4, **cap_args,
                )
            del z
    return m, l, t, e


def _chunk_width(n: int, v: int, elt: int, block_v: int, workspace_bytes: int | None) -> int:
    if workspace_bytes is None:
        # Half of 1% of the fp32 [N, V] logits, and never below 16 MiB; the rest of the 1% goes to the O(N) buffers.
        workspace_bytes = max(16 << 20, (n * v * 4) // 200)
    width = max(block_v, (workspace_bytes // max(1, n * elt)) // block_v * block_v)
    return min(width, triton.cdiv(v, block_v) * block_v)


def token_logprobs_backward(
    hidden: torch.Tensor,  # [N, D]
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [N] int64
    inv_temp: torch.Tensor | None,  # [N] fp32
    inv_temp_scalar: float,
    lse: torch.Tensor,  # [N] fp32
    mu: torch.Tensor | None,  # [N] fp32 (entropy only)
    grad_logp: torch.Tensor,  # [N] fp32, zero on ignored rows
    grad_entropy: torch.Tensor | None,  # [N] fp32, zero on ignored rows
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    workspace_bytes: int | None = None,
    config: dict | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Returns ``(d_hidden [N, D] fp32, d_weight [V, D], d_bias [V])``, ``None`` where not requested.

    ``d_weight`` and ``d_bias`` come back in the weight's dtype: each vocab chunk's rows are complete after one GEMM
    over all N rows (accumulated in fp32 inside cuBLAS), so no fp32 ``[V, D]`` buffer is needed. ``d_hidden`` sums
    over vocab chunks and is accumulated in fp32.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    if n == 0:  # no rows: every gradient is zero
        return (hidden.new_zeros((0, d), dtype=torch.float32) if need_hidden else None,
                weight.new_zeros((v, d)) if need_weight else None,
                bias.new_zeros((v,)) if need_bias else None)
    cfg = dict(config) if config else _config(n, v, d, hidden.dtype, backward=True)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    with_entropy = grad_entropy is not None
    inv_temp, inv_temp_scalar, cap_args = _transform_args(inv_temp, inv_temp_scalar, logit_scale, softcap)
    if softcap is not None:
        cap_args["logit_scale"] = float(logit_scale)
    gemm_dtype = hidden.dtype
    width = _chunk_width(n, v, hidden.element_size(), bv, workspace_bytes)
    dz = torch.empty((n, width), device=hidden.device, dtype=gemm_dtype)
    d_hidden = torch.zeros((n, d), device=hidden.device, dtype=torch.float32) if need_hidden else None
    d_weight = torch.empty((v, d), device=hidden.device, dtype=weight.dtype) if need_weight else None
    d_bias = torch.empty((v,), device=hidden.device, dtype=bias.dtype) if need_bias else None
    for v_lo in range(0, v, width):
        v_hi = min(v, v_lo + width)
        cw = v_hi - v_lo
        grid = (triton.cdiv(cw, bv), triton.cdiv(n, bn))
        with device_guard(hidden):
            _token_logprobs_dlogits_kernel[grid](
                hidden, weight, bias if bias is not None else hidden, targets,
                inv_temp if inv_temp is not None else lse,
                lse, mu if with_entropy else lse, grad_logp, grad_entropy if with_entropy else grad_logp,
                dz,
                n, d, hidden.stride(0), weight.stride(0), dz.stride(0), float(inv_temp_scalar), v_lo, v_hi,
                HAS_BIAS=bias is not None, HAS_TEMP=inv_temp is not None, WITH_ENTROPY=with_entropy,
                DOT_FP32=INTERPRET, IEEE=hidden.dtype == torch.float32, **cap_args, **cfg,
            )
        chunk = dz[:, :cw]
        if need_weight:
            if chunk.dtype == weight.dtype and chunk.is_cuda:
                torch.mm(chunk.t(), hidden, out=d_weight[v_lo:v_hi])  # fp32 accumulation inside cuBLAS
            else:
                d_weight[v_lo:v_hi] = mm_fp32(chunk.t(), hidden)
        if need_hidden:
            addmm_fp32_(d_hidden, chunk, weight[v_lo:v_hi])
        if need_bias:
            d_bias[v_lo:v_hi] = chunk.float().sum(dim=0)
    return d_hidden, d_weight, d_bias


def workspace_bytes_estimate(n: int, v: int, d: int, dtype: torch.dtype) -> int:
    """Upper bound of the extra device memory one backward allocates (for the benchmarks and the docs)."""
    elt = torch.empty((), dtype=dtype).element_size()
    cfg = _config(n, v, d, dtype, backward=True)
    width = _chunk_width(n, v, elt, cfg["BLOCK_V"], None)
    return n * width * elt + n * d * 4 + 8 * n * 4
