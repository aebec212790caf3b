// Communicator over NCCL (device tensors of the rank's GPU; host tensors staged through it). The
// collectives are queued from the calling thread on a communication stream of the communicator's
// own, after an event recorded on the order_after stream, so they overlap the compute stream's
// work; each Work is an event on the communication stream that Wait() polls until it completes, the
// communicator reports an error, or the timeout passes -- then the communicator is aborted
// (ncclCommAbort) so that no rank hangs in a collective that cannot complete.
//
// The communicator is non-blocking (ncclConfig_t::blocking = 0): its initialisation and every call
// may return ncclInProgress, and Settle() polls ncclCommGetAsyncError until it is done, within the
// timeout. A missing rank thus shows as a DeadlineExceeded error at creation, not a hang.
#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <glog/logging.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/communicator.h"
#include "comm/store.h"
#include "memory/caching_allocator.h"
#include "memory/cuda_check.h"
#include "memory/device.h"
#include "memory/status_macros.h"

namespace tessera::comm {
namespace {

using memory::DType;
using memory::Tensor;
using Clock = std::chrono::steady_clock;

class DoneWork : public Work {
 public:
  explicit DoneWork(absl::Status s) : s_(std::move(s)) {}
  absl::Status Wait() override { return s_; }

 private:
  absl::Status s_;
};

std::shared_ptr<Work> Done(absl::Status s) { return std::make_shared<DoneWork>(std::move(s)); }

absl::StatusOr<ncclDataType_t> NcclType(DType d) {
  switch (d) {
    case DType::kF32:
      return ncclFloat32;
    case DType::kBF16:
      return ncclBfloat16;
    case DType::kF16:
      return ncclFloat16;
    case DType::kI32:
      return ncclInt32;
    case DType::kI64:
      return ncclInt64;
    default:
      return absl::InvalidArgumentError(absl::StrCat("no NCCL reduction for ", memory::DTypeName(d)));
  }
}

ncclRedOp_t NcclOp(ReduceOp op) { return op == ReduceOp::kSum ? ncclSum : op == ReduceOp::kMax ? ncclMax : ncclMin; }

// Polls a non-blocking communicator until the call that returned `r` has been issued (or failed),
// within `deadline`. `what` names the call for the error.
absl::Status Settle(ncclComm_t comm, ncclResult_t r, const std::string& what, Clock::time_point deadline,
                    std::chrono::milliseconds timeout) {
  while (r == ncclInProgress) {
    if (Clock::now() > deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat(what, " did not complete within ", timeout.count(), " ms (a rank did not arrive?)"));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
    if (ncclResult_t q = ncclCommGetAsyncError(comm, &r); q != ncclSuccess) r = q;
  }
  if (r != ncclSuccess) {
    return absl::InternalError(absl::StrCat(what, " failed with NCCL error ", static_cast<int>(r), " (",
                                            ncclGetErrorString(r), "): ", ncclGetLastError(comm)));
  }
  return absl::OkStatus();
}

class NcclCommunicator;

// A collective in flight on the communication stream: `done` follows it. Keeps its tensors (and
// host staging) alive until it has finished.
class NcclWork : public Work {
 public:
  NcclWork(NcclCommunicator* owner, cudaEvent_t done, std::string what, int64_t seq, std::vector<Tensor> keep)
      : owner_(owner), done_(done), what_(std::move(what)), seq_(seq), keep_(std::move(keep)) {}
  ~NcclWork() override;
  absl::Status Wait() override;

 private:
  NcclCommunicator* owner_;
  cudaEvent_t done_;
  std::string what_;
  int64_t seq_;  // its number among the communicator's collectives
  std::vector<Tensor> keep_;
  bool waited_ = false;
  absl::Status status_;
};

class NcclCommunicator : public Communicator {
 public:
  // store: the job's, or a group's keys in it (where a timeout's reports go); job_ranks: a group's
  // members' job ranks (empty for the job's communicator).
  NcclCommunicator(CommConfig config, ncclComm_t comm, std::unique_ptr<memory::Stream> stream,
                   const memory::Stream* order_after, std::shared_ptr<gloo::rendezvous::Store> store,
                   std::vector<int> job_ranks)
      : config_(std::move(config)),
        comm_(comm),
        stream_(std::move(stream)),
        order_after_(order_after),
        store_(std::move(store)),
        job_ranks_(std::move(job_ranks)),
        device_alloc_(memory::MakeDefaultAllocator(order_after->device())) {}

