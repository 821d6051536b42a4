// Per-tile arithmetic of the A2D loss, shared by the CUDA kernels and the host path.
//
// Everything here is __host__ __device__: the GPU kernels (a2d_kernels.cu) and the
// CPU emulation of those kernels (a2d_host.cpp) call the *same* functions, phase by
// phase, so the CPU tests in tests/test_cuda.py check the arithmetic the GPU runs
// (online log-sum-exp merges, the mixing order, masks, the partial-buffer reductions),
// not a second implementation of it.
//
// Work decomposition (one thread block = one batch element b and a range of "row sets"):
//   * a tile is G query rows x KC keys of every student channel (S) and teacher
//     channel (A), staged in shared memory as fp32 in the layout [g][channel][KCP];
//   * thread (c, g, h) (see Role) owns teacher channel c of row g, keys 4h.. in steps of
//     4H: it keeps row c of the mixing matrix in registers, mixes Z[c] for 4 keys at a
//     time (Cs FMAs per key, S read as float4 broadcasts) and folds them into its own
//     running statistics, so no cross-thread reduction happens inside the hot loop. H > 1
//     only when Ct * G alone would leave threads idle (many teacher channels, short T);
//   * "map" mode: per-thread statistics are merged over (g, h) in a fixed order at the end
//     of the block and written to a per-block partial buffer; a finish pass merges the
//     blocks in a fixed order. "row" mode: when a row's last key chunk is done, its H
//     partial statistics are merged in order and written per (b, c, t). No atomics:
//     results are bitwise reproducible.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define A2D_HD __host__ __device__ __forceinline__
#else
#define A2D_HD inline
#endif

#if defined(__CUDA_ARCH__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define A2D_UNROLL _Pragma("unroll")
#else
#define A2D_UNROLL
#endif

namespace a2d {

// ---------------------------------------------------------------------------------
// Codes shared with the Python wrapper (a2d_kernels/ops/cuda_a2d.py).
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
enum Mode : int { kMap = 0, kRow = 1 };

constexpr int kThreads = 256;          // threads per block of the main kernels
constexpr int kMaxStudent = 64;        // Cs limit (row of the mixing matrix in registers)
constexpr int kSmemFloats = 12 * 1024; // 48 KiB: no opt-in needed on any architecture
constexpr int kMapFields = 7;          // floats per MapStats in the partial buffers

// Logits are handled in base 2 inside the kernels: the mixing row is scaled
// by log2(e) once (so z2 = z * log2(e) costs nothing) and teacher logits are scaled on
// load, so every exponential is one exp2f (a single MUFU.EX2 on the GPU) instead of
// expf's extra range reduction. Statistics and saved log-sum-exps are in base-2 units;
// only the KL itself is converted back to nats.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Everything a launch needs, as plain integers and pointers (no libtorch types).
struct Args {
  int B, T, K, Cs, Ct;
  int mode;      // Mode
  int dtype;     // DType of the student maps and of dS
  int t_dtype;   // DType of the teacher maps
  int w_dtype;   // DType of weight and d_weight
  int b_dtype;   // DType of bias and d_bias
  // Per-channel table (ChannelTable), int64 rows of (address, stride_b, stride_t) in elements, the key
  // stride being 1: Cs student rows, then Ct teacher rows, then Cs dS rows (backward).
  const int64_t* table;
  const void* weight;             // (Ct, Cs) contiguous
  const void* bias;               // (Ct,) or null; never read (see load_params), d_bias's dtype is b_dtype
  const unsigned char* key_valid;   // (B, K) bool, true = takes part; or null
  const unsigned char* query_valid; // (B, T) bool; or null
  // forward outputs: kl (B, Ct) in nats; map: stat0 = base-2 log-sum-exps of Z and of A
  // over the map, stat1 = (shift, residual) with lseZ - lseA = shift + residual in nats
  // (see MapStats), each (B, Ct, 2); row: stat0 = base-2 log-sum-exp of the Z row,
  // stat1 = the teacher row's mass P over valid keys, (B, Ct, T).
  float* kl;
  float* stat0;
  float* stat1;
  float* work;                    // partial buffer, Plan::work_floats(...) floats
  // backward
  const float* grad_scale;        // 0-dim fp32, read on the device
  void* d_weight;                 // (Ct, Cs) in w_dtype
  void* d_bias;                   // (Ct,) in b_dtype, or null
  int need_ds;
};

// The per-channel table travels by value, as a kernel parameter (__grid_constant__, no
// copy to local memory): no host-to-device copy per call, nothing to keep alive, and a
// captured CUDA graph replays with the addresses it was captured with. 3 * 384 int64 =
// 9 KiB, above the classic 4 KiB parameter limit: needs CUDA >= 12.1 and sm_70+.
constexpr int kMaxTableRows = 2 * kMaxStudent + kThreads;
struct ChannelTable {
  int64_t v[3 * kMaxTableRows];
};

// Tile geometry and shared-memory layout (offsets in floats).
struct Plan {
  int G;              // query rows per tile
  int H;              // threads per (row, teacher channel), splitting the tile's keys
  int KC;             // keys per tile
  int KCP;            // padded row length: a multiple of 4 with KCP/4 odd (no bank conflicts)
  int n_sets;         // ceil(T / G) row sets per batch element
  int sets_per_block;
  int n_blocks;       // blocks per batch element
  int off_s, off_a, off_w, off_row_ok, off_key_ok, smem_floats;
  int region;         // floats at off_s usable for staging block reductions
  int dw_chunk;       // d_weight columns staged per round of the block reduction

