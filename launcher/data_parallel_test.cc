// Data parallelism with real processes (fork) on the CPU backend: 1, 2 and 4 ranks, each taking
// every size()-th micro-batch of the step, train like one process over all of them -- the same
// losses, gradient norms and weights to f32 rounding (the gradient sums add in another order) -- and
// every rank ends with the same weights, bit for bit. On a GPU (skipped without one) the same with
// device gradients in bf16 compute: two ranks sharing the GPU through Gloo (device tensors staged
// through host memory), and one rank through NCCL (NCCL refuses two ranks on one GPU).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/communicator.h"
#include "launcher/memory_plan.h"
#include "launcher/trainer.h"
#include "launcher/test_language.h"
#include "memory/caching_allocator.h"
#include "memory/cpu_allocator.h"
#include "memory/device.h"
#include "memory/pinned_allocator.h"
#include "memory/status_macros.h"

namespace tessera::launcher {
namespace {

using memory::DType;
using memory::Tensor;

models::LlamaConfig Small() { return test_util::SmallLlama(); }
using test_util::Language;

struct Trained {
  std::vector<double> losses, norms;
  std::vector<float> weights;
  // The validation loss after training, over kEvalBatches (shared among the ranks), and over one
  // batch (fewer than the ranks: ZeRO-3's forwards must still match on every rank).
  double val = 0, val_one = 0;
};
constexpr int kEvalBatches = 5;  // not a multiple of 2, 3 or 4 ranks

constexpr int kSteps = 4;
constexpr int64_t windows_batch = 3, windows_seq = 8;  // each step's windows: [3, 9] tokens
// What the model holds beyond the parameter-sized buffers before the first step (scalars; each
// allocation rounded up to 64 bytes), which the plan does not count.
constexpr int64_t kPlanSlackBytes = 2 << 10;

// Makes this rank's communicator once the model's stream exists (null: one process, no communicator).
using CommFactory = std::function<absl::StatusOr<std::unique_ptr<comm::Communicator>>(const memory::Stream*)>;

// Trains kSteps steps on `device` (a GPU: bf16 compute, f32 gradients); with `make_comm`, as one
// of its communicator's ranks.
absl::StatusOr<Trained> Train(int64_t accum, const CommFactory& make_comm, int zero = 0, bool overlap = true,
                              memory::Device device = memory::Device::Cpu(), bool chunked = false,
                              bool bf16_grads = false, bool param_chunks = false, bool host_parts = false,
                              bool external = false, bool bf16 = false, bool all_state_on_host = false) {
  const bool gpu = device.is_cuda();
  RETURN_IF_ERROR(memory::SetCurrentDevice(device));
  std::unique_ptr<memory::Allocator> owned = memory::MakeDefaultAllocator(device);
  memory::Allocator& alloc = *owned;
  ASSIGN_OR_RETURN(auto stream_owned, memory::Stream::Create(device));
  const memory::Stream* stream = gpu ? stream_owned.get() : nullptr;
  ASSIGN_OR_RETURN(auto blas, ops::Blas::Create(device, gpu ? &alloc : nullptr));
  std::unique_ptr<comm::Communicator> owned_comm;
  if (make_comm) {
    ASSIGN_OR_RETURN(owned_comm, make_comm(stream_owned.get()));
  }
  comm::Communicator* comm = owned_comm.get();
  models::LlamaRuntime rt;
  // external: bf16 compute, the master weights only in the chunked state (ZeRO-3: this rank's part).
  if (gpu || bf16_grads || external || bf16) rt.compute_dtype = DType::kBF16;
  rt.external_master = external;
  if (bf16_grads) rt.grad_dtype = DType::kBF16;
  // Parameter chunks (compute copies and bf16 gradients), placement cpu: each layer's chunks come to
  // the compute tier for its use; without accumulation the gradients overwrite the copy.
  memory::CpuAllocator param_host;
  if (param_chunks) {
    rt.param_chunks = {.enabled = true,
                       .policy = gpu ? memory::PlacementPolicy::kCompute : memory::PlacementPolicy::kHost,
                       .host = &param_host,
                       .grads_in_place = accum == 1};
  }
  // ZeRO-3 with this rank's parts in host memory (their own allocator; pinned on a GPU).
  std::unique_ptr<memory::Allocator> parts_host;
  if (zero == 3) rt.shard = {.comm = comm, .overlap = overlap};
  if (host_parts) {
    parts_host = gpu ? std::unique_ptr<memory::Allocator>(new memory::PinnedHostAllocator())
                     : std::unique_ptr<memory::Allocator>(new memory::CpuAllocator());
    rt.shard.host = parts_host.get();
  }
  models::LlamaConfig config = Small();
  if (gpu) {  // the GPU's attention kernels need head_dim 32 or more
    config.hidden_size = 64;
    config.num_heads = 2;
    config.num_kv_heads = 1;
    config.intermediate_size = 96;
  }
  ASSIGN_OR_RETURN(auto model, models::LlamaModel::Create(config, rt, &alloc, blas.get(), stream));
  // (An external master exists once the trainer installs its store: the weights come after it.)
  if (!external) RETURN_IF_ERROR(model->InitRandom(5));
  TrainerConfig cfg;
  cfg.grad_accum_steps = accum;
  cfg.schedule = {.peak_lr = 1e-2f, .min_lr = 1e-3f, .warmup_steps = 1, .total_steps = kSteps};
  cfg.comm = comm;
  cfg.zero_stage = zero;
  cfg.overlap_grad_reduce = overlap;
  // ZeRO-3 with the state in host memory: each group's update (on its own thread) comes late, so that a forward
  // that gathered a group before its update had ended would train on stale weights.
  cfg.before_host_update_group = [](int) { usleep(5000); };
  // Chunked state: chunks of the largest parameter's size (each holds whole pieces), two of them in
  // the compute tier and the rest in host memory, so both of HybridAdamW's paths update.
  memory::CpuAllocator state_host;
  if (chunked) {
    int64_t largest = 0;
    for (const models::LlamaParam& p : model->params()) largest = std::max(largest, memory::NumElements(p.shape));
    // (Host parts: the state in host memory too, where the update reads and writes them.)
    cfg.chunked_state = {.enabled = true,
                         .policy = host_parts || all_state_on_host ? memory::PlacementPolicy::kHost
                                                            : memory::PlacementPolicy::kAuto,
                         .chunk_elems = largest,
                         .compute_budget_bytes = 2 * largest * 4 * 3,
                         .host = &state_host};
  }
  ASSIGN_OR_RETURN(auto trainer, Trainer::Create(cfg, model.get(), &alloc, stream));
  if (!gpu && !chunked && !param_chunks && !host_parts) {
    // The memory plan (the launcher's check before allocating) does not undercount what the model
    // and the trainer hold before the first step: the parameter-sized buffers, ZeRO's parts and
    // its collectives' padded buffers (groups that do not cut into size() whole parts).
    const DevicePlan plan = PlanDeviceMemory(config, rt, windows_batch, windows_seq, -1,
                                             comm != nullptr ? comm->size() : 1, zero);
    const int64_t planned = plan.weights + plan.master + plan.gradients + plan.optimizer;
    const int64_t held = alloc.stats().allocated_bytes;
    fprintf(stderr, "memory plan: %lld bytes planned, %lld held (ZeRO %d, %d ranks)\n",
            static_cast<long long>(planned), static_cast<long long>(held), zero, comm != nullptr ? comm->size() : 1);
    if (held > planned + kPlanSlackBytes) {
      return absl::InternalError(absl::StrCat("the memory plan counts ", planned, " bytes of parameter-sized buffers; ",
                                              held, " are held"));
    }
  }
  if (external) {
    RETURN_IF_ERROR(model->InitRandom(5));
    if (model->owns_master()) return absl::InternalError("an external master, yet the model holds one");
  }
  if (chunked) {  // ZeRO: this rank's pieces only (about 1/size() of the parameters)
    const memory::ChunkManager& st = *trainer->chunked_state();
    int64_t held = 0;
    for (int i = 0; i < st.num_tensors(); ++i) held += st.numel_of(i);
    const int64_t all = model->config().NumParameters(), ranks = comm != nullptr ? comm->size() : 1;
    const int64_t even = (all + ranks - 1) / ranks;
    if (zero >= 1 ? held > even + model->num_param_groups() : held != all) {
      return absl::InternalError(absl::StrCat("chunked state of ", held, " elements for ", all, " parameters"));
    }
  }
  // ZeRO: about 1/size() of the moments (each group is cut into size() parts; at most one element
  // per group more than an even share).
  const int64_t n = model->config().NumParameters(), w = comm != nullptr ? comm->size() : 1;
  const int64_t held = trainer->flat_moment_elements(), even = (n + w - 1) / w;
  if (chunked) {
    // (the flat moments are unused: checked below)
  } else if (zero >= 1 ? held > even + model->num_param_groups() || held < even - 2 * model->num_param_groups() : held != n) {
    return absl::InternalError(absl::StrCat("moments of ", held, " elements for ", n, " parameters, ZeRO ", zero,
                                            ", ", w, " ranks"));
  }
  memory::CpuAllocator host;
  Tensor windows = *Tensor::Empty({windows_batch, windows_seq + 1}, DType::kI32, &host);
  std::mt19937 rng(21);
  Trained run;
  for (int s = 0; s < kSteps; ++s) {
    ASSIGN_OR_RETURN(StepStats st, trainer->Step(Language(&rng), &windows));
    // One reduction per parameter group when overlapped with the last backward (and with ZeRO-2).
    // ZeRO-3: one per group and backward.
    // bf16 gradients: per group with weight GEMMs one for them and one for its f32 gradients, the
    // embedding's group only the latter.
    const int groups = model->num_param_groups();
    // (Parameter chunks: one per chunk's gradients and the f32 ones, after the backward.)
    const int want = comm == nullptr ? 0
                     : param_chunks  ? st.grad_reductions
                     : zero == 3     ? groups * static_cast<int>(accum)
                     : bf16_grads    ? (overlap || zero >= 2 ? 2 * groups - 1 : 2)
                     : overlap || zero >= 2 ? groups
                                            : 1;
    if (st.grad_reductions != want || (param_chunks && comm != nullptr && st.grad_reductions < 2)) {
      return absl::InternalError(absl::StrCat(st.grad_reductions, " gradient reductions, want ", want));
    }
    run.losses.push_back(st.loss);
    run.norms.push_back(st.grad_norm);
  }
  std::mt19937 eval_rng(33);
  // (Each rank evaluates its share: batches r, r + size(), ...; ZeRO-3 runs as many forwards as the
  // rank with the most.)
  const int rank = comm != nullptr ? comm->rank() : 0, ranks = comm != nullptr ? comm->size() : 1;
  // (One batch first: right after the last step, whose weight gathers a forward may still have to
  // issue -- ZeRO-1/2 under a host update -- while rank 1 runs no forward.)
  for (const int batches : {1, kEvalBatches}) {
    ASSIGN_OR_RETURN(const double val, trainer->Evaluate(Language(&eval_rng), &windows, batches));
    (batches == 1 ? run.val_one : run.val) = val;
    const int share = (batches - rank + ranks - 1) / ranks, most = (batches + ranks - 1) / ranks;
    const Trainer::EvalShare& e = trainer->last_eval();
    if (e.batches != share || e.forwards != (zero == 3 ? most : share)) {
      return absl::InternalError(absl::StrCat("rank ", rank, " of ", ranks, " evaluated ", e.batches, " of ", batches,
                                              " batches in ", e.forwards, " forwards; want ", share, " in ",
                                              zero == 3 ? most : share));
    }
  }
  RETURN_IF_ERROR(trainer->Drain());  // ZeRO on a GPU: gathers the master weights
  // Every parameter's master weights (ZeRO-3: all-gathered from the ranks' parts).
  for (const models::LlamaParam& p : model->params()) {
    ASSIGN_OR_RETURN(Tensor w, Tensor::Empty(p.shape, DType::kF32, &host));
    RETURN_IF_ERROR(model->ReadMaster(p, w));
    run.weights.insert(run.weights.end(), w.data<float>(), w.data<float>() + w.numel());
  }
  if (host_parts && !(model->master_flat().device().is_cpu() && model->grad_flat().device().is_cpu() &&
                      model->compute_flat().device().is_cpu())) {
    return absl::InternalError("ZeRO-3's parts are not in host memory");
  }
  if (zero == 3) {  // each rank holds about 1/size() of the weights and gradients
    // (With an external master the parts are the compute copy and the gradients only.)
    const int64_t held_weights = external ? model->compute_flat().numel() : model->master_flat().numel();
    if ((!chunked && held_weights != trainer->flat_moment_elements()) || model->grad_flat().numel() != held_weights ||
        held_weights > even + model->num_param_groups()) {
      return absl::InternalError(absl::StrCat("ZeRO-3: ", held_weights, " weights held for ", n, " parameters"));
    }
  }
  return run;
}

void Save(const std::string& path, const Trained& r) {
  std::ofstream f(path, std::ios::binary);
  for (double x : r.losses) f.write(reinterpret_cast<const char*>(&x), sizeof(x));
  for (double x : r.norms) f.write(reinterpret_cast<const char*>(&x), sizeof(x));
  f.write(reinterpret_cast<const char*>(&r.val), sizeof(r.val));
  f.write(reinterpret_cast<const char*>(&r.val_one), sizeof(r.val_one));
  f.write(reinterpret_cast<const char*>(r.weights.data()), r.weights.size() * sizeof(float));
}

Trained Load(const std::string& path, size_t weights) {
  Trained r;
  r.losses.resize(kSteps);
  r.norms.resize(kSteps);
  r.weights.resize(weights);
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(r.losses.data()), kSteps * sizeof(double));
  f.read(reinterpret_cast<char*>(r.norms.data()), kSteps * sizeof(double));
  f.read(reinterpret_cast<char*>(&r.val), sizeof(r.val));
  f.read(reinterpret_cast<char*>(&r.val_one), sizeof(r.val_one));
  f.read(reinterpret_cast<char*>(r.weights.data()), weights * sizeof(float));
  return r;
}

struct Config {
  int world, zero;
  bool overlap;          // reductions overlapped with the backward
  bool chunked = false;  // chunked optimizer state (placement auto: some chunks in the compute tier)
  bool bf16_grads = false;  // bf16 compute and weight gradients (the reference too)
  bool param_chunks = false;  // parameters in chunks (with chunked state and bf16 gradients)
  bool host_parts = false;    // ZeRO-3: the parts in host memory (with chunked state there)
  bool external = false;      // bf16 compute, master weights only in the chunked state (the reference bf16 too)
  bool state_host = false;    // the chunked state all in host memory (ZeRO-3: its update under the next forward)
};

// Runs `world` ranks of this binary (see RankMain) and compares them with one process training
// all their micro-batches on `device`: losses, norms and weights within the tolerances (relative
// for losses and norms, absolute for weights); the ranks' weights bit for bit equal.
void RanksTrainLikeOneProcess(const std::vector<Config>& configs, const std::string& device,
                              const std::string& backend, double loss_tol, double norm_tol, double weight_tol,
                              double mean_weight_tol = 0) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string base = std::string(tmp != nullptr ? tmp : "/tmp") + "/dp_" + device + "_" + backend + "_" +
                           std::to_string(getpid());
  for (size_t config = 0; config < configs.size(); ++config) {
    const int world = configs[config].world, zero = configs[config].zero;
    const bool overlap = configs[config].overlap, chunked = configs[config].chunked;
    const bool bf16_grads = configs[config].bf16_grads, param_chunks = configs[config].param_chunks;
    const bool host_parts = configs[config].host_parts, external = configs[config].external;
    const bool state_host = configs[config].state_host;
    SCOPED_TRACE(absl::StrCat(world, " ranks (", device, ", ", backend, "), ZeRO ", zero,
                              overlap ? "" : ", no overlap", chunked ? ", chunked state" : "",
                              bf16_grads ? ", bf16 gradients" : "", param_chunks ? ", parameter chunks" : "",
                              host_parts ? ", parts in host memory" : "", external ? ", external master" : "",
                              state_host ? ", state in host memory" : ""));
    const int64_t accum = world == 2 ? 2 : world == 1 ? 3 : 1;  // per rank
    const std::string dir = base + "_" + std::to_string(config);
    ASSERT_EQ(system(("rm -rf " + dir + " && mkdir -p " + dir + "/store").c_str()), 0);
    std::vector<pid_t> pids;
    for (int r = 0; r < world; ++r) {
      const pid_t pid = fork();
      if (pid == 0) {
        setenv("DP_RANK", std::to_string(r).c_str(), 1);
        setenv("DP_WORLD", std::to_string(world).c_str(), 1);
        setenv("DP_ACCUM", std::to_string(accum).c_str(), 1);
        setenv("DP_DIR", dir.c_str(), 1);
        setenv("DP_ZERO", std::to_string(zero).c_str(), 1);
        setenv("DP_OVERLAP", overlap ? "1" : "0", 1);
        setenv("DP_CHUNKED", chunked ? "1" : "0", 1);
        setenv("DP_BF16_GRADS", bf16_grads ? "1" : "0", 1);
        setenv("DP_PARAM_CHUNKS", param_chunks ? "1" : "0", 1);
        setenv("DP_HOST_PARTS", host_parts ? "1" : "0", 1);
        setenv("DP_EXTERNAL", external ? "1" : "0", 1);
        setenv("DP_STATE_HOST", state_host ? "1" : "0", 1);
        setenv("DP_DEVICE", device.c_str(), 1);
        setenv("DP_BACKEND", backend.c_str(), 1);
        execl("/proc/self/exe", "data_parallel_test", static_cast<char*>(nullptr));
        _exit(127);
      }
      pids.push_back(pid);
    }
    for (pid_t pid : pids) {
      int status = 0;
      waitpid(pid, &status, 0);
      ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "a rank failed: " << status;
    }
    // The reference, after the ranks (no threads of this process cross a fork).
    // (External master: a bf16 reference with the flat state, whose compute copy rounds the same
    // master weights.)
    absl::StatusOr<Trained> one = Train(accum * world, nullptr, 0, true, *memory::ParseDevice(device), false,
                                        bf16_grads, false, false, false, /*bf16=*/external);
    ASSERT_TRUE(one.ok()) << one.status();
    const Trained r0 = Load(dir + "/rank0", one->weights.size());
    for (int r = 1; r < world; ++r) {  // every rank applied the same updates
      const Trained rr = Load(dir + "/rank" + std::to_string(r), one->weights.size());
      EXPECT_EQ(rr.losses, r0.losses) << "rank " << r;
      EXPECT_EQ(rr.weights, r0.weights) << "rank " << r;
      EXPECT_EQ(rr.val, r0.val) << "rank " << r;  // (the sums added in rank order everywhere)
      EXPECT_EQ(rr.val_one, r0.val_one) << "rank " << r;
    }
    // The ranks' shared evaluation: one process's mean over the same batches, to the weights' rounding.
    EXPECT_NEAR(r0.val, one->val, loss_tol * one->val);
    EXPECT_NEAR(r0.val_one, one->val_one, loss_tol * one->val_one);
    for (int s = 0; s < kSteps; ++s) {
      EXPECT_NEAR(r0.losses[s], one->losses[s], loss_tol * one->losses[s]) << "step " << s;
      EXPECT_NEAR(r0.norms[s], one->norms[s], norm_tol * one->norms[s]) << "step " << s;
    }
    double worst = 0, sum = 0;
    for (size_t i = 0; i < one->weights.size(); ++i) {
      const double d = std::fabs(double(r0.weights[i]) - one->weights[i]);
      worst = std::max(worst, d);
      sum += d;
    }
    EXPECT_LT(worst, weight_tol);
    if (mean_weight_tol > 0) EXPECT_LT(sum / one->weights.size(), mean_weight_tol);
    EXPECT_LT(one->losses.back(), one->losses.front());  // it learns
  }
}

