// CPU kernels of the loss ops: chosen-token log-prob + entropy (forward, backward) and the token-level
// PPO-clip policy loss, for logits [outer, inner, V] (unit stride over V, any row strides).
//
// Same math as the Triton kernels (grkernels/kernels/logprob.py, policy_loss.py); the specification is the
// torch reference in grkernels/ops/spec.py. Python launchers: grkernels/kernels/cpp_losses.py. Per row, one pass over the vocabulary in chunks of kChunk
// entries (the chunk is converted to fp32 in a stack buffer, i.e. in L1; nothing vocab-sized is allocated):
//
//   z = logits * inv_temp        m = running max        s = sum exp(z - m)        a = sum exp(z - m) (z - m)
//   per chunk with max c:  m' = max(m, c),  s <- s e^(m - m') + sum exp(z - m'),
//                          a <- e^(m - m') (a + s (m - m')) + sum exp(z - m') (z - m')
//   logp = (z_y - m) - log s         H = log s - a / s          (the lse is kept as m and log s)
//
// Backward: dlogits_j = inv_temp (g_lp (1[j = y] - p_j) - g_H p_j (log p_j + H)), p_j = exp((z_j - m) - log s);
// inactive rows, and rows whose upstream gradients are both 0 (masked tokens) with a finite log-sum-exp, read
// nothing and get zeros. A row without a finite log-sum-exp (NaN, +inf, or -inf everywhere) is computed even
// with zero upstream gradients, which makes it NaN (0 * NaN), as torch autograd does: the rule for non-finite
// rows in grkernels/ops/spec.py, so that a non-finite-gradient check sees the row on every backend.
// Rows are split over threads with at::parallel_for; each row is computed by one thread in a fixed order,
// so the results do not depend on the thread count. fp64 logits are computed in fp64 (std::exp), all other
// dtypes in fp32. Outputs: [rows] tensors in fp32 (fp64 for fp64 logits).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "simd.h"

namespace grk {
namespace {

constexpr int64_t kChunk = 2048;
constexpr float kNegBig = -1.0e30f;  // finite start of the running max: m - m' is never inf - inf

// ------------------------------------------------------------------------------------------- generic helpers
inline double exp_acc(double x) { return std::exp(x); }
inline float exp_acc(float x) { return simd().exp1(x); }

// dst[0, n) = src * inv_temp in acc_t, then -inf up to the next multiple of kLanes
template <typename scalar_t, typename acc_t>
inline void load_chunk(const scalar_t* src, int64_t n, acc_t inv_temp, acc_t* dst) {
  if (inv_temp == acc_t(1)) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]) * inv_temp;
  }
  for (int64_t i = n; i < padded(n); ++i) dst[i] = -std::numeric_limits<acc_t>::infinity();
}

template <typename acc_t>
struct RowStats {
  acc_t logp, m, log_s, ent;
};

// One row: (logp of y, m, log s, H). An inactive row reads nothing and gives (0, 0, 0, 0).
template <typename scalar_t, typename acc_t>
RowStats<acc_t> row_forward(const scalar_t* row, int64_t V, int64_t y, bool act, acc_t inv_temp, bool with_ent) {
  if (!act) return {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  alignas(32) acc_t buf[kChunk + kLanes];
  acc_t m = acc_t(kNegBig), s = 0, a = 0;
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    load_chunk<scalar_t, acc_t>(row + start, n, inv_temp, buf);
    acc_t cm, cs, ca;
    if constexpr (std::is_same_v<acc_t, float>) {
      const SimdKernels& k = simd();
      cm = std::max(m, k.chunk_max(buf, padded(n)));
      k.chunk_sums(buf, padded(n), cm, with_ent, &cs, &ca);
    } else {
      cm = -std::numeric_limits<acc_t>::infinity();
      for (int64_t i = 0; i < n; ++i) cm = buf[i] > cm ? buf[i] : cm;
      cm = std::max(m, cm);
      cs = 0;
      ca = 0;
      for (int64_t i = 0; i < n; ++i) {
        const acc_t d = buf[i] - cm;
        const acc_t e = exp_acc(d);
        cs += e;
        ca += e > 0 ? e * d : acc_t(0);
      }
    }
    const acc_t alpha = exp_acc(m - cm);
    if (with_ent) a = alpha * (a + s * (m - cm)) + ca;
    s = s * alpha + cs;
    m = cm;
  }
  const acc_t log_s = std::log(s);
  const acc_t z_y = static_cast<acc_t>(row[y]) * inv_temp;  // x * 1 == x: the same value load_chunk gives
  return {(z_y - m) - log_s, m, log_s, with_ent ? log_s - a / s : acc_t(0)};
}