  int64_t forward_work_floats(const Args& a) const {
    return a.mode == kMap ? int64_t(a.B) * n_blocks * a.Ct * kMapFields
                          : int64_t(a.B) * a.Ct * a.T;
  }
  int64_t backward_work_floats(const Args& a) const {
    return int64_t(a.B) * n_blocks * (int64_t(a.Ct) * a.Cs + a.Ct);
  }
};

// ---------------------------------------------------------------------------------
// Element conversions. On the device the hardware conversions are used; on the host
// the same IEEE round-to-nearest-even conversions written with bit operations (checked
// bit for bit against torch in tests/test_cuda.py).
A2D_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

A2D_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

inline float host_half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float f = float(mant) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
}

inline uint16_t host_float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);   // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to infinity
  if (a < 0x38800000u) {                                  // below 2^-14: subnormal half
    if (a < 0x33000000u) return uint16_t(sign);           // <= 2^-25 rounds to zero
    const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;                       // count of 2^-24 units
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return uint16_t(sign | q);
  }
  uint32_t h = (((a >> 23) - 112) << 10) | ((a >> 13) & 0x3ffu);
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // carry may bump the exponent
  return uint16_t(sign | h);
}

inline uint16_t host_float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

A2D_HD float load_elem(const void* p, int64_t i, int dtype) {
  if (dtype == kBF16) return bits_to_float(uint32_t(static_cast<const uint16_t*>(p)[i]) << 16);
  if (dtype == kF16) {
#if defined(__CUDA_ARCH__)
    return __half2float(static_cast<const __half*>(p)[i]);
#else
    return host_half_to_float(static_cast<const uint16_t*>(p)[i]);
#endif
  }
  return static_cast<const float*>(p)[i];
}

A2D_HD void store_elem(void* p, int64_t i, int dtype, float v) {
#if defined(__CUDA_ARCH__)
  if (dtype == kBF16) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  else if (dtype == kF16) static_cast<__half*>(p)[i] = __float2half_rn(v);
  else static_cast<float*>(p)[i] = v;
#else
  if (dtype == kBF16) static_cast<uint16_t*>(p)[i] = host_float_to_bf16(v);
  else if (dtype == kF16) static_cast<uint16_t*>(p)[i] = host_float_to_half(v);
  else static_cast<float*>(p)[i] = v;
#endif
}

struct alignas(16) F4 {
  float x, y, z, w;
};

A2D_HD F4 load4(const float* p) {  // p is 16-byte aligned by the layout
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const F4*>(p);
#else
  F4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
#endif
}

A2D_HD void store4(float* p, const float v[4]) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<F4*>(p) = F4{v[0], v[1], v[2], v[3]};
#else
  std::memcpy(p, v, 4 * sizeof(float));
#endif
}

// ---------------------------------------------------------------------------------
// Series for the near-distribution forms below (the same ones the Triton kernels use,
// a2d_kernels/ops/_triton_tiles.py): where the student map is close to the teacher's,
// the KL and dZ are second-order small differences of first-order terms, and the direct
// formulas lose most of their digits in fp32.

// exp(x) - 1 - x, accurate (relative) also for small |x| where it is ~x^2 / 2: Taylor
// series to x^11 for |x| < 1/2; elsewhere the direct form loses at most a factor ~10.
A2D_HD float expm1_minus_x(float x) {
  if (!(fabsf(x) < 0.5f)) return expm1f(x) - x;
  float y = fmaf(x, 0.09090909090909091f, 1.f);
  y = fmaf(x * 0.1f, y, 1.f);
  y = fmaf(x * 0.1111111111111111f, y, 1.f);
  y = fmaf(x * 0.125f, y, 1.f);
  y = fmaf(x * 0.14285714285714285f, y, 1.f);
  y = fmaf(x * 0.16666666666666666f, y, 1.f);
  y = fmaf(x * 0.2f, y, 1.f);
  y = fmaf(x * 0.25f, y, 1.f);
  y = fmaf(x * 0.3333333333333333f, y, 1.f);
  return 0.5f * x * x * y;
}

// log(1 + s) - s for |s| < 1/2, accurate also where it is ~-s^2 / 2. With u = s / (2 + s),
// log1p(s) = 2 atanh(u) and 2u - s = -s^2 / (2 + s) has no cancellation; |u| <= 1/3.
A2D_HD float log1p_minus_x(float s) {
  const float u = s / (2.f + s), u2 = u * u;
  float series = 1.f / 17.f;
  series = fmaf(u2, series, 1.f / 15.f);
  series = fmaf(u2, series, 1.f / 13.f);
  series = fmaf(u2, series, 1.f / 11.f);
  series = fmaf(u2, series, 1.f / 9.f);
  series = fmaf(u2, series, 1.f / 7.f);
  series = fmaf(u2, series, 1.f / 5.f);
  series = fmaf(u2, series, 1.f / 3.f);
  return -s * s / (2.f + s) + 2.f * u * u2 * series;
}