// ZeRO 0 (replicated), 1 (moments sharded, weights all-gathered) and 2 (gradients reduce-scattered
// too) at 1, 2, 3 and 4 ranks. The small model's groups split evenly in 2 and 4 parts (the
// collectives work in place, in the flat buffers), not in 3 (through zero-padded buffers).
TEST(DataParallel, RanksTrainLikeOneProcessOverAllMicroBatches) {
  RanksTrainLikeOneProcess({{2, 0, true}, {2, 1, true}, {2, 2, true}, {4, 0, true}, {4, 1, true}, {4, 2, true},
                            {2, 0, false}, {4, 1, false}, {4, 2, false}, {1, 2, true}, {3, 2, true},
                            {3, 1, false}},
                           "cpu", "gloo", 1e-5, 1e-4, 1e-5);
}

// ZeRO-3 (weights and gradients sharded too, each group gathered ahead of its use and its
// gradients reduce-scattered after every backward, adding up over micro-batches in the parts): 2, 3
// (padded parts) and 4 ranks, and 2 without overlap; a rank's part may be empty at 3.
TEST(DataParallel, ZeroThreeTrainsLikeOneProcess) {
  RanksTrainLikeOneProcess({{2, 3, true}, {4, 3, true}, {3, 3, true}, {2, 3, false}, {1, 3, true}}, "cpu", "gloo",
                           1e-5, 1e-4, 1e-5);
}

