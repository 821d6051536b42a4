"""Triton kernels of the QK-mode A2D loss (see ``a2d_kernels.qk`` for the definition).

Notation: student heads ``Cs`` (queries ``(B, Cs, T, Ds)``, keys ``(B, Cs, K, Ds)``),
teacher heads ``Ct`` (head dim ``Dt``), S/A the student/teacher probabilities, Z = W S + b
the mixed student logits. Every kernel works on 3-D register tiles ``(heads, queries,
keys)``: a batched ``tl.dot`` gives all heads' scores at once, and the mixing is one
``(Ct, Cs) x (Cs, BLOCK_T*BLOCK_K)`` ``tl.dot``, so no kernel loops over channels.

Forward (nothing of size T*K is written):
  1. ``_row_lse_kernel``: per head and query row, the log-sum-exp of the visible
     scores (flash-attention's row statistic), for the student and the teacher.
  2. ``_forward_stats_kernel``: per (batch, query block, teacher-channel block), walks
     every key block, rebuilds S and A from q, k and the row lse, mixes Z, and keeps
     the online lse of Z plus sums taken about a center, so that a nearly converged
     student's KL (second order in the mismatch) is not the difference of first-order
     terms (the map-path forward's formulation, ``_triton_forward``). Row mode finishes
     each row's KL in the kernel; map mode writes per-query-block partials that the
     map path's own ``map_forward_combine`` merges into the KL of every map.

Backward, flash-attention style (dZ -> dS -> through the softmax -> dQ, dK), three
launches of ``_backward_kernel`` that recompute S, A, Z and dZ tile by tile:
  STAGE 0: r = sum_k dS * S per student head and row, plus per-block partials of
     dweight (this pass alone runs when only the AAM needs gradients). dbias is 0
     exactly (the loss ignores a per-channel shift of Z) and not computed.
  STAGE 1 (query-block major) and STAGE 2 (key-block major): dlogits = S * (dS - r);
     dQ = scale * dlogits K, dK = scale * dlogits^T Q.
A fused dK + dQ pass (FlashAttention-2 style) would need atomics for dQ; avoided here
for determinism (a candidate flag once timed on a GPU).

Causal: query blocks skip key blocks they cannot see. Where the loss still needs those
entries (S = A = 0, Z = bias: the forward statistics), they are added in
closed form from a count of non-padded hidden keys, so a causal map costs about half.

Determinism: no atomics anywhere. Every cross-program reduction (teacher-channel
blocks, query blocks) goes through a partial buffer summed by PyTorch, so the same
inputs give the same bits. The softmax backward is linear in dS, so each
teacher-channel block can apply it to its own share of dS with its own share of r,
and the shares simply add up.

Numerics: scores, probabilities, mixing and every statistic are fp32 whatever the
input dtype. bf16/fp16 inputs use the tensor-core dot with fp32 accumulation (products
of two bf16 are exact in fp32); fp32 inputs use 3xTF32 on a GPU (about fp32 accuracy,
still on tensor cores); the small mixing dots are IEEE fp32. The interpreter cannot
dot bf16, so there everything is upcast to fp32 and every dot is IEEE.

GPU status: ``compile_offline`` compiles every kernel for sm_90 on a machine without a
GPU (a test does). With the default tiles ptxas reports, for bf16 inputs, 255
registers and at most ~160 bytes of spills per kernel, shared memory up to 140 KiB.
Nothing here has been run or timed on a GPU yet.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._triton_forward import MAP_PARTIALS, MAP_SAVED, map_forward_combine
# Shared with the map path: outputs NaN-filled under the tests' POISON_OUTPUTS switch (an
# element a kernel forgets to write fails instead of passing as stale memory), launches
# on the tensors' device whatever the current one is.
from .triton_a2d import _device_guard, _new_output
from ._triton_tiles import expm1_minus_x, log1p_minus_x

_MAP_PARTIALS = tl.constexpr(MAP_PARTIALS)  # a global a kernel may read must be a constexpr

# ------------------------------------------------------------------ jit helpers

@triton.jit
def _load_heads(ptr, b, c, rows, stride_b, stride_c, stride_r, stride_d, C, R, D,
                BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """The (heads, rows, head dim) tile of a (B, C, R, D) tensor; zeros outside it."""
    d = tl.arange(0, BLOCK_D)
    ptrs = (ptr + b * stride_b + c[:, None, None] * stride_c + rows[None, :, None] * stride_r
            + d[None, None, :] * stride_d)
    mask = (c < C)[:, None, None] & (rows < R)[None, :, None] & (d < D)[None, None, :]
    x = tl.load(ptrs, mask=mask, other=0.0)
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _head_dot(x, y, DOT_FP32: tl.constexpr, F32_DOT: tl.constexpr):
    """Batched x (C, M, N) . y (C, N, P) -> (C, M, P) fp32 for all heads at once: fp32
    operands at the F32_DOT precision, else x cast to y's (input) dtype."""
    if DOT_FP32:
        return tl.dot(x, y, input_precision=F32_DOT)
    return tl.dot(x.to(y.dtype), y)


@triton.jit
def _scores(q, k, DOT_FP32: tl.constexpr, F32_DOT: tl.constexpr):
    """q (C, BT, D) . k (C, BK, D) -> (C, BT, BK) fp32, one batched dot for all heads."""
    return _head_dot(q, tl.trans(k, (0, 2, 1)), DOT_FP32, F32_DOT)


@triton.jit
def _store_head_grad(dqk_ptr, ctb, b, cs, rows, R, Cs, Ds, grad, scale, BLOCK_DS: tl.constexpr):
    """``scale * grad`` (CS_PAD, rows, BLOCK_DS) into this teacher-channel block's
    partial dQ or dK buffer (nCtb, B, Cs, R, Ds)."""
    d = tl.arange(0, BLOCK_DS)
    ptrs = (dqk_ptr + ((ctb * tl.num_programs(0) + b) * Cs + cs[:, None, None]) * R * Ds
            + rows[None, :, None] * Ds + d[None, None, :])
    mask = (cs < Cs)[:, None, None] & (rows < R)[None, :, None] & (d < Ds)[None, None, :]
    tl.store(ptrs, grad * scale, mask=mask)


@triton.jit
def _position_ok(b, i, valid_ptr, stride_b, n, HAS_MASK: tl.constexpr):
    """Bool per index i (keys or queries): it exists (< n) and is not padding."""
    ok = i < n
    if HAS_MASK:
        ok = ok & (tl.load(valid_ptr + b * stride_b + i, mask=i < n, other=0) != 0)
    return ok