// ---------------------------------------------------------------------------------
// Running statistics.
//
// "map" mode, one (b, c) map. Logits arrive in base 2 (z2 = z log2 e, a2 = a log2 e);
// mz, ma are running maxima of z2, a2, sz = sum 2^(z2 - mz), sa = sum 2^(a2 - ma), and
// e = 2^(a2 - ma) is the unnormalized teacher probability p. With y = z - a (nats) and a
// center c (the e-weighted mean of y over the first group of entries a thread sees, so
// y - c is of the size of y's spread):
//   u = sum e (y - c),  h = sum e expm1_minus_x(y - c),
//   w = u / sa = E_p[y - c],  hh = h / sa,  s = w + hh = E_p[expm1(y - c)],
//   KL = -E_p[y] + log E_p[e^y] = hh + log1p_minus_x(s)            when |s| < 1/2,
// every term of which is of the size of the KL itself (near convergence the KL is
// second order in the spread of y while log-sum-exps differ at first order). Far from
// the teacher (|s| >= 1/2, or h overflowed) nothing cancels and the max-based form is
// used: KL = ln2 (mz - ma) + ln(sz / sa) - (c + w).
struct MapStats {
  float mz, sz, ma, sa, u, h, center;
};

A2D_HD MapStats map_empty() { return MapStats{-INFINITY, 0.f, -INFINITY, 0.f, 0.f, 0.f, 0.f}; }

// (u, h) of statistics about center c_own re-expressed about c, d = c_own - c: with
// x = y - c_own, y - c = x + d and expm1_minus_x(x + d) = e^d expm1_minus_x(x) +
// expm1(d) x + expm1_minus_x(d), summed with weights e (total sa). Exact algebra, but
// its terms grow like e^|d| while their sum does not: for |d| >= 1 nat h becomes NaN,
// which sends the map to the max-based form (centers that far apart mean y spreads
// over nats, where the KL is not small and that form loses nothing).
A2D_HD void map_shift_center(float& u, float& h, float sa, float d) {
  const float u0 = u;
  u = fmaf(d, sa, u0);
  h = fabsf(d) < 1.f ? expf(d) * h + expm1f(d) * u0 + expm1_minus_x(d) * sa : NAN;
}

// Merge two partial statistics; the result keeps x's center (callers always merge in a
// fixed order, so results are reproducible bit for bit).
A2D_HD MapStats map_merge(const MapStats& x, const MapStats& y) {
  if (x.sa == 0.f) return y;  // sa >= 1 as soon as one entry was seen
  if (y.sa == 0.f) return x;
  MapStats r;
  r.mz = fmaxf(x.mz, y.mz);
  r.ma = fmaxf(x.ma, y.ma);
  r.sz = x.sz * exp2f(x.mz - r.mz) + y.sz * exp2f(y.mz - r.mz);
  const float fx = exp2f(x.ma - r.ma), fy = exp2f(y.ma - r.ma);
  r.sa = x.sa * fx + y.sa * fy;
  r.center = x.center;
  float uy = y.u * fy, hy = y.h * fy;
  map_shift_center(uy, hy, y.sa * fy, y.center - x.center);
  r.u = fmaf(x.u, fx, uy);
  r.h = fmaf(x.h, fx, hy);
  return r;
}

// Fold up to 4 entries (those with ok[j]) into s: one rescale per group of 4.
A2D_HD void map_add4(MapStats& s, const float z[4], const float a[4], const bool ok[4]) {
  float zmax = -INFINITY, amax = -INFINITY;
  A2D_UNROLL
  for (int j = 0; j < 4; ++j) {
    if (ok[j]) {
      zmax = fmaxf(zmax, z[j]);
      amax = fmaxf(amax, a[j]);
    }
  }
  if (!(ok[0] || ok[1] || ok[2] || ok[3])) return;
  const float mz = fmaxf(s.mz, zmax), ma = fmaxf(s.ma, amax);
  const float rz = exp2f(s.mz - mz), ra = exp2f(s.ma - ma);  // 0 for an empty s
  float e[4], y[4];
  A2D_UNROLL
  for (int j = 0; j < 4; ++j) {
    e[j] = ok[j] ? exp2f(a[j] - ma) : 0.f;
    y[j] = ok[j] ? (z[j] - a[j]) * kLn2 : 0.f;
  }
  float center = s.center;
  if (s.sa == 0.f)  // the first entries this thread sees set its center
    center = (e[0] * y[0] + e[1] * y[1] + e[2] * y[2] + e[3] * y[3]) / (e[0] + e[1] + e[2] + e[3]);
  float sz = s.sz * rz, sa = s.sa * ra, u = s.u * ra, h = s.h * ra;
  A2D_UNROLL
  for (int j = 0; j < 4; ++j) {
    if (ok[j]) {
      const float d = y[j] - center;
      sz += exp2f(z[j] - mz);
      sa += e[j];
      u = fmaf(e[j], d, u);
      // Far from the teacher this may overflow (inf * 0 = NaN where e underflows);
      // map_result then takes the max-based form.
      h = fmaf(e[j], expm1_minus_x(d), h);
    }
  }
  s = MapStats{mz, sz, ma, sa, u, h, center};
}

