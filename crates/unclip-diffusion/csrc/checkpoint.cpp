// Activation checkpointing for closures written in Rust: torch.utils.checkpoint's reentrant form as
// a C++ autograd Function. Forward runs the closure without building a graph and keeps only its
// inputs; backward runs it again with the graph on, from the same RNG state (dropout draws the
// same masks) and autocast state as the forward, and backpropagates through that.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" {
// Runs the closure on `n_inputs` tensors (ownership of each at::Tensor* passes to the callee) and
// writes up to `max_outputs` new at::Tensor* (ownership passes to the caller) and their count.
// Returns 0, or non-zero with a message in `error` (NUL-terminated, at most `error_len` bytes).
typedef int (*unclip_checkpoint_run)(void* closure, at::Tensor** inputs, int64_t n_inputs,
                                     at::Tensor** outputs, int64_t max_outputs,
                                     int64_t* n_outputs, char* error, int64_t error_len);
typedef void (*unclip_checkpoint_drop)(void* closure);
}

namespace {

thread_local std::string last_error;

constexpr int64_t kMaxOutputs = 16;

constexpr at::DeviceType kAutocastDevices[] = {at::kCPU, at::kCUDA};

// The RNG and autocast state a forward ran under, to run its recomputation under the same.
struct State {
  at::Tensor cpu_rng;
  at::Tensor cuda_rng;
  int64_t cuda_index = -1;
  bool autocast[2] = {false, false};
  at::ScalarType autocast_dtype[2] = {at::kBFloat16, at::kBFloat16};

  static State capture(const std::vector<at::Tensor>& inputs) {
    State s;
    {
      auto gen = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(gen.mutex());
      s.cpu_rng = gen.get_state();
    }
    for (const auto& t : inputs) {
      if (t.defined() && t.is_cuda()) {
        s.cuda_index = t.device().index();
        auto gen = at::globalContext().defaultGenerator(t.device());
        std::lock_guard<std::mutex> lock(gen.mutex());
        s.cuda_rng = gen.get_state();
        break;
      }
    }
    for (int i = 0; i < 2; ++i) {
      s.autocast[i] = at::autocast::is_autocast_enabled(kAutocastDevices[i]);
      s.autocast_dtype[i] = at::autocast::get_autocast_dtype(kAutocastDevices[i]);
    }
    return s;
  }
};

// Puts a State in force for its lifetime and restores what was there before.
class Restore {
 public:
  explicit Restore(const State& s) : before_(State::capture({})) {
    if (s.cuda_index >= 0) {
      device_ = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(s.cuda_index));
      auto gen = at::globalContext().defaultGenerator(*device_);
      std::lock_guard<std::mutex> lock(gen.mutex());
      cuda_before_ = gen.get_state();
      gen.set_state(s.cuda_rng);
    }
    set_cpu_rng(s.cpu_rng);
    for (int i = 0; i < 2; ++i) {
      at::autocast::set_autocast_dtype(kAutocastDevices[i], s.autocast_dtype[i]);
      at::autocast::set_autocast_enabled(kAutocastDevices[i], s.autocast[i]);
    }
    at::autocast::increment_nesting();
  }
  ~Restore() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    for (int i = 0; i < 2; ++i) {
      at::autocast::set_autocast_enabled(kAutocastDevices[i], before_.autocast[i]);
      at::autocast::set_autocast_dtype(kAutocastDevices[i], before_.autocast_dtype[i]);
    }
    set_cpu_rng(before_.cpu_rng);
    if (device_) {
      auto gen = at::globalContext().defaultGenerator(*device_);
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(cuda_before_);
    }
  }

 private:
  static void set_cpu_rng(const at::Tensor& state) {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(state);
  }
  State before_;
  std::optional<at::Device> device_;
  at::Tensor cuda_before_;
};

// The Rust closure and the state its forward ran under, freed with the graph node that holds
// them.
struct Closure : torch::CustomClassHolder {
  void* closure;
  unclip_checkpoint_run run;
  unclip_checkpoint_drop drop;
  State forward_state;
  Closure(void* c, unclip_checkpoint_run r, unclip_checkpoint_drop d) : closure(c), run(r), drop(d) {}
  ~Closure() override { drop(closure); }