  ~NcclCommunicator() override {
    if (aborted_) return;  // ncclCommAbort freed it
    if (stream_ != nullptr) {
      if (absl::Status s = stream_->Synchronize(); !s.ok()) LOG(ERROR) << "NCCL communicator: " << s;
    }
    // A non-blocking communicator's finalize runs on: wait for it (within the timeout) before the
    // destroy. Destroying it in flight left NCCL's state for the next communicator this thread
    // creates ("Blocking and nonblocking communicators are not allowed in the same group").
    // (At most 10 s: a destructor on an error path must not wait out a long timeout.)
    const std::chrono::milliseconds wait = std::min(config_.timeout, std::chrono::milliseconds(10000));
    const absl::Status finalized =
        Settle(comm_, ncclCommFinalize(comm_), "ncclCommFinalize", Clock::now() + wait, wait);
    if (!finalized.ok()) {
      LOG(ERROR) << "NCCL communicator: " << finalized << "; aborting it";
      ncclCommAbort(comm_);
      return;
    }
    ncclCommDestroy(comm_);
  }

  int rank() const override { return config_.rank; }
  int size() const override { return config_.world_size; }
  const char* backend() const override { return "nccl"; }
  bool CanReduce(DType d) const override { return NcclType(d).ok(); }

  std::shared_ptr<Work> AllReduce(Tensor t, ReduceOp op) override {
    const std::string what = Name("AllReduce", t);
    absl::StatusOr<ncclDataType_t> type = NcclType(t.dtype());
    if (!type.ok()) return Done(absl::InvalidArgumentError(absl::StrCat(what, ": ", type.status().message())));
    return Issue(what, {t}, {true}, [&, op](std::vector<Tensor>& d) {
      return ncclAllReduce(d[0].raw_data(), d[0].raw_data(), static_cast<size_t>(d[0].numel()), *type, NcclOp(op),
                           comm_, stream_->handle());
    });
  }

  std::shared_ptr<Work> ReduceScatter(Tensor in, Tensor out, ReduceOp op) override {
    const std::string what = Name("ReduceScatter", in);
    absl::StatusOr<ncclDataType_t> type = NcclType(in.dtype());
    if (!type.ok()) return Done(absl::InvalidArgumentError(absl::StrCat(what, ": ", type.status().message())));
    if (in.dtype() != out.dtype() || in.numel() != out.numel() * size()) {
      return Done(absl::InvalidArgumentError(
          absl::StrCat(what, ": input must hold ", size(), " parts like the output ", out.DebugString())));
    }
    return Issue(what, {in, out}, {false, true}, [&, op](std::vector<Tensor>& d) {
      return ncclReduceScatter(d[0].raw_data(), d[1].raw_data(), static_cast<size_t>(d[1].numel()), *type,
                               NcclOp(op), comm_, stream_->handle());
    });
  }

  std::shared_ptr<Work> AllGather(Tensor in, Tensor out) override {
    const std::string what = Name("AllGather", in);
    if (in.dtype() != out.dtype() || out.numel() != in.numel() * size()) {
      return Done(absl::InvalidArgumentError(
          absl::StrCat(what, ": output ", out.DebugString(), " must hold ", size(), " copies of the input")));
    }
    return Issue(what, {in, out}, {false, true}, [&](std::vector<Tensor>& d) {
      return ncclAllGather(d[0].raw_data(), d[1].raw_data(), d[0].nbytes(), ncclUint8, comm_, stream_->handle());
    });
  }

  std::shared_ptr<Work> Broadcast(Tensor t, int root) override {
    const std::string what = absl::StrCat(Name("Broadcast", t), " from rank ", root);
    if (root < 0 || root >= size()) {
      return Done(absl::InvalidArgumentError(absl::StrCat(what, ": root ", root, " of ", size(), " ranks")));
    }
    return Issue(what, {t}, {true}, [&, root](std::vector<Tensor>& d) {
      return ncclBroadcast(d[0].raw_data(), d[0].raw_data(), d[0].nbytes(), ncclUint8, root, comm_,
                           stream_->handle());
    });
  }