// The KL of finished statistics, and what backward needs: base-2 log-sum-exps of Z and
// A, and lseZ - lseA (nats) split as shift + residual so that backward forms
// (y - shift) - residual without rounding a large shift into a small log ratio.
struct MapResult {
  float kl, lse_z, lse_a, shift, residual;
};

A2D_HD MapResult map_result(const MapStats& s) {
  if (s.sa == 0.f) return MapResult{0.f, 0.f, 0.f, 0.f, 0.f};  // fully masked: no loss, no gradient
  const float w = s.u / s.sa, hh = s.h / s.sa, sum = w + hh;
  const float lse_z = s.mz + log2f(s.sz), lse_a = s.ma + log2f(s.sa);
  if (fabsf(sum) < 0.5f)
    return MapResult{hh + log1p_minus_x(sum), lse_z, lse_a, s.center, log1pf(sum)};
  // log(sz / sa), not log(sz) - log(sa): both logs are ~log(T*K) and would cancel.
  const float delta = fmaf(kLn2, s.mz - s.ma, logf(s.sz / s.sa));
  return MapResult{delta - (s.center + w), lse_z, lse_a, 0.f, delta};
}

// "row" mode, one (b, c, t) row over its valid keys, teacher row a used as given
// probabilities, student logits in base 2 (z2): m, s = running max / sum 2^(z2 - m);
// pa = sum a; palogp = sum a ln a (0 ln 0 = 0); pz = sum a * (z2 - m). Then
//   KL = palogp - sum a * (z - lse) = palogp - ln2 * pz + ln(s) * pa.
struct RowStats {
  float m, s, pa, palogp, pz;
};

A2D_HD RowStats row_empty() { return RowStats{-INFINITY, 0.f, 0.f, 0.f, 0.f}; }

A2D_HD float xlogx(float a) { return a == 0.f ? 0.f : a * logf(a); }

A2D_HD void row_add4(RowStats& r, const float z[4], const float a[4], const bool ok[4]) {
  float zmax = -INFINITY;
  A2D_UNROLL
  for (int j = 0; j < 4; ++j)
    if (ok[j]) zmax = fmaxf(zmax, z[j]);
  if (!(ok[0] || ok[1] || ok[2] || ok[3])) return;
  const float m = fmaxf(r.m, zmax);
  float s = r.s * exp2f(r.m - m);
  float pz = r.pa == 0.f ? r.pz : r.pz - (m - r.m) * r.pa;  // re-base on the new max
  float pa = r.pa, palogp = r.palogp;
  A2D_UNROLL
  for (int j = 0; j < 4; ++j) {
    if (ok[j]) {
      s += exp2f(z[j] - m);
      pa += a[j];
      palogp += xlogx(a[j]);
      pz += a[j] * (z[j] - m);
    }
  }
  r = RowStats{m, s, pa, palogp, pz};
}

A2D_HD float row_kl(const RowStats& r) {
  return r.s == 0.f ? 0.f : r.palogp - kLn2 * r.pz + logf(r.s) * r.pa;
}
A2D_HD float row_lse(const RowStats& r) { return r.s == 0.f ? 0.f : r.m + log2f(r.s); }  // base 2

A2D_HD RowStats row_merge(const RowStats& x, const RowStats& y) {
  if (x.s == 0.f) return y;  // s >= 1 as soon as one entry was seen
  if (y.s == 0.f) return x;
  const float m = fmaxf(x.m, y.m);
  return RowStats{m, x.s * exp2f(x.m - m) + y.s * exp2f(y.m - m), x.pa + y.pa, x.palogp + y.palogp,
                  (x.pz - (m - x.m) * x.pa) + (y.pz - (m - y.m) * y.pa)};
}

// ---------------------------------------------------------------------------------
// Which (teacher channel c, tile row g, key group h) a thread of the block owns; slot =
// h * G + g numbers the threads of one channel (the order block reductions merge in).
struct Role {
  int c, g, h, slot;
  bool active;
};

A2D_HD Role role_of(const Args& a, const Plan& p, int tid) {
  Role r;
  r.c = tid % a.Ct;
  const int rest = tid / a.Ct;
  r.g = rest % p.G;
  r.h = rest / p.G;
  r.slot = rest;
  r.active = r.h < p.H;
  return r;
}

// ---------------------------------------------------------------------------------
// Tile phases. Cooperative phases take (tid, nthreads) and stride over their work; the
// kernels call them with (threadIdx.x, blockDim.x), the host emulation with (0, 1).

A2D_HD const void* table_ptr(const Args& a, int row) {
  return reinterpret_cast<const void*>(static_cast<uintptr_t>(a.table[3 * row]));
}