template <typename scalar_t, typename acc_t>
void row_backward(const scalar_t* row, scalar_t* grow, int64_t V, int64_t y, bool act, acc_t m, acc_t log_s,
                  acc_t h, acc_t g_lp, acc_t g_h, acc_t inv_temp) {
  const bool no_upstream = g_lp == acc_t(0) && g_h == acc_t(0) && std::isfinite(m) && std::isfinite(log_s);
  if (!act || no_upstream) {
    for (int64_t j = 0; j < V; ++j) grow[j] = scalar_t(0);
    return;
  }
  alignas(32) acc_t buf[kChunk + kLanes];
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    load_chunk<scalar_t, acc_t>(row + start, n, inv_temp, buf);
    if constexpr (std::is_same_v<acc_t, float>) {
      simd().chunk_grad(buf, padded(n), m, log_s, g_lp, g_h, h);
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const acc_t lp = (buf[i] - m) - log_s;
        const acc_t p = exp_acc(lp);
        buf[i] = -g_lp * p - (g_h != acc_t(0) ? g_h * p * (p > 0 ? lp + h : acc_t(0)) : acc_t(0));
      }
    }
    if (y >= start && y < start + n) buf[y - start] += g_lp;
    // written after all reads of this chunk: grow may be the logits row itself (in-place backward)
    for (int64_t i = 0; i < n; ++i) grow[start + i] = static_cast<scalar_t>(buf[i] * inv_temp);
  }
}

// ------------------------------------------------------------------------------------------- argument checks
void check_logits(const at::Tensor& logits, const char* what) {
  TORCH_CHECK(logits.device().is_cpu(), what, ": the C++ kernels run on CPU tensors, got ", logits.device());
  TORCH_CHECK(logits.dim() == 3, what, ": logits must be [outer, inner, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(2) == 0 || logits.stride(2) == 1, what, ": logits must have unit stride over V");
}

void check_vec(const at::Tensor& t, int64_t n, const char* name, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.numel() == n && t.is_contiguous(), what, ": ", name,
              " must be a contiguous CPU vector of ", n, " entries, got ", t.sizes());
}

struct Rows {
  int64_t n, inner, s0, s1, V;
  explicit Rows(const at::Tensor& x)
      : n(x.size(0) * x.size(1)), inner(x.size(1)), s0(x.stride(0)), s1(x.stride(1)), V(x.size(2)) {}
  int64_t offset(int64_t r) const { return (r / inner) * s0 + (r % inner) * s1; }
  int64_t grain() const { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }
};

inline int64_t clamp_id(int64_t y, int64_t V) { return std::min(std::max<int64_t>(y, 0), V - 1); }

at::ScalarType acc_type_of(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ------------------------------------------------------------------------------------------- ops
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logp_entropy_fwd(
    const at::Tensor& logits, const at::Tensor& ids, const std::optional<at::Tensor>& active, double inv_temp,
    bool with_entropy) {
  const char* what = "grkernels_cpp.logp_entropy_fwd";
  check_logits(logits, what);
  const Rows rows(logits);
  check_vec(ids, rows.n, "ids", what);
  TORCH_CHECK(ids.scalar_type() == at::kLong, what, ": ids must be int64");
  if (active) {
    check_vec(*active, rows.n, "active", what);
    TORCH_CHECK(active->scalar_type() == at::kBool, what, ": active must be bool");
  }
  const auto opts = logits.options().dtype(acc_type_of(logits));
  at::Tensor logp = at::empty({rows.n}, opts), mx = at::empty({rows.n}, opts);
  at::Tensor log_s = at::empty({rows.n}, opts), ent = at::empty({rows.n}, opts);
  const int64_t* id = ids.data_ptr<int64_t>();
  const bool* act = active ? active->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logp_entropy_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    acc_t *o_lp = logp.data_ptr<acc_t>(), *o_m = mx.data_ptr<acc_t>();
    acc_t *o_ls = log_s.data_ptr<acc_t>(), *o_h = ent.data_ptr<acc_t>();
    at::parallel_for(0, rows.n, rows.grain(), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const bool a = act == nullptr || act[r];
        const auto st = row_forward<scalar_t, acc_t>(base + rows.offset(r), rows.V, clamp_id(id[r], rows.V), a,
                                                     static_cast<acc_t>(inv_temp), with_entropy);
        o_lp[r] = st.logp;
        o_m[r] = st.m;
        o_ls[r] = st.log_s;
        o_h[r] = st.ent;
      }
    });
  });
  return {logp, mx, log_s, ent};
}