@triton.jit
def _visible(t, k, key_ok, T, CAUSAL: tl.constexpr):
    """(BT, BK) bool: query t attends to key k."""
    vis = (t < T)[:, None] & key_ok[None, :]
    if CAUSAL:
        vis = vis & (k[None, :] <= t[:, None])
    return vis


@triton.jit
def _causal_keys(b, t_blk, key_suffix_ptr, K, HAS_KEY_MASK: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """For a causal query block: (k_cover, n_hidden).

    Key blocks starting below ``k_cover`` hold every key the block's queries can see;
    the ``n_hidden`` loss keys (not padding) at or past ``k_cover`` are hidden from all
    of them, so there S = A = 0 and Z = bias exactly: kernels add those entries in
    closed form instead of visiting their tiles (half the work of a causal map).
    ``key_suffix[b, j]`` = number of non-padded keys at positions >= j.
    """
    k_end = tl.minimum(K, (t_blk + 1) * BLOCK_T)
    k_cover = tl.minimum(K, tl.cdiv(k_end, BLOCK_K) * BLOCK_K)
    if HAS_KEY_MASK:
        n_hidden = tl.load(key_suffix_ptr + b * (K + 1) + k_cover).to(tl.float32)
    else:
        n_hidden = (K - k_cover).to(tl.float32)
    return k_cover, n_hidden


@triton.jit
def _probs(scores, lse_ptr, b, c, t, stride_l_b, stride_l_c, C, T, scale, visible):
    """Attention probabilities (C, BT, BK) fp32: exactly 0 where not visible.

    Rows with no visible key have lse = +inf (and no visible entry), padded heads
    read lse = +inf: both give 0 without a special case.
    """
    lse = tl.load(lse_ptr + b * stride_l_b + c[:, None] * stride_l_c + t[None, :],
                  mask=(c < C)[:, None] & (t < T)[None, :], other=float("inf"))
    return tl.where(visible[None, :, :], tl.exp(scores * scale - lse[:, :, None]), 0.0)


@triton.jit
def _load_weight(w_ptr, ct, cs, stride_w_t, stride_w_s, Ct, Cs):
    """(CT_BLOCK, CS_PAD) fp32 slice of the mixing weight, zeros outside."""
    mask = (ct < Ct)[:, None] & (cs < Cs)[None, :]
    return tl.load(w_ptr + ct[:, None] * stride_w_t + cs[None, :] * stride_w_s, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _mix(w, S, bias, CT_BLOCK: tl.constexpr, CS_PAD: tl.constexpr,
         BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Z = W S + b over a tile: (CT_BLOCK, CS_PAD) x (CS_PAD, BT, BK) -> (CT_BLOCK, BT, BK)."""
    z = tl.dot(w, tl.reshape(S, (CS_PAD, BLOCK_T * BLOCK_K)), input_precision="ieee")
    return tl.reshape(z, (CT_BLOCK, BLOCK_T, BLOCK_K)) + bias[:, None, None]


@triton.jit
def _unmix(w, dZ, CT_BLOCK: tl.constexpr, CS_PAD: tl.constexpr,
           BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """dS = W^T dZ over a tile: (CS_PAD, BT, BK) fp32."""
    ds = tl.dot(tl.trans(w), tl.reshape(dZ, (CT_BLOCK, BLOCK_T * BLOCK_K)), input_precision="ieee")
    return tl.reshape(ds, (CS_PAD, BLOCK_T, BLOCK_K))


# --------------------------------------------------------------- pass 1: row lse

@triton.jit
def _row_lse_kernel(
    q_ptr, k_ptr, key_valid_ptr, lse_ptr,
    stride_q_b, stride_q_c, stride_q_t, stride_q_d,
    stride_k_b, stride_k_c, stride_k_k, stride_k_d,
    stride_kv_b,
    C, T, K, D, scale,
    HAS_KEY_MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, F32_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, C_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """lse[b, c, t] = log sum over visible keys of exp(scale * q.k); +inf for a row with none.

    Grid: batch x query blocks x head blocks.
    """
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2) * C_BLOCK + tl.arange(0, C_BLOCK)
    q = _load_heads(q_ptr, b, c, t, stride_q_b, stride_q_c, stride_q_t, stride_q_d, C, T, D, BLOCK_D, DOT_FP32)

    # Running max starts finite so exp(m_old - m_new) is never inf - inf.
    m = tl.full((C_BLOCK, BLOCK_T), -1e30, tl.float32)
    s = tl.zeros((C_BLOCK, BLOCK_T), tl.float32)
    k_end = K
    if CAUSAL:  # keys past the block's last query are never visible
        k_end = tl.minimum(K, (tl.program_id(1) + 1) * BLOCK_T)
    for k0 in range(0, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kt = _load_heads(k_ptr, b, c, k, stride_k_b, stride_k_c, stride_k_k, stride_k_d, C, K, D, BLOCK_D, DOT_FP32)
        vis = _visible(t, k, _position_ok(b, k, key_valid_ptr, stride_kv_b, K, HAS_KEY_MASK), T, CAUSAL)
        x = tl.where(vis[None, :, :], _scores(q, kt, DOT_FP32, F32_DOT) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=2))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, :, None]), axis=2)
        m = m_new
    lse = tl.where(s > 0, m + tl.log(tl.where(s > 0, s, 1.0)), float("inf"))
    tl.store(lse_ptr + (b * C + c[:, None]) * T + t[None, :], lse, mask=(c < C)[:, None] & (t < T)[None, :])


# ------------------------------------------------------- pass 2: KL statistics

@triton.jit
def _forward_stats_kernel(
    sq_ptr, sk_ptr, tq_ptr, tk_ptr, lse_s_ptr, lse_t_ptr, w_ptr, bias_ptr,
    key_valid_ptr, query_valid_ptr, key_suffix_ptr, stats_ptr,
    stride_sq_b, stride_sq_c, stride_sq_t, stride_sq_d,
    stride_sk_b, stride_sk_c, stride_sk_k, stride_sk_d,
    stride_tq_b, stride_tq_c, stride_tq_t, stride_tq_d,
    stride_tk_b, stride_tk_c, stride_tk_k, stride_tk_d,
    stride_w_t, stride_w_s, stride_kv_b, stride_qv_b,
    Cs, Ct, T, K, Ds, Dt, scale_s, scale_t,
    MAP_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    HAS_QUERY_MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, F32_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, CS_PAD: tl.constexpr, CT_BLOCK: tl.constexpr,
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    """KL statistics of one (b, query block, teacher-channel block), in the centered
    second-order form of ``_triton_forward`` (its module docstring has the derivation):
    close to convergence the KL is second order in the student-teacher mismatch while
    the naive sums are first order and cancel, so every sum here is taken relative to
    a center and is itself of the size of the KL.

    Map mode, y = Z - A, e = exp(A) (A is in [0, 1]: no shift needed): writes the
    query block's partials in ``_triton_forward.map_forward_combine``'s layout, stats
    (B, n_query_blocks, MAP_PARTIALS, Ct) = (mZ, sZ, mA = 0, sA = sum e,
    U = sum e (y - c), H = sum e expm1_minus_x(y - c), c), with c the e-weighted mean
    of y over the block's first tile with loss entries; that kernel merges the blocks
    (exactly, re-centering each) and finishes the KL.

    Row mode, per row, with p = A / P the teacher row (P = sum A, 1 up to rounding:
    normalizing drops a P log P term of the size of fp32 rounding that would swamp a
    converged row's KL), y = Z - log A on entries with A > 0, c the A-weighted mean of
    y over the row's first key block with mass, W = sum A (y - c),
    H = sum A expm1_minus_x(y - c), R = sum of exp(Z - c) over the A = 0 entries and
    sigma = (W + H + R) / P:
        KL = (H + R) / P + log1p_minus_x(sigma)             for |sigma| < 1/2,
        KL = lseZ - (W + c P) / P - log P                    otherwise (no cancellation),
    writes stats (B, Ct, T, 3) = (row KL, lse of Z over the row, P).

    Loss entries: key not padded and query not padded. Causally hidden entries are
    loss entries too (S = A = 0, Z = bias there): key blocks that are hidden from the
    whole query block are added in closed form (see ``_causal_keys``).
    """
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    ct = tl.program_id(2) * CT_BLOCK + tl.arange(0, CT_BLOCK)
    cs = tl.arange(0, CS_PAD)
    w = _load_weight(w_ptr, ct, cs, stride_w_t, stride_w_s, Ct, Cs)
    bias = tl.zeros((CT_BLOCK,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ct, mask=ct < Ct, other=0.0).to(tl.float32)
    query_ok = _position_ok(b, t, query_valid_ptr, stride_qv_b, T, HAS_QUERY_MASK)
    sq = _load_heads(sq_ptr, b, cs, t, stride_sq_b, stride_sq_c, stride_sq_t, stride_sq_d, Cs, T, Ds,
                     BLOCK_DS, DOT_FP32)
    tq = _load_heads(tq_ptr, b, ct, t, stride_tq_b, stride_tq_c, stride_tq_t, stride_tq_d, Ct, T, Dt,
                     BLOCK_DT, DOT_FP32)

    # Map mode reduces over the whole block (rows and keys), row mode over keys only.
    if MAP_MODE:
        z_max = tl.full((CT_BLOCK,), -1e30, tl.float32)
        z_sum = tl.zeros((CT_BLOCK,), tl.float32)
        mass = tl.zeros((CT_BLOCK,), tl.float32)
        w_sum = tl.zeros((CT_BLOCK,), tl.float32)
        h_sum = tl.zeros((CT_BLOCK,), tl.float32)
        center = tl.zeros((CT_BLOCK,), tl.float32)
        centered = tl.zeros((CT_BLOCK,), tl.int1)
    else:
        z_max = tl.full((CT_BLOCK, BLOCK_T), -1e30, tl.float32)
        z_sum = tl.zeros((CT_BLOCK, BLOCK_T), tl.float32)
        mass = tl.zeros((CT_BLOCK, BLOCK_T), tl.float32)
        w_sum = tl.zeros((CT_BLOCK, BLOCK_T), tl.float32)
        h_sum = tl.zeros((CT_BLOCK, BLOCK_T), tl.float32)
        r_sum = tl.zeros((CT_BLOCK, BLOCK_T), tl.float32)
        center = tl.zeros((CT_BLOCK, BLOCK_T), tl.float32)
    k_end = K
    if CAUSAL:
        k_end, n_hidden = _causal_keys(b, tl.program_id(1), key_suffix_ptr, K, HAS_KEY_MASK, BLOCK_T, BLOCK_K)
    for k0 in range(0, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        key_ok = _position_ok(b, k, key_valid_ptr, stride_kv_b, K, HAS_KEY_MASK)
        vis = _visible(t, k, key_ok, T, CAUSAL)
        in_loss = (query_ok[:, None] & key_ok[None, :])[None, :, :]

        sk = _load_heads(sk_ptr, b, cs, k, stride_sk_b, stride_sk_c, stride_sk_k, stride_sk_d, Cs, K, Ds,
                         BLOCK_DS, DOT_FP32)
        S = _probs(_scores(sq, sk, DOT_FP32, F32_DOT), lse_s_ptr, b, cs, t, Cs * T, T, Cs, T, scale_s, vis)
        tk = _load_heads(tk_ptr, b, ct, k, stride_tk_b, stride_tk_c, stride_tk_k, stride_tk_d, Ct, K, Dt,
                         BLOCK_DT, DOT_FP32)
        A = _probs(_scores(tq, tk, DOT_FP32, F32_DOT), lse_t_ptr, b, ct, t, Ct * T, T, Ct, T, scale_t, vis)
        Z = _mix(w, S, bias, CT_BLOCK, CS_PAD, BLOCK_T, BLOCK_K)

        z = tl.where(in_loss, Z, float("-inf"))
        if MAP_MODE:
            z_max_new = tl.maximum(z_max, tl.max(tl.max(z, axis=2), axis=1))
            z_sum = z_sum * tl.exp(z_max - z_max_new) + tl.sum(
                tl.sum(tl.exp(z - z_max_new[:, None, None]), axis=2), axis=1)
            z_max = z_max_new
            e = tl.where(in_loss, tl.exp(A), 0.0)
            y = Z - A
            tile_e = tl.sum(tl.sum(e, axis=2), axis=1)
            # The center is fixed by the first tile with loss entries (nothing was
            # accumulated before it).
            tile_center = tl.sum(tl.sum(e * y, axis=2), axis=1) / tl.where(tile_e > 0.0, tile_e, 1.0)
            center = tl.where(centered, center, tile_center)
            centered = centered | (tile_e > 0.0)
            y = tl.where(in_loss, y - center[:, None, None], 0.0)
            mass += tile_e
            w_sum += tl.sum(tl.sum(e * y, axis=2), axis=1)
            # May overflow far from convergence; the combine then takes the far form.
            h_sum += tl.sum(tl.sum(e * expm1_minus_x(y), axis=2), axis=1)
        else:
            z_max_new = tl.maximum(z_max, tl.max(z, axis=2))
            z_sum = z_sum * tl.exp(z_max - z_max_new)
            ez = tl.exp(z - z_max_new[:, :, None])  # exp(Z - m), 0 off the loss entries
            z_sum += tl.sum(ez, axis=2)
            z_max = z_max_new
            # Entries with A = 0 (causally hidden, or underflowed) have no log A: R takes them.
            has = in_loss & (A > 0.0)
            a_mass = tl.where(has, A, 0.0)
            y = tl.where(has, Z - tl.log(tl.where(has, A, 1.0)), 0.0)
            centered = mass > 0.0
            tile_p = tl.sum(a_mass, axis=2)
            new_center = tl.where(centered, center,
                                  tl.sum(a_mass * y, axis=2) / tl.where(tile_p > 0.0, tile_p, 1.0))
            # R so far was relative to the placeholder center 0 of an uncentered row.
            r_sum = tl.where(centered, r_sum, r_sum * tl.exp(-new_center))
            center = new_center
            y = tl.where(has, y - center[:, :, None], 0.0)
            mass += tile_p
            w_sum += tl.sum(a_mass * y, axis=2)
            h_sum += tl.sum(a_mass * expm1_minus_x(y), axis=2)
            # exp(Z - c) = exp(Z - m) exp(m - c).
            r_sum += tl.sum(tl.where(in_loss & ~has, ez, 0.0), axis=2) * tl.exp(z_max - center)

    if CAUSAL:  # n hidden entries per row with Z = bias, A = 0
        n = tl.where(query_ok, n_hidden, 0.0)[None, :]
        if MAP_MODE:
            n = tl.sum(n, axis=1)  # (1,): hidden entries of the whole block
            z_max_new = tl.where(n > 0, tl.maximum(z_max, bias), z_max)
            # bias <= z_max_new wherever n > 0; the clamp keeps n = 0 from meeting inf.
            z_sum = z_sum * tl.exp(z_max - z_max_new) + n * tl.exp(tl.minimum(bias - z_max_new, 0.0))
            z_max = z_max_new
            # There y = bias and e = 1 (a block whose keys are all hidden centers at bias).
            center = tl.where(centered | (n == 0), center, bias)
            d = tl.where(n > 0, bias - center, 0.0)
            mass += n
            w_sum += n * d
            h_sum += n * expm1_minus_x(d)
        else:
            zb = tl.zeros((CT_BLOCK, BLOCK_T), tl.float32) + bias[:, None]
            z_max_new = tl.where(n > 0, tl.maximum(z_max, zb), z_max)
            z_sum = z_sum * tl.exp(z_max - z_max_new) + n * tl.exp(tl.minimum(zb - z_max_new, 0.0))
            z_max = z_max_new
            # Only rows with mass (hence centered) use R; others must not overflow.
            r_sum += tl.where(mass > 0.0, n * tl.exp(tl.where(mass > 0.0, zb - center, 0.0)), 0.0)

    if MAP_MODE:
        base = stats_ptr + ((b * tl.num_programs(1) + tl.program_id(1)) * _MAP_PARTIALS) * Ct + ct
        ok = ct < Ct
        tl.store(base, z_max, mask=ok)
        tl.store(base + Ct, z_sum, mask=ok)
        tl.store(base + 2 * Ct, tl.zeros((CT_BLOCK,), tl.float32), mask=ok)  # mA: exp(A) needs no shift
        tl.store(base + 3 * Ct, mass, mask=ok)
        tl.store(base + 4 * Ct, w_sum, mask=ok)
        tl.store(base + 5 * Ct, h_sum, mask=ok)
        tl.store(base + 6 * Ct, center, mask=ok)
    else:
        has_keys = z_sum > 0.0  # False for padded query rows, rows past the end, no loss key
        has_mass = has_keys & (mass > 0.0)
        safe_p = tl.where(has_mass, mass, 1.0)
        z_lse = tl.where(has_keys, z_max + tl.log(tl.where(has_keys, z_sum, 1.0)), 0.0)
        sigma = (w_sum + h_sum + r_sum) / safe_p
        near = has_mass & (tl.abs(sigma) < 0.5)  # False for NaN or an overflowed sigma
        sigma = tl.where(near, sigma, 0.0)
        kl = tl.where(near, (h_sum + r_sum) / safe_p + log1p_minus_x(sigma),
                      z_lse - (w_sum / safe_p + center) - tl.log(safe_p))
        # A row without teacher mass (no visible key) is all zeros: KL 0.
        kl = tl.where(has_mass, kl, 0.0)
        base = stats_ptr + b * Ct * T * 3 + ct[:, None] * T * 3 + t[None, :] * 3
        mask = (ct < Ct)[:, None] & (t < T)[None, :]
        tl.store(base + 0, kl, mask=mask)
        tl.store(base + 1, z_lse, mask=mask)
        tl.store(base + 2, mass, mask=mask)


# ------------------------------------------------------------------- backward

@triton.jit
def _grad_z(Z, A, in_loss, shift_ptr, b, ct, t, grad_scale, Ct, T,
            MAP_MODE: tl.constexpr):
    """dZ (CT_BLOCK, BT, BK) on loss entries, 0 elsewhere.

    ``shift_ptr`` holds (3, B, Ct, T) fp32 planes written by the host:
      map mode: [lse of Z over the map, lse of A over the map, unused]
      row mode: [lse of Z over the row, unused, P = sum of A over the row]
    map: dZ = g * (exp(Z - lseZ) - exp(A - lseA));  row: dZ = g * (exp(Z - lseZ) * P - A).
    """
    plane = tl.num_programs(0) * Ct * T
    offs = b * Ct * T + ct[:, None] * T + t[None, :]
    mask = (ct < Ct)[:, None] & (t < T)[None, :]
    z_shift = tl.load(shift_ptr + offs, mask=mask, other=0.0)
    q = tl.exp(Z - z_shift[:, :, None])
    if MAP_MODE:
        a_shift = tl.load(shift_ptr + plane + offs, mask=mask, other=0.0)
        d = q - tl.exp(A - a_shift[:, :, None])
    else:
        row_mass = tl.load(shift_ptr + 2 * plane + offs, mask=mask, other=0.0)
        d = q * row_mass[:, :, None] - A
    return tl.where(in_loss, grad_scale * d, 0.0)


@triton.jit
def _tile_grads(
    sq, sk, tq, tk, w, bias, lse_s_ptr, lse_t_ptr, shift_ptr, b, t, k, ct, cs,
    key_ok, query_ok, grad_scale, Cs, Ct, T, scale_s, scale_t,
    MAP_MODE: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, F32_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, CS_PAD: tl.constexpr, CT_BLOCK: tl.constexpr,
):
    """Recompute one tile and return (S, dS, dZ): S, dS (CS_PAD, BT, BK), dZ (CT_BLOCK, BT, BK).

    dS is this teacher-channel block's share, W[block]^T dZ[block].
    """
    vis = _visible(t, k, key_ok, T, CAUSAL)
    in_loss = (query_ok[:, None] & key_ok[None, :])[None, :, :]
    S = _probs(_scores(sq, sk, DOT_FP32, F32_DOT), lse_s_ptr, b, cs, t, Cs * T, T, Cs, T, scale_s, vis)
    A = _probs(_scores(tq, tk, DOT_FP32, F32_DOT), lse_t_ptr, b, ct, t, Ct * T, T, Ct, T, scale_t, vis)
    Z = _mix(w, S, bias, CT_BLOCK, CS_PAD, BLOCK_T, BLOCK_K)
    dZ = _grad_z(Z, A, in_loss, shift_ptr, b, ct, t, grad_scale, Ct, T, MAP_MODE)
    dS = _unmix(w, dZ, CT_BLOCK, CS_PAD, BLOCK_T, BLOCK_K)
    return S, dS, dZ


@triton.jit
def _backward_kernel(
    sq_ptr, sk_ptr, tq_ptr, tk_ptr, lse_s_ptr, lse_t_ptr, w_ptr, bias_ptr,
    key_valid_ptr, query_valid_ptr, key_suffix_ptr, shift_ptr, grad_scale_ptr,
    rowsum_ptr, dw_ptr, dqk_ptr,
    stride_sq_b, stride_sq_c, stride_sq_t, stride_sq_d,
    stride_sk_b, stride_sk_c, stride_sk_k, stride_sk_d,
    stride_tq_b, stride_tq_c, stride_tq_t, stride_tq_d,
    stride_tk_b, stride_tk_c, stride_tk_k, stride_tk_d,
    stride_w_t, stride_w_s, stride_kv_b, stride_qv_b,
    Cs, Ct, T, K, Ds, Dt, scale_s, scale_t,
    STAGE: tl.constexpr,
    MAP_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    HAS_QUERY_MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, F32_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, CS_PAD: tl.constexpr, CT_BLOCK: tl.constexpr,
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    """The three backward passes; STAGE picks one (they share every tile computation).

    STAGE 0 (grid B x query blocks x Ct blocks): r = sum_k dS * S -> rowsum (nCtb, B, Cs, T);
        dweight partials -> dw (B, nT, Ct, Cs). (No dbias: the loss is invariant to a
        per-channel shift of Z in both modes, so dbias is exactly 0.)
    STAGE 1 (same grid): dQ partial -> dqk (nCtb, B, Cs, T, Ds), fp32, scale applied.
    STAGE 2 (grid B x key blocks x Ct blocks): dK partial -> dqk (nCtb, B, Cs, K, Ds).
    """
    b = tl.program_id(0)
    blk = tl.program_id(1)
    ctb = tl.program_id(2)
    ct = ctb * CT_BLOCK + tl.arange(0, CT_BLOCK)
    cs = tl.arange(0, CS_PAD)
    w = _load_weight(w_ptr, ct, cs, stride_w_t, stride_w_s, Ct, Cs)
    bias = tl.zeros((CT_BLOCK,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ct, mask=ct < Ct, other=0.0).to(tl.float32)
    grad_scale = tl.load(grad_scale_ptr)
    rowsum_base = rowsum_ptr + ctb * tl.num_programs(0) * Cs * T + b * Cs * T

    if STAGE < 2:  # query-block major: walk the key blocks
        t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
        query_ok = _position_ok(b, t, query_valid_ptr, stride_qv_b, T, HAS_QUERY_MASK)
        sq = _load_heads(sq_ptr, b, cs, t, stride_sq_b, stride_sq_c, stride_sq_t, stride_sq_d, Cs, T, Ds,
                         BLOCK_DS, DOT_FP32)
        tq = _load_heads(tq_ptr, b, ct, t, stride_tq_b, stride_tq_c, stride_tq_t, stride_tq_d, Ct, T, Dt,
                         BLOCK_DT, DOT_FP32)
        rs_ptrs = rowsum_base + cs[:, None] * T + t[None, :]
        rs_mask = (cs < Cs)[:, None] & (t < T)[None, :]
        if STAGE == 0:
            rowsum = tl.zeros((CS_PAD, BLOCK_T), tl.float32)
            dw = tl.zeros((CT_BLOCK, CS_PAD), tl.float32)
            k_end = K
            if CAUSAL:  # S = 0 in the hidden key blocks: no rowsum or dweight there
                k_end, _ = _causal_keys(b, blk, key_suffix_ptr, K, HAS_KEY_MASK, BLOCK_T, BLOCK_K)
        else:
            rowsum = tl.load(rs_ptrs, mask=rs_mask, other=0.0)
            dq = tl.zeros((CS_PAD, BLOCK_T, BLOCK_DS), tl.float32)
            k_end = K
            if CAUSAL:  # S = 0 past the diagonal: no dQ there
                k_end = tl.minimum(K, (blk + 1) * BLOCK_T)
        for k0 in range(0, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            key_ok = _position_ok(b, k, key_valid_ptr, stride_kv_b, K, HAS_KEY_MASK)
            sk = _load_heads(sk_ptr, b, cs, k, stride_sk_b, stride_sk_c, stride_sk_k, stride_sk_d, Cs, K, Ds,
                             BLOCK_DS, DOT_FP32)
            tk = _load_heads(tk_ptr, b, ct, k, stride_tk_b, stride_tk_c, stride_tk_k, stride_tk_d, Ct, K, Dt,
                             BLOCK_DT, DOT_FP32)
            S, dS, dZ = _tile_grads(sq, sk, tq, tk, w, bias, lse_s_ptr, lse_t_ptr, shift_ptr, b, t, k, ct, cs,
                                    key_ok, query_ok, grad_scale, Cs, Ct, T, scale_s, scale_t,
                                    MAP_MODE, CAUSAL, DOT_FP32, F32_DOT, BLOCK_T, BLOCK_K, CS_PAD, CT_BLOCK)
            if STAGE == 0:
                rowsum += tl.sum(dS * S, axis=2)
                dw += tl.dot(tl.reshape(dZ, (CT_BLOCK, BLOCK_T * BLOCK_K)),
                             tl.trans(tl.reshape(S, (CS_PAD, BLOCK_T * BLOCK_K))), input_precision="ieee")
            else:
                dq += _head_dot(S * (dS - rowsum[:, :, None]), sk, DOT_FP32, F32_DOT)
        if STAGE == 0:
            tl.store(rs_ptrs, rowsum, mask=rs_mask)
            nT = tl.num_programs(1)
            w_ptrs = dw_ptr + ((b * nT + blk) * Ct + ct[:, None]) * Cs + cs[None, :]
            tl.store(w_ptrs, dw, mask=(ct < Ct)[:, None] & (cs < Cs)[None, :])
        else:
            _store_head_grad(dqk_ptr, ctb, b, cs, t, T, Cs, Ds, dq, scale_s, BLOCK_DS)
    else:  # key-block major: walk the query blocks
        k = blk * BLOCK_K + tl.arange(0, BLOCK_K)
        key_ok = _position_ok(b, k, key_valid_ptr, stride_kv_b, K, HAS_KEY_MASK)
        sk = _load_heads(sk_ptr, b, cs, k, stride_sk_b, stride_sk_c, stride_sk_k, stride_sk_d, Cs, K, Ds,
                         BLOCK_DS, DOT_FP32)
        tk = _load_heads(tk_ptr, b, ct, k, stride_tk_b, stride_tk_c, stride_tk_k, stride_tk_d, Ct, K, Dt,
                         BLOCK_DT, DOT_FP32)
        dk = tl.zeros((CS_PAD, BLOCK_K, BLOCK_DS), tl.float32)
        t_start = 0
        if CAUSAL:  # queries before the block's first key see none of it
            t_start = (blk * BLOCK_K // BLOCK_T) * BLOCK_T
        for t0 in range(t_start, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            query_ok = _position_ok(b, t, query_valid_ptr, stride_qv_b, T, HAS_QUERY_MASK)
            sq = _load_heads(sq_ptr, b, cs, t, stride_sq_b, stride_sq_c, stride_sq_t, stride_sq_d, Cs, T, Ds,
                             BLOCK_DS, DOT_FP32)
            tq = _load_heads(tq_ptr, b, ct, t, stride_tq_b, stride_tq_c, stride_tq_t, stride_tq_d, Ct, T, Dt,
                             BLOCK_DT, DOT_FP32)
            S, dS, dZ = _tile_grads(sq, sk, tq, tk, w, bias, lse_s_ptr, lse_t_ptr, shift_ptr, b, t, k, ct, cs,
                                    key_ok, query_ok, grad_scale, Cs, Ct, T, scale_s, scale_t,
                                    MAP_MODE, CAUSAL, DOT_FP32, F32_DOT, BLOCK_T, BLOCK_K, CS_PAD, CT_BLOCK)
            rowsum = tl.load(rowsum_base + cs[:, None] * T + t[None, :],
                             mask=(cs < Cs)[:, None] & (t < T)[None, :], other=0.0)
            dk += _head_dot(tl.trans(S * (dS - rowsum[:, :, None]), (0, 2, 1)), sq, DOT_FP32, F32_DOT)
        _store_head_grad(dqk_ptr, ctb, b, cs, k, K, Cs, Ds, dk, scale_s, BLOCK_DS)


# ------------------------------------------------------------------------ host

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device) -> Optional[str]:
    if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
        return None
    return f"the Triton QK kernels need a CUDA device (or TRITON_INTERPRET=1 on the CPU), got {device}"


MAX_STUDENT_HEADS = 64
MAX_HEAD_DIM = 256


def unsupported_reason(problem) -> Optional[str]:
    tensors = (problem.student_q, problem.teacher_q, problem.weight)
    if any(t.dtype == torch.float64 for t in tensors):
        return "float64 inputs are computed by backend='reference' only (the kernels accumulate in fp32)"
    if problem.student_q.shape[1] > MAX_STUDENT_HEADS:
        return (f"at most {MAX_STUDENT_HEADS} student heads in total (every tile holds all of them), "
                f"got Cs={problem.student_q.shape[1]}")
    for side, t in (("student", problem.student_q), ("teacher", problem.teacher_q)):
        if t.shape[3] > MAX_HEAD_DIM:
            return f"{side} head dim must be <= {MAX_HEAD_DIM}, got {t.shape[3]}"
    # Offsets are 32-bit in the kernels: bound every input's extent and the largest
    # partial buffer (dQ/dK: one share per teacher-channel block of the tile plan).
    B, Cs, T, Ds = problem.student_q.shape
    K, Ct = problem.student_k.shape[2], problem.teacher_q.shape[1]
    extents = [1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
               for t in (problem.student_q, problem.student_k, problem.teacher_q, problem.teacher_k)]
    partial = triton.cdiv(Ct, _tiles(problem).ct_block) * B * Cs * max(T, K) * Ds
    if max(*extents, partial, 4 * B * Ct * T) >= 2 ** 31:
        return "inputs or buffers with 2**31 or more elements (the kernels use 32-bit offsets)"
    return None


# Tile shapes, overridable (e.g. by a benchmark sweep or a test). On a GPU every dot
# dimension must be >= 16. The GPU values were picked by compiling for sm_90 and
# reading ptxas register/spill counts (bf16, Cs = 12, Ct = 24, d = 64; 16x16 tiles
# with 8 warps spilled least of the sizes tried) and have NOT been timed on a GPU;
# ct_block trades registers against recomputing the student tile per channel block.
GPU_TILES = dict(block_t=16, block_k=16, ct_block=16, num_warps=8, f32_dot="tf32x3")
# Small on purpose: small test shapes then span several query, key and teacher-channel
# blocks, exercising every cross-block reduction. Speed is irrelevant there.
INTERPRETER_TILES = dict(block_t=8, block_k=8, ct_block=4, num_warps=4, f32_dot="ieee")


@dataclass(frozen=True)
class _Tiles:
    block_t: int
    block_k: int
    cs_pad: int
    ct_block: int
    block_ds: int
    block_dt: int
    dot_fp32: bool
    f32_dot: str
    num_warps: int


def _tiles(problem) -> _Tiles:
    Cs, Ds = problem.student_q.shape[1], problem.student_q.shape[3]
    Ct, Dt = problem.teacher_q.shape[1], problem.teacher_q.shape[3]
    dot_fp32 = _interpreting() or problem.student_q.dtype == torch.float32 or problem.teacher_q.dtype == torch.float32
    p2 = triton.next_power_of_2
    if _interpreting():
        cfg, least = INTERPRETER_TILES, 1
    else:
        cfg, least = GPU_TILES, 16
    return _Tiles(cfg["block_t"], cfg["block_k"], max(least, p2(Cs)), max(least, min(p2(Ct), cfg["ct_block"])),
                  max(least, p2(Ds)), max(least, p2(Dt)), dot_fp32, cfg["f32_dot"], cfg["num_warps"])


def _flags(problem):
    return dict(HAS_KEY_MASK=problem.key_valid is not None, CAUSAL=problem.causal)


def _masks(problem, fallback: torch.Tensor):
    """int8 copies of the validity masks (Triton loads them as bytes) and, for causal
    problems with key padding, the (B, K + 1) int32 suffix counts of valid keys;
    ``fallback`` stands in as an unused pointer for whatever is absent."""
    kv = problem.key_valid.to(torch.int8).contiguous() if problem.key_valid is not None else None
    qv = problem.query_valid.to(torch.int8).contiguous() if problem.query_valid is not None else None
    suffix = fallback
    if kv is not None and problem.causal:
        counts = problem.key_valid.flip(-1).cumsum(-1, dtype=torch.int32).flip(-1)
        suffix = torch.nn.functional.pad(counts, (0, 1)).contiguous()
    return (kv if kv is not None else fallback, kv.stride(0) if kv is not None else 0,
            qv if qv is not None else fallback, qv.stride(0) if qv is not None else 0, suffix)


def _row_lse(q, k, scale, problem, key_valid, stride_kv, tiles: _Tiles, c_block: int, block_d: int) -> torch.Tensor:
    B, C, T, D = q.shape
    K = k.shape[2]
    lse = _new_output((B, C, T), torch.float32, q.device)
    grid = (B, triton.cdiv(T, tiles.block_t), triton.cdiv(C, c_block))
    _row_lse_kernel[grid](
        q, k, key_valid, lse, *q.stride(), *k.stride(), stride_kv, C, T, K, D, scale,
        DOT_FP32=tiles.dot_fp32, F32_DOT=tiles.f32_dot, BLOCK_T=tiles.block_t, BLOCK_K=tiles.block_k,
        C_BLOCK=c_block, BLOCK_D=block_d,
        num_warps=tiles.num_warps, **_flags(problem),
    )
    return lse


def _common_args(problem, lse_s, lse_t, key_valid, query_valid, key_suffix):
    sq, sk, tq, tk, w = problem.student_q, problem.student_k, problem.teacher_q, problem.teacher_k, problem.weight
    bias = problem.bias if problem.bias is not None else w
    return (sq, sk, tq, tk, lse_s, lse_t, w, bias, key_valid, query_valid, key_suffix)


def _common_strides(problem, stride_kv, stride_qv):
    sq, sk, tq, tk, w = problem.student_q, problem.student_k, problem.teacher_q, problem.teacher_k, problem.weight
    B, Cs, T, Ds = sq.shape
    Ct, Dt = tq.shape[1], tq.shape[3]
    K = sk.shape[2]
    return (*sq.stride(), *sk.stride(), *tq.stride(), *tk.stride(), *w.stride(), stride_kv, stride_qv,
            Cs, Ct, T, K, Ds, Dt, problem.student_scale, problem.teacher_scale)


def _common_meta(problem, tiles: _Tiles):
    return dict(
        MAP_MODE=problem.normalize == "map", HAS_BIAS=problem.bias is not None,
        HAS_QUERY_MASK=problem.query_valid is not None, DOT_FP32=tiles.dot_fp32, F32_DOT=tiles.f32_dot,
        BLOCK_T=tiles.block_t, BLOCK_K=tiles.block_k, CS_PAD=tiles.cs_pad, CT_BLOCK=tiles.ct_block,
        BLOCK_DS=tiles.block_ds, BLOCK_DT=tiles.block_dt, num_warps=tiles.num_warps, **_flags(problem),
    )


def forward(problem) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """(kl (B, Ct) fp32, saved): saved = (lse_s (B,Cs,T), lse_t (B,Ct,T), shifts (3,B,Ct,T))."""
    with _device_guard(problem.student_q.device):
        return _forward(problem)


def _forward(problem) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    sq, sk, tq, tk = problem.student_q, problem.student_k, problem.teacher_q, problem.teacher_k
    B, Cs, T, _ = sq.shape
    Ct = tq.shape[1]
    tiles = _tiles(problem)
    key_valid, stride_kv, query_valid, stride_qv, key_suffix = _masks(problem, sq)
    lse_s = _row_lse(sq, sk, problem.student_scale, problem, key_valid, stride_kv, tiles, tiles.cs_pad, tiles.block_ds)
    lse_t = _row_lse(tq, tk, problem.teacher_scale, problem, key_valid, stride_kv, tiles, tiles.ct_block,
                     tiles.block_dt)

    map_mode = problem.normalize == "map"
    nT = triton.cdiv(T, tiles.block_t)
    if map_mode:
        stats = _new_output((B, nT, MAP_PARTIALS, Ct), torch.float32, sq.device)
    else:
        stats = _new_output((B, Ct, T, 3), torch.float32, sq.device)
    grid = (B, nT, triton.cdiv(Ct, tiles.ct_block))
    _forward_stats_kernel[grid](
        *_common_args(problem, lse_s, lse_t, key_valid, query_valid, key_suffix), stats,
        *_common_strides(problem, stride_kv, stride_qv), **_common_meta(problem, tiles),
    )
    kl, shifts = _fold_map_stats(stats, T) if map_mode else _fold_row_stats(stats)
    return kl, (lse_s, lse_t, shifts)


def _fold_map_stats(partials: torch.Tensor, T: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Query-block partials (B, nT, MAP_PARTIALS, Ct) -> KL per (b, c) and the shifts
    backward needs, merged by the map-path backend's own combine kernel (same
    statistics, same centered form). A map with no loss entry gets KL 0 and finite
    shifts."""
    B, n_blocks, _, Ct = partials.shape
    kl = _new_output((B, Ct), torch.float32, partials.device)
    saved = _new_output((B, MAP_SAVED, Ct), torch.float32, partials.device)
    map_forward_combine[(B,)](partials, *partials.stride()[:3], kl, saved, *saved.stride()[:2], n_blocks, Ct,
                              CT_PAD=triton.next_power_of_2(Ct))
    # saved = (mZ, log sZ, mA, log sA, ...): the map log-sum-exps of Z and of A.
    z_lse, a_lse = saved[:, 0] + saved[:, 1], saved[:, 2] + saved[:, 3]
    shifts = torch.stack([z_lse[..., None].expand(-1, -1, T), a_lse[..., None].expand(-1, -1, T),
                          torch.zeros_like(z_lse)[..., None].expand(-1, -1, T)])
    return kl, shifts.contiguous()


def _fold_row_stats(stats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row (KL, lse of Z, P) (B, Ct, T, 3) -> KL per (b, c) and the shifts backward
    needs. Rows with no loss entry carry KL 0, lse 0 and P = 0."""
    row_kl, z_lse, mass = stats.unbind(-1)
    return row_kl.sum(-1), torch.stack([z_lse, torch.zeros_like(z_lse), mass]).contiguous()


def backward(problem, saved, grad_scale: torch.Tensor, need_qk: bool):
    """(dQ, dK, dweight, dbias) of the summed-KL-times-grad_scale; dQ, dK None unless need_qk."""
    with _device_guard(problem.student_q.device):
        return _backward(problem, saved, grad_scale, need_qk)


def _backward(problem, saved, grad_scale: torch.Tensor, need_qk: bool):
    lse_s, lse_t, shifts = saved
    sq, sk = problem.student_q, problem.student_k
    B, Cs, T, Ds = sq.shape
    K = sk.shape[2]
    Ct = problem.teacher_q.shape[1]
    tiles = _tiles(problem)
    key_valid, stride_kv, query_valid, stride_qv, key_suffix = _masks(problem, sq)
    nT, nK, nCtb = triton.cdiv(T, tiles.block_t), triton.cdiv(K, tiles.block_k), triton.cdiv(Ct, tiles.ct_block)
    dev, f32 = sq.device, torch.float32

    rowsum = _new_output((nCtb, B, Cs, T), f32, dev)
    dw = _new_output((B, nT, Ct, Cs), f32, dev)
    args = (*_common_args(problem, lse_s, lse_t, key_valid, query_valid, key_suffix), shifts,
            grad_scale.to(device=dev, dtype=f32).reshape(1))
    strides = _common_strides(problem, stride_kv, stride_qv)
    meta = _common_meta(problem, tiles)

    _backward_kernel[(B, nT, nCtb)](*args, rowsum, dw, dw, *strides, STAGE=0, **meta)
    d_weight = dw.sum(dim=(0, 1)).to(problem.weight.dtype)
    # The loss is invariant to a per-channel shift of Z in both modes: dbias == 0.
    d_bias = None if problem.bias is None else torch.zeros_like(problem.bias)
    if not need_qk:
        return None, None, d_weight, d_bias

    dq = _new_output((nCtb, B, Cs, T, Ds), f32, dev)
    _backward_kernel[(B, nT, nCtb)](*args, rowsum, dw, dq, *strides, STAGE=1, **meta)
    dk = _new_output((nCtb, B, Cs, K, Ds), f32, dev)
    _backward_kernel[(B, nK, nCtb)](*args, rowsum, dw, dk, *strides, STAGE=2, **meta)
    return dq.sum(0).to(sq.dtype), dk.sum(0).to(sk.dtype), d_weight, d_bias


class TritonQKBackend:
    """These kernels as ``a2d_kernels.dispatch`` sees them (its "qk" family): the same
    availability methods as a map-path backend, over QK problems."""

    name = "triton"
    unavailable_reason = staticmethod(unavailable_reason)
    unsupported_reason = staticmethod(unsupported_reason)
    forward = staticmethod(forward)
    backward = staticmethod(backward)


BACKEND = TritonQKBackend()


# --------------------------------------------------------- offline compile check

def compile_offline(arch: int = 90, dtype: str = "bf16", causal: bool = True, normalize: str = "map") -> dict:
    """Compile every kernel for ``sm_<arch>`` without a GPU (Triton + its bundled ptxas).

    CI has no GPU, and the interpreter accepts programs the GPU compiler rejects
    (layouts, dot shapes), so this catches GPU-only compile errors early. Uses the
    GPU tile shapes for Cs = 12, Ct = 24, head dim 64 with every mask on. Must run
    without TRITON_INTERPRET (under it kernels are not compilable objects).
    Returns ``{kernel name: compiled kernel}`` (``.asm["ptx"]``, ``.metadata.shared``).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if _interpreting():
        raise RuntimeError("compile_offline() needs TRITON_INTERPRET unset")
    element = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}[dtype]
    masks = {"key_valid_ptr": "*i8", "query_valid_ptr": "*i8", "key_suffix_ptr": "*i32"}
    floats = {"scale", "scale_s", "scale_t"}
    inputs = {"q_ptr", "k_ptr", "sq_ptr", "sk_ptr", "tq_ptr", "tk_ptr"}
    cfg = GPU_TILES
    common = dict(HAS_KEY_MASK=True, CAUSAL=causal, DOT_FP32=dtype == "fp32", F32_DOT=cfg["f32_dot"],
                  BLOCK_T=cfg["block_t"], BLOCK_K=cfg["block_k"])
    tile = dict(common, MAP_MODE=normalize == "map", HAS_BIAS=True, HAS_QUERY_MASK=True, CS_PAD=16,
                CT_BLOCK=cfg["ct_block"], BLOCK_DS=64, BLOCK_DT=64)
    jobs = {"row_lse": (_row_lse_kernel, dict(common, C_BLOCK=16, BLOCK_D=64)),
            "forward_stats": (_forward_stats_kernel, tile)}
    for stage in (0, 1, 2):
        jobs[f"backward_stage{stage}"] = (_backward_kernel, dict(tile, STAGE=stage))

    compiled = {}
    for name, (fn, constexprs) in jobs.items():
        signature = {}
        for p in fn.params:
            if p.is_constexpr:
                signature[p.name] = "constexpr"
            elif p.name.endswith("_ptr"):
                signature[p.name] = element if p.name in inputs else masks.get(p.name, "*fp32")
            else:
                signature[p.name] = "fp32" if p.name in floats else "i32"
        src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        compiled[name] = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                        options=dict(num_warps=cfg["num_warps"]))
    return compiled