// Mixing matrix into shared memory as fp32. The bias is never read: both softmaxes
// ignore a per-channel shift of Z (over the whole map, or over each row), so it cancels
// from the loss and from dZ exactly, and leaving it out keeps the logits, and their
// rounding, small (as the Triton kernels do).
A2D_HD void load_params(const Args& a, const Plan& p, float* sm, int tid, int nth) {
  for (int i = tid; i < a.Ct * a.Cs; i += nth) sm[p.off_w + i] = load_elem(a.weight, i, a.w_dtype);
}

// Stage rows t0..t0+G-1, keys k0..k0+KC-1 of every student and teacher channel (fp32),
// zero outside the problem and at masked entries, plus the row / key validity flags
// (1 = takes part). Masked entries are never read: they may hold anything (a model's
// fully padded softmax row is NaN), and a NaN staged there would reach dweight through
// 0 * NaN even though every masked term is excluded.
// Whether query row t / key k0 + i of the tile (i < kc_len) takes part in the loss.
A2D_HD bool row_takes_part(const Args& a, int b, int t) {
  return t < a.T && (!a.query_valid || a.query_valid[int64_t(b) * a.T + t]);
}

A2D_HD bool key_takes_part(const Args& a, int b, int k0, int i, int kc_len) {
  return i < kc_len && (!a.key_valid || a.key_valid[int64_t(b) * a.K + k0 + i]);
}

A2D_HD void load_tile(const Args& a, const Plan& p, float* sm, int b, int t0, int k0, int tid,
                      int nth) {
  const int kc_len = a.K - k0 < p.KC ? a.K - k0 : p.KC;
  for (int i = tid; i < p.G; i += nth) sm[p.off_row_ok + i] = row_takes_part(a, b, t0 + i) ? 1.f : 0.f;
  for (int i = tid; i < p.KCP; i += nth) sm[p.off_key_ok + i] = key_takes_part(a, b, k0, i, kc_len) ? 1.f : 0.f;
  // Lanes walk the keys of one (row, channel) line so global reads are coalesced; each
  // thread issues kLoadBatch independent loads before storing any, so enough bytes are
  // in flight to cover memory latency (a load-store-load chain would not be).
  constexpr int kLoadBatch = 6;  // 8 spills a little in backward (ptxas -v, sm_90)
  const int lanes = nth >= 32 ? 32 : 1;
  const int step = nth / lanes;
  const int n_lines = p.G * (a.Cs + a.Ct);
  for (int kk = tid % lanes; kk < p.KCP; kk += lanes) {
    const bool key_in = key_takes_part(a, b, k0, kk, kc_len);
    for (int first = tid / lanes; first < n_lines; first += kLoadBatch * step) {
      float v[kLoadBatch];
      A2D_UNROLL
      for (int j = 0; j < kLoadBatch; ++j) {
        const int line = first + j * step;
        const int ch = line / p.G, t = t0 + (line - ch * p.G);
        v[j] = 0.f;
        if (line < n_lines && key_in && row_takes_part(a, b, t)) {
          // table rows: students first, then teachers (same order as the channels)
          const int64_t off = int64_t(b) * a.table[3 * ch + 1] + int64_t(t) * a.table[3 * ch + 2] + k0 + kk;
          v[j] = load_elem(table_ptr(a, ch), off, ch < a.Cs ? a.dtype : a.t_dtype);
        }
      }
      A2D_UNROLL
      for (int j = 0; j < kLoadBatch; ++j) {
        const int line = first + j * step;
        if (line < n_lines) {
          const int ch = line / p.G, g = line - ch * p.G;
          float* dst = ch < a.Cs ? sm + p.off_s + (g * a.Cs + ch) * p.KCP
                                 : sm + p.off_a + (g * a.Ct + (ch - a.Cs)) * p.KCP;
          dst[kk] = v[j];
        }
      }
    }
  }
}

// Row c of the mixing matrix into registers, times log2(e) (zero past Cs): mixing with
// it gives z2 = z * log2(e) directly.
template <int CS_MAX>
A2D_HD void thread_weights(const Args& a, const Plan& p, const float* sm, int c, float (&w)[CS_MAX]) {
  A2D_UNROLL
  for (int k = 0; k < CS_MAX; ++k) w[k] = k < a.Cs ? sm[p.off_w + c * a.Cs + k] * kLog2e : 0.f;
}

// z[j] = sum_k w[k] * S[k, kk + j], j < 4 (the bias left out, see load_params),
// accumulated in k order with fmaf (the same order and rounding on host and device).
template <int CS_MAX>
A2D_HD void mix4(const float (&w)[CS_MAX], const float* s_rows, int Cs, int KCP, int kk, float z[4]) {
  z[0] = z[1] = z[2] = z[3] = 0.f;
  A2D_UNROLL
  for (int k = 0; k < CS_MAX; ++k) {
    if (k < Cs) {
      const F4 s = load4(s_rows + k * KCP + kk);
      z[0] = fmaf(w[k], s.x, z[0]);
      z[1] = fmaf(w[k], s.y, z[1]);
      z[2] = fmaf(w[k], s.z, z[2]);
      z[3] = fmaf(w[k], s.w, z[3]);
    }
  }
}

