// CPU kernels of the GR step: the passes of grkernels/reference.py over many tensors at once, one pass over
// memory per pass of the algorithm (the Triton kernels of grkernels/kernels/gr_step.py on CPU).
//
// Per tensor, with w the weight the perturbation is written into, g its gradient, and the save slots θs, g1s
// (in the save dtype S: the gradient's, or bf16 in lean mode) and g₊s (central estimator):
//
//   sumsq        Σ x²  (mode 1: Σ (x + b)²;  mode 2: Σ (x² + 2·x·b), b from g1s: the lean-mode norms)
//   perturb@0    θs ← w (bits), g1s ← g, w ← round(θ + step·g), g ← 0 (or −g / −b in lean mode);
//                returns Σ (w' − θ)², the realised perturbation
//   perturb@1    g₊s ← g, w ← round(θs + step·g1s), g ← 0 (or −b); returns Σ g₊² (Σ (d₊ + b)² lean)
//   combine      w ← θs (bits); g ← g1 + coef_t·(sa·ga − sb·gb); returns Σ correction²
//                (forward: ga = g2, gb = g1; central: ga = g₊, gb = g₋; lean: see the Triton module docstring)
//   restore      w ← θs (bits); g ← g1s  (abort)
//
// where step = ε·s1 (or −ε·s1) is 0 when the step's finite flag is false, and then w stays θ bitwise.
// Arithmetic: the element-wise expressions of the torch reference in the same order (no FMA contraction:
// -ffp-contract=off), in float32 (float64 for float64 tensors), so θ', the combined gradient and the saved copies
// equal the reference bitwise when rounding to nearest and the clip factors are exact. Sums: per work item (a
// chunk of at most kChunk elements of one tensor) in 16 independent double lanes (float values widened before
// squaring: no overflow or underflow for 32-bit and narrower values, elements of 3e19 or 1e-25 included; the
// plain fp32/bf16 sum of squares runs in float lanes and is redone in double for a chunk outside float's safe
// range), lanes summed in a fixed order, items summed in a fixed order in float64 and returned as a float64
// tensor: deterministic, independent of the thread count.
//
// Stochastic rounding (bf16/fp16 targets): the Triton kernel's random stream, bit for bit: Philox4x32-10 keyed
// by the step seed, counter (element / 4 (64 bit), tensor index, point), one call per 4 elements; bf16 adds 16
// random bits below the kept ones and truncates, fp16 picks the neighbour on x's side with probability
// |x − lo| / gap against a 24-bit uniform. So a CPU and a GPU run of one seed perturb to the same bits.
//
// With a mixed-precision compute grid (FSDP2's param_dtype below an fp32 shard) the perturbed value is
// round_grid(rn_grid(θ) + step·g), stored in the shard's dtype: the model's cast keeps it exactly.
//
// Values go through small per-block float buffers (kBlock elements, in L1): one load and one store function
// per storage dtype, the arithmetic written once per working precision (csrc/gr_passes.inc, compiled for AVX2+FMA
// and for baseline x86-64, chosen once at load time from the CPU's features; FMA contraction is off in both, so
// the two builds give the same bits).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace grk {
namespace {

constexpr int64_t kChunk = 65536;  // elements per work item (a multiple of kBlock)
constexpr int64_t kBlock = 512;    // elements per staged block (a multiple of 16 and of 4)
constexpr int kLanesGR = 16;

using at::ScalarType;

// ------------------------------------------------------------------------------------------- shared types
struct Slot {  // one tensor of a list: its storage and dtype (nullptr when the list is empty)
  void* ptr = nullptr;
  ScalarType dt = ScalarType::Float;
};

struct Item {  // one chunk of one tensor
  int64_t t, begin, end;
};

struct PerturbArgs {
  int64_t point, rounding, preload;
  uint64_t seed;
  bool finite;
  double step;
};

struct CombineArgs {
  int64_t mode;  // 0 forward, 1 central, 2 abort (restore)
  bool delta;    // lean mode: the gradient buffer holds g − g1 (forward) or g − b (central)
  double sa, sb;
};

size_t elem_size(ScalarType t) {
  switch (t) {
    case ScalarType::Double: return 8;
    case ScalarType::Float: return 4;
    case ScalarType::BFloat16:
    case ScalarType::Half: return 2;
    default: TORCH_CHECK(false, "grkernels GR step (C++): unsupported dtype ", t);
  }
  return 0;
}

// dst[0, n) ← src[off, off + n) as W
inline void copy_range(const Slot& dst, const Slot& src, int64_t b, int64_t e, size_t sz) {
  std::memcpy(static_cast<char*>(dst.ptr) + b * sz, static_cast<const char*>(src.ptr) + b * sz, (e - b) * sz);
}

// The per-target builds of the passes (gr_passes.inc) and the load-time choice between them.
struct GRPasses {
  const char* name;
  double (*sumsq_f)(const Slot&, const Slot&, int64_t, const Item&);
  double (*sumsq_d)(const Slot&, const Slot&, int64_t, const Item&);
  double (*perturb_f)(const Slot&, const Slot&, const Slot&, const Slot&, const Slot&, ScalarType, int64_t,
                      const PerturbArgs&, const Item&);
  double (*perturb_d)(const Slot&, const Slot&, const Slot&, const Slot&, const Slot&, ScalarType, int64_t,
                      const PerturbArgs&, const Item&);
  double (*combine_f)(const Slot&, const Slot&, const Slot&, const Slot&, const Slot&, double, const CombineArgs&,
                      const Item&);
  double (*combine_d)(const Slot&, const Slot&, const Slot&, const Slot&, const Slot&, double, const CombineArgs&,
                      const Item&);
};

// The passes of the correction reuse (reuse_passes.inc; grkernels/reuse.py), built beside the GR-step passes.
struct ReusePasses {
  const char* name;
  void (*sums)(const Slot& g, const Slot& c, const Slot& undo, const Item&, double* out3);
  void (*update)(const Slot& g, const Slot& c, float a, float k, const Item&);
  void (*store)(const Slot& gr, const Slot& buf, const Slot& old, bool finite, const Item&, double* out6);
};

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define GRK_PASSES_NAME "avx2"
#include "gr_passes.inc"
#include "reuse_passes.inc"
#undef GRK_PASSES_NAME
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace baseline {
#define GRK_PASSES_NAME "baseline"
#include "gr_passes.inc"
#include "reuse_passes.inc"
#undef GRK_PASSES_NAME
}  // namespace baseline

const GRPasses& passes() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx2_fma()) return avx2::kPasses;
#endif
  return baseline::kPasses;
}

