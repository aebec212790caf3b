#pragma once
// For launcher tests: a small LLaMA configuration and a learnable pseudo-language to train it on.
#include <cstdint>
#include <random>

#include "launcher/trainer.h"
#include "memory/tensor.h"
#include "models/llama/config.h"

namespace tessera::launcher::test_util {

// Two layers, hidden 16, GQA (4 query heads, 2 key/value heads), vocabulary 13.
inline models::LlamaConfig SmallLlama() {
  models::LlamaConfig c;
  c.vocab_size = 13;
  c.hidden_size = 16;
  c.intermediate_size = 32;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.max_seq_len = 32;
  return c;
}

// Windows from a deterministic pseudo-language: the next token is (3 * previous + 1) mod 13, from a
// random start per window.
inline BatchSource Language(std::mt19937* rng) {
  return [rng](memory::Tensor* w) {
    for (int64_t b = 0; b < w->dim(0); ++b) {
      int32_t t = static_cast<int32_t>((*rng)() % 13);
      for (int64_t i = 0; i < w->dim(1); ++i) {
        w->data<int32_t>()[b * w->dim(1) + i] = t;
        t = (3 * t + 1) % 13;
      }
    }
    return absl::OkStatus();
  };
}

}  // namespace tessera::launcher::test_util
