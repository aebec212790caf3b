// Communicator over Gloo (host tensors, TCP; device tensors staged through host memory). One worker
// thread per communicator runs the queued collectives in call order; Gloo's exceptions become
// absl::Status naming the collective.
#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/transport/tcp/device.h>

#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "memory/status_macros.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_cat.h"
#include "comm/communicator.h"
#include "comm/store.h"
#include "memory/cpu_allocator.h"
#include "memory/device.h"

namespace tessera::comm {
namespace {

// How long a rank whose collective timed out waits for the others' reports of where they are.
constexpr std::chrono::milliseconds kDiagnoseGrace{5000};

using memory::DType;
using memory::Tensor;

class FutureWork : public Work {
 public:
  explicit FutureWork(std::shared_future<absl::Status> f) : f_(std::move(f)) {}
  absl::Status Wait() override { return f_.get(); }

 private:
  std::shared_future<absl::Status> f_;
};

std::shared_ptr<Work> Done(absl::Status s) {
  std::promise<absl::Status> p;
  p.set_value(std::move(s));
  return std::make_shared<FutureWork>(p.get_future().share());
}

template <typename T>
void Reduce(ReduceOp op, void* c, const void* a, const void* b, size_t n) {
  T* out = static_cast<T*>(c);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  for (size_t i = 0; i < n; ++i) {
    out[i] = op == ReduceOp::kSum ? x[i] + y[i] : op == ReduceOp::kMax ? std::max(x[i], y[i]) : std::min(x[i], y[i]);
  }
}

class GlooCommunicator : public Communicator {
 public:
  // store: the job's, or a group's keys in it (where a timeout's reports go); job_ranks: a group's
  // members' job ranks (empty for the job's communicator).
  GlooCommunicator(const CommConfig& config, std::shared_ptr<gloo::rendezvous::Context> context,
                   std::shared_ptr<gloo::rendezvous::Store> store, std::vector<int> job_ranks,
                   const memory::Stream* order_after, std::unique_ptr<memory::Stream> staging)
      : config_(config),
        context_(std::move(context)),
        store_(std::move(store)),
        job_ranks_(std::move(job_ranks)),
        order_after_(order_after),
        staging_(std::move(staging)),
        worker_([this] { Run(); }) {}

  ~GlooCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    worker_.join();
  }

  int rank() const override { return config_.rank; }
  int size() const override { return config_.world_size; }
  const char* backend() const override { return "gloo"; }
  // bf16 / f16: reduced in f32 (widened on the way in, rounded once on the way out).
  bool CanReduce(DType d) const override {
    return d == DType::kF32 || d == DType::kI32 || d == DType::kI64 || d == DType::kBF16 || d == DType::kF16;
  }

  std::shared_ptr<Work> AllReduce(Tensor t, ReduceOp op) override {
    if (absl::Status s = CheckPlace(t, "AllReduce"); !s.ok()) return Done(s);
    if (absl::Status s = CheckReducible(t, "AllReduce"); !s.ok()) return Done(s);
    return EnqueueStaged("AllReduce", {t}, [this, op](std::vector<Tensor>& h) {
      gloo::AllreduceOptions o(context_);
      o.setTimeout(config_.timeout);
      Tensor wide = Widened(h[0]);
      SetReduce(o, wide, op);
      gloo::allreduce(o);
      Narrow(wide, h[0]);
    });
  }

