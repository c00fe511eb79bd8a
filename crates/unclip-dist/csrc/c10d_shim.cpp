// A thin C ABI over PyTorch's c10d: TCPStore rendezvous, ProcessGroupGloo (CPU tensors) and, when
// built with USE_C10D_NCCL, ProcessGroupNCCL (CUDA tensors) collectives. libtorch does the work;
// this file only converts errors to strings and waits on Work objects.
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

namespace {

thread_local std::string last_error;

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return 1;
}

void wait(Group* g, c10::intrusive_ptr<c10d::Work> work) {
  if (!work->wait(g->timeout)) {
    throw std::runtime_error("collective timed out");
  }
}

// The rendezvous: a TCPStore at host:port, hosted by rank 0, that waits for every rank.
c10::intrusive_ptr<c10d::Store> rendezvous(const char* host, int port, int rank, int world_size,
                                           std::chrono::milliseconds timeout) {
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<std::uint16_t>(port);
  opts.isServer = rank == 0;
  opts.numWorkers = world_size;
  opts.waitWorkers = true;
  opts.timeout = timeout;
  return c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
}

}  // namespace

// For grad_reducer.cpp.
c10d::Backend* unclip_c10d_backend(void* group) { return static_cast<Group*>(group)->backend.get(); }
std::chrono::milliseconds unclip_c10d_timeout(void* group) {
  return static_cast<Group*>(group)->timeout;
}
int unclip_c10d_guarded(const std::function<void()>& f) { return guarded(f); }

extern "C" {

const char* unclip_c10d_last_error() { return last_error.c_str(); }

// 1 when this build has the NCCL backend.
int unclip_c10d_has_nccl() {
#ifdef USE_C10D_NCCL
  return 1;
#else
  return 0;
#endif
}

// Rendezvous through a TCPStore at host:port (rank 0 hosts it), then a process group: Gloo when
// cuda_device < 0, else NCCL bound to that CUDA device (one per rank, as torchrun's LOCAL_RANK).
// Returns null on failure (see unclip_c10d_last_error).
void* unclip_c10d_init(const char* host, int port, int rank, int world_size, long timeout_ms,
                       int cuda_device) {
  Group* out = nullptr;
  int rc = guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto store = rendezvous(host, port, rank, world_size, timeout);
    c10::intrusive_ptr<c10d::Backend> backend;
    if (cuda_device < 0) {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      // As torch.distributed: GLOO_SOCKET_IFNAME picks the interface, else the host's address.
      if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME")) {
        options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      } else {
        options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, options);
    } else {
#ifdef USE_C10D_NCCL
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, options);
      // Binding the device lets NCCL create its communicator eagerly and lets barrier() know
      // which device to use.
      pg->setBoundDeviceId(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(cuda_device)));
      backend = pg;
#else
      throw std::runtime_error("this build of the c10d shim has no NCCL backend");
#endif
    }
    out = new Group{store, backend, timeout};
  });
  return rc == 0 ? out : nullptr;
}

void unclip_c10d_free(void* group) { delete static_cast<Group*>(group); }

// op: 0 = sum, 1 = average (Gloo has no AVG: sum, then divide; NCCL's AVG would do the same).
int unclip_c10d_all_reduce(void* group, at::Tensor* tensor, int op) {
  auto* g = static_cast<Group*>(group);
  return guarded([&] {
    std::vector<at::Tensor> ts{*tensor};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    wait(g, g->backend->allreduce(ts, o));
    if (op == 1) {
      tensor->div_(g->backend->getSize());
    }
  });
}

int unclip_c10d_broadcast(void* group, at::Tensor* tensor, int root) {
  auto* g = static_cast<Group*>(group);
  return guarded([&] {
    std::vector<at::Tensor> ts{*tensor};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    wait(g, g->backend->broadcast(ts, o));
  });
}

// output: [world_size, *input.shape], preallocated.
int unclip_c10d_all_gather(void* group, at::Tensor* output, at::Tensor* input) {
  auto* g = static_cast<Group*>(group);
  return guarded([&] {
    std::vector<at::Tensor> parts;
    for (int i = 0; i < g->backend->getSize(); ++i) {
      parts.push_back(at::empty_like(*input));
    }
    std::vector<std::vector<at::Tensor>> outs{parts};
    std::vector<at::Tensor> ins{*input};
    wait(g, g->backend->allgather(outs, ins));
    output->copy_(at::stack(outs[0]));
  });
}

int unclip_c10d_barrier(void* group) {
  auto* g = static_cast<Group*>(group);
  return guarded([&] { wait(g, g->backend->barrier()); });
}

}  // extern "C"
