"""Forward Triton kernels of the A2D loss: one pass over S and A, O(B*Ct) output.

Grid of every pass-1 kernel: (B, n_chunks). A program owns a chunk of query rows of
one batch element and walks it tile by tile (BLOCK_T rows x BLOCK_K keys), mixing
the tile's student channels into all teacher channels with one small matmul in
registers. Nothing of size T*K is written.

The bias never enters: both softmaxes are invariant to a per-channel shift (whole
map in "map" mode, whole row in "row" mode), so the bias cancels from the loss
exactly. Leaving it out also keeps the logits small, which helps accuracy.

Map mode, per (b, c) over valid positions x, with y = Z - A and p = softmax(A):
    KL = E_p[-y] + delta,  delta = lseZ - lseA = log E_p[exp(y)].
Attention maps used as logits are nearly uniform, so KL is second order in y
(~Var_p(y) / 2) while E_p[y] and delta are first order: the naive
``cross - lseA + lseZ`` even subtracts numbers of size log(T*K), losing three to
four decimal digits in fp32. So, with w = E_p[y], h = E_p[expm1(y) - y] (second
order, summed from an accurate expm1_minus_x) and s = w + h = E_p[expm1(y)],
    KL = h + (log1p(s) - s)        when |s| < 1/2 (then |delta| < 0.7),
every term of which is of the size of KL itself. Far apart (|s| >= 1/2, or h
overflowed) no cancellation threatens and the max-based form is used:
    KL = E_p[-y] + (mZ - mA) + log(sZ / sA),
m a running max and s the running sum of exp(. - m).
"""
import triton
import triton.language as tl

from ._triton_tiles import (channel_rows, expm1_minus_x, load_tile, load_weight, log1p,
                            log1p_minus_x, online_logsumexp, position_offsets, tile_positions)

# Map mode: the pass-1 partials hold, per (b, chunk, channel), these statistics in
# this order (buffer (B, n_chunks, 6, Ct)); the saved statistics are (B, 5, Ct).
# The kernels index both through strides from the host.
MAP_PARTIALS = 6  # mZ, sZ, mA, sA, u = sum e * (A - Z), v = sum e * expm1_minus_x(Z - A); e = exp(A - mA)
MAP_SAVED = 5  # mZ, log sZ, mA, log sA, delta


@triton.jit
def map_forward_partials(
    s_ptrs, s_strides, s_starts, s_pos_strides,
    a_ptrs, a_strides, a_starts, a_pos_strides,
    w_ptr, w_stride_c, w_stride_k,
    kv_ptr, kv_stride_b, kv_stride_k, qv_ptr, qv_stride_b, qv_stride_t,
    part_ptr, part_stride_b, part_stride_chunk, part_stride_stat, T, K, Cs, Ct, rows_per_chunk,
    CS_PAD: tl.constexpr, CT_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, HAS_QUERY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    OFFSETS_64: tl.constexpr,
):
    """Running statistics of one chunk of rows; ``part`` is (B, n_chunks, 6, Ct)."""
    b = tl.program_id(0)
    chunk = tl.program_id(1)

    w = load_weight(w_ptr, w_stride_c, w_stride_k, Ct, Cs, CT_PAD, CS_PAD)
    s_row = channel_rows(s_ptrs, s_strides, s_starts, b, CS_PAD)
    a_row = channel_rows(a_ptrs, a_strides, a_starts, b, CT_PAD)
    cs_ok = tl.arange(0, CS_PAD) < Cs
    c = tl.arange(0, CT_PAD)
    ct_ok = c < Ct

    m_z = tl.full([CT_PAD], float("-inf"), tl.float32)
    s_z = tl.zeros([CT_PAD], tl.float32)
    m_a = tl.full([CT_PAD], float("-inf"), tl.float32)
    s_a = tl.zeros([CT_PAD], tl.float32)
    u = tl.zeros([CT_PAD], tl.float32)
    v = tl.zeros([CT_PAD], tl.float32)

    t_begin = chunk * rows_per_chunk
    t_end = tl.minimum(t_begin + rows_per_chunk, T)
    for t0 in range(t_begin, t_end, BLOCK_T):
        for k0 in range(0, K, BLOCK_K):
            t, x, inside, valid = tile_positions(
                b, t0, k0, t_end, K, kv_ptr, kv_stride_b, kv_stride_k,
                qv_ptr, qv_stride_b, qv_stride_t, HAS_KEY_MASK, HAS_QUERY_MASK, BLOCK_T, BLOCK_K)
            s = load_tile(s_row, position_offsets(t, x, s_pos_strides, OFFSETS_64), cs_ok, valid)
            a = load_tile(a_row, position_offsets(t, x, a_pos_strides, OFFSETS_64), ct_ok, valid)
            z = tl.dot(w, s, input_precision=DOT_PRECISION)
            valid2 = valid[None, :]
            m_z, s_z, _, _ = online_logsumexp(m_z, s_z, z, valid2, 1)
            m_a, s_a, alpha_a, e_a = online_logsumexp(m_a, s_a, a, valid2, 1)
            u = u * alpha_a + tl.sum(e_a * (a - z), axis=1)
            # Far from A this may overflow (where e_a underflows: inf * 0 = NaN);
            # the combine then takes the max-based form instead.
            v = v * alpha_a + tl.sum(e_a * expm1_minus_x(z - a), axis=1)

    out = part_ptr + b * part_stride_b + chunk * part_stride_chunk + c
    tl.store(out, m_z, mask=ct_ok)
    tl.store(out + part_stride_stat, s_z, mask=ct_ok)
    tl.store(out + 2 * part_stride_stat, m_a, mask=ct_ok)
    tl.store(out + 3 * part_stride_stat, s_a, mask=ct_ok)
    tl.store(out + 4 * part_stride_stat, u, mask=ct_ok)
    tl.store(out + 5 * part_stride_stat, v, mask=ct_ok)


