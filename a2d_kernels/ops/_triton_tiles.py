"""Triton building blocks shared by the A2D forward and backward kernels.

Vocabulary (DESIGN.md): S student maps, A teacher maps, Z = weight @ S the mixed
student logits; Cs / Ct channel counts, padded to powers of two (CS_PAD / CT_PAD) so
a whole channel dimension sits in registers; T queries, K keys.

A *tile* is BLOCK_T query rows x BLOCK_K keys of one batch element, flattened into
BLOCK_T * BLOCK_K positions (row-major, so position i is row i // BLOCK_K, key
i % BLOCK_K). Channel tiles are (C_PAD, positions): every channel of every layer at
once, because each mixed channel needs all student channels.

Per-layer inputs are read in place. A group of layers arrives as tuples: ``ptrs``
(one tensor per layer, all of one dtype), ``strides`` (per layer its batch and head
strides) and ``starts`` (the first channel of each layer in the layer-major channel
order), plus the group's query and key strides, which all its layers share (the
host makes that so; contiguous layers always do, whatever their head counts). The
kernels resolve once per program where each channel's map starts; inside the tile
loop a channel tile is then one 64-bit pointer per channel plus one offset per
position shared by every channel, which keeps the per-thread register cost of the
addressing small even with 128 channels.
"""
import triton
import triton.language as tl


@triton.jit
def channel_rows(ptrs, strides, starts, b, C_PAD: tl.constexpr):
    """Per channel c < C_PAD: pointer to the start of map (b, c) in its own layer.

    Rows past the last channel point into the last layer; callers mask them out.
    Layers are in channel order, so each later layer overrides the rows from its
    start onwards.
    """
    c = tl.arange(0, C_PAD).to(tl.int64)
    b = b.to(tl.int64)
    row = ptrs[0] + b * strides[0][0] + c * strides[0][1]
    for layer in tl.static_range(1, len(ptrs)):
        row = tl.where(c >= starts[layer],
                       ptrs[layer] + b * strides[layer][0] + (c - starts[layer]) * strides[layer][1],
                       row)
    return row


@triton.jit
def position_offsets(t, x, pos_strides, OFFSETS_64: tl.constexpr):
    """Element offset of each tile position inside one map, shared by all channels
    of a group. int32 unless the host found a map too large for it."""
    # One return (a constexpr branch chooses the type): compiled Triton rejects
    # early returns of different types, which the interpreter would accept.
    if OFFSETS_64:
        offsets = t.to(tl.int64) * pos_strides[0] + x.to(tl.int64) * pos_strides[1]
    else:
        offsets = t * pos_strides[0] + x * pos_strides[1]
    return offsets


