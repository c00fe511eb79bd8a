// Gradient averaging in buckets, overlapped with backward as DDP's Reducer does, in less: a hook on
// each variable's gradient accumulator marks it ready; while armed, a bucket's all-reduce starts as
// soon as its variables are all in and every earlier bucket has started, so the collectives run
// while autograd computes the remaining gradients. Buckets start in the same order on every rank
// whatever order their gradients arrive in, and `wait` starts any not yet started (a variable
// unused this step, or a rank whose non-finite loss skipped backward), so the ranks' collectives
// always match. Each bucket carries a flag per variable (its gradient is defined on this rank), so
// a gradient defined on any rank is defined on all afterwards and stays undefined on none. With
// bucket views (fp32 buckets of dense variables, once the buckets are fixed), each gradient is a
// view into its bucket's buffer, as DDP's gradient_as_bucket_view: backward accumulates straight
// into the buffer that is all-reduced in place, with no copy of the gradients. Sharded (ZeRO-2),
// each variable has an owner rank: buckets hold one owner's variables and are reduced to it alone,
// and the other ranks drop their copy of those gradients as soon as the bucket is sent, so each
// rank keeps only its own share of the averaged gradients — from the first step on: that step
// sends buckets in the order read off the loss's graph before backward (where DDP's first
// iteration guesses from the parameters' order), and a gradient that arrives after its bucket left
// (a variable accumulated twice, as by a reentrant checkpoint) follows after backward in a second
// reduce, which its owner adds.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <queue>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

// From c10d_shim.cpp.
c10d::Backend* unclip_c10d_backend(void* group);
std::chrono::milliseconds unclip_c10d_timeout(void* group);
// Runs f, turning an exception into 1 and unclip_c10d_last_error's message.
int unclip_c10d_guarded(const std::function<void()>& f);

namespace {

// DDP's first bucket is small so that communication starts early in backward.
constexpr int64_t kFirstBucketBytes = 1 << 20;

int guarded(const std::function<void()>& f) { return unclip_c10d_guarded(f); }

struct Reducer {
  c10d::Backend* backend;
  std::chrono::milliseconds timeout;
  std::vector<at::Tensor> vars;
  bool bf16;
  bool want_views;
  int64_t bucket_bytes;
  int64_t rank = 0;
  int64_t world = 1;
  // ZeRO-2: each variable's owner (empty: every rank keeps every average).
  std::vector<int64_t> owners;
  // The order gradients are expected in before any has been seen (the constructor's).
  std::vector<size_t> expected_order;
  // Kept alive so the hooks stay registered (a variable holds its accumulator weakly).
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;
  std::vector<uintptr_t> hook_keys;

  // Buckets in launch order, each bucket's owner (sharded) and each variable's bucket.
  std::vector<std::vector<size_t>> buckets;
  std::vector<int64_t> bucket_owner;
  std::vector<size_t> bucket_of;
  // Accumulations a variable receives in one backward (learned at the first overlapped step; a
  // reentrant checkpoint can accumulate a variable shared by two segments twice).
  std::vector<int64_t> expected;
  bool learned = false;
  // Bucket views: each bucket's buffer (its variables' gradients, then a flag each) and each
  // variable's gradient view into it.
  bool use_views = false;
  std::vector<at::Tensor> buffers;
  std::vector<at::Tensor> views;

  // This backward.
  std::mutex mu;
  bool armed = false;
  bool overlap = false;
  bool late = false;     // a gradient arrived after its bucket had started
  bool written = false;  // wait wrote the averages already (buckets sent one at a time)
  // This backward completes the gradients (the sums become means); otherwise (ZeRO-2 over several
  // micro-batches) the owners keep the sums, which the next backward adds to.
  bool last_backward = true;
  // ZeRO-2's first overlapped backward: buckets of the order predicted (see predict) start from the
  // hooks before the order is learned; `late_vars` marks gradients that arrived after their bucket
  // left.
  bool guessing = false;
  bool predicted = false;  // this step's order was read off its graph (the first call only)
  std::vector<uint8_t> late_vars;
  std::vector<int64_t> fires;
  std::vector<size_t> first_fired;  // variables in the order their gradients first arrived
  std::vector<int64_t> waiting;     // per bucket, variables not yet complete
  std::vector<at::Tensor> flats;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  size_t next = 0;
  size_t started_in_backward = 0;
  size_t sent_buckets = 0;  // buckets this step sent (before the guessing step's rebuild)
  // Bytes of gradients complete but not yet sent during backward: per bucket, in all, and the
  // most at once (a bucket filling, and any held behind an earlier bucket that still waits).
  std::vector<int64_t> complete_bytes;
  int64_t waiting_bytes = 0;
  int64_t peak_waiting_bytes = 0;