// On a GPU: device gradients, bf16 compute (a step's bf16 rounding of the weights may differ where
// the f32 sums do, hence the wider bounds).
TEST(DataParallel, RanksTrainLikeOneProcessOnTheGpu) {
  if (memory::CudaDeviceCount() == 0) GTEST_SKIP() << "no GPU";
  // (ZeRO-3 also with host parts, and with the master weights only in the chunked state.)
  RanksTrainLikeOneProcess({{2, 0, true}, {2, 1, true}, {2, 2, true}, {2, 2, false}, {2, 3, true},
                            {2, 3, true, true, false, false, true}, {2, 3, true, true, false, false, false, true},
                            {2, 3, true, true, false, false, false, false, true},
                            {2, 2, true, true, false, false, false, false, true}},
                           "cuda:0", "gloo", 2e-3, 2e-2, 2e-3);
  RanksTrainLikeOneProcess({{1, 0, true}, {1, 1, true}, {1, 2, true}, {1, 1, false}, {1, 3, true},
                            {1, 3, true, true, false, false, true}, {1, 3, false, true, false, false, true},
                            {1, 3, true, true, false, false, true, true},
                            {1, 3, true, true, false, false, false, true, true},
                            {1, 2, true, true, false, false, false, false, true}},
                           "cuda:0", "nccl", 2e-3, 2e-2, 2e-3);
  // bf16 weight gradients (device bf16 reductions: NCCL's own, Gloo's through host f32), the
  // chunked state beside them, and parameter chunks (on the device) under ZeRO-0, -1 and -2.
  RanksTrainLikeOneProcess({{2, 0, true, false, true}, {2, 2, true, false, true}, {2, 1, true, true, true},
                            {2, 0, true, true, true, true}, {2, 1, true, true, true, true},
                            {2, 2, true, true, true, true}},
                           "cuda:0", "gloo", 2e-3, 2e-2, 4e-2, 1e-3);
  RanksTrainLikeOneProcess({{1, 0, true, false, true}, {1, 2, true, false, true}, {1, 2, true, true, true},
                            {1, 0, true, true, true, true}, {1, 1, true, true, true, true},
                            {1, 2, true, true, true, true}},
                           "cuda:0", "nccl", 2e-3, 2e-2, 4e-2, 1e-3);
}

