// Mixed-precision and layout switches libtch does not expose: autocast on any device with a chosen
// dtype (tch's autocast is CUDA-only and fp16), TF32 for CUDA matmuls and convolutions, and the
// channels-last memory format.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

namespace {
at::DeviceType device_type(int device) { return device == 1 ? at::kCUDA : at::kCPU; }
at::ScalarType scalar_type(int dtype) { return dtype == 1 ? at::kHalf : at::kBFloat16; }
}  // namespace

extern "C" {

// Enables autocast for the device with the dtype; returns the previous state to restore:
// bit 0 = was enabled, bits 8.. = previous dtype code.
int unclip_autocast_enter(int device, int dtype) {
  auto dev = device_type(device);
  int prev_enabled = at::autocast::is_autocast_enabled(dev) ? 1 : 0;
  int prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(dev));
  at::autocast::set_autocast_dtype(dev, scalar_type(dtype));
  at::autocast::set_autocast_enabled(dev, true);
  at::autocast::increment_nesting();
  return prev_enabled | (prev_dtype << 8);
}

void unclip_autocast_exit(int device, int prev) {
  auto dev = device_type(device);
  if (at::autocast::decrement_nesting() == 0) {
    at::autocast::clear_cache();
  }
  at::autocast::set_autocast_enabled(dev, (prev & 1) != 0);
  at::autocast::set_autocast_dtype(dev, static_cast<at::ScalarType>(prev >> 8));
}

void unclip_set_tf32(bool enabled) {
  at::globalContext().setAllowTF32CuBLAS(enabled);
  at::globalContext().setAllowTF32CuDNN(enabled);
}

bool unclip_tf32_enabled() {
  return at::globalContext().allowTF32CuBLAS() && at::globalContext().allowTF32CuDNN();
}

// Re-lays a 4-D tensor's storage out channels-last in place, keeping its identity (autograd,
// VarStore entry), as module.to(memory_format=torch.channels_last) does for parameters.
void unclip_to_channels_last(at::Tensor* t) {
  if (t->dim() == 4) {
    t->set_data(t->contiguous(at::MemoryFormat::ChannelsLast));
  }
}

bool unclip_is_channels_last(const at::Tensor* t) {
  return t->dim() == 4 && t->is_contiguous(at::MemoryFormat::ChannelsLast) && !t->is_contiguous();
}

}  // extern "C"
