// comm_smoke: joins the job described by the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
// -- as launch or torchrun set them -- or TESSERA_STORE_DIR) and all-reduces rank + 1; prints
// "rank R of W: sum S" (S = W (W + 1) / 2). Exit 1 with the error on failure.
#include <cstdio>

#include "comm/communicator.h"
#include "memory/cpu_allocator.h"

int main() {
  using namespace tessera;
  absl::StatusOr<comm::CommConfig> cfg = comm::CommConfigFromEnv();
  if (!cfg.ok()) {
    fprintf(stderr, "comm_smoke: %s\n", std::string(cfg.status().message()).c_str());
    return 1;
  }
  cfg->timeout = std::chrono::seconds(60);
  absl::StatusOr<std::unique_ptr<comm::Communicator>> c = comm::Communicator::CreateGloo(*cfg);
  if (!c.ok()) {
    fprintf(stderr, "comm_smoke: %s\n", std::string(c.status().message()).c_str());
    return 1;
  }
  memory::CpuAllocator host;
  memory::Tensor t = *memory::Tensor::Empty({1}, memory::DType::kI64, &host);
  t.data<int64_t>()[0] = cfg->rank + 1;
  if (absl::Status s = (*c)->AllReduce(t, comm::ReduceOp::kSum)->Wait(); !s.ok()) {
    fprintf(stderr, "comm_smoke: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  printf("rank %d of %d: sum %lld\n", cfg->rank, cfg->world_size, static_cast<long long>(t.data<int64_t>()[0]));
  return 0;
}