// Chunked optimizer state (PatrickStar / Gemini placement, CPU and compute-tier AdamW) under data
// parallelism: replicated (ZeRO-0), and with ZeRO-1/2/3 each rank's chunks hold only its pieces of
// the parameters; 2, 3 (padded parts) and 4 ranks.
TEST(DataParallel, ChunkedStateTrainsLikeOneProcess) {
  RanksTrainLikeOneProcess({{2, 0, true, true}, {2, 1, true, true}, {2, 2, true, true}, {4, 2, true, true},
                            {3, 1, true, true}, {2, 2, false, true}, {2, 3, true, true}, {3, 3, true, true},
                            {2, 3, true, true, false, false, false, false, true},
                            {2, 1, true, true, false, false, false, false, true},
                            {3, 2, true, true, false, false, false, false, true},
                            {2, 0, true, true, false, false, false, false, true}},
                           "cpu", "gloo", 1e-5, 1e-4, 1e-5);
}

// bf16 weight gradients (half the memory and, through NCCL, half the traffic): each rank's rounded
// gradients summed (Gloo: in f32, rounded once) -- one process rounds each micro-batch's sum over
// its own micro-batches instead, so the curves agree to bf16 rounding, not f32's. ZeRO 0-2, with and
// without overlap, padded parts at 3 ranks, and the chunked state. Weights: AdamW moves an element
// whose gradient is near zero by up to the learning rate (1e-2) whichever sign the rounding gave it,
// so the worst element may differ by about that; on average they agree to about 1e-4 (7e-4 at 3
// ranks, against one process rounding 3 micro-batches' sums -- every stage alike, so not the
// padded parts).
// ZeRO-3 with each rank's parts in host memory (DeepSpeed's offload_param) and the chunked state
// there too, updating them in place: overlapped, not, and padded parts (3 ranks).
TEST(DataParallel, ZeroThreeWithHostPartsTrainsLikeOneProcess) {
  RanksTrainLikeOneProcess({{2, 3, true, true, false, false, true}, {3, 3, true, true, false, false, true},
                            {2, 3, false, true, false, false, true}},
                           "cpu", "gloo", 1e-5, 1e-4, 1e-5);
}