const ReusePasses& reuse_passes() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx2_fma()) return avx2::kReusePasses;
#endif
  return baseline::kReusePasses;
}

// ------------------------------------------------------------------------------------------- tensor lists

std::vector<Slot> slots(const at::TensorList& ts, int64_t n, const char* what) {
  std::vector<Slot> out(n);
  if (ts.empty()) return out;
  TORCH_CHECK(int64_t(ts.size()) == n, "grkernels GR step (C++): ", what, " has ", ts.size(), " tensors, expected ",
              n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = ts[i];
    TORCH_CHECK(t.device().is_cpu(), "grkernels GR step (C++): ", what, " must be CPU tensors");
    TORCH_CHECK(t.is_contiguous(), "grkernels GR step (C++): ", what, " must be contiguous");
    elem_size(t.scalar_type());
    out[i].ptr = t.data_ptr();
    out[i].dt = t.scalar_type();
  }
  return out;
}



std::vector<Item> items_of(const at::TensorList& ts) {
  std::vector<Item> items;
  for (int64_t t = 0; t < int64_t(ts.size()); ++t) {
    const int64_t n = ts[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) items.push_back({t, b, std::min(n, b + kChunk)});
  }
  return items;
}

void check_same_numel(const at::TensorList& a, const at::TensorList& b, const char* what) {
  if (b.empty()) return;
  for (size_t i = 0; i < a.size(); ++i)
    TORCH_CHECK(a[i].numel() == b[i].numel(), "grkernels GR step (C++): ", what, " ", i, " has ", b[i].numel(),
                " elements, expected ", a[i].numel());
}