  bool sharded() const { return !owners.empty(); }

  // Whether this rank keeps bucket b's averages (under ZeRO-2, only its owner does).
  bool kept_here(size_t b) const { return !sharded() || bucket_owner[b] == rank; }

  // Buckets of the variables in `order` (sharded: one open bucket per owner), launched in the
  // order their last variable comes; each owner's first bucket is small.
  void build_buckets(const std::vector<size_t>& order) {
    size_t groups = sharded() ? static_cast<size_t>(world) : 1;
    std::vector<std::vector<size_t>> open(groups);
    std::vector<int64_t> bytes(groups, 0);
    std::vector<size_t> made(groups, 0);
    std::vector<std::pair<size_t, size_t>> closed_at;  // (position of the last variable, index)
    std::vector<std::vector<size_t>> all;
    std::vector<int64_t> all_owner;
    auto close = [&](size_t g, size_t position) {
      closed_at.emplace_back(position, all.size());
      all.push_back(std::move(open[g]));
      all_owner.push_back(sharded() ? static_cast<int64_t>(g) : -1);
      open[g].clear();
      bytes[g] = 0;
      made[g] += 1;
    };
    std::vector<size_t> last_position(groups, 0);
    for (size_t position = 0; position < order.size(); ++position) {
      size_t i = order[position];
      size_t g = sharded() ? static_cast<size_t>(owners[i]) : 0;
      int64_t cap = made[g] == 0 ? std::min(kFirstBucketBytes, bucket_bytes) : bucket_bytes;
      if (!open[g].empty() && bytes[g] >= cap) {
        close(g, last_position[g]);
      }
      open[g].push_back(i);
      last_position[g] = position;
      bytes[g] += vars[i].numel() * vars[i].element_size();
    }
    for (size_t g = 0; g < groups; ++g) {
      if (!open[g].empty()) {
        close(g, last_position[g]);
      }
    }
    std::sort(closed_at.begin(), closed_at.end());
    buckets.clear();
    bucket_owner.clear();
    bucket_of.assign(vars.size(), 0);
    for (const auto& [position, index] : closed_at) {
      for (size_t i : all[index]) {
        bucket_of[i] = buckets.size();
      }
      buckets.push_back(std::move(all[index]));
      bucket_owner.push_back(all_owner[index]);
    }
  }

  // Gradients as views into per-bucket buffers (of the buckets this rank keeps), when every
  // variable can be one (dense, and of its bucket's type); the current gradients move into them.
  void set_up_views() {
    if (bf16) {
      return;
    }
    for (size_t b = 0; b < buckets.size(); ++b) {
      const auto& bucket = buckets[b];
      if (!kept_here(b)) {
        continue;
      }
      for (size_t i : bucket) {
        const at::Tensor& v = vars[i];
        if (!v.is_non_overlapping_and_dense() || v.scalar_type() != vars[bucket[0]].scalar_type()) {
          return;
        }
      }
    }
    at::NoGradGuard no_grad;
    views.assign(vars.size(), at::Tensor());
    buffers.assign(buckets.size(), at::Tensor());
    for (size_t b = 0; b < buckets.size(); ++b) {
      const auto& bucket = buckets[b];
      if (!kept_here(b)) {
        continue;
      }
      at::Tensor buffer = at::zeros({bucket_numel(b) + static_cast<int64_t>(bucket.size())},
                                    vars[bucket[0]].options());
      int64_t offset = 0;
      for (size_t i : bucket) {
        at::Tensor& var = vars[i];
        at::Tensor view = slot(buffer, i, offset);
        at::Tensor& g = var.mutable_grad();
        if (g.defined()) {
          view.copy_(g);
          g = view;
        }
        views[i] = view;
        offset += var.numel();
      }
      buffers[b] = buffer;
    }
    use_views = true;
  }