// The master weights only in the chunked state (bf16 compute): ZeRO-3 keeps no master part in the
// model (on the device or, with host parts, in host memory), ZeRO-1/2 none at all; every rank's
// pieces of the state are its only fp32 weights.
TEST(DataParallel, ExternalMasterTrainsLikeOneProcess) {
  RanksTrainLikeOneProcess({{2, 3, true, true, false, false, false, true}, {3, 3, true, true, false, false, true, true},
                            {2, 3, false, true, false, false, false, true}, {2, 2, true, true, false, false, false, true}},
                           "cpu", "gloo", 2e-3, 2e-2, 2e-3);
}

TEST(DataParallel, BF16GradientsTrainLikeOneProcess) {
  RanksTrainLikeOneProcess({{2, 0, true, false, true}, {2, 1, true, false, true}, {2, 2, true, false, true},
                            {4, 2, true, false, true}, {3, 2, true, false, true}, {3, 0, true, false, true}, {3, 1, true, false, true}, {2, 2, false, false, true},
                            {2, 0, false, false, true}, {2, 2, true, true, true}},
                           "cpu", "gloo", 2e-3, 2e-2, 4e-2, 1e-3);
}

// Parameter chunks (placement cpu) with the chunked state: each rank fetches every layer's chunks
// for its use, the gradients are all-reduced chunk by chunk where they lie after the backward, and
// every rank updates everything (ZeRO-0) or its pieces, whose updated copies are then summed into
// every rank's chunks (ZeRO-1). Against one process with flat buffers and bf16 gradients; 2 ranks
// accumulating 2 micro-batches, 3 and 4 ranks with gradients in place of the copy.
TEST(DataParallel, ParameterChunksTrainLikeOneProcess) {
  RanksTrainLikeOneProcess({{2, 0, true, true, true, true}, {4, 0, true, true, true, true},
                            {2, 1, true, true, true, true}, {3, 1, true, true, true, true},
                            {2, 2, true, true, true, true}, {3, 2, true, true, true, true},
                            {4, 2, true, true, true, true}},
                           "cpu", "gloo", 2e-3, 2e-2, 4e-2, 1e-3);
}

