#include "memory/parallel_for.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace tessera::memory {
namespace {

// Set on the pool's threads and on a caller while it runs its share: a ParallelFor inside one runs
// inline (the pool is busy with the outer call).
thread_local bool in_parallel_for = false;

}  // namespace

int CpuThreads() {
  if (const char* env = std::getenv("TESSERA_CPU_THREADS"); env != nullptr && std::atoi(env) > 0) {
    return std::atoi(env);
  }
  // The CPUs this process may run on; those of the whole machine are shared among the node's ranks.
  const int machine = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int cpus = machine;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = std::max(1, CPU_COUNT(&set));
  // A mask narrower than the machine is this rank's own binding already (srun --cpu-bind, numactl):
  // it is not shared further.
  if (cpus < machine) return cpus;
  const char* local = std::getenv("LOCAL_WORLD_SIZE");
  const int ranks = local != nullptr ? std::max(1, std::atoi(local)) : 1;
  return std::max(1, cpus / ranks);
}

namespace {

// CpuThreads() - 1 threads, started on first use and kept for the process's life (never joined:
// they wait on a condition variable, and process exit ends them). One call at a time; a concurrent
// caller from another thread runs its loop inline instead of waiting.
class Pool {
 public:
  static Pool& Get() {
    static Pool* pool = new Pool(CpuThreads() - 1);
    return *pool;
  }
  int workers() const { return static_cast<int>(workers_.size()); }

  // Runs fn over [0, n) on `threads` threads (the calling thread one of them). The range is cut
  // into up to 4 pieces per thread, which the threads claim in turn: a thread that the OS
  // deschedules (a communicator's or the driver's threads share the cores) delays only its
  // current piece, not a fixed share of the work. False, having run nothing, when another call
  // holds the pool.
  bool Run(int64_t n, int64_t threads, const std::function<void(int64_t, int64_t)>& fn) {
    std::unique_lock<std::mutex> call(call_mu_, std::try_to_lock);
    if (!call.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      n_ = n;
      parts_ = threads;
      pieces_ = std::min<int64_t>(n, threads * 4);
      next_.store(0);
      pending_ = threads - 1;
      ++generation_;
    }
    work_cv_.notify_all();
    in_parallel_for = true;
    Claim(fn, n, pieces_);
    in_parallel_for = false;
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return pending_ == 0; });
    fn_ = nullptr;
    return true;
  }

 private:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) {
      workers_.emplace_back([this, i] { Loop(i + 1); });
      workers_.back().detach();
    }
  }

  void Loop(int64_t index) {
    in_parallel_for = true;
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int64_t, int64_t)>* fn;
      int64_t n, parts, pieces;
      {
        std::unique_lock<std::mutex> lock(mu_);
        work_cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        fn = fn_;
        n = n_;
        parts = parts_;
        pieces = pieces_;
      }
      if (index >= parts) continue;  // this call needs fewer threads
      Claim(*fn, n, pieces);
      std::lock_guard<std::mutex> lock(mu_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }

  // Pieces of the running call, claimed in order until none is left.
  void Claim(const std::function<void(int64_t, int64_t)>& fn, int64_t n, int64_t pieces) {
    for (int64_t i = next_.fetch_add(1); i < pieces; i = next_.fetch_add(1)) fn(n * i / pieces, n * (i + 1) / pieces);
  }

  std::vector<std::thread> workers_;
  std::atomic<int64_t> next_{0};  // the running call's next unclaimed piece
  std::mutex call_mu_;  // one ParallelFor at a time
  std::mutex mu_;       // guards the fields below
  std::condition_variable work_cv_, done_cv_;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, parts_ = 0, pieces_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
};

}  // namespace

void ParallelFor(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (in_parallel_for) {
    fn(0, n);
    return;
  }
  Pool& pool = Pool::Get();
  const int64_t threads = std::min<int64_t>(n, pool.workers() + 1);  // the pool's size, fixed at start
  if (threads <= 1 || !pool.Run(n, threads, fn)) fn(0, n);
}

}  // namespace tessera::memory