  std::shared_ptr<Work> Send(Tensor t, int peer, uint32_t tag) override { return PointToPoint(t, peer, tag, true); }
  std::shared_ptr<Work> Recv(Tensor t, int peer, uint32_t tag) override { return PointToPoint(t, peer, tag, false); }

  std::shared_ptr<Work> Barrier() override {
    absl::StatusOr<Tensor> one = Tensor::Zeros({1}, DType::kI32, device_alloc_.get());
    if (!one.ok()) return Done(one.status());
    return AllReduce(*one, ReduceOp::kSum);
  }

  absl::StatusOr<std::unique_ptr<Communicator>> NewGroup(const std::vector<int>& ranks) override {
    ASSIGN_OR_RETURN(const int me, GroupRank(ranks, rank(), size()));
    if (!job_ranks_.empty()) {
      return absl::UnimplementedError("NewGroup of a group: make groups from the job's communicator");
    }
    CommConfig sub = config_;
    sub.rank = me;
    sub.world_size = static_cast<int>(ranks.size());
    const std::string prefix = absl::StrCat("group/", absl::StrJoin(ranks, ","), "/", groups_made_++);
    // (A timeout in the group is diagnosed under the group's keys in the job's store, kept alive.)
    return Connect(sub, *order_after_, *store_, prefix + "/nccl_id", SharedPrefixStore(prefix + "/diag", store_), ranks,
                   "the job's store");
  }

  // Creates the communicator of `config` whose ranks meet at `key` in `store` (rank 0 publishes the id).
  static absl::StatusOr<std::unique_ptr<Communicator>> Connect(const CommConfig& config,
                                                               const memory::Stream& order_after,
                                                               gloo::rendezvous::Store& store, const std::string& key,
                                                               std::shared_ptr<gloo::rendezvous::Store> own_store,
                                                               std::vector<int> job_ranks, const std::string& where) {
    const std::string who = absl::StrCat("NCCL communicator: rank ", config.rank, " of ", config.world_size);
    ncclUniqueId id;
    try {
      if (config.rank == 0) {
        NCCL_RETURN_IF_ERROR(ncclGetUniqueId(&id));
        store.set(key, std::vector<char>(id.internal, id.internal + sizeof(id.internal)));
      } else {
        store.wait({key}, config.timeout);
        const std::vector<char> v = store.get(key);
        if (v.size() != sizeof(id.internal)) {
          return absl::DataLossError(absl::StrCat(who, ": the NCCL id in the ", where, " has ", v.size(),
                                                  " bytes, not ", sizeof(id.internal)));
        }
        std::memcpy(id.internal, v.data(), v.size());
      }
    } catch (const std::exception& e) {
      return absl::DeadlineExceededError(absl::StrCat(who, ": no NCCL id from rank 0 in the ", where, " within ",
                                                      config.timeout.count(), " ms: ", e.what()));
    }
    RETURN_IF_ERROR(memory::SetCurrentDevice(order_after.device()));
    ASSIGN_OR_RETURN(std::unique_ptr<memory::Stream> stream, memory::Stream::Create(order_after.device()));
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    ncclComm_t comm = nullptr;
    const Clock::time_point deadline = Clock::now() + config.timeout;
    ncclResult_t r = ncclCommInitRankConfig(&comm, config.world_size, id, config.rank, &cfg);
    if (r != ncclSuccess && r != ncclInProgress) {
      return absl::InternalError(absl::StrCat(who, ": ncclCommInitRankConfig on ", order_after.device().ToString(),
                                              " failed with NCCL error ", static_cast<int>(r), " (",
                                              ncclGetErrorString(r), "): ", ncclGetLastError(comm)));
    }
    if (absl::Status s = Settle(comm, r, absl::StrCat(who, ": joining the others"), deadline, config.timeout);
        !s.ok()) {
      ncclCommAbort(comm);
      return s;
    }
    auto made = std::make_unique<NcclCommunicator>(config, comm, std::move(stream), &order_after, std::move(own_store),
                                                   std::move(job_ranks));
    // A non-blocking initialisation may report success before every rank has connected: a first
    // collective within the timeout proves they all did (else it is aborted, and this an error).
    if (absl::Status s = made->Barrier()->Wait(); !s.ok()) {
      return absl::DeadlineExceededError(absl::StrCat(who, ": the ranks did not all join within ",
                                                      config.timeout.count(), " ms: ", s.message()));
    }
    return std::unique_ptr<Communicator>(std::move(made));
  }