// Forward, thread (c, g): fold this tile's entries of row g, channel c into the stats.
// Map mode folds the tile into its own statistics first and merges them into the
// thread's once: a two-level sum, so the fp32 error of the running sums grows with the
// entries per tile plus the tiles per thread, not with their product (a thread of a
// long map on a GPU with few SMs sees ~10^4 entries).
template <int CS_MAX>
A2D_HD void forward_thread(const Args& a, const Plan& p, const float* sm, const Role& role,
                           const float (&w)[CS_MAX], int kc_len, MapStats& ms, RowStats& rs) {
  const int c = role.c, g = role.g;
  if (sm[p.off_row_ok + g] == 0.f) return;
  const float* s_rows = sm + p.off_s + g * a.Cs * p.KCP;
  const float* a_row = sm + p.off_a + (g * a.Ct + c) * p.KCP;
  const float* key_ok = sm + p.off_key_ok;
  // map: the teacher values are logits too, so they go to base 2; row: probabilities.
  const float a_scale = a.mode == kMap ? kLog2e : 1.f;
  MapStats tile = map_empty();
  for (int kk = 4 * role.h; kk < kc_len; kk += 4 * p.H) {
    float z[4];
    mix4<CS_MAX>(w, s_rows, a.Cs, p.KCP, kk, z);
    const F4 a4 = load4(a_row + kk);
    const float av[4] = {a4.x * a_scale, a4.y * a_scale, a4.z * a_scale, a4.w * a_scale};
    const F4 k4 = load4(key_ok + kk);
    const bool ok[4] = {k4.x != 0.f, k4.y != 0.f, k4.z != 0.f, k4.w != 0.f};
    if (a.mode == kMap) map_add4(tile, z, av, ok);
    else row_add4(rs, z, av, ok);
  }
  if (a.mode == kMap) ms = map_merge(ms, tile);
}

// Row mode, after the last key chunk of row t: the row's lse, teacher mass and KL.
A2D_HD void forward_row_done(const Args& a, int b, int c, int t, const RowStats& rs) {
  if (t >= a.T) return;
  const int64_t i = (int64_t(b) * a.Ct + c) * a.T + t;
  a.stat0[i] = row_lse(rs);
  a.stat1[i] = rs.pa;
  a.work[i] = row_kl(rs);
}

A2D_HD MapStats map_read(const float* src) {
  return MapStats{src[0], src[1], src[2], src[3], src[4], src[5], src[6]};
}

A2D_HD void map_write(float* dst, const MapStats& s) {
  dst[0] = s.mz; dst[1] = s.sz; dst[2] = s.ma; dst[3] = s.sa; dst[4] = s.u; dst[5] = s.h; dst[6] = s.center;
}

// Staging slot of a thread's kMapFields-float statistics in the shared-memory region.
A2D_HD float* stash_slot(const Args& a, const Plan& p, float* sm, int c, int slot) {
  return sm + p.off_s + (slot * a.Ct + c) * kMapFields;
}

// Row mode, after the last key chunk of a row set: each thread parks its row partial ...
A2D_HD void row_stash(const Args& a, const Plan& p, float* sm, const Role& role, const RowStats& rs) {
  float* dst = stash_slot(a, p, sm, role.c, role.slot);
  dst[0] = rs.m; dst[1] = rs.s; dst[2] = rs.pa; dst[3] = rs.palogp; dst[4] = rs.pz;
}

// ... and one thread per (c, g) merges h = 0..H-1 in order and writes the row's results.
A2D_HD void row_set_done(const Args& a, const Plan& p, float* sm, int b, int t0, int tid, int nth) {
  for (int i = tid; i < a.Ct * p.G; i += nth) {
    const int c = i % a.Ct, g = i / a.Ct;
    RowStats acc = row_empty();
    for (int h = 0; h < p.H; ++h) {
      const float* src = stash_slot(a, p, sm, c, h * p.G + g);
      acc = row_merge(acc, RowStats{src[0], src[1], src[2], src[3], src[4]});
    }
    forward_row_done(a, b, c, t0 + g, acc);
  }
}

// Map mode, end of block: every thread parks its stats ...
A2D_HD void map_stash(const Args& a, const Plan& p, float* sm, const Role& role, const MapStats& ms) {
  map_write(stash_slot(a, p, sm, role.c, role.slot), ms);
}

// ... and thread c (< Ct) merges the G * H slots in order into the block's partial.
A2D_HD void map_block_reduce(const Args& a, const Plan& p, float* sm, int b, int blk, int tid, int nth) {
  for (int c = tid; c < a.Ct; c += nth) {
    MapStats acc = map_empty();
    for (int slot = 0; slot < p.G * p.H; ++slot) acc = map_merge(acc, map_read(stash_slot(a, p, sm, c, slot)));
    map_write(a.work + ((int64_t(b) * p.n_blocks + blk) * a.Ct + c) * kMapFields, acc);
  }
}