@triton.jit
def _merge(m, s, m_i, s_i):
    """Merge running (max, sum) pair i into (m, s); -inf maxima stay NaN-free."""
    m_new = tl.maximum(m, m_i)
    scale = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
    scale_i = tl.where(m_i == m_new, 1.0, tl.exp(m_i - m_new))
    return m_new, s * scale + s_i * scale_i, scale, scale_i


@triton.jit
def map_forward_combine(part_ptr, part_stride_b, part_stride_chunk, part_stride_stat,
                        kl_ptr, saved_ptr, saved_stride_b, saved_stride_stat, n_chunks, Ct,
                        CT_PAD: tl.constexpr):
    """Second pass, grid (B,): fold the chunks of one batch element in chunk order
    (deterministic), write KL (B, Ct) and the saved statistics (B, 4, Ct)."""
    b = tl.program_id(0)
    c = tl.arange(0, CT_PAD)
    ct_ok = c < Ct
    m_z = tl.full([CT_PAD], float("-inf"), tl.float32)
    s_z = tl.zeros([CT_PAD], tl.float32)
    m_a = tl.full([CT_PAD], float("-inf"), tl.float32)
    s_a = tl.zeros([CT_PAD], tl.float32)
    u = tl.zeros([CT_PAD], tl.float32)
    v = tl.zeros([CT_PAD], tl.float32)
    for i in range(0, n_chunks):
        src = part_ptr + b * part_stride_b + i * part_stride_chunk + c
        m_z, s_z, _, _ = _merge(m_z, s_z, tl.load(src, mask=ct_ok, other=float("-inf")),
                                tl.load(src + part_stride_stat, mask=ct_ok, other=0.0))
        m_a, s_a, scale, scale_i = _merge(
            m_a, s_a, tl.load(src + 2 * part_stride_stat, mask=ct_ok, other=float("-inf")),
            tl.load(src + 3 * part_stride_stat, mask=ct_ok, other=0.0))
        u = u * scale + tl.load(src + 4 * part_stride_stat, mask=ct_ok, other=0.0) * scale_i
        v = v * scale + tl.load(src + 5 * part_stride_stat, mask=ct_ok, other=0.0) * scale_i

    # A map with no valid entry (fully masked) contributes 0 and has no gradient.
    empty = s_a == 0.0
    safe_s_a = tl.where(empty, 1.0, s_a)
    safe_s_z = tl.where(empty, 1.0, s_z)
    h = v / safe_s_a  # E_p[expm1(y) - y]; NaN/inf when v overflowed
    s = h - u / safe_s_a  # E_p[expm1(y)]
    near = tl.abs(s) < 0.5
    s_near = tl.where(near, s, 0.0)
    delta_far = (m_z - m_a) + tl.log(safe_s_z / safe_s_a)
    delta = tl.where(empty, 0.0, tl.where(near, log1p(s_near), delta_far))
    kl = tl.where(near, h + log1p_minus_x(s_near), u / safe_s_a + delta_far)
    tl.store(kl_ptr + b * Ct + c, tl.where(empty, 0.0, kl), mask=ct_ok)
    dst = saved_ptr + b * saved_stride_b + c
    tl.store(dst, tl.where(empty, 0.0, m_z), mask=ct_ok)
    tl.store(dst + saved_stride_stat, tl.log(safe_s_z), mask=ct_ok)
    tl.store(dst + 2 * saved_stride_stat, tl.where(empty, 0.0, m_a), mask=ct_ok)
    tl.store(dst + 3 * saved_stride_stat, tl.log(safe_s_a), mask=ct_ok)
    tl.store(dst + 4 * saved_stride_stat, delta, mask=ct_ok)


