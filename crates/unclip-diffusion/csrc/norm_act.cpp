// GroupNorm → per-sample, per-channel affine → SiLU as one CPU kernel, forward and backward, in
// float32, bfloat16 (computed in float32) and float64. ADM's ResBlocks run this chain twice each
// (norm1 → SiLU, norm2 → scale-shift → SiLU); as separate ATen ops its forward and backward take
// 2.7–4× the time of the GroupNorm alone on CPU (broadcast multiply-adds, their sum-to-size
// reductions and the SiLU each sweep the map), here a few sweeps over each cache-sized group.
//
// y = act(x̂ · a[n, c] + b[n, c]), x̂ = (x − mean[n, g]) · rstd[n, g], act = SiLU or identity.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

thread_local std::string last_error;

// Everything the entry points call is force-inlined into them, so each instruction-set build of
// them (UNCLIP_KERNELS below) gets its own vectorised copy of the loops.
#define UNCLIP_INLINE inline __attribute__((always_inline))

constexpr int64_t kChunk = 1024;  // float partial sums over at most this many, then in double

UNCLIP_INLINE float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even, as c10::BFloat16 does (NaN stays NaN).
UNCLIP_INLINE uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

// Storage type T, compute type A.
template <typename T>
struct Io;
template <>
struct Io<float> {
  using A = float;
  UNCLIP_INLINE static float load(const float* p, int64_t i) { return p[i]; }
  UNCLIP_INLINE static void store(float* p, int64_t i, float v) { p[i] = v; }
};
template <>
struct Io<uint16_t> {
  using A = float;
  UNCLIP_INLINE static float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
  UNCLIP_INLINE static void store(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }
};
template <>
struct Io<double> {
  using A = double;
  UNCLIP_INLINE static double load(const double* p, int64_t i) { return p[i]; }
  UNCLIP_INLINE static void store(double* p, int64_t i, double v) { p[i] = v; }
};

// exp for the sigmoid: Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial,
// ~1 ulp), branch-free so the loops vectorise; float64 uses std::exp.
UNCLIP_INLINE float exp_approx(float x) {
  // Comparisons, not std::fmin/fmax (whose NaN rules make them libm calls that stop vectorising).
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  // n = round(x / ln 2) by the 1.5·2²³ trick (a floor call would be a libm call here too).
  const float magic = 12582912.0f;
  float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
UNCLIP_INLINE double exp_approx(double x) { return std::exp(x); }

template <typename A>
UNCLIP_INLINE A sigmoid(A z) {
  return A(1) / (A(1) + exp_approx(-z));
}

// Σ (x − shift) and Σ (x − shift)² over n elements. `omp simd` lets the float reductions
// vectorise without -ffast-math (the loops are written for it on every instruction set).
template <typename T, typename A = typename Io<T>::A>
UNCLIP_INLINE void moments(const T* x, int64_t n, A shift, double& sum, double& sum_sq) {
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t end = std::min(n, start + kChunk);
    A s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
    for (int64_t i = start; i < end; ++i) {
      A v = Io<T>::load(x, i) - shift;
      s += v;
      q += v * v;
    }
    sum += s;
    sum_sq += q;
  }
}

// One (sample, group): `channels` maps of `hw` elements, contiguous.
template <typename T>
UNCLIP_INLINE void forward_group(const T* x, T* y, const typename Io<T>::A* a, const typename Io<T>::A* b,
                   int64_t channels, int64_t hw, double eps, bool silu, double& mean_out,
                   double& rstd_out) {
  using A = typename Io<T>::A;
  const int64_t n = channels * hw;
  double sum = 0, sum_sq = 0;
  moments(x, n, A(0), sum, sum_sq);
  const double mean = sum / n;
  // Second sweep about the mean (the group is in cache): no cancellation when |mean| ≫ std.
  sum = 0, sum_sq = 0;
  moments(x, n, static_cast<A>(mean), sum, sum_sq);
  const double centred_mean = sum / n;
  const double var = std::max(sum_sq / n - centred_mean * centred_mean, 0.0);
  const double rstd = 1.0 / std::sqrt(var + eps);
  mean_out = mean;
  rstd_out = rstd;
  for (int64_t c = 0; c < channels; ++c) {
    const A scale = static_cast<A>(a[c] * rstd);
    const A shift = static_cast<A>(b[c] - mean * a[c] * rstd);
    const T* xc = x + c * hw;
    T* yc = y + c * hw;
    if (silu) {
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) {
        A z = Io<T>::load(xc, i) * scale + shift;
        Io<T>::store(yc, i, z * sigmoid(z));
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) {
        Io<T>::store(yc, i, Io<T>::load(xc, i) * scale + shift);
      }
    }
  }
}