  // After a timeout or an NCCL error: no later call may touch the communicator.
  void Abort(const std::string& why) {
    if (aborted_) return;
    LOG(ERROR) << "aborting the NCCL communicator (rank " << rank() << " of " << size() << "): " << why;
    ncclCommAbort(comm_);
    aborted_ = true;
    abort_reason_ = why;
  }
  ncclComm_t comm() const { return comm_; }
  // Where the other ranks are, after collective `seq` (`what`) timed out.
  std::string Diagnose(int64_t seq, const std::string& what) {
    if (store_ == nullptr) return "";
    const std::string op = what.substr(0, what.find(" on rank "));
    return DiagnoseStuckRanks(*store_, rank(), size(), seq, op,
                              std::min(config_.timeout, std::chrono::milliseconds(5000)), job_ranks_);
  }
  const CommConfig& config() const { return config_; }
  const memory::Device& device() const { return order_after_->device(); }

 private:
  std::string Name(const char* op, const Tensor& t) const {
    return absl::StrCat(op, " (", memory::DTypeName(t.dtype()), ", ", t.numel(), " elements) on rank ", rank(),
                        " of ", size());
  }

  // Queues `call` on the communication stream over `ts` (host tensors staged through device copies;
  // `written[i]`: ts[i] is an output, copied back to the host once the collective is done).
  template <typename Call>
  std::shared_ptr<Work> Issue(const std::string& what, std::vector<Tensor> ts, std::vector<bool> written, Call call) {
    if (aborted_) {
      return Done(absl::FailedPreconditionError(
          absl::StrCat(what, ": the NCCL communicator was aborted after an earlier failure: ", abort_reason_)));
    }
    for (const Tensor& t : ts) {
      if (!t.defined() || (t.device().is_cuda() && t.device() != device())) {
        return Done(absl::InvalidArgumentError(absl::StrCat(
            what, ": NCCL takes tensors of ", device().ToString(), " (or host ones), got ",
            t.defined() ? t.DebugString() : "an undefined one")));
      }
    }
    auto fail = [&](const absl::Status& s) { return Done(absl::Status(s.code(), absl::StrCat(what, ": ", s.message()))); };
    if (absl::Status s = memory::SetCurrentDevice(device()); !s.ok()) return fail(s);
    // The communication stream starts after what the compute stream has queued so far.
    if (absl::Status s = stream_->WaitFor(*order_after_); !s.ok()) return fail(s);
    std::vector<Tensor> dev(ts.size());
    bool staged = false;
    for (size_t i = 0; i < ts.size(); ++i) {
      if (ts[i].device().is_cuda()) {
        dev[i] = ts[i];
        continue;
      }
      // Host tensors: through a device copy, in and back on the communication stream. In-place
      // pairs (an output inside an input) are not aliased here; host collectives are small.
      staged = true;
      absl::StatusOr<Tensor> d = Tensor::Empty(ts[i].shape(), ts[i].dtype(), device_alloc_.get());
      if (!d.ok()) return fail(d.status());
      dev[i] = *std::move(d);
      if (absl::Status s = dev[i].CopyFrom(ts[i], stream_.get()); !s.ok()) return fail(s);
    }
    const Clock::time_point deadline = Clock::now() + config_.timeout;
    if (absl::Status s = Settle(comm_, call(dev), what, deadline, config_.timeout); !s.ok()) {
      Abort(std::string(s.message()));
      return Done(s);
    }
    if (staged) {
      for (size_t i = 0; i < ts.size(); ++i) {
        if (ts[i].device().is_cpu() && written[i]) {
          if (absl::Status s = ts[i].CopyFrom(dev[i], stream_.get()); !s.ok()) return fail(s);
        }
      }
    }
    cudaEvent_t done = nullptr;
    if (cudaError_t e = cudaEventCreateWithFlags(&done, cudaEventDisableTiming); e != cudaSuccess) {
      return fail(absl::InternalError(cudaGetErrorString(e)));
    }
    if (cudaError_t e = cudaEventRecord(done, stream_->handle()); e != cudaSuccess) {
      cudaEventDestroy(done);
      return fail(absl::InternalError(cudaGetErrorString(e)));
    }
    for (Tensor& d : dev) ts.push_back(d);  // kept alive until done
    return std::make_shared<NcclWork>(this, done, what, ++issued_, std::move(ts));
  }