// Finish passes, one "thread" per (b, c): blocks merged / rows summed in a fixed order.
A2D_HD void map_finish(const Args& a, const Plan& p, int i) {
  const int b = i / a.Ct, c = i - b * a.Ct;
  MapStats acc = map_empty();
  for (int blk = 0; blk < p.n_blocks; ++blk)
    acc = map_merge(acc, map_read(a.work + ((int64_t(b) * p.n_blocks + blk) * a.Ct + c) * kMapFields));
  const MapResult r = map_result(acc);
  a.kl[i] = r.kl;
  a.stat0[2 * int64_t(i)] = r.lse_z;
  a.stat0[2 * int64_t(i) + 1] = r.lse_a;
  a.stat1[2 * int64_t(i)] = r.shift;
  a.stat1[2 * int64_t(i) + 1] = r.residual;
}

A2D_HD void row_finish(const Args& a, int i) {
  const float* rows = a.work + int64_t(i) * a.T;
  float sum = 0.f;
  for (int t = 0; t < a.T; ++t) sum += rows[t];
  a.kl[i] = sum;
}

// What backward reads per map (map mode: lse_z, lse_a, shift, residual of MapResult) or
// per row (row mode: s0 = the row's base-2 lse of Z, s1 = its teacher mass P).
struct SavedStats {
  float s0, s1, s2, s3;
};

A2D_HD SavedStats saved_map(const Args& a, int b, int c) {
  const int64_t i = 2 * (int64_t(b) * a.Ct + c);
  return SavedStats{a.stat0[i], a.stat0[i + 1], a.stat1[i], a.stat1[i + 1]};
}

A2D_HD SavedStats saved_row(const Args& a, int b, int c, int t) {
  const int64_t i = (int64_t(b) * a.Ct + c) * a.T + t;
  return SavedStats{a.stat0[i], a.stat1[i], 0.f, 0.f};
}

// Backward, thread (c, g): dZ for this tile's entries of row g, channel c, written over
// the teacher tile (only this thread reads that line), and folded into d_weight / d_bias.
//   map: dZ = g * (q - p), q = 2^(z2 - lseZ2), p = 2^(a2 - lseA2); near the teacher
//        (|log(q / p)| < 1/2, where q - p would cancel) as g * p * expm1(log(q / p)),
//        log(q / p) = (y - shift) - residual;
//   row: dZ = g * (q * P - a) = g * (2^(z2 - lse2) * P - a);
// zero where the entry does not take part.
template <int CS_MAX>
A2D_HD void backward_thread(const Args& a, const Plan& p, float* sm, const Role& role, const float (&w)[CS_MAX],
                            int kc_len, float gscale, const SavedStats& st, float (&dw)[CS_MAX], float& db) {
  const int c = role.c, g = role.g;
  const float* s_rows = sm + p.off_s + g * a.Cs * p.KCP;
  float* a_row = sm + p.off_a + (g * a.Ct + c) * p.KCP;
  const float* key_ok = sm + p.off_key_ok;
  const bool row_ok = sm[p.off_row_ok + g] != 0.f;
  for (int kk = 4 * role.h; kk < kc_len; kk += 4 * p.H) {
    float dz[4] = {0.f, 0.f, 0.f, 0.f};
    if (row_ok) {
      float z[4];
      mix4<CS_MAX>(w, s_rows, a.Cs, p.KCP, kk, z);
      const F4 a4 = load4(a_row + kk), k4 = load4(key_ok + kk);
      const float av[4] = {a4.x, a4.y, a4.z, a4.w}, ok[4] = {k4.x, k4.y, k4.z, k4.w};
      A2D_UNROLL
      for (int j = 0; j < 4; ++j) {
        if (ok[j] == 0.f) continue;
        if (a.mode == kMap) {
          const float a2 = av[j] * kLog2e;  // as forward_thread scales it
          const float pj = exp2f(a2 - st.s1);
          const float log_ratio = ((z[j] - a2) * kLn2 - st.s2) - st.s3;
          dz[j] = gscale * (fabsf(log_ratio) < 0.5f ? pj * expm1f(log_ratio) : exp2f(z[j] - st.s0) - pj);
        } else {
          dz[j] = gscale * (exp2f(z[j] - st.s0) * st.s1 - av[j]);
        }
      }
    }
    store4(a_row + kk, dz);
    db += (dz[0] + dz[1]) + (dz[2] + dz[3]);
    A2D_UNROLL
    for (int k = 0; k < CS_MAX; ++k) {
      if (k < a.Cs) {
        const F4 s = load4(s_rows + k * p.KCP + kk);
        dw[k] = fmaf(dz[0], s.x, fmaf(dz[1], s.y, fmaf(dz[2], s.z, fmaf(dz[3], s.w, dw[k]))));
      }
    }
  }
}

