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
// chunk of at most kChunk elements of one tensor) in 16 independent lanes, lanes summed in a fixed order, items
// summed in a fixed order in float64: deterministic, independent of the thread count.
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
// per storage dtype, the arithmetic written once per working precision.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace grk {
namespace {

constexpr int64_t kChunk = 65536;  // elements per work item (a multiple of kBlock)
constexpr int64_t kBlock = 512;    // elements per staged block (a multiple of 16 and of 4)
constexpr int kLanesGR = 16;

using at::ScalarType;

// ------------------------------------------------------------------------------------------- conversions
inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
// float → bf16 bits, round to nearest even, NaN → 0x7FC0 (what c10::BFloat16 and the Triton kernel do)
inline uint16_t bf16_rn(float x) {
  const uint32_t b = float_to_bits(x);
  const uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  return x != x ? uint16_t(0x7FC0) : uint16_t(r);
}
inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
inline uint16_t half_rn(float x) { return c10::Half(x).x; }
inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

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
template <typename W>
void load(const void* src, ScalarType t, int64_t off, int64_t n, W* dst) {
  switch (t) {
    case ScalarType::Double: {
      const double* s = static_cast<const double*>(src) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<W>(s[i]);
    } break;
    case ScalarType::Float: {
      const float* s = static_cast<const float*>(src) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<W>(s[i]);
    } break;
    case ScalarType::BFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<W>(bf16_to_float(s[i]));
    } break;
    case ScalarType::Half: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<W>(half_to_float(s[i]));
    } break;
    default: TORCH_CHECK(false, "unsupported dtype");
  }
}

// dst[off, off + n) ← src rounded to nearest (as torch's .to / copy_; double → bf16/fp16 goes through float)
template <typename W>
void store(void* dst, ScalarType t, int64_t off, int64_t n, const W* src) {
  switch (t) {
    case ScalarType::Double: {
      double* d = static_cast<double*>(dst) + off;
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<double>(src[i]);
    } break;
    case ScalarType::Float: {
      float* d = static_cast<float*>(dst) + off;
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(src[i]);
    } break;
    case ScalarType::BFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst) + off;
      for (int64_t i = 0; i < n; ++i) d[i] = bf16_rn(static_cast<float>(src[i]));
    } break;
    case ScalarType::Half: {
      uint16_t* d = static_cast<uint16_t*>(dst) + off;
      for (int64_t i = 0; i < n; ++i) d[i] = half_rn(static_cast<float>(src[i]));
    } break;
    default: TORCH_CHECK(false, "unsupported dtype");
  }
}

// x[0, n) rounded to nearest onto dtype t in place (the switch outside the loop, so that the loop vectorises)
template <typename W>
void rn_block(W* x, int64_t n, ScalarType t) {
  switch (t) {
    case ScalarType::Float:
      for (int64_t i = 0; i < n; ++i) x[i] = static_cast<W>(static_cast<float>(x[i]));
      break;
    case ScalarType::BFloat16:
      for (int64_t i = 0; i < n; ++i) x[i] = static_cast<W>(bf16_to_float(bf16_rn(static_cast<float>(x[i]))));
      break;
    case ScalarType::Half:
      for (int64_t i = 0; i < n; ++i) x[i] = static_cast<W>(half_to_float(half_rn(static_cast<float>(x[i]))));
      break;
    default: break;
  }
}