  std::shared_ptr<Work> ReduceScatter(Tensor in, Tensor out, ReduceOp op) override {
    if (absl::Status s = CheckPlace(in, "ReduceScatter"); !s.ok()) return Done(s);
    if (absl::Status s = CheckPlace(out, "ReduceScatter"); !s.ok()) return Done(s);
    if (absl::Status s = CheckReducible(in, "ReduceScatter"); !s.ok()) return Done(s);
    if (in.dtype() != out.dtype() || in.numel() != out.numel() * size()) {
      return Done(absl::InvalidArgumentError(absl::StrCat("ReduceScatter: input ", in.DebugString(), " must hold ",
                                                          size(), " parts like the output ", out.DebugString())));
    }
    // A ring: in size() - 1 steps each rank passes one accumulated part to its right neighbour
    // and adds the part from its left one, so that part r ends on rank r with every rank's
    // contribution -- (size() - 1) / size() of the data sent per rank, half an all-reduce's.
    // In place too: the input is copied into the accumulator before the output is written.
    return EnqueueStaged("ReduceScatter", {in, out}, [this, op](std::vector<Tensor>& h) {
      const Tensor in = Widened(h[0]);
      Tensor out = Widened(h[1], /*copy=*/false);
      const int p = size(), r = rank();
      const size_t part = out.nbytes();
      std::vector<char> acc(in.nbytes()), incoming(part);
      std::memcpy(acc.data(), in.raw_data(), in.nbytes());
      const int slot = context_->nextSlot(p);  // the same on every rank: collectives run in order
      for (int s = 0; s + 1 < p; ++s) {
        const int send_idx = ((r - s - 1) % p + p) % p, recv_idx = ((r - s - 2) % p + p) % p;
        auto sb = context_->createUnboundBuffer(acc.data() + send_idx * part, part);
        auto rb = context_->createUnboundBuffer(incoming.data(), part);
        sb->send((r + 1) % p, slot + s);
        rb->recv((r + p - 1) % p, slot + s);
        if (!rb->waitRecv(config_.timeout) || !sb->waitSend(config_.timeout)) {
          throw std::runtime_error(absl::StrCat("step ", s, " of the ring timed out"));
        }
        Accumulate(op, in.dtype(), acc.data() + recv_idx * part, incoming.data(), out.numel());
      }
      std::memcpy(out.raw_data(), acc.data() + r * part, part);
      Narrow(out, h[1]);
    });
  }

  std::shared_ptr<Work> AllGather(Tensor in, Tensor out) override {
    if (absl::Status s = CheckPlace(in, "AllGather"); !s.ok()) return Done(s);
    if (absl::Status s = CheckPlace(out, "AllGather"); !s.ok()) return Done(s);
    if (in.dtype() != out.dtype() || out.numel() != in.numel() * size()) {
      return Done(absl::InvalidArgumentError(absl::StrCat("AllGather: output ", out.DebugString(), " must hold ",
                                                          size(), " copies of the input ", in.DebugString())));
    }
    return EnqueueStaged("AllGather", {in, out}, [this](std::vector<Tensor>& h) {
      const Tensor &in = h[0], &out = h[1];
      gloo::AllgatherOptions o(context_);
      o.setTimeout(config_.timeout);
      char* mine = static_cast<char*>(out.raw_data()) + static_cast<size_t>(rank()) * in.nbytes();
      // In place (the input is this rank's part of the output): Gloo then takes the output as primed.
      if (in.raw_data() != mine) o.setInput(static_cast<char*>(in.raw_data()), in.nbytes());
      o.setOutput(static_cast<char*>(out.raw_data()), out.nbytes());
      gloo::allgather(o);
    });
  }

  std::shared_ptr<Work> Broadcast(Tensor t, int root) override {
    if (absl::Status s = CheckPlace(t, "Broadcast"); !s.ok()) return Done(s);
    if (root < 0 || root >= size()) {
      return Done(absl::InvalidArgumentError(absl::StrCat("Broadcast: root ", root, " of ", size(), " ranks")));
    }
    return EnqueueStaged(absl::StrCat("Broadcast from rank ", root), {t}, [this, root](std::vector<Tensor>& h) {
      Tensor& t = h[0];
      gloo::BroadcastOptions o(context_);
      o.setTimeout(config_.timeout);
      o.setRoot(root);
      if (rank() == root) o.setInput(static_cast<char*>(t.raw_data()), t.nbytes());
      o.setOutput(static_cast<char*>(t.raw_data()), t.nbytes());
      gloo::broadcast(o);
    });
  }

  std::shared_ptr<Work> Send(Tensor t, int peer, uint32_t tag) override {
    return PointToPoint(t, peer, tag, /*send=*/true);
  }
  std::shared_ptr<Work> Recv(Tensor t, int peer, uint32_t tag) override {
    return PointToPoint(t, peer, tag, /*send=*/false);
  }