// dz at element k (the gradient at the affine's output), and its two sums.
template <typename T, bool Silu, typename A = typename Io<T>::A>
UNCLIP_INLINE void backward_element(const T* x, const T* dy, A* dz, int64_t k, A mean, A rstd, A a,
                                    A b, A& sum_dz, A& sum_dz_xhat) {
  A xhat = (Io<T>::load(x, k) - mean) * rstd;
  A g = Io<T>::load(dy, k);
  if (Silu) {
    A z = xhat * a + b;
    A s = sigmoid(z);
    g = g * (s * (A(1) + z * (A(1) - s)));
  }
  dz[k] = g;
  sum_dz += g;
  sum_dz_xhat += g * xhat;
}

// One (sample, group) of the backward. dz (the gradient at the affine's output) goes to `scratch`.
template <typename T>
UNCLIP_INLINE void backward_group(const T* x, const T* dy, T* dx, const typename Io<T>::A* a,
                    const typename Io<T>::A* b, typename Io<T>::A* da, typename Io<T>::A* db,
                    int64_t channels, int64_t hw, double mean, double rstd, bool silu,
                    typename Io<T>::A* scratch) {
  using A = typename Io<T>::A;
  const int64_t n = channels * hw;
  const A mean_a = static_cast<A>(mean), rstd_a = static_cast<A>(rstd);
  double g1 = 0, g2 = 0;  // Σ_c a_c Σ dz, Σ_c a_c Σ dz·x̂
  for (int64_t c = 0; c < channels; ++c) {
    const A ac = a[c], bc = b[c];
    const T* xc = x + c * hw;
    const T* dyc = dy + c * hw;
    A* dz = scratch + c * hw;
    double s1 = 0, s2 = 0;
    for (int64_t start = 0; start < hw; start += kChunk) {
      const int64_t end = std::min(hw, start + kChunk);
      A p1 = 0, p2 = 0;
      if (silu) {
#pragma omp simd reduction(+ : p1, p2)
        for (int64_t i = start; i < end; ++i) {
          backward_element<T, true>(xc, dyc, dz, i, mean_a, rstd_a, ac, bc, p1, p2);
        }
      } else {
#pragma omp simd reduction(+ : p1, p2)
        for (int64_t i = start; i < end; ++i) {
          backward_element<T, false>(xc, dyc, dz, i, mean_a, rstd_a, ac, bc, p1, p2);
        }
      }
      s1 += p1;
      s2 += p2;
    }
    db[c] = static_cast<A>(s1);
    da[c] = static_cast<A>(s2);
    g1 += ac * s1;
    g2 += ac * s2;
  }
  // dx = rstd·(a_c·dz − g1/n − x̂·g2/n) = dz·k1 + x·k2 + k3.
  const double k2 = -rstd * rstd * g2 / n;
  const double k3 = -rstd * g1 / n - mean * k2;
  for (int64_t c = 0; c < channels; ++c) {
    const A k1 = static_cast<A>(rstd * a[c]), k2a = static_cast<A>(k2), k3a = static_cast<A>(k3);
    const T* xc = x + c * hw;
    const A* dz = scratch + c * hw;
    T* dxc = dx + c * hw;
#pragma omp simd
    for (int64_t i = 0; i < hw; ++i) {
      Io<T>::store(dxc, i, dz[i] * k1 + Io<T>::load(xc, i) * k2a + k3a);
    }
  }
}