// ------------------------------------------------------------------------------------------- Philox4x32-10
struct Rand4 {
  uint32_t r[4];
};
inline uint32_t mulhi32(uint32_t a, uint32_t b) { return uint32_t((uint64_t(a) * uint64_t(b)) >> 32); }
inline Rand4 philox(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = uint32_t(seed & 0xFFFFFFFFu), k1 = uint32_t((seed >> 32) & 0xFFFFFFFFu);
  for (int i = 0; i < 10; ++i) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = mulhi32(0xCD9E8D57u, p2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, p0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * p2;
    c3 = 0xD2511F53u * p0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// Stochastic rounding of float x onto t (bf16 or fp16) with random word r, as a float.
inline float sr_to(float x, ScalarType t, uint32_t r) {
  if (t == ScalarType::BFloat16) {  // add 16 random bits below the kept ones, truncate (sign-magnitude)
    return bf16_to_float(uint16_t((float_to_bits(x) + (r & 0xFFFFu)) >> 16));
  }
  const uint16_t lo_b = half_rn(x);
  const float lo = half_to_float(lo_b);
  const bool away = std::fabs(x) > std::fabs(lo);
  // the neighbour of lo on x's side: one step of the magnitude, or the smallest subnormal of x's sign
  const int16_t lo_i = static_cast<int16_t>(lo_b);
  const int16_t other_i = lo == 0.0f ? (x > 0 ? int16_t(1) : int16_t(-32767)) : int16_t(away ? lo_i + 1 : lo_i - 1);
  const float other = half_to_float(static_cast<uint16_t>(other_i));
  const float gap = std::fabs(other - lo);
  const float p_other = gap > 0 ? std::fabs(x - lo) / gap : 0.0f;
  const float u = static_cast<float>(r >> 8) * (1.0f / 16777216.0f);
  return u < p_other ? other : lo;
}

// ------------------------------------------------------------------------------------------- tensor lists
struct Slot {  // one tensor of a list: its storage and dtype (nullptr when the list is empty)
  void* ptr = nullptr;
  ScalarType dt = ScalarType::Float;
};

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

inline void copy_range(const Slot& dst, const Slot& src, int64_t b, int64_t e, size_t sz) {
  std::memcpy(static_cast<char*>(dst.ptr) + b * sz, static_cast<const char*>(src.ptr) + b * sz, (e - b) * sz);
}

struct Item {  // one chunk of one tensor
  int64_t t, begin, end;
};

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

// Run fn(item) -> partial sum on every item in parallel; the partials summed in item order (float64).
template <typename F>
at::Tensor run_items(const std::vector<Item>& items, ScalarType out_dtype, F fn) {
  std::vector<double> part(items.size(), 0.0);
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) part[k] = fn(items[k]);
  });
  double total = 0.0;
  for (double p : part) total += p;
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(out_dtype));
  if (out_dtype == ScalarType::Double)
    *out.data_ptr<double>() = total;
  else
    *out.data_ptr<float>() = static_cast<float>(total);
  return out;
}

// Sum of 16 independent lanes of acc, in a fixed order.
template <typename W>
inline double lanes_total(const W* acc) {
  double s = 0.0;
  for (int l = 0; l < kLanesGR; ++l) s += static_cast<double>(acc[l]);
  return s;
}

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

ScalarType acc_type(bool wide) { return wide ? ScalarType::Double : ScalarType::Float; }

// ------------------------------------------------------------------------------------------- sum of squares
template <typename W, int MODE>
double sumsq_item(const Slot& x, const Slot& b, const Item& it) {
  W acc[kLanesGR] = {};
  W xv[kBlock], bv[kBlock];
  for (int64_t i = it.begin; i < it.end; i += kBlock) {
    const int64_t n = std::min(kBlock, it.end - i);
    load<W>(x.ptr, x.dt, i, n, xv);
    if (MODE != 0) load<W>(b.ptr, b.dt, i, n, bv);
    const int64_t np = (n + kLanesGR - 1) / kLanesGR * kLanesGR;
    for (int64_t j = n; j < np; ++j) xv[j] = bv[j] = W(0);
    for (int64_t j = 0; j < np; j += kLanesGR) {
      for (int l = 0; l < kLanesGR; ++l) {
        const W v = xv[j + l];
        if (MODE == 0) {
          acc[l] += v * v;
        } else if (MODE == 1) {
          const W s = v + bv[j + l];
          acc[l] += s * s;
        } else {
          acc[l] += v * v + W(2) * (v * bv[j + l]);
        }
      }
    }
  }
  return lanes_total(acc);
}

template <typename W>
double sumsq_any(const Slot& x, const Slot& b, int64_t mode, const Item& it) {
  if (mode == 0) return sumsq_item<W, 0>(x, b, it);
  if (mode == 1) return sumsq_item<W, 1>(x, b, it);
  return sumsq_item<W, 2>(x, b, it);
}

at::Tensor gr_sumsq(at::TensorList xs, at::TensorList base, int64_t mode, bool wide) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "gr_sumsq: mode must be 0, 1 or 2");
  TORCH_CHECK(mode == 0 || base.size() == xs.size(), "gr_sumsq: modes 1 and 2 need one base tensor per tensor");
  const int64_t n = xs.size();
  auto x = slots(xs, n, "tensors");
  auto b = slots(mode == 0 ? at::TensorList() : base, n, "base");
  check_same_numel(xs, mode == 0 ? at::TensorList() : base, "base");
  return run_items(items_of(xs), acc_type(wide), [&](const Item& it) {
    return wide ? sumsq_any<double>(x[it.t], b[it.t], mode, it) : sumsq_any<float>(x[it.t], b[it.t], mode, it);
  });
}

// ------------------------------------------------------------------------------------------- perturb
struct PerturbArgs {
  int64_t point, rounding, preload;
  uint64_t seed;
  bool finite;
  double step;
};