  absl::StatusOr<std::unique_ptr<Communicator>> NewGroup(const std::vector<int>& ranks) override {
    ASSIGN_OR_RETURN(const int me, GroupRank(ranks, rank(), size()));
    if (!job_ranks_.empty()) {
      return absl::UnimplementedError("NewGroup of a group: make groups from the job's communicator");
    }
    // Members meet under a key of the member list and how many groups this rank made before (the
    // same on every member when they create their groups in the same order).
    CommConfig sub = config_;
    sub.rank = me;
    sub.world_size = static_cast<int>(ranks.size());
    const std::string prefix = absl::StrCat("group/", absl::StrJoin(ranks, ","), "/", groups_made_++);
    try {
      gloo::rendezvous::PrefixStore store(prefix, *store_);
      gloo::transport::tcp::attr attr(config_.interface_host.c_str());
      auto device = gloo::transport::tcp::CreateDevice(attr);
      auto context = std::make_shared<gloo::rendezvous::Context>(sub.rank, sub.world_size);
      context->setTimeout(config_.timeout);
      context->connectFullMesh(store, device);
      std::unique_ptr<memory::Stream> staging;
      if (order_after_ != nullptr && order_after_->handle() != nullptr) {
        ASSIGN_OR_RETURN(staging, memory::Stream::Create(order_after_->device()));
      }
      // A timeout in the group is diagnosed under the group's keys in the job's store, which the
      // group keeps alive.
      return std::unique_ptr<Communicator>(new GlooCommunicator(
          sub, std::move(context), SharedPrefixStore(prefix + "/diag", store_), ranks, order_after_, std::move(staging)));
    } catch (const std::exception& e) {
      return absl::DeadlineExceededError(absl::StrCat("NewGroup ", absl::StrJoin(ranks, ","), " on rank ", rank(),
                                                      ": the members did not meet within ", config_.timeout.count(),
                                                      " ms: ", e.what()));
    }
  }

  std::shared_ptr<Work> Barrier() override {
    return Enqueue("Barrier", [this] {
      gloo::BarrierOptions o(context_);
      o.setTimeout(config_.timeout);
      gloo::barrier(o);
    });
  }

 private:
  // Host tensors, or device tensors on the order_after stream's GPU (staged through host memory).
  absl::Status CheckPlace(const Tensor& t, const char* what) const {
    if (t.defined() && t.device().is_cuda()) {
      if (staging_ == nullptr || t.device() != order_after_->device()) {
        return absl::InvalidArgumentError(absl::StrCat(
            what, ": device tensor ", t.DebugString(), " for a Gloo communicator ",
            staging_ == nullptr ? "created without a GPU stream to order after (CreateGloo's order_after)"
                                : absl::StrCat("of ", order_after_->device().ToString())));
      }
      return absl::OkStatus();
    }
    return CheckHost(t, what);
  }