  bool viewed(size_t b) const { return use_views && buffers[b].defined(); }

  // Elements of bucket b's gradients (its flags follow them in a flat bucket).
  int64_t bucket_numel(size_t b) const { return numel_of(buckets[b]); }

  int64_t numel_of(const std::vector<size_t>& list) const {
    int64_t total = 0;
    for (size_t i : list) {
      total += vars[i].numel();
    }
    return total;
  }

  // Variable i's place in a flat bucket, from `offset`: in its own memory order where it is dense
  // (a channels-last variable too), as its view is, otherwise row-major. Every rank lays a bucket
  // out alike, views or copies (under ZeRO-2 the owner's bucket is a view, the others' copies).
  at::Tensor slot(const at::Tensor& flat, size_t i, int64_t offset) const {
    const at::Tensor& v = vars[i];
    if (v.is_non_overlapping_and_dense()) {
      return flat.as_strided(v.sizes(), v.strides(), flat.storage_offset() + offset);
    }
    return flat.narrow(0, offset, v.numel()).view(v.sizes());
  }

  bool all_grads_defined(size_t b) const { return all_grads_defined(buckets[b]); }

  bool all_grads_defined(const std::vector<size_t>& list) const {
    return std::all_of(list.begin(), list.end(), [&](size_t i) { return vars[i].grad().defined(); });
  }

  // The flags of `list`, one per variable: 1 where its gradient is defined here. Made on the
  // device (no host-to-device copy from backward's thread).
  at::Tensor defined_flags(const std::vector<size_t>& list, const at::TensorOptions& opts) const {
    if (all_grads_defined(list)) {
      return at::ones({static_cast<int64_t>(list.size())}, opts);
    }
    std::vector<at::Tensor> flags;
    for (size_t i : list) {
      flags.push_back(vars[i].grad().defined() ? at::ones({1}, opts) : at::zeros({1}, opts));
    }
    return at::cat(flags, 0);
  }

  // Bucket b's buffer, ready to send: a gradient that is not its view (undefined, or a tensor
  // something else put there) is copied in and replaced by the view; the flags set.
  at::Tensor fill_buffer(size_t b) {
    at::NoGradGuard no_grad;
    at::Tensor buffer = buffers[b];
    int64_t n_vars = static_cast<int64_t>(buckets[b].size());
    buffer.narrow(0, buffer.numel() - n_vars, n_vars)
        .copy_(defined_flags(buckets[b], buffer.options()));
    for (size_t i : buckets[b]) {
      at::Tensor& g = vars[i].mutable_grad();
      if (!g.defined()) {
        views[i].zero_();
      } else if (!g.is_same(views[i])) {
        views[i].copy_(g);
        g = views[i];
      }
    }
    return buffer;
  }

  // Bucket b's gradients and flags copied into one flat tensor (in bf16 when it travels so).
  at::Tensor copy_bucket(size_t b) { return flatten(buckets[b]); }

  // The gradients of `list` (zeros where undefined), then a defined-flag each, in one flat tensor.
  at::Tensor flatten(const std::vector<size_t>& list) const {
    at::NoGradGuard no_grad;
    int64_t total = numel_of(list);
    int64_t n_vars = static_cast<int64_t>(list.size());
    const at::Tensor& first = vars[list[0]];
    at::Tensor flat = at::empty({total + n_vars},
                                first.options().dtype(bf16 ? at::kBFloat16 : first.scalar_type()));
    int64_t offset = 0;
    for (size_t i : list) {
      const at::Tensor& g = vars[i].grad();
      at::Tensor place = slot(flat, i, offset);
      if (g.defined()) {
        place.copy_(g);
      } else {
        place.zero_();
      }
      offset += vars[i].numel();
    }
    flat.narrow(0, total, n_vars).copy_(defined_flags(list, first.options()));
    return flat;
  }

  c10::intrusive_ptr<c10d::Work> all_reduce_sum(at::Tensor t) {
    std::vector<at::Tensor> ts{std::move(t)};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    return backend->allreduce(ts, o);
  }

