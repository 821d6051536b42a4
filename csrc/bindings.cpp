// pybind11 module a2d_kernels._C. It takes integers only (addresses, sizes, dtype codes,
// device index, stream handle) and never links libtorch, so the built wheel keeps
// working when torch is upgraded. Arguments travel as one dict with named fields (see
// a2d_kernels/ops/cuda_a2d.py), which keeps the long argument lists readable on both
// sides and makes a missing field an error that names it.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "a2d_api.h"

namespace py = pybind11;

namespace {

int64_t field(const py::dict& d, const char* name) {
  if (!d.contains(name)) throw py::key_error(std::string("a2d_kernels._C: missing argument '") + name + "'");
  return d[name].cast<int64_t>();
}

int64_t field_or(const py::dict& d, const char* name, int64_t fallback) {
  return d.contains(name) ? d[name].cast<int64_t>() : fallback;
}

template <typename T>
T* address(const py::dict& d, const char* name) {
  return reinterpret_cast<T*>(static_cast<std::uintptr_t>(field_or(d, name, 0)));
}

// The "table" field: a flat sequence of ints, (address, stride_b, stride_t) per channel,
// for `rows` channels (students, teachers, and the student gradients in backward).
void parse_table(const py::dict& d, int rows, a2d::ChannelTable* table) {
  if (!d.contains("table")) throw py::key_error("a2d_kernels._C: missing argument 'table'");
  const auto values = d["table"].cast<std::vector<int64_t>>();
  if (values.size() != 3 * size_t(rows) || rows > a2d::kMaxTableRows)
    throw py::value_error("a2d_kernels._C: table must hold (address, stride_b, stride_t) for " +
                          std::to_string(rows) + " channels (at most " + std::to_string(a2d::kMaxTableRows) +
                          "), got " + std::to_string(values.size()) + " values");
  std::fill(table->v, table->v + 3 * a2d::kMaxTableRows, int64_t(0));
  std::copy(values.begin(), values.end(), table->v);
}

a2d::Args parse_args(const py::dict& d) {
  a2d::Args a{};
  a.B = int(field(d, "B"));
  a.T = int(field(d, "T"));
  a.K = int(field(d, "K"));
  a.Cs = int(field(d, "Cs"));
  a.Ct = int(field(d, "Ct"));
  a.mode = int(field(d, "mode"));
  a.dtype = int(field(d, "dtype"));
  a.t_dtype = int(field_or(d, "t_dtype", a.dtype));
  a.w_dtype = int(field_or(d, "w_dtype", a2d::kF32));
  a.b_dtype = int(field_or(d, "b_dtype", a2d::kF32));
  if (a.mode != a2d::kMap && a.mode != a2d::kRow) throw py::value_error("a2d_kernels._C: mode must be 0 or 1");
  for (int code : {a.dtype, a.t_dtype, a.w_dtype, a.b_dtype})
    if (code < a2d::kF32 || code > a2d::kF16) throw py::value_error("a2d_kernels._C: dtype codes must be 0, 1 or 2");
  a.weight = address<const void>(d, "weight");
  a.bias = address<const void>(d, "bias");
  a.key_valid = address<const unsigned char>(d, "key_valid");
  a.query_valid = address<const unsigned char>(d, "query_valid");
  a.kl = address<float>(d, "kl");
  a.stat0 = address<float>(d, "stat0");
  a.stat1 = address<float>(d, "stat1");
  a.work = address<float>(d, "work");
  a.grad_scale = address<const float>(d, "grad_scale");
  a.d_weight = address<void>(d, "d_weight");
  a.d_bias = address<void>(d, "d_bias");
  a.need_ds = int(field_or(d, "need_ds", 0));
  return a;
}

a2d::Plan parse_plan(const py::dict& d, const a2d::Args& a) {
  a2d::Plan p{};
  const std::string why = a2d::make_plan(a, int(field_or(d, "num_sms", 1)), int(field_or(d, "max_rows", 0)),
                                         int(field_or(d, "max_keys", 0)), &p);
  if (!why.empty()) throw py::value_error(why);
  return p;
}

void require(bool ok, const char* what) {
  if (!ok) throw py::value_error(std::string("a2d_kernels._C: ") + what);
}

void check_forward(const a2d::Args& a) {
  require(a.weight && a.kl && a.stat0 && a.stat1 && a.work, "forward needs weight, kl, stat0, stat1 and work");
}

void check_backward(const a2d::Args& a) {
  require(a.weight && a.stat0 && a.stat1 && a.work && a.grad_scale && a.d_weight,
          "backward needs weight, stat0, stat1, work, grad_scale and d_weight");
  require(!a.bias == !a.d_bias, "backward needs d_bias exactly when there is a bias");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "A2D loss kernels (CUDA) and their CPU emulation; see a2d_kernels/ops/cuda_a2d.py";

  m.def(
      "plan",
      [](const py::dict& d) {
        const a2d::Args a = parse_args(d);
        const a2d::Plan p = parse_plan(d, a);
        py::dict out;
        out["rows_per_tile"] = p.G;
        out["keys_per_tile"] = p.KC;
        out["key_groups"] = p.H;
        out["blocks_per_batch"] = p.n_blocks;
        out["smem_bytes"] = p.smem_floats * 4;
        out["forward_work_floats"] = p.forward_work_floats(a);
        out["backward_work_floats"] = p.backward_work_floats(a);
        return out;
      },
      "Tile plan and workspace sizes for a problem; ValueError naming the limit when unsupported.");

  m.def(
      "forward",
      [](const py::dict& d) {
        const a2d::Args a = parse_args(d);
        const a2d::Plan p = parse_plan(d, a);
        check_forward(a);
        a2d::ChannelTable table;
        parse_table(d, a.Cs + a.Ct, &table);
        a2d::cuda_forward(a, p, table, int(field(d, "device")), std::uintptr_t(field(d, "stream")));
      },
      "Enqueue the forward kernels on a CUDA stream (device pointers).");
  m.def(
      "backward",
      [](const py::dict& d) {
        const a2d::Args a = parse_args(d);
        const a2d::Plan p = parse_plan(d, a);
        check_backward(a);
        a2d::ChannelTable table;
        parse_table(d, a.Cs + a.Ct + (a.need_ds ? a.Cs : 0), &table);
        a2d::cuda_backward(a, p, table, int(field(d, "device")), std::uintptr_t(field(d, "stream")));
      },
      "Enqueue the backward kernels on a CUDA stream (device pointers).");

  m.def(
      "host_forward",
      [](const py::dict& d) {
        a2d::Args a = parse_args(d);
        const a2d::Plan p = parse_plan(d, a);
        check_forward(a);
        a2d::ChannelTable table;
        parse_table(d, a.Cs + a.Ct, &table);
        a.table = table.v;
        py::gil_scoped_release release;
        a2d::host_forward(a, p);
      },
      "Run the forward kernels' arithmetic on the CPU (host pointers).");
  m.def(
      "host_backward",
      [](const py::dict& d) {
        a2d::Args a = parse_args(d);
        const a2d::Plan p = parse_plan(d, a);
        check_backward(a);
        a2d::ChannelTable table;
        parse_table(d, a.Cs + a.Ct + (a.need_ds ? a.Cs : 0), &table);
        a.table = table.v;
        py::gil_scoped_release release;
        a2d::host_backward(a, p);
      },
      "Run the backward kernels' arithmetic on the CPU (host pointers).");

  m.def(
      "host_cast",
      [](int64_t src, int src_dtype, int64_t dst, int dst_dtype, int64_t n) {
        const void* s = reinterpret_cast<const void*>(static_cast<std::uintptr_t>(src));
        void* t = reinterpret_cast<void*>(static_cast<std::uintptr_t>(dst));
        for (int64_t i = 0; i < n; ++i) a2d::store_elem(t, i, dst_dtype, a2d::load_elem(s, i, src_dtype));
      },
      "Convert n elements between dtype codes with the host conversions the CPU path uses.");

  m.def("device_problem", &a2d::cuda_device_problem,
        "Why the kernels cannot run on this CUDA device ('' when they can).");
  m.def("runtime_version", &a2d::cuda_runtime_version, "CUDA runtime version the extension was built with.");
  m.def("driver_version", &a2d::cuda_driver_version, "CUDA version the installed driver supports (0: none).");
#ifdef A2D_CUDA_ARCHS
  m.attr("cuda_archs") = A2D_CUDA_ARCHS;
#else
  m.attr("cuda_archs") = "";
#endif
}