// One work item of perturb. W: the working precision (float64 for float64 weights).
template <typename W>
double perturb_item(const Slot& w, const Slot& g, const Slot& ths, const Slot& g1s, const Slot& gps,
                    ScalarType target, int64_t row, const PerturbArgs& a, const Item& it) {
  W acc[kLanesGR] = {};
  W th[kBlock], gv[kBlock], d[kBlock], nw[kBlock], out[kBlock];
  const W step = static_cast<W>(a.step);
  const bool sr = a.rounding == 1 && (target == ScalarType::BFloat16 || target == ScalarType::Half);
  const bool grid = target != w.dt;  // a compute grid below the stored dtype
  const size_t wsz = elem_size(w.dt), gsz = elem_size(g.dt);
  // bit copies of the whole item first (one memcpy each; the item, ≤ 256 KiB per tensor, stays in L2)
  if (a.point == 0) {
    copy_range(ths, w, it.begin, it.end, wsz);
    if (g1s.dt == g.dt) copy_range(g1s, g, it.begin, it.end, gsz);
  } else if (gps.dt == g.dt) {
    copy_range(gps, g, it.begin, it.end, gsz);
  }
  for (int64_t i = it.begin; i < it.end; i += kBlock) {
    const int64_t n = std::min(kBlock, it.end - i);
    const int64_t np = (n + kLanesGR - 1) / kLanesGR * kLanesGR;
    load<W>(g.ptr, g.dt, i, n, gv);
    if (a.point == 0) {
      if (g1s.dt != g.dt) store<W>(g1s.ptr, g1s.dt, i, n, gv);
      load<W>(ths.ptr, w.dt, i, n, th);
    } else {
      if (gps.dt != g.dt) store<W>(gps.ptr, gps.dt, i, n, gv);
      load<W>(ths.ptr, w.dt, i, n, th);
      load<W>(g1s.ptr, g1s.dt, i, n, d);  // the direction: g1 as saved
      for (int64_t j = n; j < np; ++j) gv[j] = d[j] = W(0);
      if (a.preload == 0) {  // Σ g₊²
        for (int64_t j = 0; j < np; j += kLanesGR)
          for (int l = 0; l < kLanesGR; ++l) acc[l] += gv[j + l] * gv[j + l];
      } else {  // lean: the buffer holds d₊ = g₊ − b: Σ (d₊ + b)²
        for (int64_t j = 0; j < np; j += kLanesGR)
          for (int l = 0; l < kLanesGR; ++l) {
            const W ga = gv[j + l] + d[j + l];
            acc[l] += ga * ga;
          }
      }
    }
    if (grid) rn_block<W>(th, n, target);  // start from the weight the model computed with
    const W* dir = a.point == 0 ? gv : d;  // point 0: the exact g1 (lean mode too); point 1: g1 as saved
    for (int64_t j = 0; j < n; ++j) nw[j] = th[j] + step * dir[j];
    if (sr) {
      for (int64_t j0 = 0; j0 < n; j0 += 4) {  // i, j0 are multiples of 4: one Philox call per 4 elements
        const uint64_t q = uint64_t(i + j0) / 4;
        const Rand4 r = philox(a.seed, uint32_t(q), uint32_t(q >> 32), uint32_t(row), uint32_t(a.point));
        for (int64_t k = 0; k < 4 && j0 + k < n; ++k)
          nw[j0 + k] = static_cast<W>(sr_to(static_cast<float>(nw[j0 + k]), target, r.r[k]));
      }
    } else {
      rn_block<W>(nw, n, target);
    }
    if (!a.finite) {  // a NaN/inf of g1 never reaches the weights: w stays θ, bitwise
      for (int64_t j = 0; j < n; ++j) nw[j] = th[j];
      copy_range(w, ths, i, i + n, wsz);
    } else {
      store<W>(w.ptr, w.dt, i, n, nw);
    }
    if (a.point == 0) {
      for (int64_t j = n; j < np; ++j) nw[j] = th[j] = W(0);
      for (int64_t j = 0; j < np; j += kLanesGR) {
        for (int l = 0; l < kLanesGR; ++l) {
          const W dl = nw[j + l] - th[j + l];
          acc[l] += dl * dl;
        }
      }
    }
    // the gradient buffer for the next backward: zeros, or −g1 / −b (lean mode: it then accumulates g − g1)
    if (a.preload == 0) {
      std::memset(static_cast<char*>(g.ptr) + i * gsz, 0, n * gsz);
    } else {
      if (a.preload == 1) {
        for (int64_t j = 0; j < n; ++j) out[j] = -gv[j];
      } else if (a.point == 0) {  // −b, b = the value just saved
        load<W>(g1s.ptr, g1s.dt, i, n, out);
        for (int64_t j = 0; j < n; ++j) out[j] = -out[j];
      } else {
        for (int64_t j = 0; j < n; ++j) out[j] = -d[j];
      }
      store<W>(g.ptr, g.dt, i, n, out);
    }
  }
  return lanes_total(acc);
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
  return run_items(items_of(weights), acc_type(wide), [&](const Item& it) {
    const Slot& wt = w[it.t];
    const ScalarType target = grid.has_value() && wt.dt == ScalarType::Float ? *grid : wt.dt;
    if (wt.dt == ScalarType::Double)
      return perturb_item<double>(wt, g[it.t], ths[it.t], g1s[it.t], gps[it.t], target, it.t, a, it);
    return perturb_item<float>(wt, g[it.t], ths[it.t], g1s[it.t], gps[it.t], target, it.t, a, it);
  });
}