void logp_entropy_bwd(const at::Tensor& logits, const at::Tensor& ids, const std::optional<at::Tensor>& active,
                      const at::Tensor& mx, const at::Tensor& log_s, const at::Tensor& ent, const at::Tensor& g_lp,
                      const std::optional<at::Tensor>& g_ent, double inv_temp, at::Tensor& grad) {
  const char* what = "grkernels_cpp.logp_entropy_bwd";
  check_logits(logits, what);
  const Rows rows(logits);
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() &&
                  (grad.size(2) == 0 || grad.stride(2) == 1),
              what, ": grad must be a tensor like logits (same shape, dtype, unit stride over V)");
  const auto acc = acc_type_of(logits);
  for (const at::Tensor* t : {&ids, &mx, &log_s, &ent, &g_lp}) check_vec(*t, rows.n, "row vector", what);
  TORCH_CHECK(mx.scalar_type() == acc && log_s.scalar_type() == acc && ent.scalar_type() == acc &&
                  g_lp.scalar_type() == acc,
              what, ": statistics and upstream gradients must be ", acc);
  if (g_ent) {
    check_vec(*g_ent, rows.n, "g_ent", what);
    TORCH_CHECK(g_ent->scalar_type() == acc, what, ": g_ent must be ", acc);
  }
  if (active) {
    check_vec(*active, rows.n, "active", what);
    TORCH_CHECK(active->scalar_type() == at::kBool, what, ": active must be bool");
  }
  const Rows grows(grad);
  const int64_t* id = ids.data_ptr<int64_t>();
  const bool* act = active ? active->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logp_entropy_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    scalar_t* gbase = grad.data_ptr<scalar_t>();
    const acc_t *m = mx.const_data_ptr<acc_t>(), *ls = log_s.const_data_ptr<acc_t>();
    const acc_t *h = ent.const_data_ptr<acc_t>(), *glp = g_lp.const_data_ptr<acc_t>();
    const acc_t* gh = g_ent ? g_ent->const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, rows.n, rows.grain(), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const bool a = act == nullptr || act[r];
        row_backward<scalar_t, acc_t>(base + rows.offset(r), gbase + grows.offset(r), rows.V,
                                      clamp_id(id[r], rows.V), a, m[r], ls[r], h[r], glp[r],
                                      gh != nullptr ? gh[r] : acc_t(0), static_cast<acc_t>(inv_temp));
      }
    });
  });
}

