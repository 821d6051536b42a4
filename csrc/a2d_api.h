// Host-side interface of the extension: tile planning and the entry points the
// bindings call. Compiled by both nvcc (a2d_kernels.cu) and the host compiler
// (bindings.cpp, a2d_host.cpp); nothing here needs CUDA headers.
#pragma once

#include <cstdint>
#include <string>

#include "a2d_tile.cuh"

namespace a2d {

// Choose the tile geometry for a problem; returns an empty string on success, else why
// the CUDA kernels cannot take this problem (the Python side reports it as-is).
// max_rows / max_keys (> 0) cap the tile, so small test problems still exercise several
// row sets, key chunks and blocks.
inline std::string make_plan(const Args& a, int num_sms, int max_rows, int max_keys, Plan* out) {
  if (a.B < 1 || a.T < 1 || a.K < 1 || a.Cs < 1 || a.Ct < 1)
    return "every size must be >= 1, got B=" + std::to_string(a.B) + ", T=" + std::to_string(a.T) +
           ", K=" + std::to_string(a.K) + ", Cs=" + std::to_string(a.Cs) + ", Ct=" + std::to_string(a.Ct);
  if (a.B > 65535) return "the CUDA kernels take at most 65535 batch elements, got B=" + std::to_string(a.B);
  if (a.Cs > kMaxStudent)
    return "the CUDA kernels take at most " + std::to_string(kMaxStudent) + " student channels, got Cs=" +
           std::to_string(a.Cs);
  if (a.Ct > kThreads)
    return "the CUDA kernels take at most " + std::to_string(kThreads) + " teacher channels, got Ct=" +
           std::to_string(a.Ct);
  Plan p{};
  const int fixed_params = a.Ct * a.Cs;
  // Keys per tile: a warp-wide line (32) when the rows are long enough, else the row.
  int kc = a.K < 32 ? a.K : 32;
  if (max_keys > 0 && kc > max_keys) kc = max_keys;
  int g_cap = kThreads / a.Ct;
  if (g_cap > a.T) g_cap = a.T;
  if (max_rows > 0 && g_cap > max_rows) g_cap = max_rows;
  for (;;) {
    int kcp = (kc + 3) / 4 * 4;
    if ((kcp / 4) % 2 == 0) kcp += 4;  // KCP/4 odd: float4 reads by consecutive channels spread over banks
    const int per_row = (a.Cs + a.Ct) * kcp;
    const int room = kSmemFloats - fixed_params - 3 - kcp - g_cap;
    int g = room > 0 ? room / per_row : 0;
    if (g > g_cap) g = g_cap;
    if (g >= 1) {
      p.G = g;
      p.KC = kc;
      p.KCP = kcp;
      break;
    }
    if (kc <= 4)
      return "the mixing matrix (Ct*Cs = " + std::to_string(a.Ct * a.Cs) +
             " values) leaves no room for a tile in 48 KiB of shared memory";
    kc = kc > 8 ? kc / 2 : 4;
  }
  // Key groups: more threads per (row, channel) when Ct * G alone leaves threads idle.
  p.H = kThreads / (a.Ct * p.G);
  if (p.H > p.KCP / 4) p.H = p.KCP / 4;
  if (p.H < 1) p.H = 1;
  const int slots = p.G * p.H * a.Ct;  // threads with a role
  const int tile = p.G * (a.Cs + a.Ct) * p.KCP;
  const int stage_min = slots * (kMapFields + 1);  // map stats / at least kMapFields + 1 dW columns per thread
  p.region = (tile > stage_min ? tile : stage_min + 3) / 4 * 4;
  p.off_s = 0;
  p.off_a = p.G * a.Cs * p.KCP;
  p.off_w = p.region;                       // multiples of 4: float4 alignment holds
  p.off_key_ok = (p.off_w + a.Ct * a.Cs + 3) / 4 * 4;  // float4-aligned: read 4 flags at once
  p.off_row_ok = p.off_key_ok + p.KCP;
  p.smem_floats = p.off_row_ok + p.G;
  if (p.smem_floats > kSmemFloats)
    return "the tile does not fit in 48 KiB of shared memory (Cs=" + std::to_string(a.Cs) +
           ", Ct=" + std::to_string(a.Ct) + ")";
  p.dw_chunk = p.region / slots;
  if (p.dw_chunk > a.Cs) p.dw_chunk = a.Cs;
  // Blocks: enough to fill the device about four times over, whole row sets each.
  p.n_sets = (a.T + p.G - 1) / p.G;
  const int target = 4 * (num_sms > 0 ? num_sms : 1);
  int per_batch = (target + a.B - 1) / a.B;
  if (per_batch > p.n_sets) per_batch = p.n_sets;
  p.sets_per_block = (p.n_sets + per_batch - 1) / per_batch;
  p.n_blocks = (p.n_sets + p.sets_per_block - 1) / p.sets_per_block;
  *out = p;
  return std::string();
}

// CPU emulation of the kernels (a2d_host.cpp): every pointer in `a` is a host pointer.
// a.table points at table.v.
void host_forward(const Args& a, const Plan& p);
void host_backward(const Args& a, const Plan& p);

// GPU launches (a2d_kernels.cu): device pointers, enqueued on `stream` of `device`.
// Throw std::runtime_error with the CUDA error text when a launch fails.
// The table goes to the kernels by value; a.table is ignored.
void cuda_forward(const Args& a, const Plan& p, const ChannelTable& table, int device, std::uintptr_t stream);
void cuda_backward(const Args& a, const Plan& p, const ChannelTable& table, int device, std::uintptr_t stream);

// Why the extension cannot run on `device` (driver too old, no kernel image for the
// device's architecture, no such device), or an empty string when it can.
std::string cuda_device_problem(int device);
int cuda_runtime_version();
int cuda_driver_version();

}  // namespace a2d