// Run fn(item) -> partial sum on every item in parallel; the partials summed in item order, returned as a 0-d
// float64 tensor (a float32 result would overflow for squares of elements beyond 1.8e19).
template <typename F>
at::Tensor run_items(const std::vector<Item>& items, F fn) {
  std::vector<double> part(items.size(), 0.0);
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) part[k] = fn(items[k]);
  });
  double total = 0.0;
  for (double p : part) total += p;
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(ScalarType::Double));
  *out.data_ptr<double>() = total;
  return out;
}

// Sum of 16 independent lanes of acc, in a fixed order.
double read_scalar(const at::Tensor& t) {
  TORCH_CHECK(t.numel() == 1 && t.device().is_cpu(), "grkernels GR step (C++): expected a CPU scalar tensor");
  switch (t.scalar_type()) {
    case ScalarType::Double: return *t.data_ptr<double>();
    case ScalarType::Float: return *t.data_ptr<float>();
    case ScalarType::Bool: return *t.data_ptr<bool>() ? 1.0 : 0.0;
    default: TORCH_CHECK(false, "grkernels GR step (C++): unsupported scalar dtype ", t.scalar_type());
  }
  return 0.0;
}

at::Tensor gr_sumsq(at::TensorList xs, at::TensorList base, int64_t mode, bool wide) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "gr_sumsq: mode must be 0, 1 or 2");
  TORCH_CHECK(mode == 0 || base.size() == xs.size(), "gr_sumsq: modes 1 and 2 need one base tensor per tensor");
  const int64_t n = xs.size();
  auto x = slots(xs, n, "tensors");
  auto b = slots(mode == 0 ? at::TensorList() : base, n, "base");
  check_same_numel(xs, mode == 0 ? at::TensorList() : base, "base");
  return run_items(items_of(xs), [&](const Item& it) {
    return wide ? passes().sumsq_d(x[it.t], b[it.t], mode, it) : passes().sumsq_f(x[it.t], b[it.t], mode, it);
  });
}

at::Tensor gr_perturb(at::TensorList weights, at::TensorList grads, at::TensorList theta_save, at::TensorList g1_save,
                      at::TensorList gplus_save, const at::Tensor& step, const at::Tensor& finite, int64_t point,
                      int64_t rounding, int64_t seed, int64_t preload, c10::optional<ScalarType> grid, bool wide) {
  TORCH_CHECK(point == 0 || point == 1, "gr_perturb: point must be 0 or 1");
  TORCH_CHECK(rounding == 0 || rounding == 1, "gr_perturb: rounding must be 0 (nearest) or 1 (stochastic)");
  TORCH_CHECK(preload >= 0 && preload <= 2, "gr_perturb: preload must be 0, 1 or 2");
  TORCH_CHECK(point == 0 || !gplus_save.empty(), "gr_perturb: point 1 needs the g+ save slots");
  const int64_t n = weights.size();
  auto w = slots(weights, n, "weights");
  auto g = slots(grads, n, "grads");
  auto ths = slots(theta_save, n, "theta_save");
  auto g1s = slots(g1_save, n, "g1_save");
  auto gps = slots(gplus_save, n, "gplus_save");
  check_same_numel(weights, grads, "grads");
  check_same_numel(weights, theta_save, "theta_save");
  check_same_numel(weights, g1_save, "g1_save");
  check_same_numel(weights, gplus_save, "gplus_save");
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(theta_save[i].scalar_type() == weights[i].scalar_type(), "gr_perturb: theta_save dtype must be the weight's");
  PerturbArgs a{point, rounding, preload, uint64_t(seed), read_scalar(finite) != 0.0, read_scalar(step)};
  if (grid.has_value())
    TORCH_CHECK(*grid == ScalarType::BFloat16 || *grid == ScalarType::Half, "gr_perturb: grid must be bf16 or fp16");
  return run_items(items_of(weights), [&](const Item& it) {
    const Slot& wt = w[it.t];
    const ScalarType target = grid.has_value() && wt.dt == ScalarType::Float ? *grid : wt.dt;
    if (wt.dt == ScalarType::Double)
      return passes().perturb_d(wt, g[it.t], ths[it.t], g1s[it.t], gps[it.t], target, it.t, a, it);
    return passes().perturb_f(wt, g[it.t], ths[it.t], g1s[it.t], gps[it.t], target, it.t, a, it);
  });
}