  absl::Status CheckHost(const Tensor& t, const char* what) const {
    if (!t.defined() || !t.device().is_cpu()) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": the Gloo communicator takes host tensors, got ",
                                                     t.defined() ? t.DebugString() : "an undefined one"));
    }
    return absl::OkStatus();
  }

  static absl::Status CheckReducible(const Tensor& t, const char* what) {
    const DType d = t.dtype();
    if (d == DType::kF32 || d == DType::kI32 || d == DType::kI64 || d == DType::kBF16 || d == DType::kF16) {
      return absl::OkStatus();
    }
    return absl::InvalidArgumentError(absl::StrCat(what, ": no reduction for ", memory::DTypeName(d),
                                                   " (f32, bf16, f16, i32 or i64)"));
  }

  // dst[i] = op(dst[i], src[i]) for n elements of `dtype` (one CheckReducible accepted).
  static void Accumulate(ReduceOp op, DType dtype, void* dst, const void* src, int64_t n) {
    const size_t k = static_cast<size_t>(n);
    switch (dtype) {
      case DType::kF32:
        Reduce<float>(op, dst, dst, src, k);
        break;
      case DType::kI32:
        Reduce<int32_t>(op, dst, dst, src, k);
        break;
      case DType::kI64:
        Reduce<int64_t>(op, dst, dst, src, k);
        break;
      default:
        throw std::logic_error("unreachable dtype");
    }
  }

  void SetReduce(gloo::AllreduceOptions& o, Tensor& t, ReduceOp op) {
    const size_t n = static_cast<size_t>(t.numel());
    switch (t.dtype()) {
      case DType::kF32:
        o.setOutput(t.data<float>(), n);
        o.setReduceFunction([op](void* c, const void* a, const void* b, size_t k) { Reduce<float>(op, c, a, b, k); });
        break;
      case DType::kI32:
        o.setOutput(t.data<int32_t>(), n);
        o.setReduceFunction([op](void* c, const void* a, const void* b, size_t k) { Reduce<int32_t>(op, c, a, b, k); });
        break;
      case DType::kI64:
        o.setOutput(t.data<int64_t>(), n);
        o.setReduceFunction([op](void* c, const void* a, const void* b, size_t k) { Reduce<int64_t>(op, c, a, b, k); });
        break;
      default:  // CheckReducible came first
        throw std::logic_error("unreachable dtype");
    }
  }

  std::shared_ptr<Work> PointToPoint(Tensor t, int peer, uint32_t tag, bool send) {
    const char* what = send ? "Send" : "Recv";
    if (absl::Status s = CheckHost(t, what); !s.ok()) return Done(s);
    if (peer < 0 || peer >= size() || peer == rank()) {
      return Done(absl::InvalidArgumentError(absl::StrCat(what, ": peer ", peer, " of ", size(), " ranks (this is ",
                                                          rank(), ")")));
    }
    // The worker only posts the transfer (in call order); Wait() waits for it. A send completes
    // only once the peer has posted the matching receive, so waiting on the worker would deadlock
    // two ranks that send to each other before receiving.
    const std::string name = absl::StrCat(what, send ? " to rank " : " from rank ", peer, " (tag ", tag, ") on rank ",
                                          rank(), " of ", size());
    auto state = std::make_shared<std::unique_ptr<gloo::transport::UnboundBuffer>>();
    // User tags live above the slots the collectives draw from the context (nextSlot).
    const uint64_t slot = (uint64_t{1} << 40) + tag;
    std::shared_ptr<Work> posted = Enqueue(name, [this, t, peer, slot, send, state]() mutable {
      *state = context_->createUnboundBuffer(t.raw_data(), t.nbytes());
      if (send) {
        (*state)->send(peer, slot);
      } else {
        (*state)->recv(peer, slot);
      }
    });
    return std::make_shared<TransferWork>(std::move(posted), std::move(state), send, config_.timeout, name);
  }

  class TransferWork : public Work {
   public:
    TransferWork(std::shared_ptr<Work> posted, std::shared_ptr<std::unique_ptr<gloo::transport::UnboundBuffer>> buf,
                 bool send, std::chrono::milliseconds timeout, std::string name)
        : posted_(std::move(posted)), buf_(std::move(buf)), send_(send), timeout_(timeout), name_(std::move(name)) {}
    absl::Status Wait() override {
      if (absl::Status s = posted_->Wait(); !s.ok()) return s;
      if (done_) return absl::OkStatus();
      try {
        const bool ok = send_ ? (*buf_)->waitSend(timeout_) : (*buf_)->waitRecv(timeout_);
        if (!ok) {
          return absl::DeadlineExceededError(absl::StrCat(name_, " did not complete within ", timeout_.count(), " ms"));
        }
      } catch (const std::exception& e) {
        return absl::DeadlineExceededError(absl::StrCat(name_, " failed: ", e.what()));
      }
      done_ = true;
      return absl::OkStatus();
    }

   private:
    std::shared_ptr<Work> posted_;
    std::shared_ptr<std::unique_ptr<gloo::transport::UnboundBuffer>> buf_;
    bool send_;
    std::chrono::milliseconds timeout_;
    std::string name_;
    bool done_ = false;
  };

  // A 16-bit float tensor as a new host f32 one (its values when `copy`); others as they are.
  Tensor Widened(const Tensor& t, bool copy = true) {
    if (t.dtype() != DType::kBF16 && t.dtype() != DType::kF16) return t;
    absl::StatusOr<Tensor> w = Tensor::Empty({t.numel()}, DType::kF32, &host_);
    if (!w.ok()) throw std::runtime_error(std::string(w.status().message()));
    if (copy) {
      for (int64_t i = 0; i < t.numel(); ++i) w->data<float>()[i] = memory::LoadAsFloat(t.raw_data(), t.dtype(), i);
    }
    return *std::move(w);
  }
  // Widened's result back into the 16-bit tensor (rounded); nothing when they are the same.
  static void Narrow(const Tensor& wide, Tensor& t) {
    if (wide.raw_data() == t.raw_data()) return;
    for (int64_t i = 0; i < t.numel(); ++i) memory::StoreFromFloat(t.raw_data(), t.dtype(), i, wide.data<float>()[i]);
  }

  // Runs fn on the worker over `ts` -- device tensors among them replaced by host copies, taken
  // after the work queued on order_after_ up to this call and copied back once fn has written them
  // (every staged tensor is copied both ways: a fallback for sharing one GPU, not a fast path).
  std::shared_ptr<Work> EnqueueStaged(std::string what, std::vector<Tensor> ts,
                                      std::function<void(std::vector<Tensor>&)> fn) {
    bool on_device = false;
    for (const Tensor& t : ts) on_device |= t.device().is_cuda();
    if (!on_device) {
      return Enqueue(std::move(what), [ts, fn = std::move(fn)]() mutable { fn(ts); });
    }
    absl::StatusOr<std::unique_ptr<memory::Event>> made = memory::Event::Create(order_after_->device());
    if (!made.ok()) return Done(made.status());
    std::shared_ptr<memory::Event> ready = *std::move(made);
    if (absl::Status s = ready->Record(*order_after_); !s.ok()) return Done(s);
    return Enqueue(std::move(what), [this, ts, ready, fn = std::move(fn)]() mutable {
      auto check = [](const absl::Status& s) {
        if (!s.ok()) throw std::runtime_error(std::string(s.message()));
      };
      check(memory::SetCurrentDevice(order_after_->device()));
      check(ready->Synchronize());
      std::vector<Tensor> host(ts.size());
      for (size_t i = 0; i < ts.size(); ++i) {
        if (!ts[i].device().is_cuda()) {
          host[i] = ts[i];
          continue;
        }
        absl::StatusOr<Tensor> h = Tensor::Empty(ts[i].shape(), ts[i].dtype(), &host_);
        check(h.status());
        host[i] = *std::move(h);
        check(host[i].CopyFrom(ts[i], staging_.get()));
      }
      check(staging_->Synchronize());
      fn(host);
      for (size_t i = 0; i < ts.size(); ++i) {
        if (ts[i].device().is_cuda()) check(ts[i].CopyFrom(host[i], staging_.get()));
      }
      check(staging_->Synchronize());
    });
  }

  std::shared_ptr<Work> Enqueue(std::string what, std::function<void()> fn) {
    auto promise = std::make_shared<std::promise<absl::Status>>();
    auto work = std::make_shared<FutureWork>(promise->get_future().share());
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back([this, what = std::move(what), fn = std::move(fn), promise]() mutable {
        absl::Status status;
        const int64_t seq = ++jobs_run_;
        try {
          fn();
        } catch (const std::exception& e) {
          // Gloo reports a rank that never came as a timeout (IoException) on the ranks waiting.
          // The ranks that did not arrive are found through the job's store.
          std::string who;
          if (store_ != nullptr) {
            who = DiagnoseStuckRanks(*store_, rank(), size(), seq, what, std::min(config_.timeout, kDiagnoseGrace),
                                     job_ranks_);
          }
          const std::string job_rank =
              job_ranks_.empty() ? "" : absl::StrCat(" (job rank ", job_ranks_[config_.rank], ")");
          status = absl::DeadlineExceededError(absl::StrCat(what, " on rank ", config_.rank, " of ",
                                                            config_.world_size, job_rank, " failed (timeout ",
                                                            config_.timeout.count(), " ms): ", e.what(),
                                                            who.empty() ? "" : "; ", who));
        }
        // Drop the job's tensors before the caller learns it is done: the caller may then free
        // them, and their allocator, at once.
        fn = nullptr;
        promise->set_value(std::move(status));
      });
    }
    cv_.notify_one();
    return work;
  }

  void Run() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping, nothing left
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      job();
    }
  }

  CommConfig config_;
  std::shared_ptr<gloo::rendezvous::Context> context_;
  std::shared_ptr<gloo::rendezvous::Store> store_;  // the job's, or (a group) its keys in the job's
  std::vector<int> job_ranks_;                      // a group: its members' job ranks
  const memory::Stream* order_after_;                // device tensors: read after its work
  std::unique_ptr<memory::Stream> staging_;          // their copies (null: host tensors only)
  memory::CpuAllocator host_;                        // their host copies
  int groups_made_ = 0;
  int64_t jobs_run_ = 0;  // on the worker: the collectives run so far (their numbers in errors)
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stop_ = false;
  std::thread worker_;  // last: starts once everything above exists
};

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> Communicator::CreateGloo(const CommConfig& config,
                                                                       const memory::Stream* order_after) {
  if (config.world_size < 1 || config.rank < 0 || config.rank >= config.world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("communicator: rank ", config.rank, " is not in [0, ", config.world_size, ")"));
  }
  std::unique_ptr<memory::Stream> staging;
  if (order_after != nullptr && order_after->handle() != nullptr) {
    ASSIGN_OR_RETURN(staging, memory::Stream::Create(order_after->device()));
  }
  ASSIGN_OR_RETURN(OpenedStore opened, OpenStore(config));
  try {
    gloo::transport::tcp::attr attr(config.interface_host.c_str());
    auto device = gloo::transport::tcp::CreateDevice(attr);
    auto context = std::make_shared<gloo::rendezvous::Context>(config.rank, config.world_size);
    context->setTimeout(config.timeout);
    context->connectFullMesh(*opened.store, device);
    return std::unique_ptr<Communicator>(
        new GlooCommunicator(config, std::move(context), std::move(opened.store), {}, order_after, std::move(staging)));
  } catch (const std::exception& e) {
    return absl::DeadlineExceededError(absl::StrCat("communicator: rank ", config.rank, " of ", config.world_size,
                                                    " could not meet the others through the ", opened.where,
                                                    " within ", config.timeout.count(), " ms: ", e.what()));
  }
}