  c10::intrusive_ptr<c10d::Work> reduce_sum(at::Tensor t, int64_t root) {
    std::vector<at::Tensor> ts{std::move(t)};
    c10d::ReduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    o.rootRank = root;
    return backend->reduce(ts, o);
  }

  void launch(size_t b) {
    flats[b] = viewed(b) ? fill_buffer(b) : copy_bucket(b);
    if (!sharded()) {
      works[b] = all_reduce_sum(flats[b]);
      return;
    }
    works[b] = reduce_sum(flats[b], bucket_owner[b]);
    if (!kept_here(b) || guessing) {
      // Their copy is on its way to the owner: the gradients go now, while backward runs on. (At
      // the guessing step the owner's too: the copy becomes its sums, and a gradient arriving
      // later is then the part still to be added.)
      for (size_t i : buckets[b]) {
        vars[i].mutable_grad().reset();
      }
    }
  }

  void launch_ready() {
    while (next < buckets.size() && waiting[next] == 0) {
      waiting_bytes -= complete_bytes[next];
      launch(next++);
      started_in_backward += 1;
    }
    release_sent();
  }

  // ZeRO-2: the copy of a bucket sent to another rank is needed only until its reduce is done;
  // freeing those that are, during backward, keeps the copies from adding up to a whole set of
  // gradients. (A failed one is kept, for wait to report; NCCL's work has no isSuccess.)
  void release_sent() {
    for (size_t b = 0; sharded() && b < next; ++b) {
      if (!kept_here(b) && works[b] && works[b]->isCompleted() && !works[b]->exception()) {
        works[b].reset();
        flats[b] = at::Tensor();
      }
    }
  }

  void on_accumulated(size_t i) {
    std::lock_guard<std::mutex> lock(mu);
    if (!armed || !overlap) {
      return;
    }
    if (fires[i]++ == 0) {
      first_fired.push_back(i);
    }
    if (!learned && !guessing) {
      return;
    }
    size_t b = bucket_of[i];
    if (b < next) {
      if (guessing) {
        late_vars[i] = 1;
      } else {
        late = true;
      }
      return;
    }
    // (At the guessing step a variable is expected once.)
    if (fires[i] == (guessing ? 1 : expected[i])) {
      int64_t bytes = vars[i].numel() * vars[i].element_size();
      complete_bytes[b] += bytes;
      waiting_bytes += bytes;
      peak_waiting_bytes = std::max(peak_waiting_bytes, waiting_bytes);
      waiting[b] -= 1;
      launch_ready();
    }
  }

  void arm(bool overlapped, bool last) {
    std::lock_guard<std::mutex> lock(mu);
    if (!last && !sharded()) {
      // Every rank would add its next gradients to the sums it received, counting them again.
      throw std::runtime_error(
          "gradient reducer: only a sharded reducer sums over several backward passes");
    }
    last_backward = last;
    armed = true;
    written = false;
    overlap = overlapped;
    late = false;
    guessing = sharded() && overlapped && !learned;
    predicted = false;
    late_vars.assign(vars.size(), 0);
    fires.assign(vars.size(), 0);
    first_fired.clear();
    reset_buckets_state();
  }

  // The per-bucket state of the step armed, for the current buckets.
  void reset_buckets_state() {
    flats.assign(buckets.size(), at::Tensor());
    works.assign(buckets.size(), c10::intrusive_ptr<c10d::Work>());
    waiting.assign(buckets.size(), 0);
    complete_bytes.assign(buckets.size(), 0);
    waiting_bytes = 0;
    peak_waiting_bytes = 0;
    for (size_t i = 0; i < vars.size(); ++i) {
      if (!learned || expected[i] > 0) {
        waiting[bucket_of[i]] += 1;
      }
    }
    next = 0;
    started_in_backward = 0;
  }

  // Between the guessing step's forward and its backward: the order its gradients will arrive in,
  // read off the loss's graph as autograd's engine walks it — rank 0's, for every rank, so they
  // bucket alike (see engine_order). A no-op at other steps and after the first call of a step (on
  // every rank alike, as every rank calls it alike).
  void predict(const at::Tensor& loss) {
    std::lock_guard<std::mutex> lock(mu);
    if (!armed || !guessing || predicted) {
      return;
    }
    predicted = true;
    std::vector<int64_t> local(vars.size(), 0);
    if (rank == 0) {
      std::vector<size_t> order = engine_order(loss);
      std::copy(order.begin(), order.end(), local.begin());
    }
    std::vector<int64_t> agreed = rank0s(local);
    build_buckets(std::vector<size_t>(agreed.begin(), agreed.end()));
    reset_buckets_state();
  }