at::Tensor gr_combine(at::TensorList weights, at::TensorList grads, at::TensorList theta_save, at::TensorList g1_save,
                      at::TensorList gplus_save, at::ArrayRef<double> coefs, const at::Tensor& sa, const at::Tensor& sb,
                      int64_t mode, bool delta, bool wide) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "gr_combine: mode must be 0 (forward), 1 (central) or 2 (restore)");
  TORCH_CHECK(mode != 1 || !gplus_save.empty(), "gr_combine: the central estimator needs the g+ save slots");
  const int64_t n = weights.size();
  TORCH_CHECK(mode == 2 || int64_t(coefs.size()) == n, "gr_combine: one coefficient per tensor expected");
  auto w = slots(weights, n, "weights");
  auto g = slots(grads, n, "grads");
  auto ths = slots(theta_save, n, "theta_save");
  auto g1s = slots(g1_save, n, "g1_save");
  auto gps = slots(mode == 1 ? gplus_save : at::TensorList(), n, "gplus_save");
  check_same_numel(weights, grads, "grads");
  check_same_numel(weights, theta_save, "theta_save");
  check_same_numel(weights, g1_save, "g1_save");
  CombineArgs a{mode, delta, mode == 2 ? 0.0 : read_scalar(sa), mode == 2 ? 0.0 : read_scalar(sb)};
  return run_items(items_of(weights), [&](const Item& it) {
    const double coef = mode == 2 ? 0.0 : coefs[it.t];
    if (wide) return passes().combine_d(w[it.t], g[it.t], ths[it.t], g1s[it.t], gps[it.t], coef, a, it);
    return passes().combine_f(w[it.t], g[it.t], ths[it.t], g1s[it.t], gps[it.t], coef, a, it);
  });
}

// ------------------------------------------------------------------------------------------- correction reuse
// The passes of grkernels/reuse.py (CorrectionReuse): g = the gradients (fp32/bf16/fp16, contiguous, CPU); c = the
// stored correction per tensor, an empty tensor where none is stored for it (read as zeros).

void check_reuse_list(const at::TensorList& ts, const char* op, const char* what) {
  for (const at::Tensor& t : ts) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", what, " must be CPU tensors");
    TORCH_CHECK(t.is_contiguous(), op, ": ", what, " must be contiguous");
    const ScalarType d = t.scalar_type();
    TORCH_CHECK(d == ScalarType::Float || d == ScalarType::BFloat16 || d == ScalarType::Half, op, ": ", what,
                " must be float32, bfloat16 or float16 (float64 runs the torch reference), got ", d);
  }
}

// The slots of ``ts`` against ``like``: same count; a tensor with ``like``'s element count, or an empty one (absent:
// ptr == nullptr)
std::vector<Slot> optional_slots(const at::TensorList& ts, const at::TensorList& like, const char* op,
                                 const char* what) {
  TORCH_CHECK(ts.size() == like.size(), op, ": ", what, " has ", ts.size(), " tensors, expected ", like.size());
  check_reuse_list(ts, op, what);
  std::vector<Slot> out(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    if (ts[i].numel() == 0) continue;
    TORCH_CHECK(ts[i].numel() == like[i].numel(), op, ": ", what, " ", i, " has ", ts[i].numel(),
                " elements, expected ", like[i].numel(), " (or none: absent)");
    out[i].ptr = ts[i].data_ptr();
    out[i].dt = ts[i].scalar_type();
  }
  return out;
}

// Run fn(item, out) on every item in parallel, K sums per item; the partials summed in item order, returned as a
// 1-D float64 tensor of K (deterministic, independent of the thread count).
template <int K, typename F>
at::Tensor run_items_k(const std::vector<Item>& items, F fn) {
  std::vector<double> part(items.size() * K, 0.0);
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) fn(items[k], &part[k * K]);
  });
  at::Tensor out = at::empty({K}, at::TensorOptions().dtype(ScalarType::Double));
  double* o = out.data_ptr<double>();
  for (int k = 0; k < K; ++k) o[k] = 0.0;
  for (size_t i = 0; i < items.size(); ++i)
    for (int k = 0; k < K; ++k) o[k] += part[i * K + k];
  return out;
}