// ZeRO-3's forward gathers a group ahead of its use only when the params-ready hook's poll says that
// group is ready; otherwise the hook is called once per group, just before the group's own gather
// (the host does not block on group g + 1 before queuing group g's work). The loss is the same.
TEST(DataParallel, Zero3ForwardGathersAheadOnlyWhatIsReady) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp != nullptr ? tmp : "/tmp") + "/dp_poll_" + std::to_string(getpid());
  ASSERT_EQ(system(("rm -rf " + dir + " && mkdir -p " + dir).c_str()), 0);
  comm::CommConfig cc{.rank = 0, .world_size = 1, .store_dir = dir, .timeout = std::chrono::seconds(30)};
  auto c = comm::Communicator::CreateGloo(cc);
  ASSERT_TRUE(c.ok()) << c.status();
  memory::CpuAllocator alloc;
  auto blas = *ops::Blas::Create(memory::Device::Cpu(), nullptr);
  auto model = models::LlamaModel::Create(Small(), {.shard = {.comm = c->get(), .overlap = true}}, &alloc,
                                          blas.get(), nullptr);
  ASSERT_TRUE(model.ok()) << model.status();
  ASSERT_TRUE((*model)->InitRandom(5).ok());
  Tensor tokens = *Tensor::Empty({2, 8}, DType::kI32, &alloc), targets = *Tensor::Empty({2, 8}, DType::kI32, &alloc);
  for (int64_t i = 0; i < tokens.numel(); ++i) {
    tokens.data<int32_t>()[i] = static_cast<int32_t>((3 * i + 1) % Small().vocab_size);
    targets.data<int32_t>()[i] = static_cast<int32_t>((5 * i + 2) % Small().vocab_size);
  }
  const int groups = (*model)->num_param_groups();
  double loss[2];
  for (bool ready : {false, true}) {
    SCOPED_TRACE(ready ? "ready" : "not ready");
    std::vector<int> calls, polls;
    (*model)->SetParamsReadyHook(
        [&](int g) {
          calls.push_back(g);
          return absl::OkStatus();
        },
        [&](int g) {
          polls.push_back(g);
          return ready;
        });
    absl::StatusOr<models::LossSum> l = (*model)->ForwardBackward(tokens, targets, 1.0f, false);
    ASSERT_TRUE(l.ok()) << l.status();
    loss[ready] = l->sum;
    std::vector<int> want_calls, want_polls;
    for (int g = 0; g < groups; ++g) {
      // Ready: group g >= 1 waited for by the prefetch from group g - 1, then by its own use (the
      // last group's hook call is the last: the hook is then forgotten).
      if (ready && g >= 1 && g + 1 < groups) want_calls.push_back(g);
      want_calls.push_back(g);
      if (g >= 1) want_polls.push_back(g);
    }
    EXPECT_EQ(calls, want_calls);
    EXPECT_EQ(polls, want_polls);
  }
  EXPECT_EQ(loss[0], loss[1]);
}