  // Rank 0's `local`, on every rank.
  std::vector<int64_t> rank0s(const std::vector<int64_t>& local) {
    at::Tensor t = at::tensor(local, at::kLong).to(vars[0].device());
    std::vector<at::Tensor> ts{t};
    c10d::BroadcastOptions o;
    o.rootRank = 0;
    wait_work(backend->broadcast(ts, o));
    at::Tensor agreed = t.cpu();
    const int64_t* p = agreed.data_ptr<int64_t>();
    return std::vector<int64_t>(p, p + local.size());
  }

  // The variables in the order autograd's engine reaches their gradient accumulators from `loss`
  // (one device): a node runs once every node feeding it has, and of the nodes ready the one made
  // last runs first (an accumulator, numbered last of all, at once). The ones the graph does not
  // reach go, in the expected order, where the first activation checkpoint's node runs (its
  // variables' gradients come from there: unclip-diffusion's `Checkpoint`, PyTorch's
  // `CheckpointFunctionBackward`), or else last.
  std::vector<size_t> engine_order(const at::Tensor& loss) const {
    using torch::autograd::Node;
    std::vector<size_t> order;
    std::vector<bool> placed(vars.size(), false);
    std::vector<bool> reached(vars.size(), false);
    auto place_unreached = [&] {
      for (size_t i : expected_order) {
        if (!reached[i] && !placed[i]) {
          order.push_back(i);
          placed[i] = true;
        }
      }
    };
    const std::shared_ptr<Node>& root = loss.grad_fn();
    if (root) {
      std::unordered_map<const Node*, size_t> var_of;
      for (size_t i = 0; i < vars.size(); ++i) {
        if (accumulators[i]) {
          var_of[accumulators[i].get()] = i;
        }
      }
      std::unordered_map<const Node*, int64_t> feeding;
      std::vector<Node*> stack{root.get()};
      std::unordered_set<const Node*> seen{root.get()};
      while (!stack.empty()) {
        Node* n = stack.back();
        stack.pop_back();
        for (const auto& edge : n->next_edges()) {
          Node* f = edge.function.get();
          if (f == nullptr) {
            continue;
          }
          feeding[f] += 1;
          if (seen.insert(f).second) {
            stack.push_back(f);
            auto found = var_of.find(f);
            if (found != var_of.end()) {
              reached[found->second] = true;
            }
          }
        }
      }
      auto runs_later = [](const Node* a, const Node* b) {
        return a->sequence_nr() < b->sequence_nr();
      };
      std::priority_queue<Node*, std::vector<Node*>, decltype(runs_later)> ready(runs_later);
      ready.push(root.get());
      while (!ready.empty()) {
        Node* n = ready.top();
        ready.pop();
        auto found = var_of.find(n);
        if (found != var_of.end() && !placed[found->second]) {
          order.push_back(found->second);
          placed[found->second] = true;
        } else if (n->name().find("Checkpoint") != std::string::npos) {
          place_unreached();
        }
        for (const auto& edge : n->next_edges()) {
          Node* f = edge.function.get();
          if (f != nullptr && --feeding[f] == 0) {
            ready.push(f);
          }
        }
      }
    }
    place_unreached();
    return order;
  }

