"""Backward Triton kernel of the A2D loss, both modes.

Grid (B, n_chunks), the same walk as the forward kernels. Each tile recomputes
Z = weight @ S from the inputs (nothing of size T*K was saved), forms
    map mode: dZ / g = q - p,      q = exp(Z - lseZ), p = exp(A - lseA)
              (as p * expm1(Z - A - (lseZ - lseA)) where q is within e^0.5 of p,
              so the difference of two nearly equal numbers is never formed)
    row mode: dZ / g = q * P - p,  q = exp(Z - lseZ[row]), p = A, P = sum_row p
              (as p * expm1(log(q P / p)) where p > 0 and q P is within e^0.5 of p;
              q P = exp(Z - shift - residual), lseZ = shift + residual + log P)
on valid entries (0 elsewhere), and
  - writes dS = (g * weight)^T @ dZ straight into each student layer's gradient
    tensor (every in-map position, masked ones get 0, so nothing is left unwritten);
  - accumulates dweight = dZ @ S^T over the program's tiles in registers, stored
    once per program into a (B * n_chunks, Ct, Cs) partial buffer that the host
    sums in a fixed order (deterministic; no atomics).
dbias is identically 0 (the softmaxes are shift invariant, see _triton_forward),
so it is not computed here.
"""
import triton
import triton.language as tl

from ._triton_tiles import (channel_rows, expm1, load_tile, load_weight, position_offsets,
                            tile_positions)