// What data parallelism does not do yet is an error, not a silent single-rank run.
TEST(DataParallel, UnsupportedSetupsAreErrors) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp != nullptr ? tmp : "/tmp") + "/dp_unsupported_" + std::to_string(getpid());
  ASSERT_EQ(system(("rm -rf " + dir + " && mkdir -p " + dir).c_str()), 0);
  const pid_t pid = fork();
  if (pid == 0) {  // the other rank only joins: a fresh process (see main)
    setenv("DP_JOIN_DIR", dir.c_str(), 1);
    execl("/proc/self/exe", "data_parallel_test", static_cast<char*>(nullptr));
    _exit(127);
  }
  comm::CommConfig cc{.rank = 0, .world_size = 2, .store_dir = dir, .timeout = std::chrono::seconds(30)};
  auto c = comm::Communicator::CreateGloo(cc);
  ASSERT_TRUE(c.ok()) << c.status();
  memory::CpuAllocator alloc, host;
  auto blas = *ops::Blas::Create(memory::Device::Cpu(), nullptr);
  auto model = *models::LlamaModel::Create(Small(), {.compute_dtype = DType::kBF16}, &alloc, blas.get(), nullptr);
  TrainerConfig cfg;
  cfg.comm = c->get();
  models::LlamaRuntime chunks{.compute_dtype = DType::kBF16, .grad_dtype = DType::kBF16};
  chunks.param_chunks = {.enabled = true, .host = &host};
  auto chunked_model = *models::LlamaModel::Create(Small(), chunks, &alloc, blas.get(), nullptr);
  cfg.chunked_state = {.enabled = true, .policy = memory::PlacementPolicy::kHost, .host = &host};
  cfg.zero_stage = 3;  // (parameter chunks: stages 0, 1 and 2 only)
  absl::StatusOr<std::unique_ptr<Trainer>> t = Trainer::Create(cfg, chunked_model.get(), &alloc, nullptr);
  ASSERT_FALSE(t.ok());
  EXPECT_TRUE(absl::IsUnimplemented(t.status())) << t.status();
  cfg.chunked_state = {};
  cfg.zero_stage = 0;
  // ZeRO-3: the model and the trainer must agree on the sharding; parameter chunks and bf16 weight
  // gradients are not sharded yet.
  {
    auto sharded = models::LlamaModel::Create(Small(), {.shard = {.comm = c->get()}}, &alloc, blas.get(), nullptr);
    ASSERT_TRUE(sharded.ok()) << sharded.status();
    const int64_t held = (*sharded)->master_flat().numel(), half = (Small().NumParameters() + 1) / 2;
    EXPECT_GE(held, half);  // each group's part rounded up
    EXPECT_LE(held, half + (*sharded)->num_param_groups());
    TrainerConfig zero2;
    zero2.comm = c->get();
    zero2.zero_stage = 2;
    absl::StatusOr<std::unique_ptr<Trainer>> t2 = Trainer::Create(zero2, sharded->get(), &alloc, nullptr);
    EXPECT_TRUE(absl::IsInvalidArgument(t2.status())) << t2.status();
    TrainerConfig zero3 = zero2;
    zero3.zero_stage = 3;
    absl::StatusOr<std::unique_ptr<Trainer>> t3 = Trainer::Create(zero3, model.get(), &alloc, nullptr);
    EXPECT_TRUE(absl::IsInvalidArgument(t3.status())) << t3.status();
    auto bf16_grads = models::LlamaModel::Create(
        Small(), {.compute_dtype = DType::kBF16, .grad_dtype = DType::kBF16, .shard = {.comm = c->get()}}, &alloc,
        blas.get(), nullptr);
    EXPECT_TRUE(absl::IsUnimplemented(bf16_grads.status())) << bf16_grads.status();
  }
  EXPECT_TRUE((*c)->Barrier()->Wait().ok());
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