// Token-level PPO-clip loss per token (see grkernels/kernels/policy_loss.py for the formulas; torch.min's
// gradient rule with ties split evenly). Outputs: terms [2, n] = (w l, H m), stats [3, n] = (KL m, low-clip m,
// high-clip m), the lse parts m and log s, and g_lp = w dl/dlp (the loss gradient per token).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_fwd(
    const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& mask, const at::Tensor& weights,
    const at::Tensor& adv, const std::optional<at::Tensor>& old, const std::optional<at::Tensor>& ref,
    double inv_temp, double clip_low, double clip_high, std::optional<double> delta, double beta, int64_t kl_est) {
  const char* what = "grkernels_cpp.policy_loss_fwd";
  check_logits(logits, what);
  const Rows rows(logits);
  const auto acc = acc_type_of(logits);
  check_vec(ids, rows.n, "ids", what);
  check_vec(mask, rows.n, "mask", what);
  TORCH_CHECK(ids.scalar_type() == at::kLong && mask.scalar_type() == at::kBool, what, ": ids int64, mask bool");
  for (const at::Tensor* t : {&weights, &adv}) {
    check_vec(*t, rows.n, "weights/advantages", what);
    TORCH_CHECK(t->scalar_type() == acc, what, ": weights and advantages must be ", acc);
  }
  for (const auto* t : {&old, &ref})
    if (*t) {
      check_vec(**t, rows.n, "old/ref log-probs", what);
      TORCH_CHECK((*t)->scalar_type() == acc, what, ": old/ref log-probs must be ", acc);
    }
  TORCH_CHECK(kl_est >= 0 && kl_est <= 2, what, ": kl_est must be 0 (k1), 1 (k2) or 2 (k3)");
  const auto opts = logits.options().dtype(acc);
  at::Tensor terms = at::empty({2, rows.n}, opts), stats = at::empty({3, rows.n}, opts);
  at::Tensor mx = at::empty({rows.n}, opts), log_s = at::empty({rows.n}, opts), g_lp = at::empty({rows.n}, opts);
  const int64_t* id = ids.data_ptr<int64_t>();
  const bool* act = mask.data_ptr<bool>();
  const int64_t n = rows.n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "policy_loss_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    const acc_t *w = weights.const_data_ptr<acc_t>(), *A = adv.const_data_ptr<acc_t>();
    const acc_t* o = old ? old->const_data_ptr<acc_t>() : nullptr;
    const acc_t* rf = ref ? ref->const_data_ptr<acc_t>() : nullptr;
    acc_t *tm = terms.data_ptr<acc_t>(), *sm = stats.data_ptr<acc_t>();
    acc_t *o_m = mx.data_ptr<acc_t>(), *o_ls = log_s.data_ptr<acc_t>(), *o_g = g_lp.data_ptr<acc_t>();
    const acc_t lo = acc_t(1) - static_cast<acc_t>(clip_low), hi = acc_t(1) + static_cast<acc_t>(clip_high);
    const acc_t dl = delta ? static_cast<acc_t>(*delta) : acc_t(0), bt = static_cast<acc_t>(beta);
    at::parallel_for(0, n, rows.grain(), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const bool a = act[r];
        const auto st = row_forward<scalar_t, acc_t>(base + rows.offset(r), rows.V, clamp_id(id[r], rows.V), a,
                                                     static_cast<acc_t>(inv_temp), true);
        const acc_t lp = st.logp, adv_r = A[r];
        const acc_t old_r = o ? o[r] : lp;  // on-policy: r = 1 and dr/dlp = r
        // masked tokens may hold padding garbage in old/ref: zero the differences before exp()
        const acc_t ratio = std::exp(a ? lp - old_r : acc_t(0));
        const acc_t r_c = std::min(std::max(ratio, lo), hi);
        const acc_t dr_c = (ratio >= lo && ratio <= hi) ? ratio : acc_t(0);
        const acc_t r_1 = delta ? std::min(ratio, dl) : ratio;
        const acc_t dr_1 = delta ? (ratio <= dl ? ratio : acc_t(0)) : ratio;
        const acc_t s1 = r_1 * adv_r, s2 = r_c * adv_r;
        const acc_t g1 = s1 < s2 ? acc_t(1) : (s1 == s2 ? acc_t(0.5) : acc_t(0));
        acc_t per_tok = -std::min(s1, s2);
        acc_t dper = -(g1 * adv_r * dr_1 + (acc_t(1) - g1) * adv_r * dr_c);
        acc_t kl = 0;
        if (rf) {
          const acc_t d = a ? rf[r] - lp : acc_t(0);
          acc_t dkl;
          if (kl_est == 0) {
            kl = -d;
            dkl = 1;
          } else if (kl_est == 1) {
            kl = acc_t(0.5) * d * d;
            dkl = -d;
          } else {
            const acc_t ed = std::exp(d);
            kl = ed - d - acc_t(1);
            dkl = acc_t(1) - ed;
          }
          per_tok += bt * kl;
          dper += bt * dkl;
        }
        const acc_t mf = a ? acc_t(1) : acc_t(0);
        tm[r] = w[r] * per_tok;
        tm[n + r] = st.ent * mf;
        sm[r] = kl * mf;
        sm[n + r] = (r_1 < lo && adv_r < 0) ? mf : acc_t(0);
        sm[2 * n + r] = (r_1 > hi && adv_r > 0) ? mf : acc_t(0);
        o_m[r] = st.m;
        o_ls[r] = st.log_s;
        o_g[r] = w[r] * dper;
      }
    });
  });
  return {terms, stats, mx, log_s, g_lp};
}

}  // namespace
}  // namespace grk

TORCH_LIBRARY(grkernels_cpp, m) {
  m.def("logp_entropy_fwd(Tensor logits, Tensor ids, Tensor? active, float inv_temp, bool with_entropy) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("logp_entropy_bwd(Tensor logits, Tensor ids, Tensor? active, Tensor mx, Tensor log_s, Tensor ent, "
        "Tensor g_lp, Tensor? g_ent, float inv_temp, Tensor(a!) grad) -> ()");
  m.def("policy_loss_fwd(Tensor logits, Tensor ids, Tensor mask, Tensor weights, Tensor adv, Tensor? old, "
        "Tensor? ref, float inv_temp, float clip_low, float clip_high, float? delta, float beta, int kl_est) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(grkernels_cpp, CPU, m) {
  m.impl("logp_entropy_fwd", &grk::logp_entropy_fwd);
  m.impl("logp_entropy_bwd", &grk::logp_entropy_bwd);
  m.impl("policy_loss_fwd", &grk::policy_loss_fwd);
}

// `import grkernels._C` loads this library (which registers the ops above); it has no Python functions.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "grkernels C++ CPU kernels (torch.ops.grkernels_cpp)",
                                   -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