  // The first overlapped backward fixes the buckets: rank 0's arrival order (then the variables
  // that had no gradient, last first), so every rank buckets alike.
  void learn() {
    std::vector<int64_t> local(2 * vars.size(), 0);
    std::vector<bool> seen(vars.size(), false);
    size_t k = 0;
    for (size_t i : first_fired) {
      local[k++] = static_cast<int64_t>(i);
      seen[i] = true;
    }
    for (size_t j = vars.size(); j-- > 0;) {
      if (!seen[j]) {
        local[k++] = static_cast<int64_t>(j);
      }
    }
    for (size_t i = 0; i < vars.size(); ++i) {
      // A variable that had no gradient at this step is still waited for (it may have one at the
      // next; its bucket then starts at the end of backward when it does not).
      local[vars.size() + i] = accumulators[i] ? std::max<int64_t>(fires[i], 1) : 0;
    }
    std::vector<int64_t> agreed = rank0s(local);
    const int64_t* p = agreed.data();
    std::vector<size_t> order(p, p + vars.size());
    expected.assign(p + vars.size(), p + 2 * vars.size());
    build_buckets(order);
    if (want_views) {
      set_up_views();
    }
    learned = true;
    flats.assign(buckets.size(), at::Tensor());
    works.assign(buckets.size(), c10::intrusive_ptr<c10d::Work>());
    next = 0;
  }

  void wait_work(const c10::intrusive_ptr<c10d::Work>& work) {
    if (!work->wait(timeout)) {
      throw std::runtime_error("collective timed out");
    }
  }

  // Starts every bucket not yet started, in order, and waits for all. Returns whether, on any
  // rank, a gradient arrived after its bucket had started (all then average again, unoverlapped).
  // When no bucket started during backward (not overlapped, or the step that fixes the buckets),
  // the buckets go one at a time, each written back before the next is made, so they hold one
  // bucket's copy of the gradients rather than all of them; finish then has nothing left to do.
  bool wait() {
    std::lock_guard<std::mutex> lock(mu);
    if (!armed) {
      throw std::runtime_error("gradient reducer: wait without arm");
    }
    armed = false;
    sent_buckets = buckets.size();
    if (guessing) {
      finish_guessing();
      return false;
    }
    bool learning = overlap && !learned;
    if (learning) {
      learn();
    }
    if (!overlap || learning) {
      for (size_t b = 0; b < buckets.size(); ++b) {
        launch(b);
        wait_work(works[b]);
        write_back(b);
        flats[b] = at::Tensor();
        works[b].reset();
      }
      next = buckets.size();
      written = true;
      return false;
    }
    send_rest_and_wait();
    // Every rank must drop the averages if any rank's were incomplete.
    at::Tensor any = at::full({1}, late ? 1.0f : 0.0f, vars[0].options().dtype(at::kFloat));
    wait_work(all_reduce_sum(any));
    bool late_anywhere = any.item<float>() > 0.0f;
    if (late_anywhere && (use_views || sharded())) {
      // The buffers were reduced in place, or (sharded) dropped: the local gradients are gone.
      throw std::runtime_error(
          "a gradient arrived after its bucket had been sent (a variable accumulated more often "
          "than at the first step: the model's graph changes between steps); set "
          "distributed.grad_reduce: after_backward for this model");
    }
    return late_anywhere;
  }

  // Starts the buckets not started during backward, in order, and waits for all.
  void send_rest_and_wait() {
    while (next < buckets.size()) {
      launch(next++);
    }
    for (auto& w : works) {
      if (w) {
        wait_work(w);  // (none where release_sent freed a finished one)
      }
    }
  }

  // The end of the guessing step: the buckets not yet started go, then the gradients that arrived
  // after their bucket had left (every rank learns which), reduced to their owners, who add them to
  // the buckets' sums; then the order this step's gradients came in fixes the buckets.
  void finish_guessing() {
    // (Still guessing: the buckets started here drop the owner's gradients too.)
    send_rest_and_wait();
    at::Tensor flags = at::tensor(std::vector<float>(late_vars.begin(), late_vars.end()))
                           .to(vars[0].device());
    wait_work(all_reduce_sum(flags));
    at::Tensor agreed = flags.cpu();
    std::vector<std::vector<size_t>> late_of(static_cast<size_t>(world));
    for (size_t i = 0; i < vars.size(); ++i) {
      if (agreed.data_ptr<float>()[i] > 0.0f) {
        late_of[static_cast<size_t>(owners[i])].push_back(i);
      }
    }
    std::vector<at::Tensor> extra(vars.size());
    for (size_t o = 0; o < late_of.size(); ++o) {
      const auto& list = late_of[o];
      if (list.empty()) {
        continue;
      }
      at::Tensor flat = flatten(list);
      wait_work(reduce_sum(flat, static_cast<int64_t>(o)));
      int64_t offset = 0;
      for (size_t i : list) {
        if (static_cast<int64_t>(o) == rank) {
          extra[i] = slot(flat, i, offset);
        }
        vars[i].mutable_grad().reset();
        offset += vars[i].numel();
      }
    }
    at::NoGradGuard no_grad;
    for (size_t b = 0; b < buckets.size(); ++b) {
      write_back(b);
      flats[b] = at::Tensor();
      works[b].reset();
    }
    for (size_t i = 0; i < vars.size(); ++i) {
      if (!extra[i].defined()) {
        continue;
      }
      at::Tensor add = extra[i].to(vars[i].scalar_type());
      if (last_backward) {
        add.div_(static_cast<double>(world));
      }
      at::Tensor& g = vars[i].mutable_grad();
      if (g.defined()) {
        g.add_(add);
      } else {
        g = add.clone();
      }
    }
    guessing = false;
    learn();
    written = true;
  }

