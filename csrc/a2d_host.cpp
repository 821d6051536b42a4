// CPU emulation of the kernels in a2d_kernels.cu, compiled by the host compiler.
//
// Each function mirrors its kernel line for line: the same phases from a2d_tile.cuh in
// the same order, with "a barrier" meaning "every thread has finished the previous
// phase". Cooperative phases run as one thread (tid 0 of 1); per-thread phases run for
// each thread id of the block in turn, with that thread's registers (weights, running
// statistics, d_weight accumulators) kept in arrays. So the CPU tests check exactly the
// arithmetic, the tile schedule and the reduction order of the GPU path; what they do
// not check is the GPU-specific part (launch configuration, barriers, shared memory,
// device math library).
#include <algorithm>
#include <vector>

#include "a2d_api.h"

namespace a2d {
namespace {

// Shared memory of one block, 16-byte aligned like the kernels' float4 declaration.
struct Smem {
  explicit Smem(const Plan& p) : storage((p.smem_floats + 3) / 4) {}
  float* data() { return reinterpret_cast<float*>(storage.data()); }
  std::vector<F4> storage;
};

template <int CS_MAX>
void forward_impl(const Args& a, const Plan& p) {
  Smem smem(p);
  float* sm = smem.data();
  const int active_threads = p.G * p.H * a.Ct;  // threads with a Role; the rest only load
  std::vector<MapStats> ms(active_threads);
  std::vector<RowStats> rs(active_threads);
  for (int b = 0; b < a.B; ++b) {
    for (int blk = 0; blk < p.n_blocks; ++blk) {
      load_params(a, p, sm, 0, 1);
      std::fill(ms.begin(), ms.end(), map_empty());
      const int set_end = std::min(p.n_sets, (blk + 1) * p.sets_per_block);
      for (int set = blk * p.sets_per_block; set < set_end; ++set) {
        const int t0 = set * p.G;
        std::fill(rs.begin(), rs.end(), row_empty());
        for (int k0 = 0; k0 < a.K; k0 += p.KC) {
          load_tile(a, p, sm, b, t0, k0, 0, 1);
          for (int tid = 0; tid < active_threads; ++tid) {
            const Role role = role_of(a, p, tid);
            float w[CS_MAX];
            thread_weights<CS_MAX>(a, p, sm, role.c, w);
            forward_thread<CS_MAX>(a, p, sm, role, w, std::min(p.KC, a.K - k0), ms[tid], rs[tid]);
          }
        }
        if (a.mode == kRow) {
          for (int tid = 0; tid < active_threads; ++tid) row_stash(a, p, sm, role_of(a, p, tid), rs[tid]);
          row_set_done(a, p, sm, b, t0, 0, 1);
        }
      }
      if (a.mode == kMap) {
        for (int tid = 0; tid < active_threads; ++tid) map_stash(a, p, sm, role_of(a, p, tid), ms[tid]);
        map_block_reduce(a, p, sm, b, blk, 0, 1);
      }
    }
  }
  for (int i = 0; i < a.B * a.Ct; ++i) {
    if (a.mode == kMap) map_finish(a, p, i);
    else row_finish(a, i);
  }
}

template <int CS_MAX>
struct Accumulators {
  float dw[CS_MAX];
  float db;
};

template <int CS_MAX>
void backward_impl(const Args& a, const Plan& p) {
  Smem smem(p);
  float* sm = smem.data();
  const int active_threads = p.G * p.H * a.Ct;
  const float gscale = *a.grad_scale;
  std::vector<Accumulators<CS_MAX>> acc(active_threads);
  std::vector<SavedStats> st(active_threads);
  for (int b = 0; b < a.B; ++b) {
    for (int blk = 0; blk < p.n_blocks; ++blk) {
      load_params(a, p, sm, 0, 1);
      for (int tid = 0; tid < active_threads; ++tid) {
        std::fill(acc[tid].dw, acc[tid].dw + CS_MAX, 0.f);
        acc[tid].db = 0.f;
        st[tid] = a.mode == kMap ? saved_map(a, b, tid % a.Ct) : SavedStats{0.f, 0.f, 0.f, 0.f};
      }
      const int set_end = std::min(p.n_sets, (blk + 1) * p.sets_per_block);
      for (int set = blk * p.sets_per_block; set < set_end; ++set) {
        const int t0 = set * p.G;
        for (int tid = 0; tid < active_threads; ++tid) {
          const Role role = role_of(a, p, tid);
          const int c = role.c, g = role.g;
          if (a.mode == kRow && t0 + g < a.T) st[tid] = saved_row(a, b, c, t0 + g);
        }
        for (int k0 = 0; k0 < a.K; k0 += p.KC) {
          const int kc_len = std::min(p.KC, a.K - k0);
          load_tile(a, p, sm, b, t0, k0, 0, 1);
          for (int tid = 0; tid < active_threads; ++tid) {
            const Role role = role_of(a, p, tid);
            float w[CS_MAX];
            thread_weights<CS_MAX>(a, p, sm, role.c, w);
            backward_thread<CS_MAX>(a, p, sm, role, w, kc_len, gscale, st[tid], acc[tid].dw,
                                    acc[tid].db);
          }
          if (a.need_ds) {
            backward_ds(a, p, sm, kc_len, 0, 1);
            store_ds(a, p, sm, b, t0, k0, 0, 1);
          }
        }
      }
      for (int k0 = 0; k0 < a.Cs; k0 += p.dw_chunk) {
        for (int tid = 0; tid < active_threads; ++tid) dw_stash<CS_MAX>(a, p, sm, role_of(a, p, tid), k0, acc[tid].dw);
        dw_block_reduce(a, p, sm, b, blk, k0, 0, 1);
      }
      for (int tid = 0; tid < active_threads; ++tid) db_stash(a, p, sm, role_of(a, p, tid), acc[tid].db);
      db_block_reduce(a, p, sm, b, blk, 0, 1);
    }
  }
  for (int o = 0; o < a.Ct * a.Cs + a.Ct; ++o) backward_finish(a, p, o);
}

}  // namespace

// The same Cs -> register-array size dispatch as the kernels, so the host runs the same
// instantiation (the guards make the arithmetic identical either way).
void host_forward(const Args& a, const Plan& p) {
  if (a.Cs <= 16) forward_impl<16>(a, p);
  else if (a.Cs <= 32) forward_impl<32>(a, p);
  else forward_impl<64>(a, p);
}

void host_backward(const Args& a, const Plan& p) {
  if (a.Cs <= 16) backward_impl<16>(a, p);
  else if (a.Cs <= 32) backward_impl<32>(a, p);
  else backward_impl<64>(a, p);
}

}  // namespace a2d