template <typename T>
UNCLIP_INLINE void forward_range(const T* x, T* y, const typename Io<T>::A* a, const typename Io<T>::A* b,
                   double* mean, double* rstd, int64_t begin, int64_t end, int64_t groups,
                   int64_t channels, int64_t hw, double eps, bool silu) {
  for (int64_t ng = begin; ng < end; ++ng) {
    const int64_t n = ng / groups, g = ng % groups;
    const int64_t offset = (n * groups + g) * channels;  // first channel of the group, over N·C
    forward_group(x + offset * hw, y + offset * hw, a + offset, b + offset, channels, hw, eps, silu,
                  mean[ng], rstd[ng]);
  }
}

template <typename T>
UNCLIP_INLINE void backward_range(const T* x, const T* dy, T* dx, const typename Io<T>::A* a,
                    const typename Io<T>::A* b, typename Io<T>::A* da, typename Io<T>::A* db,
                    const double* mean, const double* rstd, int64_t begin, int64_t end,
                    int64_t groups, int64_t channels, int64_t hw, bool silu) {
  using A = typename Io<T>::A;
  thread_local std::vector<A> scratch;
  scratch.resize(static_cast<size_t>(channels * hw));
  for (int64_t ng = begin; ng < end; ++ng) {
    const int64_t n = ng / groups, g = ng % groups;
    const int64_t offset = (n * groups + g) * channels;
    backward_group(x + offset * hw, dy + offset * hw, dx + offset * hw, a + offset, b + offset,
                   da + offset, db + offset, channels, hw, mean[ng], rstd[ng], silu,
                   scratch.data());
  }
}

// The entry points, compiled for AVX-512, AVX2 and baseline x86-64 (the wheel's libtorch runs on
// all three) and picked as ATen picks its own kernels: at::get_cpu_capability(), which
// ATEN_CPU_CAPABILITY=default|avx2|avx512 overrides — the tests run each this way.
#define UNCLIP_KERNELS(NS, ATTR)                                                                \
  namespace NS {                                                                                \
  template <typename T>                                                                         \
  ATTR void forward(const T* x, T* y, const typename Io<T>::A* a, const typename Io<T>::A* b,   \
                    double* mean, double* rstd, int64_t begin, int64_t end, int64_t groups,     \
                    int64_t channels, int64_t hw, double eps, bool silu) {                      \
    forward_range<T>(x, y, a, b, mean, rstd, begin, end, groups, channels, hw, eps, silu);      \
  }                                                                                             \
  template <typename T>                                                                         \
  ATTR void backward(const T* x, const T* dy, T* dx, const typename Io<T>::A* a,                \
                     const typename Io<T>::A* b, typename Io<T>::A* da, typename Io<T>::A* db,  \
                     const double* mean, const double* rstd, int64_t begin, int64_t end,        \
                     int64_t groups, int64_t channels, int64_t hw, bool silu) {                 \
    backward_range<T>(x, dy, dx, a, b, da, db, mean, rstd, begin, end, groups, channels, hw,    \
                      silu);                                                                    \
  }                                                                                             \
  }

UNCLIP_KERNELS(isa_default, )
#if defined(__x86_64__) && defined(__GNUC__)
#define UNCLIP_X86 1
UNCLIP_KERNELS(isa_avx2, __attribute__((target("arch=x86-64-v3"))))
UNCLIP_KERNELS(isa_avx512, __attribute__((target("arch=x86-64-v4"))))
#endif

enum class Isa { kDefault, kAvx2, kAvx512 };

Isa chosen_isa() {
  static const Isa isa = [] {
#ifdef UNCLIP_X86
    const std::string aten = at::get_cpu_capability();
    __builtin_cpu_init();
    if (aten == "AVX512" && __builtin_cpu_supports("x86-64-v4")) return Isa::kAvx512;
    if ((aten == "AVX512" || aten == "AVX2") && __builtin_cpu_supports("x86-64-v3")) {
      return Isa::kAvx2;
    }
#endif
    return Isa::kDefault;
  }();
  return isa;
}

template <typename T, typename... Args>
void run_forward(Args... args) {
  switch (chosen_isa()) {
#ifdef UNCLIP_X86
    case Isa::kAvx512:
      return isa_avx512::forward<T>(args...);
    case Isa::kAvx2:
      return isa_avx2::forward<T>(args...);
#endif
    default:
      return isa_default::forward<T>(args...);
  }
}