  // Bucket b's sums, divided by the world size after the last backward, into its variables'
  // gradients (each defined if any rank's was).
  void write_back(size_t b) {
    if (!kept_here(b)) {
      return;  // the owner's (launch dropped this rank's copy)
    }
    at::NoGradGuard no_grad;
    at::Tensor flat = flats[b];
    if (last_backward) {
      // Gloo has no AVG: sum, then divide, in the type the bucket travelled in.
      flat.div_(static_cast<double>(world));
    }
    // The flags are read back (a device sync) only when some gradient here is undefined: where
    // all are defined, this rank's own flags make every sum positive.
    int64_t n_vars = static_cast<int64_t>(buckets[b].size());
    std::vector<float> defined(buckets[b].size(), 1.0f);
    if (!all_grads_defined(b)) {
      at::Tensor flags = flat.narrow(0, flat.numel() - n_vars, n_vars).cpu().to(at::kFloat);
      defined.assign(flags.data_ptr<float>(), flags.data_ptr<float>() + n_vars);
    }
    if (viewed(b)) {
      // The averages are in the views already; a gradient only other ranks had becomes one.
      for (size_t k = 0; k < buckets[b].size(); ++k) {
        at::Tensor& g = vars[buckets[b][k]].mutable_grad();
        if (defined[k] > 0.0f && !g.defined()) {
          g = views[buckets[b][k]];
        }
      }
      return;
    }
    int64_t offset = 0;
    for (size_t k = 0; k < buckets[b].size(); ++k) {
      at::Tensor& var = vars[buckets[b][k]];
      int64_t n = var.numel();
      if (defined[k] > 0.0f) {
        at::Tensor& g = var.mutable_grad();
        if (!g.defined()) {
          g = at::zeros_like(var);
        }
        g.copy_(slot(flat, buckets[b][k], offset));
      }
      offset += n;
    }
  }

  // Writes the averages into the gradients (copy), or drops them.
  void finish(bool copy) {
    std::lock_guard<std::mutex> lock(mu);
    if (written) {
      written = false;
      return;
    }
    if (copy) {
      for (size_t b = 0; b < buckets.size(); ++b) {
        if (!kept_here(b)) {
          continue;  // the owner's
        }
        if (!flats[b].defined()) {
          throw std::runtime_error("gradient reducer: finish before wait");
        }
        write_back(b);
      }
    }
    flats.assign(buckets.size(), at::Tensor());
    works.assign(buckets.size(), c10::intrusive_ptr<c10d::Work>());
  }

  ~Reducer() {
    for (size_t i = 0; i < accumulators.size(); ++i) {
      if (accumulators[i]) {
        accumulators[i]->del_post_hook(hook_keys[i]);
      }
    }
  }
};

}  // namespace