@triton.jit
def _xlogx(a):
    """a * log(a) with 0 * log(0) = 0, as torch.xlogy(a, a)."""
    return tl.where(a == 0.0, 0.0, a * tl.log(a))


@triton.jit
def row_forward(
    s_ptrs, s_strides, s_starts, s_pos_strides,
    a_ptrs, a_strides, a_starts, a_pos_strides,
    w_ptr, w_stride_c, w_stride_k,
    kv_ptr, kv_stride_b, kv_stride_k, qv_ptr, qv_stride_b, qv_stride_t,
    part_ptr, part_stride_b, part_stride_chunk, row_stats_ptr, B, T, K, Cs, Ct, rows_per_chunk,
    CS_PAD: tl.constexpr, CT_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, HAS_QUERY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    OFFSETS_64: tl.constexpr,
):
    """Row mode: each query row is a distribution over its valid keys. A program
    finishes its rows (all keys) before moving on, so per-row statistics never
    leave the program; per (b, c) the rows' KL is summed into ``part`` (B,
    n_chunks, Ct). ``row_stats`` (2, B, Ct, T) receives lseZ and P = sum of p of
    each row, all backward needs.

    Per row: KL = sum xlogx(A) - sum A * Z + P * lseZ (the p = 0 terms vanish).
    """
    b = tl.program_id(0)
    chunk = tl.program_id(1)

    w = load_weight(w_ptr, w_stride_c, w_stride_k, Ct, Cs, CT_PAD, CS_PAD)
    s_row = channel_rows(s_ptrs, s_strides, s_starts, b, CS_PAD)
    a_row = channel_rows(a_ptrs, a_strides, a_starts, b, CT_PAD)
    cs_ok = tl.arange(0, CS_PAD) < Cs
    c = tl.arange(0, CT_PAD)
    ct_ok = c < Ct
    kl = tl.zeros([CT_PAD], tl.float32)

    t_begin = chunk * rows_per_chunk
    t_end = tl.minimum(t_begin + rows_per_chunk, T)
    for t0 in range(t_begin, t_end, BLOCK_T):
        m = tl.full([CT_PAD, BLOCK_T], float("-inf"), tl.float32)
        s_sum = tl.zeros([CT_PAD, BLOCK_T], tl.float32)
        cross = tl.zeros([CT_PAD, BLOCK_T], tl.float32)  # sum xlogx(A) - A * Z
        p_sum = tl.zeros([CT_PAD, BLOCK_T], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            t, x, inside, valid = tile_positions(
                b, t0, k0, t_end, K, kv_ptr, kv_stride_b, kv_stride_k,
                qv_ptr, qv_stride_b, qv_stride_t, HAS_KEY_MASK, HAS_QUERY_MASK, BLOCK_T, BLOCK_K)
            s = load_tile(s_row, position_offsets(t, x, s_pos_strides, OFFSETS_64), cs_ok, valid)
            a = load_tile(a_row, position_offsets(t, x, a_pos_strides, OFFSETS_64), ct_ok, valid)
            z = tl.reshape(tl.dot(w, s, input_precision=DOT_PRECISION), (CT_PAD, BLOCK_T, BLOCK_K))
            a = tl.reshape(a, (CT_PAD, BLOCK_T, BLOCK_K))
            valid3 = tl.reshape(valid, (BLOCK_T, BLOCK_K))[None, :, :]
            m, s_sum, _, _ = online_logsumexp(m, s_sum, z, valid3, 2)
            # a is 0 wherever not valid, so these sums need no extra mask.
            cross += tl.sum(_xlogx(a) - a * z, axis=2)
            p_sum += tl.sum(a, axis=2)

        rows = t0 + tl.arange(0, BLOCK_T)
        has_keys = s_sum > 0.0  # False for masked query rows, rows past the end, no valid key
        lse = tl.where(has_keys, m + tl.log(tl.where(has_keys, s_sum, 1.0)), 0.0)
        kl += tl.sum(tl.where(has_keys, cross + p_sum * lse, 0.0), axis=1)
        stats_mask = ct_ok[:, None] & (rows < t_end)[None, :]
        dst = row_stats_ptr + (b * Ct + c[:, None]).to(tl.int64) * T + rows[None, :]
        tl.store(dst, lse, mask=stats_mask)
        tl.store(dst + B * Ct * T, tl.where(has_keys, p_sum, 0.0), mask=stats_mask)

    tl.store(part_ptr + b * part_stride_b + chunk * part_stride_chunk + c, kl, mask=ct_ok)