@triton.jit
def tile_positions(b, t0, k0, t_end, K,
                   kv_ptr, kv_stride_b, kv_stride_k, qv_ptr, qv_stride_b, qv_stride_t,
                   HAS_KEY_MASK: tl.constexpr, HAS_QUERY_MASK: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Query/key index of each position of the tile at (t0, k0), whether it lies
    inside the map (rows < t_end, keys < K), and whether it takes part in the loss
    (inside and not masked). Masks are uint8 views of the validity masks."""
    i = tl.arange(0, BLOCK_T * BLOCK_K)
    t = t0 + i // BLOCK_K
    x = k0 + i % BLOCK_K
    inside = (t < t_end) & (x < K)
    valid = inside
    if HAS_KEY_MASK:
        key_ok = tl.load(kv_ptr + b.to(tl.int64) * kv_stride_b + x.to(tl.int64) * kv_stride_k,
                         mask=inside, other=0)
        valid = valid & (key_ok != 0)
    if HAS_QUERY_MASK:
        query_ok = tl.load(qv_ptr + b.to(tl.int64) * qv_stride_b + t.to(tl.int64) * qv_stride_t,
                           mask=inside, other=0)
        valid = valid & (query_ok != 0)
    return t, x, inside, valid


@triton.jit
def load_tile(row, offsets, channel_ok, position_ok):
    """A (C_PAD, positions) channel tile in fp32 (whatever the input dtype); 0 where
    not loaded."""
    mask = channel_ok[:, None] & position_ok[None, :]
    return tl.load(row[:, None] + offsets[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_weight(w_ptr, w_stride_c, w_stride_k, Ct, Cs,
                CT_PAD: tl.constexpr, CS_PAD: tl.constexpr):
    """The (CT_PAD, CS_PAD) mixing matrix in fp32, zero in the padding."""
    c = tl.arange(0, CT_PAD)
    k = tl.arange(0, CS_PAD)
    mask = (c < Ct)[:, None] & (k < Cs)[None, :]
    w = tl.load(w_ptr + c[:, None] * w_stride_c + k[None, :] * w_stride_k, mask=mask, other=0.0)
    return w.to(tl.float32)


@triton.jit
def online_logsumexp(m, s, logits, valid, axis: tl.constexpr):
    """One step of a running log-sum-exp along ``axis``: returns the new running
    max, the new rescaled sum of exp(logit - max), the factor the old sum was
    rescaled by, and exp(logit - new max) (0 where not valid).

    Invalid entries are excluded entirely. An all-invalid prefix keeps m = -inf and
    s = 0; the rescale factor is then 1 rather than exp(-inf + inf) = NaN.
    """
    m_new = tl.maximum(m, tl.max(tl.where(valid, logits, float("-inf")), axis=axis))
    alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
    e = tl.where(valid, tl.exp(logits - tl.expand_dims(m_new, axis)), 0.0)
    return m_new, s * alpha + tl.sum(e, axis=axis), alpha, e


@triton.jit
def expm1(x):
    """exp(x) - 1 accurate to a few ulps also for small |x| (Triton has no expm1
    the interpreter can run). For |x| < 0.5: Taylor series to x^9 in Horner form
    (truncation < 1e-8 relative, FMAs only); elsewhere exp(x) - 1 loses nothing."""
    y = 1.0 + x * 0.1111111111111111
    y = 1.0 + x * 0.125 * y
    y = 1.0 + x * 0.14285714285714285 * y
    y = 1.0 + x * 0.16666666666666666 * y
    y = 1.0 + x * 0.2 * y
    y = 1.0 + x * 0.25 * y
    y = 1.0 + x * 0.3333333333333333 * y
    y = 1.0 + x * 0.5 * y
    return tl.where(tl.abs(x) < 0.5, x * y, tl.exp(x) - 1.0)


@triton.jit
def log1p(x):
    """log(1 + x) accurate for small |x| (Goldberg's trick: the rounding of 1 + x
    cancels in log(u) * x / (u - 1))."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / tl.where(u == 1.0, 1.0, u - 1.0))


@triton.jit
def expm1_minus_x(x):
    """exp(x) - 1 - x, accurate (relative) also for small |x|, where it is ~x^2/2.
    Taylor series to x^11 for |x| < 0.5; elsewhere the direct form loses at most a
    factor ~10 in relative accuracy."""
    y = 1.0 + x * 0.09090909090909091
    y = 1.0 + x * 0.1 * y
    y = 1.0 + x * 0.1111111111111111 * y
    y = 1.0 + x * 0.125 * y
    y = 1.0 + x * 0.14285714285714285 * y
    y = 1.0 + x * 0.16666666666666666 * y
    y = 1.0 + x * 0.2 * y
    y = 1.0 + x * 0.25 * y
    y = 1.0 + x * 0.3333333333333333 * y
    return tl.where(tl.abs(x) < 0.5, 0.5 * x * x * y, tl.exp(x) - 1.0 - x)


@triton.jit
def log1p_minus_x(s):
    """log(1 + s) - s for |s| < 1/2, accurate (relative) also where it is ~-s^2/2.
    With u = s / (2 + s): log1p(s) = 2 atanh(u), and 2u - s = -s^2 / (2 + s) has no
    cancellation; |u| <= 1/3, so the odd series in u converges fast (to u^17)."""
    u = s / (2.0 + s)
    u2 = u * u
    series = 1.0 / 17.0
    series = 1.0 / 15.0 + u2 * series
    series = 1.0 / 13.0 + u2 * series
    series = 1.0 / 11.0 + u2 * series
    series = 1.0 / 9.0 + u2 * series
    series = 1.0 / 7.0 + u2 * series
    series = 1.0 / 5.0 + u2 * series
    series = 1.0 / 3.0 + u2 * series
    return -s * s / (2.0 + s) + 2.0 * u * u2 * series