  std::shared_ptr<Work> PointToPoint(Tensor t, int peer, uint32_t tag, bool send) {
    const std::string what = absl::StrCat(send ? "Send" : "Recv", " (", t.nbytes(), " bytes, tag ", tag, ") ",
                                          send ? "to" : "from", " rank ", peer, " on rank ", rank(), " of ", size());
    if (peer < 0 || peer >= size() || peer == rank()) {
      return Done(absl::InvalidArgumentError(absl::StrCat(what, ": no such peer")));
    }
    // NCCL matches point-to-point calls by order between a pair of ranks, not by tag: the tag
    // only names the transfer in errors.
    return Issue(what, {t}, {!send}, [&, peer, send](std::vector<Tensor>& d) {
      return send ? ncclSend(d[0].raw_data(), d[0].nbytes(), ncclUint8, peer, comm_, stream_->handle())
                  : ncclRecv(d[0].raw_data(), d[0].nbytes(), ncclUint8, peer, comm_, stream_->handle());
    });
  }

  CommConfig config_;
  ncclComm_t comm_;
  std::unique_ptr<memory::Stream> stream_;  // the communication stream
  const memory::Stream* order_after_;
  std::shared_ptr<gloo::rendezvous::Store> store_;  // the job's, or (a group) its keys in the job's
  std::vector<int> job_ranks_;                      // a group: its members' job ranks
  std::unique_ptr<memory::Allocator> device_alloc_;  // staging for host tensors, barrier
  int groups_made_ = 0;
  int64_t issued_ = 0;  // collectives issued so far
  bool aborted_ = false;
  std::string abort_reason_;
};

NcclWork::~NcclWork() {
  // Not waited for: the collective may still use the tensors kept here.
  if (!waited_) cudaEventSynchronize(done_);
  cudaEventDestroy(done_);
}

absl::Status NcclWork::Wait() {
  if (waited_) return status_;
  waited_ = true;
  const std::chrono::milliseconds timeout = owner_->config().timeout;
  const Clock::time_point deadline = Clock::now() + timeout;
  for (int spins = 0;; ++spins) {
    const cudaError_t e = cudaEventQuery(done_);
    if (e == cudaSuccess) break;
    if (e != cudaErrorNotReady) {
      status_ = absl::InternalError(absl::StrCat(what_, ": ", cudaGetErrorString(e)));
      return status_;
    }
    ncclResult_t async = ncclSuccess;
    ncclCommGetAsyncError(owner_->comm(), &async);
    if (async != ncclSuccess && async != ncclInProgress) {
      status_ = absl::InternalError(absl::StrCat(what_, " failed with NCCL error ", static_cast<int>(async), " (",
                                                 ncclGetErrorString(async), ")"));
      owner_->Abort(std::string(status_.message()));
      return status_;
    }
    if (Clock::now() > deadline) {
      const std::string who = owner_->Diagnose(seq_, what_);
      status_ = absl::DeadlineExceededError(absl::StrCat(
          what_, " did not finish within ", timeout.count(), " ms; the NCCL communicator is aborted",
          who.empty() ? "" : "; ", who));
      owner_->Abort(std::string(status_.message()));
      return status_;
    }
    // Spin briefly (collectives of a backward finish within microseconds of each other), then sleep.
    if (spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  return status_;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> Communicator::CreateNccl(const CommConfig& config,
                                                                       const memory::Stream& order_after) {
  if (config.world_size < 1 || config.rank < 0 || config.rank >= config.world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("communicator: rank ", config.rank, " is not in [0, ", config.world_size, ")"));
  }
  if (!order_after.device().is_cuda() || order_after.handle() == nullptr) {
    return absl::UnavailableError("NCCL needs a GPU (and the GPU stream its collectives follow)");
  }
  ASSIGN_OR_RETURN(OpenedStore opened, OpenStore(config));
  gloo::rendezvous::Store& store = *opened.store;
  return NcclCommunicator::Connect(config, order_after, store, "nccl_id", opened.store, {}, opened.where);
}

}  // namespace tessera::comm