extern "C" {

// A reducer over `n` variables (at::Tensor*, every one on the group's device). Until the first
// overlapped backward, buckets take the variables in `order` (indices, the order their gradients
// are expected to arrive in; null: last first, backward's order roughly). views:
// gradients become views into the fp32 buckets from the first overlapped step on. owners (null:
// not sharded): each variable's rank under ZeRO-2, which alone receives its average.
void* unclip_c10d_reducer_new(void* group, at::Tensor** vars, int64_t n, int64_t bucket_bytes,
                              int bf16, int views, const int64_t* owners, const int64_t* order) {
  Reducer* out = nullptr;
  int rc = guarded([&] {
    if (n <= 0) {
      throw std::runtime_error("gradient reducer: no variables");
    }
    auto r = std::make_unique<Reducer>();
    r->backend = unclip_c10d_backend(group);
    r->timeout = unclip_c10d_timeout(group);
    r->bf16 = bf16 != 0;
    r->want_views = views != 0;
    r->bucket_bytes = bucket_bytes;
    r->rank = r->backend->getRank();
    r->world = r->backend->getSize();
    for (int64_t i = 0; i < n; ++i) {
      r->vars.push_back(*vars[i]);
      if (owners != nullptr) {
        if (owners[i] < 0 || owners[i] >= r->world) {
          throw std::runtime_error("gradient reducer: variable " + std::to_string(i) +
                                   " has owner " + std::to_string(owners[i]) + ", not a rank of " +
                                   std::to_string(r->world));
        }
        r->owners.push_back(owners[i]);
      }
    }
    std::vector<size_t> expected_order;
    if (order != nullptr) {
      std::vector<bool> seen(r->vars.size(), false);
      for (int64_t k = 0; k < n; ++k) {
        if (order[k] < 0 || order[k] >= n || seen[static_cast<size_t>(order[k])]) {
          throw std::runtime_error("gradient reducer: the expected order is not a permutation of " +
                                   std::to_string(n) + " variables");
        }
        seen[static_cast<size_t>(order[k])] = true;
        expected_order.push_back(static_cast<size_t>(order[k]));
      }
    } else {
      for (size_t j = r->vars.size(); j-- > 0;) {
        expected_order.push_back(j);
      }
    }
    r->build_buckets(expected_order);
    r->expected_order = std::move(expected_order);
    Reducer* self = r.get();
    for (size_t i = 0; i < r->vars.size(); ++i) {
      if (!r->vars[i].requires_grad()) {
        r->accumulators.push_back(nullptr);
        r->hook_keys.push_back(0);
        continue;
      }
      auto acc = torch::autograd::impl::grad_accumulator(r->vars[i]);
      auto key = acc->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
          [self, i](const torch::autograd::variable_list& outputs,
                    const torch::autograd::variable_list&) {
            self->on_accumulated(i);
            return outputs;
          }));
      r->accumulators.push_back(acc);
      r->hook_keys.push_back(key);
    }
    out = r.release();
  });
  return rc == 0 ? out : nullptr;
}

void unclip_c10d_reducer_free(void* reducer) { delete static_cast<Reducer*>(reducer); }

// Before the backward whose gradients are to be averaged (the last micro-batch's; under ZeRO-2
// every micro-batch's, `last` on the last): overlapped (buckets start from the hooks) or not (all
// start in `wait`).
int unclip_c10d_reducer_arm(void* reducer, int overlap, int last) {
  return guarded([&] { static_cast<Reducer*>(reducer)->arm(overlap != 0, last != 0); });
}

// late: whether the averages are to be dropped (see Reducer::wait); started / buckets: how many
// buckets started during backward, of how many; peak_waiting: the most bytes of gradients that
// were complete but not yet sent at once during backward.
int unclip_c10d_reducer_wait(void* reducer, int* late, int64_t* started, int64_t* buckets,
                             int64_t* peak_waiting) {
  return guarded([&] {
    auto* r = static_cast<Reducer*>(reducer);
    *late = r->wait() ? 1 : 0;
    *started = static_cast<int64_t>(r->started_in_backward);
    *buckets = static_cast<int64_t>(r->sent_buckets);
    *peak_waiting = r->peak_waiting_bytes;
  });
}

// Between the forward and the backward of an armed step, on every rank: see Reducer::predict.
int unclip_c10d_reducer_predict(void* reducer, const at::Tensor* loss) {
  return guarded([&] { static_cast<Reducer*>(reducer)->predict(*loss); });
}

int unclip_c10d_reducer_finish(void* reducer, int copy) {
  return guarded([&] { static_cast<Reducer*>(reducer)->finish(copy != 0); });
}

}  // extern "C"