absl::StatusOr<CommConfig> CommConfigFromEnv() {
  CommConfig c;
  auto get = [](const char* name) -> const char* { return std::getenv(name); };
  auto parse = [&](const char* name, int* out) -> absl::Status {
    const char* v = get(name);
    if (v == nullptr) return absl::NotFoundError(name);
    if (!absl::SimpleAtoi(v, out)) {
      return absl::InvalidArgumentError(absl::StrCat("environment variable ", name, "='", v, "' is not an integer"));
    }
    return absl::OkStatus();
  };
  absl::Status r = parse("RANK", &c.rank), w = parse("WORLD_SIZE", &c.world_size);
  if (absl::IsNotFound(r) && absl::IsNotFound(w)) {  // SLURM
    r = parse("SLURM_PROCID", &c.rank);
    w = parse("SLURM_NTASKS", &c.world_size);
  }
  for (const absl::Status& s : {r, w}) {
    if (absl::IsNotFound(s)) {
      return absl::InvalidArgumentError(absl::StrCat("environment variable ", s.message(),
                                                     " is not set (RANK and WORLD_SIZE, or SLURM_PROCID and "
                                                     "SLURM_NTASKS)"));
    }
    if (!s.ok()) return s;
  }
  if (c.world_size < 1 || c.rank < 0 || c.rank >= c.world_size) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", c.rank, " is not in [0, WORLD_SIZE=", c.world_size, ")"));
  }
  if (const char* dir = get("TESSERA_STORE_DIR"); dir != nullptr) c.store_dir = dir;
  // A restarted job (launch --max_restarts) meets apart from its attempts before: a file store
  // keeps their keys.
  if (get("TESSERA_RESTART_COUNT") != nullptr) {
    int attempt = 0;
    if (absl::Status s = parse("TESSERA_RESTART_COUNT", &attempt); !s.ok()) return s;
    if (attempt < 0) return absl::InvalidArgumentError("environment variable TESSERA_RESTART_COUNT is negative");
    if (attempt > 0) c.prefix = absl::StrCat(c.prefix, "/attempt", attempt);
  }
  if (const char* addr = get("MASTER_ADDR"); addr != nullptr) c.master_addr = addr;
  if (get("MASTER_PORT") != nullptr) {
    if (absl::Status s = parse("MASTER_PORT", &c.master_port); !s.ok()) return s;
  }
  return c;
}

}  // namespace tessera::comm