@triton.jit
def _row_stat_tile(ptr, b, t0, t_end, Ct, T, ct_ok,
                   CT_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """A (Ct, T) per-row statistic of batch b, for the tile's rows, broadcast to
    the tile's (CT_PAD, BLOCK_T * BLOCK_K) layout."""
    rows = t0 + tl.arange(0, BLOCK_T)
    c = tl.arange(0, CT_PAD)
    src = ptr + (b * Ct + c[:, None]).to(tl.int64) * T + rows[None, :]
    v = tl.load(src, mask=ct_ok[:, None] & (rows < t_end)[None, :], other=0.0)
    v = tl.broadcast_to(v[:, :, None], (CT_PAD, BLOCK_T, BLOCK_K))
    return tl.reshape(v, (CT_PAD, BLOCK_T * BLOCK_K))


@triton.jit
def a2d_backward(
    s_ptrs, s_strides, s_starts, s_pos_strides,
    a_ptrs, a_strides, a_starts, a_pos_strides,
    ds_ptrs, ds_strides, ds_pos_strides,
    w_ptr, w_stride_c, w_stride_k,
    kv_ptr, kv_stride_b, kv_stride_k, qv_ptr, qv_stride_b, qv_stride_t,
    stats_ptr, stats_stride_b, stats_stride_stat, grad_scale_ptr,
    dw_part_ptr, B, T, K, Cs, Ct, rows_per_chunk,
    ROW_MODE: tl.constexpr, WRITE_DS: tl.constexpr,
    CS_PAD: tl.constexpr, CT_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, HAS_QUERY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    OFFSETS_64: tl.constexpr,
):
    """``stats``: map mode (B, 6, Ct) = mZ, log sZ, mA, log sA, shift, residual;
    row mode
    (2, B, Ct, T) = shift, residual. ``dw_part``: (B, n_chunks, Ct, Cs) fp32."""
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)

    g = tl.load(grad_scale_ptr).to(tl.float32)
    w = load_weight(w_ptr, w_stride_c, w_stride_k, Ct, Cs, CT_PAD, CS_PAD)
    w_t_scaled = tl.trans(w * g)  # (CS_PAD, CT_PAD): dS = (g W)^T (dZ / g)
    s_row = channel_rows(s_ptrs, s_strides, s_starts, b, CS_PAD)
    a_row = channel_rows(a_ptrs, a_strides, a_starts, b, CT_PAD)
    if WRITE_DS:
        ds_row = channel_rows(ds_ptrs, ds_strides, s_starts, b, CS_PAD)
    cs_ok = tl.arange(0, CS_PAD) < Cs
    c = tl.arange(0, CT_PAD)
    ct_ok = c < Ct

    if not ROW_MODE:
        src = stats_ptr + b * stats_stride_b + c
        m_z = tl.load(src, mask=ct_ok, other=0.0)[:, None]
        log_s_z = tl.load(src + stats_stride_stat, mask=ct_ok, other=0.0)[:, None]
        m_a = tl.load(src + 2 * stats_stride_stat, mask=ct_ok, other=0.0)[:, None]
        log_s_a = tl.load(src + 3 * stats_stride_stat, mask=ct_ok, other=0.0)[:, None]
        shift = tl.load(src + 4 * stats_stride_stat, mask=ct_ok, other=0.0)[:, None]
        residual = tl.load(src + 5 * stats_stride_stat, mask=ct_ok, other=0.0)[:, None]

    dw = tl.zeros([CT_PAD, CS_PAD], tl.float32)
    t_begin = chunk * rows_per_chunk
    t_end = tl.minimum(t_begin + rows_per_chunk, T)
    for t0 in range(t_begin, t_end, BLOCK_T):
        if ROW_MODE:
            shift = _row_stat_tile(stats_ptr, b, t0, t_end, Ct, T, ct_ok, CT_PAD, BLOCK_T, BLOCK_K)
            residual = _row_stat_tile(stats_ptr + B * Ct * T, b, t0, t_end, Ct, T, ct_ok,
                                      CT_PAD, BLOCK_T, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            t, x, inside, valid = tile_positions(
                b, t0, k0, t_end, K, kv_ptr, kv_stride_b, kv_stride_k,
                qv_ptr, qv_stride_b, qv_stride_t, HAS_KEY_MASK, HAS_QUERY_MASK, BLOCK_T, BLOCK_K)
            s = load_tile(s_row, position_offsets(t, x, s_pos_strides, OFFSETS_64), cs_ok, valid)
            a = load_tile(a_row, position_offsets(t, x, a_pos_strides, OFFSETS_64), ct_ok, valid)
            z = tl.dot(w, s, input_precision=DOT_PRECISION)
            if ROW_MODE:
                zc = (z - shift) - residual
                log_ratio = zc - tl.log(a)  # log(q P / p); +inf where p = 0
                # (residual = +inf on rows without mass: q P = 0 there, NaN ratio.)
                dz = tl.where(tl.abs(log_ratio) < 0.5, a * expm1(log_ratio), tl.exp(zc) - a)
            else:
                p = tl.exp((a - m_a) - log_s_a)
                log_ratio = ((z - a) - shift) - residual  # log(q / p)
                dz = tl.where(tl.abs(log_ratio) < 0.5, p * expm1(log_ratio),
                              tl.exp((z - m_z) - log_s_z) - p)
            dz = tl.where(ct_ok[:, None] & valid[None, :], dz, 0.0)
            dw = tl.dot(dz, tl.trans(s), dw, input_precision=DOT_PRECISION)
            if WRITE_DS:
                ds = tl.dot(w_t_scaled, dz, input_precision=DOT_PRECISION)
                ds_offsets = position_offsets(t, x, ds_pos_strides, OFFSETS_64)
                ds_tile_ptrs = ds_row[:, None] + ds_offsets[None, :]
                tl.store(ds_tile_ptrs, ds.to(ds_tile_ptrs.dtype.element_ty),
                         mask=cs_ok[:, None] & inside[None, :])

    k = tl.arange(0, CS_PAD)
    dst = dw_part_ptr + ((b * n_chunks + chunk) * Ct + c[:, None]).to(tl.int64) * Cs + k[None, :]
    tl.store(dst, dw * g, mask=ct_ok[:, None] & cs_ok[None, :])