// Backward: dS[k, kk] = sum_c W[c, k] * dZ[c, kk] for every (k, g) line of the tile,
// written over the student tile (whose values were consumed by backward_thread). One
// work item is 4 keys of one line, so every thread of the block has work.
A2D_HD void backward_ds(const Args& a, const Plan& p, float* sm, int kc_len, int tid, int nth) {
  const float* W = sm + p.off_w;
  const int quads = (kc_len + 3) / 4;
  for (int item = tid; item < a.Cs * p.G * quads; item += nth) {
    const int line = item / quads, kk = 4 * (item - line * quads);
    const int g = line / a.Cs, k = line - g * a.Cs;
    const float* dz_rows = sm + p.off_a + g * a.Ct * p.KCP;
    float ds[4] = {0.f, 0.f, 0.f, 0.f};
    for (int c = 0; c < a.Ct; ++c) {
      const float wck = W[c * a.Cs + k];
      const F4 d = load4(dz_rows + c * p.KCP + kk);
      ds[0] = fmaf(wck, d.x, ds[0]);
      ds[1] = fmaf(wck, d.y, ds[1]);
      ds[2] = fmaf(wck, d.z, ds[2]);
      ds[3] = fmaf(wck, d.w, ds[3]);
    }
    store4(sm + p.off_s + (g * a.Cs + k) * p.KCP + kk, ds);
  }
}

// Backward: the dS tile to global memory in the maps' dtype (rows past T skipped).
A2D_HD void store_ds(const Args& a, const Plan& p, const float* sm, int b, int t0, int k0, int tid, int nth) {
  const int kc_len = a.K - k0 < p.KC ? a.K - k0 : p.KC;
  const int lanes = nth >= 32 ? 32 : 1;
  for (int line = tid / lanes; line < p.G * a.Cs; line += nth / lanes) {
    const int k = line / p.G, g = line - k * p.G;
    const int t = t0 + g;
    if (t >= a.T) continue;
    const int row = a.Cs + a.Ct + k;  // dS rows of the table
    void* base = const_cast<void*>(table_ptr(a, row));
    const int64_t off = int64_t(b) * a.table[3 * row + 1] + int64_t(t) * a.table[3 * row + 2] + k0;
    const float* src = sm + p.off_s + (g * a.Cs + k) * p.KCP;
    for (int kk = tid % lanes; kk < kc_len; kk += lanes) store_elem(base, off + kk, a.dtype, src[kk]);
  }
}

// Backward, end of block: d_weight / d_bias of the block, summed over the slots in order.
// Round r stages columns [k0, k0 + dw_chunk) of every thread's accumulators ...
template <int CS_MAX>
A2D_HD void dw_stash(const Args& a, const Plan& p, float* sm, const Role& role, int k0, const float (&dw)[CS_MAX]) {
  float* dst = sm + p.off_s + (role.slot * a.Ct + role.c) * p.dw_chunk;
  A2D_UNROLL
  for (int k = 0; k < CS_MAX; ++k)
    if (k >= k0 && k < k0 + p.dw_chunk && k < a.Cs) dst[k - k0] = dw[k];
}

// ... and the block sums them over the slots into its partial row.
A2D_HD void dw_block_reduce(const Args& a, const Plan& p, const float* sm, int b, int blk, int k0, int tid,
                            int nth) {
  const int width = a.Cs - k0 < p.dw_chunk ? a.Cs - k0 : p.dw_chunk;
  float* part = a.work + (int64_t(b) * p.n_blocks + blk) * (int64_t(a.Ct) * a.Cs + a.Ct);
  for (int o = tid; o < a.Ct * width; o += nth) {
    const int c = o / width, j = o - c * width;
    float sum = 0.f;
    for (int slot = 0; slot < p.G * p.H; ++slot) sum += sm[p.off_s + (slot * a.Ct + c) * p.dw_chunk + j];
    part[c * a.Cs + k0 + j] = sum;
  }
}

A2D_HD void db_stash(const Args& a, const Plan& p, float* sm, const Role& role, float db) {
  sm[p.off_s + role.slot * a.Ct + role.c] = db;
}

A2D_HD void db_block_reduce(const Args& a, const Plan& p, const float* sm, int b, int blk, int tid, int nth) {
  float* part = a.work + (int64_t(b) * p.n_blocks + blk) * (int64_t(a.Ct) * a.Cs + a.Ct) + int64_t(a.Ct) * a.Cs;
  for (int c = tid; c < a.Ct; c += nth) {
    float sum = 0.f;
    for (int slot = 0; slot < p.G * p.H; ++slot) sum += sm[p.off_s + slot * a.Ct + c];
    part[c] = sum;
  }
}

// Finish: output o of (d_weight flattened, then d_bias) = sum of the block partials in order.
A2D_HD void backward_finish(const Args& a, const Plan& p, int o) {
  const int64_t width = int64_t(a.Ct) * a.Cs + a.Ct;
  const int64_t n_parts = int64_t(a.B) * p.n_blocks;
  float sum = 0.f;
  for (int64_t q = 0; q < n_parts; ++q) sum += a.work[q * width + o];
  if (o < a.Ct * a.Cs) store_elem(a.d_weight, o, a.w_dtype, sum);
  else if (a.d_bias) store_elem(a.d_bias, o - a.Ct * a.Cs, a.b_dtype, sum);
}

}  // namespace a2d
