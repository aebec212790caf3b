#pragma once
// A byte-level MLP language model (Bengio et al. 2003 style): the embeddings of the last `context`
// bytes, concatenated, go through one ReLU hidden layer to logits over the next byte.
// Scaffolding that proves the layering (memory -> ops -> model -> launcher) before LLaMA replaces it;
// forward and backward are written out explicitly, llm.c style. Runs on the CPU.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "memory/allocator.h"
#include "memory/tensor.h"
#include "models/ops/gemm.h"

namespace tessera::models {

struct ByteMlpConfig {
  int context = 16;   // bytes of history per prediction
  int embed = 32;     // embedding width per byte
  int hidden = 512;   // hidden units
  int vocab = 256;    // token ids must be < vocab
};

class ByteMlp {
 public:
  struct Param {
    std::string name;
    memory::Tensor value;  // f32
    memory::Tensor grad;   // f32, same shape; written by ForwardBackward
  };

  // Parameters are initialised from `seed` (normal, scaled by 1/sqrt(fan_in)); memory comes from
  // `allocator`; GEMMs run on `blas` (a CPU Blas). Both must outlive the model.
  static absl::StatusOr<std::unique_ptr<ByteMlp>> Create(const ByteMlpConfig& config, uint64_t seed,
                                                         memory::Allocator* allocator,
                                                         ops::Blas* blas);

  // `windows` is i32 [batch, context + 1]: each row's first `context` ids predict its last.
  // Returns the mean cross-entropy (nats). With `backward`, overwrites every Param::grad with the
  // gradient of that mean.
  absl::StatusOr<float> ForwardBackward(const memory::Tensor& windows, bool backward);

  // Logits [vocab] for the byte that follows `context` ids (for sampling).
  absl::StatusOr<std::vector<float>> NextLogits(const std::vector<int32_t>& context);

  std::vector<Param>& params() { return params_; }
  const ByteMlpConfig& config() const { return config_; }
  int64_t num_parameters() const;
  // Matmul FLOPs per predicted token for forward + backward (6 * matmul weights).
  double flops_per_token() const;

 private:
  ByteMlp(ByteMlpConfig config, memory::Allocator* allocator, ops::Blas* blas)
      : config_(config), allocator_(allocator), blas_(blas) {}
  absl::Status EnsureBuffers(int64_t batch);

  ByteMlpConfig config_;
  memory::Allocator* allocator_;
  ops::Blas* blas_;
  std::vector<Param> params_;  // embedding, w1, b1, w2, b2
  // Activations and their gradients for the current batch size.
  int64_t batch_ = -1;
  memory::Tensor x_, h_, a_, logits_, dx_, dh_, da_;
};

}  // namespace tessera::models
