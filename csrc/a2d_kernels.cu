// CUDA kernels of the A2D loss. The arithmetic lives in a2d_tile.cuh; a kernel here is
// only the block schedule around it (which phases run, and the barriers between them).
// a2d_host.cpp runs the same schedule on the CPU, phase for phase.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "a2d_api.h"

namespace a2d {
namespace {

// Forward: grid (n_blocks, B). Map mode ends with per-block partial statistics in
// `work`; row mode writes each row's lse / mass / KL directly.
template <int CS_MAX>
__global__ void __launch_bounds__(kThreads) forward_kernel(Args args, Plan p, const __grid_constant__ ChannelTable table) {
  Args a = args;
  a.table = table.v;
  extern __shared__ float4 smem_f4[];
  float* sm = reinterpret_cast<float*>(smem_f4);
  const int b = blockIdx.y, blk = blockIdx.x, tid = threadIdx.x, nth = blockDim.x;
  load_params(a, p, sm, tid, nth);
  __syncthreads();
  const Role role = role_of(a, p, tid);
  const bool active = role.active;
  float w[CS_MAX];
  thread_weights<CS_MAX>(a, p, sm, role.c, w);
  MapStats ms = map_empty();
  const int set_end = min(p.n_sets, (blk + 1) * p.sets_per_block);
  for (int set = blk * p.sets_per_block; set < set_end; ++set) {
    const int t0 = set * p.G;
    RowStats rs = row_empty();
    for (int k0 = 0; k0 < a.K; k0 += p.KC) {
      load_tile(a, p, sm, b, t0, k0, tid, nth);
      __syncthreads();
      if (active) forward_thread<CS_MAX>(a, p, sm, role, w, min(p.KC, a.K - k0), ms, rs);
      __syncthreads();
    }
    if (a.mode == kRow) {
      if (active) row_stash(a, p, sm, role, rs);
      __syncthreads();
      row_set_done(a, p, sm, b, t0, tid, nth);
      __syncthreads();  // the next set's tile overwrites the staging region
    }
  }
  if (a.mode == kMap) {
    if (active) map_stash(a, p, sm, role, ms);
    __syncthreads();
    map_block_reduce(a, p, sm, b, blk, tid, nth);
  }
}

__global__ void forward_finish_kernel(Args a, Plan p) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= a.B * a.Ct) return;
  if (a.mode == kMap) map_finish(a, p, i);
  else row_finish(a, i);
}

// Backward: grid (n_blocks, B); per-block d_weight / d_bias partials in `work`.
template <int CS_MAX>
__global__ void __launch_bounds__(kThreads) backward_kernel(Args args, Plan p, const __grid_constant__ ChannelTable table) {
  Args a = args;
  a.table = table.v;
  extern __shared__ float4 smem_f4[];
  float* sm = reinterpret_cast<float*>(smem_f4);
  const int b = blockIdx.y, blk = blockIdx.x, tid = threadIdx.x, nth = blockDim.x;
  load_params(a, p, sm, tid, nth);
  __syncthreads();
  const Role role = role_of(a, p, tid);
  const bool active = role.active;
  const int c = role.c, g = role.g;
  float w[CS_MAX], dw[CS_MAX];
  thread_weights<CS_MAX>(a, p, sm, c, w);
#pragma unroll
  for (int k = 0; k < CS_MAX; ++k) dw[k] = 0.f;
  float db = 0.f;
  const float gscale = *a.grad_scale;
  SavedStats st{0.f, 0.f, 0.f, 0.f};
  if (active && a.mode == kMap) st = saved_map(a, b, c);
  const int set_end = min(p.n_sets, (blk + 1) * p.sets_per_block);
  for (int set = blk * p.sets_per_block; set < set_end; ++set) {
    const int t0 = set * p.G;
    if (active && a.mode == kRow && t0 + g < a.T) st = saved_row(a, b, c, t0 + g);
    for (int k0 = 0; k0 < a.K; k0 += p.KC) {
      const int kc_len = min(p.KC, a.K - k0);
      load_tile(a, p, sm, b, t0, k0, tid, nth);
      __syncthreads();
      if (active) backward_thread<CS_MAX>(a, p, sm, role, w, kc_len, gscale, st, dw, db);
      __syncthreads();
      if (a.need_ds) {
        backward_ds(a, p, sm, kc_len, tid, nth);
        __syncthreads();
        store_ds(a, p, sm, b, t0, k0, tid, nth);
        __syncthreads();
      }
    }
  }
  for (int k0 = 0; k0 < a.Cs; k0 += p.dw_chunk) {
    if (active) dw_stash<CS_MAX>(a, p, sm, role, k0, dw);
    __syncthreads();
    dw_block_reduce(a, p, sm, b, blk, k0, tid, nth);
    __syncthreads();
  }
  if (active) db_stash(a, p, sm, role, db);
  __syncthreads();
  db_block_reduce(a, p, sm, b, blk, tid, nth);
}

