"""Forward Triton kernels of the A2D loss: one pass over S and A, O(B*Ct) output.

Grid of every pass-1 kernel: (B, n_chunks). A program owns a chunk of query rows of
one batch element and walks it tile by tile (BLOCK_T rows x BLOCK_K keys), mixing
the tile's student channels into all teacher channels with one small matmul in
registers. Nothing of size T*K is written.

The bias never enters: both softmaxes are invariant to a per-channel shift (whole
map in "map" mode, whole row in "row" mode), so the bias cancels from the loss
exactly. Leaving it out also keeps the logits small, which helps accuracy.

Map mode, per (b, c) over valid positions x, with y = Z - A and p = softmax(A):
    KL = -E_p[y] + log E_p[exp(y)]   (= -E_p[y] + lseZ - lseA).
Close to convergence KL is second order in the spread of y (~Var_p(y) / 2) while
both terms are first order, and y itself carries an arbitrary offset (softmax
ignores shifts of Z or A). The naive ``cross - lseA + lseZ`` subtracts numbers
of size log(T*K) and loses most digits of a small KL in fp32. Here, relative to
a center c (the p-weighted mean of y over the first valid tile of each chunk,
so y - c is of the size of y's spread), with
    w = E_p[y - c],  h = E_p[expm1(y - c) - (y - c)] (second order),
    s = w + h = E_p[expm1(y - c)],
    KL = h + (log1p(s) - s)         when |s| < 1/2,
every term of which is of the size of KL itself. Chunks with different centers
are merged exactly (see _shift_center). Far apart (|s| >= 1/2, or h overflowed)
nothing cancels and the max-based form is used:
    KL = -(c + w) + (mZ - mA) + log(sZ / sA),
m a running max and s the running sum of exp(. - m).
"""
import triton
import triton.language as tl

from ._triton_tiles import (channel_rows, expm1, expm1_minus_x, load_tile, load_weight, log1p,
                            log1p_minus_x, online_logsumexp, position_offsets, tile_positions)

# Map mode: the pass-1 partials hold, per (b, chunk, channel), these statistics in
# this order (buffer (B, n_chunks, 7, Ct)); the saved statistics are (B, 6, Ct).
# The kernels index both through strides from the host.
MAP_PARTIALS = 7  # mZ, sZ, mA, sA, U = sum e (y - c), H = sum e expm1_minus_x(y - c), c
MAP_SAVED = 6  # mZ, log sZ, mA, log sA, shift, residual (lseZ - lseA = shift + residual)


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
    """Running statistics of one chunk of rows; ``part`` is (B, n_chunks, 7, Ct),
    e = exp(A - mA) the unnormalized p, y = Z - A, c the chunk's center."""
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
    h = tl.zeros([CT_PAD], tl.float32)
    center = tl.zeros([CT_PAD], tl.float32)
    centered = tl.zeros([CT_PAD], tl.int1)

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
            y = z - a
            # The center: p-weighted mean of y over the first tile with valid entries
            # (fixed from then on; nothing was accumulated before it).
            tile_e = tl.sum(e_a, axis=1)
            tile_center = tl.sum(e_a * y, axis=1) / tl.where(tile_e > 0.0, tile_e, 1.0)
            center = tl.where(centered, center, tile_center)
            centered = centered | (tile_e > 0.0)
            y = tl.where(valid2, y - center[:, None], 0.0)
            u = u * alpha_a + tl.sum(e_a * y, axis=1)
            # Far from A this may overflow (where e_a underflows: inf * 0 = NaN);
            # the combine then takes the max-based form instead.
            h = h * alpha_a + tl.sum(e_a * expm1_minus_x(y), axis=1)

    out = part_ptr + b * part_stride_b + chunk * part_stride_chunk + c
    tl.store(out, m_z, mask=ct_ok)
    tl.store(out + part_stride_stat, s_z, mask=ct_ok)
    tl.store(out + 2 * part_stride_stat, m_a, mask=ct_ok)
    tl.store(out + 3 * part_stride_stat, s_a, mask=ct_ok)
    tl.store(out + 4 * part_stride_stat, u, mask=ct_ok)
    tl.store(out + 5 * part_stride_stat, h, mask=ct_ok)
    tl.store(out + 6 * part_stride_stat, center, mask=ct_ok)


