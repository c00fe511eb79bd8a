// Multi-tensor optimiser ops libtch does not expose: PyTorch's fused AdamW (one pass over each
// parameter on CPU, a multi-tensor kernel on CUDA) and the _foreach_ ops behind torch's foreach
// gradient norm, clipping, zeroing and EMA. Each returns 0, or 1 with the message in
// unclip_multi_tensor_last_error(). Empty lists are no-ops (the ATen ops refuse them).
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <string>
#include <vector>

namespace {

thread_local std::string last_error;

template <typename F>
int guarded(F&& f) {
  try {
    c10::AutoGradMode no_grad(false);
    f();
    return 0;
  } catch (const c10::Error& e) {
    last_error = e.what_without_backtrace();
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return 1;
}

std::vector<at::Tensor> list(at::Tensor* const* ts, int n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}

}  // namespace

extern "C" {

const char* unclip_multi_tensor_last_error() { return last_error.c_str(); }

// torch.optim.AdamW(fused=True)'s update of n parameters of one device and dtype at optimiser
// step `step` (counted from 1, as the kernels read it).
int unclip_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads,
                       at::Tensor* const* exp_avgs, at::Tensor* const* exp_avg_sqs, int n,
                       double step, double lr, double beta1, double beta2, double weight_decay,
                       double eps) {
  return guarded([&] {
    if (n == 0) return;
    auto p = list(params, n);
    // The kernels read each parameter's step from a float32 tensor on its device; one shared
    // tensor serves all (they only read it).
    auto step_t = at::full({}, step, p[0].options().dtype(at::kFloat));
    std::vector<at::Tensor> steps(n, step_t);
    at::_fused_adamw_(p, list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n), {}, steps, lr,
                      beta1, beta2, weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
  });
}

// The L2 norm of every tensor's L2 norm (each in its own dtype, as clip_grad_norm_), read back
// once as a double.
int unclip_foreach_global_norm(at::Tensor* const* ts, int n, double* out) {
  return guarded([&] {
    if (n == 0) {
      *out = 0.0;
      return;
    }
    auto norms = at::_foreach_norm(list(ts, n), 2);
    *out = at::stack(norms).to(at::kDouble).norm().item<double>();
  });
}

// Every tensor's L2 norm, as unclip_foreach_global_norm computes them, written into `out` (n
// elements on their device): the per-rank part of a norm over gradients sharded across ranks.
int unclip_foreach_norms(at::Tensor* const* ts, int n, at::Tensor* out) {
  return guarded([&] {
    if (n > 0) out->copy_(at::stack(at::_foreach_norm(list(ts, n), 2)));
  });
}

int unclip_foreach_mul_scalar_(at::Tensor* const* ts, int n, double factor) {
  return guarded([&] {
    if (n > 0) at::_foreach_mul_(list(ts, n), factor);
  });
}

int unclip_foreach_zero_(at::Tensor* const* ts, int n) {
  return guarded([&] {
    if (n > 0) at::_foreach_zero_(list(ts, n));
  });
}

// selfs[i] += weight · (ends[i] − selfs[i]): the EMA update with weight 1 − decay.
int unclip_foreach_lerp_scalar_(at::Tensor* const* selfs, at::Tensor* const* ends, int n,
                                double weight) {
  return guarded([&] {
    if (n > 0) at::_foreach_lerp_(list(selfs, n), list(ends, n), weight);
  });
}

}  // extern "C"