// ------------------------------------------------------------------------------------------- restore + combine
struct CombineArgs {
  int64_t mode;  // 0 forward, 1 central, 2 abort (restore)
  bool delta;    // lean mode: the gradient buffer holds g − g1 (forward) or g − b (central)
  double sa, sb;
};

template <typename W, int MODE, bool DELTA>
double combine_item(const Slot& w, const Slot& g, const Slot& ths, const Slot& g1s, const Slot& gps, double coef_d,
                    const CombineArgs& a, const Item& it) {
  W acc[kLanesGR] = {};
  W g1[kBlock], gv[kBlock], ga[kBlock], out[kBlock];
  const W coef = static_cast<W>(coef_d), sa = static_cast<W>(a.sa), sb = static_cast<W>(a.sb);
  const size_t wsz = elem_size(w.dt), ssz = elem_size(g1s.dt);
  copy_range(w, ths, it.begin, it.end, wsz);
  if (MODE == 2 && g1s.dt == g.dt) {
    copy_range(g, g1s, it.begin, it.end, ssz);
    return 0.0;
  }
  for (int64_t i = it.begin; i < it.end; i += kBlock) {
    const int64_t n = std::min(kBlock, it.end - i);
    const int64_t np = (n + kLanesGR - 1) / kLanesGR * kLanesGR;
    load<W>(g1s.ptr, g1s.dt, i, n, g1);
    if (MODE == 2) {  // restore, lean: g1 was saved rounded
      store<W>(g.ptr, g.dt, i, n, g1);
      continue;
    }
    load<W>(g.ptr, g.dt, i, n, gv);
    if (MODE == 1) load<W>(gps.ptr, gps.dt, i, n, ga);
    for (int64_t j = n; j < np; ++j) g1[j] = gv[j] = ga[j] = W(0);
    for (int64_t j = 0; j < np; j += kLanesGR) {
      for (int l = 0; l < kLanesGR; ++l) {
        const int64_t k = j + l;
        W corr;
        if (MODE == 1) {
          const W gp = DELTA ? ga[k] + g1[k] : ga[k];
          const W gm = DELTA ? gv[k] + g1[k] : gv[k];
          corr = coef * (sa * gp - sb * gm);
        } else if (DELTA) {
          corr = coef * (sa * gv[k] + (sa - sb) * g1[k]);
        } else {
          corr = coef * (sa * gv[k] - sb * g1[k]);
        }
        out[k] = g1[k] + corr;
        acc[l] += corr * corr;
      }
    }
    store<W>(g.ptr, g.dt, i, n, out);
  }
  return lanes_total(acc);
}

template <typename W>
double combine_any(const Slot& w, const Slot& g, const Slot& ths, const Slot& g1s, const Slot& gps, double coef,
                   const CombineArgs& a, const Item& it) {
  if (a.mode == 2) return combine_item<W, 2, false>(w, g, ths, g1s, gps, coef, a, it);
  if (a.mode == 1)
    return a.delta ? combine_item<W, 1, true>(w, g, ths, g1s, gps, coef, a, it)
                   : combine_item<W, 1, false>(w, g, ths, g1s, gps, coef, a, it);
  return a.delta ? combine_item<W, 0, true>(w, g, ths, g1s, gps, coef, a, it)
                 : combine_item<W, 0, false>(w, g, ths, g1s, gps, coef, a, it);
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
  return run_items(items_of(weights), acc_type(wide), [&](const Item& it) {
    const double coef = mode == 2 ? 0.0 : coefs[it.t];
    if (wide) return combine_any<double>(w[it.t], g[it.t], ths[it.t], g1s[it.t], gps[it.t], coef, a, it);
    return combine_any<float>(w[it.t], g[it.t], ths[it.t], g1s[it.t], gps[it.t], coef, a, it);
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
}

TORCH_LIBRARY_IMPL(grkernels_cpp, CPU, m) {
  m.impl("gr_sumsq", &grk::gr_sumsq);
  m.impl("gr_perturb", &grk::gr_perturb);
  m.impl("gr_combine", &grk::gr_combine);
}