// undo: empty, or one tensor per g (its dtype and size) that receives g's bits in the same pass
at::Tensor gr_reuse_sums(at::TensorList g, at::TensorList c, at::TensorList undo) {
  check_reuse_list(g, "gr_reuse_sums", "g");
  auto gs = slots(g, g.size(), "g");
  auto cs = optional_slots(c, g, "gr_reuse_sums", "c");
  auto us = slots(undo, g.size(), "undo");
  check_same_numel(g, undo, "undo");
  for (size_t i = 0; i < undo.size(); ++i)
    TORCH_CHECK(undo[i].scalar_type() == g[i].scalar_type(), "gr_reuse_sums: undo ", i, " must have g's dtype");
  return run_items_k<3>(items_of(g), [&](const Item& it, double* out) {
    reuse_passes().sums(gs[it.t], cs[it.t], us[it.t], it, out);
  });
}

void gr_reuse_update(at::TensorList g, at::TensorList c, const at::Tensor& a, const at::Tensor& k) {
  check_reuse_list(g, "gr_reuse_update", "g");
  auto gs = slots(g, g.size(), "g");
  auto cs = optional_slots(c, g, "gr_reuse_update", "c");
  const float av = static_cast<float>(read_scalar(a)), kv = static_cast<float>(read_scalar(k));
  if (av == 1.0f && kv == 0.0f) return;  // nothing applied: every bit of g stays (a −0 or a NaN's payload too)
  const auto items = items_of(g);
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) reuse_passes().update(gs[items[i].t], cs[items[i].t], av, kv, items[i]);
  });
}

at::Tensor gr_reuse_store(at::TensorList gr, at::TensorList buf, at::TensorList old, const at::Tensor& finite) {
  check_reuse_list(gr, "gr_reuse_store", "gr");
  check_reuse_list(buf, "gr_reuse_store", "buf");
  auto grs = slots(gr, gr.size(), "gr");
  auto bufs = slots(buf, gr.size(), "buf");
  check_same_numel(gr, buf, "buf");
  auto olds = optional_slots(old, gr, "gr_reuse_store", "old");
  const bool fin = read_scalar(finite) != 0.0;
  return run_items_k<6>(items_of(gr), [&](const Item& it, double* out) {
    reuse_passes().store(grs[it.t], bufs[it.t], olds[it.t], fin, it, out);
  });
}

}  // namespace
}  // namespace grk

TORCH_LIBRARY_FRAGMENT(grkernels_cpp, m) {
  m.def("gr_sumsq(Tensor[] xs, Tensor[] base, int kind, bool wide) -> Tensor");
  m.def("gr_perturb(Tensor(a!)[] weights, Tensor(b!)[] grads, Tensor(c!)[] theta_save, Tensor(d!)[] g1_save, "
        "Tensor(e!)[] gplus_save, Tensor step, Tensor finite, int point, int rounding, int seed, int preload, "
        "ScalarType? grid, bool wide) -> Tensor");
  m.def("gr_combine(Tensor(a!)[] weights, Tensor(b!)[] grads, Tensor[] theta_save, Tensor[] g1_save, "
        "Tensor[] gplus_save, float[] coefs, Tensor sa, Tensor sb, int kind, bool delta, bool wide) -> Tensor");
  m.def("gr_reuse_sums(Tensor[] g, Tensor[] c, Tensor(a!)[] undo) -> Tensor");
  m.def("gr_reuse_update(Tensor(a!)[] g, Tensor[] c, Tensor a, Tensor k) -> ()");
  m.def("gr_reuse_store(Tensor[] gr, Tensor(a!)[] buf, Tensor[] old, Tensor finite) -> Tensor");
}

TORCH_LIBRARY_IMPL(grkernels_cpp, CPU, m) {
  m.impl("gr_sumsq", &grk::gr_sumsq);
  m.impl("gr_perturb", &grk::gr_perturb);
  m.impl("gr_combine", &grk::gr_combine);
  m.impl("gr_reuse_sums", &grk::gr_reuse_sums);
  m.impl("gr_reuse_update", &grk::gr_reuse_update);
  m.impl("gr_reuse_store", &grk::gr_reuse_store);
}