@triton.jit
def _merge(m, s, m_i, s_i):
    """Merge running (max, sum) pair i into (m, s); -inf maxima stay NaN-free."""
    m_new = tl.maximum(m, m_i)
    scale = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
    scale_i = tl.where(m_i == m_new, 1.0, tl.exp(m_i - m_new))
    return m_new, s * scale + s_i * scale_i, scale, scale_i


@triton.jit
def _shift_center(u, h, s, d):
    """(U, H) of a chunk re-expressed about the common center c, d = c_own - c:
    with a = y - c_own, y - c = a + d and expm1_minus_x(a + d) = e^d
    expm1_minus_x(a) + expm1(d) a + expm1_minus_x(d), summed with weights e
    (total s). Exact algebra; no term is first order where the result is second
    order. Its terms grow like e^|d| while their sum does not, so for |d| >= 1 nat
    H becomes NaN, which sends the map to the max-based form: centers that far
    apart mean y spreads over nats, where the KL is not small and that form loses
    nothing."""
    h_shifted = tl.exp(d) * h + expm1(d) * u + expm1_minus_x(d) * s
    return u + d * s, tl.where(tl.abs(d) < 1.0, h_shifted, float("nan"))


@triton.jit
def map_forward_combine(part_ptr, part_stride_b, part_stride_chunk, part_stride_stat,
                        kl_ptr, saved_ptr, saved_stride_b, saved_stride_stat, n_chunks, Ct,
                        CT_PAD: tl.constexpr):
    """Second pass, grid (B,): fold the chunks of one batch element in chunk order
    (deterministic), write KL (B, Ct) and the saved statistics (B, 6, Ct)."""
    b = tl.program_id(0)
    c = tl.arange(0, CT_PAD)
    ct_ok = c < Ct
    m_z = tl.full([CT_PAD], float("-inf"), tl.float32)
    s_z = tl.zeros([CT_PAD], tl.float32)
    m_a = tl.full([CT_PAD], float("-inf"), tl.float32)
    s_a = tl.zeros([CT_PAD], tl.float32)
    u = tl.zeros([CT_PAD], tl.float32)
    h = tl.zeros([CT_PAD], tl.float32)
    center = tl.zeros([CT_PAD], tl.float32)
    for i in range(0, n_chunks):
        src = part_ptr + b * part_stride_b + i * part_stride_chunk + c
        m_z, s_z, _, _ = _merge(m_z, s_z, tl.load(src, mask=ct_ok, other=float("-inf")),
                                tl.load(src + part_stride_stat, mask=ct_ok, other=0.0))
        had_data = s_a > 0.0
        s_a_i = tl.load(src + 3 * part_stride_stat, mask=ct_ok, other=0.0)
        m_a, s_a, scale, scale_i = _merge(
            m_a, s_a, tl.load(src + 2 * part_stride_stat, mask=ct_ok, other=float("-inf")), s_a_i)
        # The first chunk with data sets the common center; later ones shift to it.
        center_i = tl.load(src + 6 * part_stride_stat, mask=ct_ok, other=0.0)
        center = tl.where(had_data, center, center_i)
        u_i, h_i = _shift_center(tl.load(src + 4 * part_stride_stat, mask=ct_ok, other=0.0) * scale_i,
                                 tl.load(src + 5 * part_stride_stat, mask=ct_ok, other=0.0) * scale_i,
                                 s_a_i * scale_i, center_i - center)
        has_data_i = s_a_i > 0.0
        u = u * scale + tl.where(has_data_i, u_i, 0.0)
        h = h * scale + tl.where(has_data_i, h_i, 0.0)

    # A map with no valid entry (fully masked) contributes 0 and has no gradient.
    empty = s_a == 0.0
    safe_s_a = tl.where(empty, 1.0, s_a)
    safe_s_z = tl.where(empty, 1.0, s_z)
    w = u / safe_s_a  # E_p[y - c]
    h = h / safe_s_a  # E_p[expm1(y - c) - (y - c)]; NaN/inf when it overflowed
    s = w + h  # E_p[expm1(y - c)]
    near = tl.abs(s) < 0.5
    s_near = tl.where(near, s, 0.0)
    delta_far = (m_z - m_a) + tl.log(safe_s_z / safe_s_a)
    kl = tl.where(near, h + log1p_minus_x(s_near), delta_far - (center + w))
    tl.store(kl_ptr + b * Ct + c, tl.where(empty, 0.0, kl), mask=ct_ok)
    dst = saved_ptr + b * saved_stride_b + c
    tl.store(dst, tl.where(empty, 0.0, m_z), mask=ct_ok)
    tl.store(dst + saved_stride_stat, tl.log(safe_s_z), mask=ct_ok)
    tl.store(dst + 2 * saved_stride_stat, tl.where(empty, 0.0, m_a), mask=ct_ok)
    tl.store(dst + 3 * saved_stride_stat, tl.log(safe_s_a), mask=ct_ok)
    # lseZ - lseA = shift + residual, split so backward forms (y - shift) - residual
    # without rounding a large shift into a small log ratio.
    tl.store(dst + 4 * saved_stride_stat, tl.where(near & ~empty, center, 0.0), mask=ct_ok)
    tl.store(dst + 5 * saved_stride_stat,
             tl.where(empty, 0.0, tl.where(near, log1p(s_near), delta_far)), mask=ct_ok)