template <typename T, typename... Args>
void run_backward(Args... args) {
  switch (chosen_isa()) {
#ifdef UNCLIP_X86
    case Isa::kAvx512:
      return isa_avx512::backward<T>(args...);
    case Isa::kAvx2:
      return isa_avx2::backward<T>(args...);
#endif
    default:
      return isa_default::backward<T>(args...);
  }
}

// The grain: enough (sample, group) pairs per task to amortise the fork.
int64_t grain(int64_t group_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, group_elems)); }

// Calls f with a value of the kernel's storage type for x's dtype (bf16 as its raw uint16_t).
template <typename F>
void with_storage_type(at::ScalarType dtype, F f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(uint16_t{});
    default:
      return f(double{});
  }
}

template <typename T>
T* data(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

struct GroupNormAct : public torch::autograd::Function<GroupNormAct> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x_in,
                            const at::Tensor& a_in, const at::Tensor& b_in, int64_t groups,
                            double eps, bool silu) {
    const at::Tensor x = x_in.contiguous();
    const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
    const at::ScalarType affine = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(a.scalar_type() == affine && b.scalar_type() == affine,
                "group_norm_act: gain and bias must be ", affine, " for a ", x.scalar_type(),
                " input");
    const int64_t batch = x.size(0), channels = x.size(1);
    const int64_t hw = x.numel() / std::max<int64_t>(1, batch * channels);
    const int64_t per_group = channels / groups;
    at::Tensor y = at::empty_like(x);
    at::Tensor mean = at::empty({batch, groups}, x.options().dtype(at::kDouble));
    at::Tensor rstd = at::empty({batch, groups}, x.options().dtype(at::kDouble));
    at::parallel_for(0, batch * groups, grain(per_group * hw), [&](int64_t begin, int64_t end) {
      with_storage_type(x.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        using A = typename Io<T>::A;
        run_forward<T>(data<const T>(x), data<T>(y), data<const A>(a), data<const A>(b),
                       data<double>(mean), data<double>(rstd), begin, end, groups, per_group, hw,
                       eps, silu);
      });
    });
    ctx->save_for_backward({x, a, b, mean, rstd});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["silu"] = silu;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!grads[0].defined()) {  // the output did not reach the loss
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &a = saved[1], &b = saved[2], &mean = saved[3],
                     &rstd = saved[4];
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const bool silu = ctx->saved_data["silu"].toBool();
    const at::Tensor dy = grads[0].to(x.scalar_type()).contiguous();
    const int64_t batch = x.size(0), channels = x.size(1);
    const int64_t hw = x.numel() / std::max<int64_t>(1, batch * channels);
    const int64_t per_group = channels / groups;
    at::Tensor dx = at::empty_like(x);
    at::Tensor da = at::empty_like(a);
    at::Tensor db = at::empty_like(b);
    at::parallel_for(0, batch * groups, grain(per_group * hw), [&](int64_t begin, int64_t end) {
      with_storage_type(x.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        using A = typename Io<T>::A;
        run_backward<T>(data<const T>(x), data<const T>(dy), data<T>(dx), data<const A>(a),
                        data<const A>(b), data<A>(da), data<A>(db), data<const double>(mean),
                        data<const double>(rstd), begin, end, groups, per_group, hw, silu);
      });
    });
    return {dx, da, db, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// x: [N, C, *] on the CPU in float32, bfloat16 or float64; a, b: [N, C] (float64 for float64 x,
// else float32; the caller casts them, so autograd casts their gradients back). Returns a new at::Tensor* (tch takes ownership), or null with the message in
// unclip_norm_act_last_error(). The caller checks shapes, device, dtype and C % groups.
at::Tensor* unclip_group_norm_act(const at::Tensor* x, const at::Tensor* a, const at::Tensor* b,
                                  int64_t groups, double eps, bool silu) {
  try {
    return new at::Tensor(GroupNormAct::apply(*x, *a, *b, groups, eps, silu));
  } catch (const std::exception& e) {
    last_error = e.what();
    return nullptr;
  }
}

const char* unclip_norm_act_last_error() { return last_error.c_str(); }

// The instruction set the kernel runs with: "avx512", "avx2" or "default".
const char* unclip_norm_act_isa() {
  switch (chosen_isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

}  // extern "C"