__global__ void backward_finish_kernel(Args a, Plan p) {
  const int o = blockIdx.x * blockDim.x + threadIdx.x;
  if (o < a.Ct * a.Cs + a.Ct) backward_finish(a, p, o);
}

// Raise the CUDA error of the last launch (or of an earlier asynchronous failure) as a
// Python RuntimeError (pybind11 translates std::runtime_error).
void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("a2d_kernels._C: ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

// Runs the launches on `device`, restoring the caller's current device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

template <template <int> class Launch, typename... Ts>
void dispatch_cs(int Cs, Ts&&... args) {
  if (Cs <= 16) Launch<16>::run(args...);
  else if (Cs <= 32) Launch<32>::run(args...);
  else Launch<64>::run(args...);
}

template <int CS_MAX>
struct LaunchForward {
  static void run(const Args& a, const Plan& p, const ChannelTable& table, cudaStream_t s) {
    const dim3 grid(p.n_blocks, a.B);
    forward_kernel<CS_MAX><<<grid, kThreads, p.smem_floats * sizeof(float), s>>>(a, p, table);
    check(cudaGetLastError(), "forward_kernel launch");
  }
};

template <int CS_MAX>
struct LaunchBackward {
  static void run(const Args& a, const Plan& p, const ChannelTable& table, cudaStream_t s) {
    const dim3 grid(p.n_blocks, a.B);
    backward_kernel<CS_MAX><<<grid, kThreads, p.smem_floats * sizeof(float), s>>>(a, p, table);
    check(cudaGetLastError(), "backward_kernel launch");
  }
};

}  // namespace

void cuda_forward(const Args& a, const Plan& p, const ChannelTable& table, int device, std::uintptr_t stream) {
  DeviceGuard guard(device);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_cs<LaunchForward>(a.Cs, a, p, table, s);
  const int n = a.B * a.Ct;
  forward_finish_kernel<<<(n + 127) / 128, 128, 0, s>>>(a, p);
  check(cudaGetLastError(), "forward_finish_kernel launch");
}

void cuda_backward(const Args& a, const Plan& p, const ChannelTable& table, int device, std::uintptr_t stream) {
  DeviceGuard guard(device);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_cs<LaunchBackward>(a.Cs, a, p, table, s);
  const int n = a.Ct * a.Cs + a.Ct;
  backward_finish_kernel<<<(n + 127) / 128, 128, 0, s>>>(a, p);
  check(cudaGetLastError(), "backward_finish_kernel launch");
}

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int cuda_driver_version() {
  int v = 0;
  cudaDriverGetVersion(&v);
  return v;
}

std::string cuda_device_problem(int device) {
  const int driver = cuda_driver_version(), runtime = cuda_runtime_version();
  if (driver == 0) return "no CUDA driver found";
  if (driver / 1000 < runtime / 1000)  // same major: minor-version compatibility applies
    return "the NVIDIA driver is too old: it supports CUDA " + std::to_string(driver / 1000) + "." +
           std::to_string(driver % 1000 / 10) + ", the extension was built with CUDA " +
           std::to_string(runtime / 1000) + "." + std::to_string(runtime % 1000 / 10);
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(err);
  if (device < 0 || device >= count)
    return "no CUDA device " + std::to_string(device) + " (found " + std::to_string(count) + ")";
  // Is there SASS or PTX in this build the device can run?
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device);
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, forward_kernel<16>);
  cudaSetDevice(previous);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later launches are not blamed
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    return "the extension has no kernel image for this GPU (sm_" + std::to_string(major) +
           std::to_string(minor) + "): rebuild with A2D_CUDA_ARCHS including it (" + cudaGetErrorString(err) + ")";
  }
  return std::string();
}

}  // namespace a2d