@triton.jit
def _split_mass(a):
    """``a`` rounded to a multiple of 2^-20 (the ulp of 12 in fp32): sums of such
    values are exact while below 16, so a row's probability mass P can be summed
    as exact high parts plus tiny low parts a - a_hi (|a - a_hi| <= 2^-21)."""
    return (a + 12.0) - 12.0


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
    n_chunks, Ct). ``row_stats`` (2, B, Ct, T) receives per row a shift and a
    residual, lseZ = shift + residual + log P with P = sum of p: all that backward
    needs (see ``a2d_backward``).

    Per row, p = A as given (P need not be 1; p = 0 terms vanish):
        KL = sum xlogx(p) - sum p Z + P lseZ   (used as the fallback).
    That form is first order in the student-teacher mismatch while KL is second
    order, so, as in map mode, it is only the fallback. With y = Z - log p on the
    entries with p > 0, a row center c (p-weighted mean of y over the first key
    block with p > 0), W = sum p (y - c), H = sum p expm1_minus_x(y - c),
    R = sum over the p = 0 entries of exp(Z - c), and sigma = (W + H + R) / P:
        KL = xlogx(P) + H + R + P (log1p(sigma) - sigma),  lseZ = c + log P + log1p(sigma)
    for |sigma| < 1/2, where every term is of the size of KL itself.
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
        p_hi = tl.zeros([CT_PAD, BLOCK_T], tl.float32)  # P = p_hi + p_lo, see _split_mass
        p_lo = tl.zeros([CT_PAD, BLOCK_T], tl.float32)
        center = tl.zeros([CT_PAD, BLOCK_T], tl.float32)
        w_sum = tl.zeros([CT_PAD, BLOCK_T], tl.float32)
        h_sum = tl.zeros([CT_PAD, BLOCK_T], tl.float32)
        r_sum = tl.zeros([CT_PAD, BLOCK_T], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            t, x, inside, valid = tile_positions(
                b, t0, k0, t_end, K, kv_ptr, kv_stride_b, kv_stride_k,
                qv_ptr, qv_stride_b, qv_stride_t, HAS_KEY_MASK, HAS_QUERY_MASK, BLOCK_T, BLOCK_K)
            s = load_tile(s_row, position_offsets(t, x, s_pos_strides, OFFSETS_64), cs_ok, valid)
            a = load_tile(a_row, position_offsets(t, x, a_pos_strides, OFFSETS_64), ct_ok, valid)
            z = tl.reshape(tl.dot(w, s, input_precision=DOT_PRECISION), (CT_PAD, BLOCK_T, BLOCK_K))
            a = tl.reshape(a, (CT_PAD, BLOCK_T, BLOCK_K))
            valid3 = tl.reshape(valid, (BLOCK_T, BLOCK_K))[None, :, :]
            m, s_sum, _, e = online_logsumexp(m, s_sum, z, valid3, 2)
            # a is 0 wherever not valid. A row is centered once it has mass (P > 0).
            centered = (p_hi + p_lo) > 0.0
            a_hi = _split_mass(a)
            p_hi += tl.sum(a_hi, axis=2)
            p_lo += tl.sum(a - a_hi, axis=2)

            # p != 0 rather than p > 0: a negative p then makes y NaN, and the loss
            # NaN, as in the reference (xlogy of a negative number).
            mass = valid3 & (a != 0.0)
            a_mass = tl.where(mass, a, 0.0)
            y = tl.where(mass, z - tl.log(a), 0.0)
            tile_p = tl.sum(a_mass, axis=2)
            new_center = tl.where(centered, center, tl.sum(a_mass * y, axis=2)
                                  / tl.where(tile_p > 0.0, tile_p, 1.0))
            # R so far was relative to the placeholder center 0 of an uncentered row.
            r_sum = tl.where(centered, r_sum, r_sum * tl.exp(-new_center))
            center = new_center
            y = tl.where(mass, y - center[:, :, None], 0.0)
            w_sum += tl.sum(a_mass * y, axis=2)
            h_sum += tl.sum(a_mass * expm1_minus_x(y), axis=2)
            # exp(Z - c) = e * exp(m - c), e = exp(Z - m) from the running lse.
            r_sum += tl.sum(tl.where(valid3 & (a == 0.0), e, 0.0), axis=2) * tl.exp(m - center)

        rows = t0 + tl.arange(0, BLOCK_T)
        p_sum = p_hi + p_lo
        has_keys = s_sum > 0.0  # False for masked query rows, rows past the end, no valid key
        has_mass = has_keys & (p_sum > 0.0)
        safe_p = tl.where(has_mass, p_sum, 1.0)
        sigma = (w_sum + h_sum + r_sum) / safe_p
        near = has_mass & (tl.abs(sigma) < 0.5)  # False for NaN or an overflowed sigma
        sigma = tl.where(near, sigma, 0.0)
        lse_far = m + tl.log(tl.where(has_keys, s_sum, 1.0))
        # P log P from P - 1 = (p_hi - 1) + p_lo, exact for rows of probabilities:
        # for P = 1 + 1e-7 this term is 1e-7 and as large as a converged row's KL.
        p_excess = (p_hi - 1.0) + p_lo
        p_log_p = (1.0 + p_excess) * log1p(p_excess)
        # Far: sum xlogx(p) - p Z = -sum p y = -(W + c P), first order but nothing
        # cancels there.
        kl_row = tl.where(near, p_log_p + h_sum + r_sum + p_sum * log1p_minus_x(sigma),
                          p_sum * lse_far - (w_sum + center * p_sum))
        kl += tl.sum(tl.where(has_keys, kl_row, 0.0), axis=1)
        residual = tl.where(near, log1p(sigma), lse_far - tl.log(safe_p))
        stats_mask = ct_ok[:, None] & (rows < t_end)[None, :]
        dst = row_stats_ptr + (b * Ct + c[:, None]).to(tl.int64) * T + rows[None, :]
        tl.store(dst, tl.where(near, center, 0.0), mask=stats_mask)
        # A row without mass has q P = 0 everywhere: residual +inf says so.
        tl.store(dst + B * Ct * T, tl.where(has_mass, residual, float("inf")), mask=stats_mask)

    tl.store(part_ptr + b * part_stride_b + chunk * part_stride_chunk + c, kl, mask=ct_ok)