// The ranks the tests start run this binary again (a forked child would inherit OpenBLAS's and
// ParallelFor's threads, which do not survive fork); the environment says which role.
int RankMain() {
  if (const char* dir = std::getenv("DP_JOIN_DIR"); dir != nullptr) {
    comm::CommConfig cc{.rank = 1, .world_size = 2, .store_dir = dir, .timeout = std::chrono::seconds(30)};
    auto c = comm::Communicator::CreateGloo(cc);
    // Leave only once rank 0 is done with its checks (it may still be connecting to this one).
    return c.ok() && (*c)->Barrier()->Wait().ok() ? 0 : 10;
  }
  const int r = std::atoi(std::getenv("DP_RANK")), world = std::atoi(std::getenv("DP_WORLD"));
  const std::string dir = std::getenv("DP_DIR"), backend = std::getenv("DP_BACKEND");
  comm::CommConfig cc{.rank = r, .world_size = world, .store_dir = dir + "/store", .timeout = std::chrono::seconds(60)};
  CommFactory make = [&](const memory::Stream* stream) -> absl::StatusOr<std::unique_ptr<comm::Communicator>> {
    if (backend == "nccl") return comm::Communicator::CreateNccl(cc, *stream);
    return comm::Communicator::CreateGloo(cc, stream->device().is_cuda() ? stream : nullptr);
  };
  absl::StatusOr<Trained> run =
      Train(std::atoi(std::getenv("DP_ACCUM")), make, std::atoi(std::getenv("DP_ZERO")),
            std::string(std::getenv("DP_OVERLAP")) == "1", *memory::ParseDevice(std::getenv("DP_DEVICE")),
            std::string(std::getenv("DP_CHUNKED")) == "1", std::string(std::getenv("DP_BF16_GRADS")) == "1",
            std::string(std::getenv("DP_PARAM_CHUNKS")) == "1", std::string(std::getenv("DP_HOST_PARTS")) == "1",
            std::string(std::getenv("DP_EXTERNAL")) == "1", /*bf16=*/false,
            std::string(std::getenv("DP_STATE_HOST")) == "1");
  if (!run.ok()) {
    fprintf(stderr, "rank %d: %s\n", r, std::string(run.status().message()).c_str());
    return 11;
  }
  Save(dir + "/rank" + std::to_string(r), *run);
  return 0;
}

}  // namespace
}  // namespace tessera::launcher

int main(int argc, char** argv) {
  if (std::getenv("DP_RANK") != nullptr || std::getenv("DP_JOIN_DIR") != nullptr) {
    return tessera::launcher::RankMain();
  }
  testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