  std::vector<at::Tensor> call(const std::vector<at::Tensor>& inputs) const {
    std::vector<at::Tensor*> in;
    in.reserve(inputs.size());
    for (const auto& t : inputs) in.push_back(new at::Tensor(t));
    at::Tensor* out[kMaxOutputs] = {nullptr};
    int64_t n_out = 0;
    char error[1024] = {0};
    int rc = run(closure, in.data(), static_cast<int64_t>(in.size()), out, kMaxOutputs, &n_out,
                 error, sizeof error);
    std::vector<at::Tensor> outputs;
    for (int64_t i = 0; i < n_out; ++i) {
      outputs.push_back(*out[i]);
      delete out[i];
    }
    if (rc != 0) throw std::runtime_error(std::string("checkpoint: ") + error);
    return outputs;
  }
};

struct Checkpoint : public torch::autograd::Function<Checkpoint> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                c10::intrusive_ptr<Closure> closure,
                                                at::TensorList input_list) {
    // A TensorList (not a vector) is what autograd counts as n differentiable inputs.
    std::vector<at::Tensor> inputs = input_list.vec();
    closure->forward_state = State::capture(inputs);
    ctx->saved_data["closure"] = c10::IValue::make_capsule(closure);
    ctx->save_for_backward(inputs);
    // Autograd is off here (a custom Function's forward): no graph, no saved activations.
    return closure->call(inputs);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto closure = c10::static_intrusive_pointer_cast<Closure>(ctx->saved_data["closure"].toCapsule());
    std::vector<at::Tensor> inputs;
    for (const auto& saved : ctx->get_saved_variables()) {
      at::Tensor d = saved.detach();
      d.requires_grad_(saved.requires_grad());
      inputs.push_back(d);
    }
    std::vector<at::Tensor> outputs;
    {
      Restore restore(closure->forward_state);
      at::AutoGradMode grad(true);
      outputs = closure->call(inputs);
    }
    torch::autograd::variable_list roots, root_grads;
    for (size_t i = 0; i < outputs.size() && i < grads.size(); ++i) {
      if (outputs[i].requires_grad() && grads[i].defined()) {
        roots.push_back(outputs[i]);
        root_grads.push_back(grads[i]);
      }
    }
    if (!roots.empty()) torch::autograd::backward(roots, root_grads);
    torch::autograd::variable_list result = {at::Tensor()};  // the closure
    for (const auto& d : inputs) result.push_back(d.requires_grad() ? d.grad() : at::Tensor());
    return result;
  }
};

}  // namespace

extern "C" {

// Runs the closure through Checkpoint on `n_inputs` tensors (borrowed) and writes its outputs as
// new at::Tensor* (tch takes ownership) and their count; the closure is freed with the graph (or
// at once when no graph is built). Returns 0, or -1 with the message in
// unclip_checkpoint_last_error().
int unclip_checkpoint(void* closure, unclip_checkpoint_run run, unclip_checkpoint_drop drop,
                      const at::Tensor* const* inputs, int64_t n_inputs, at::Tensor** outputs,
                      int64_t max_outputs, int64_t* n_outputs) {
  try {
    auto holder = c10::make_intrusive<Closure>(closure, run, drop);
    torch::autograd::variable_list in;
    for (int64_t i = 0; i < n_inputs; ++i) in.push_back(*inputs[i]);
    auto out = Checkpoint::apply(holder, at::TensorList(in));
    TORCH_CHECK(static_cast<int64_t>(out.size()) <= max_outputs, "checkpoint: ", out.size(),
                " outputs, at most ", max_outputs);
    for (size_t i = 0; i < out.size(); ++i) outputs[i] = new at::Tensor(out[i]);
    *n_outputs = static_cast<int64_t>(out.size());
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

const char* unclip_checkpoint_last_error() { return last_error.c_str(); }

}  // extern "C"
