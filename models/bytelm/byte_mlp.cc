#include "models/bytelm/byte_mlp.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"
#include "memory/status_macros.h"

namespace tessera::models {

using memory::DType;
using memory::Tensor;

namespace {
enum { kEmbedding = 0, kW1, kB1, kW2, kB2 };
}

absl::StatusOr<std::unique_ptr<ByteMlp>> ByteMlp::Create(const ByteMlpConfig& config,
                                                         uint64_t seed,
                                                         memory::Allocator* allocator,
                                                         ops::Blas* blas) {
  if (config.context <= 0 || config.embed <= 0 || config.hidden <= 0 || config.vocab <= 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ByteMlp config needs positive context, embed, hidden and vocab > 1; got context=",
        config.context, " embed=", config.embed, " hidden=", config.hidden,
        " vocab=", config.vocab));
  }
  if (!blas->device().is_cpu() || !allocator->device().is_cpu()) {
    return absl::InvalidArgumentError("ByteMlp runs on the CPU only");
  }
  std::unique_ptr<ByteMlp> model(new ByteMlp(config, allocator, blas));
  const int64_t in = int64_t{config.context} * config.embed;
  const std::vector<std::pair<std::string, memory::Shape>> shapes = {
      {"embedding", {config.vocab, config.embed}},
      {"w1", {in, config.hidden}},
      {"b1", {config.hidden}},
      {"w2", {config.hidden, config.vocab}},
      {"b2", {config.vocab}}};
  std::mt19937_64 rng(seed);
  for (const auto& [name, shape] : shapes) {
    absl::StatusOr<Tensor> value = Tensor::Empty(shape, DType::kF32, allocator);
    if (!value.ok()) return value.status();
    absl::StatusOr<Tensor> grad = Tensor::Zeros(shape, DType::kF32, allocator);
    if (!grad.ok()) return grad.status();
    const bool bias = shape.size() == 1;
    const float scale = name == "embedding" ? 1.0f : 1.0f / std::sqrt(static_cast<float>(shape[0]));
    std::normal_distribution<float> dist(0.0f, scale);
    float* v = value->data<float>();
    for (int64_t i = 0; i < value->numel(); ++i) v[i] = bias ? 0.0f : dist(rng);
    model->params_.push_back(Param{name, *value, *grad});
  }
  return model;
}

int64_t ByteMlp::num_parameters() const {
  int64_t n = 0;
  for (const Param& p : params_) n += p.value.numel();
  return n;
}

double ByteMlp::flops_per_token() const {
  const double in = double(config_.context) * config_.embed;
  return 6.0 * (in * config_.hidden + double(config_.hidden) * config_.vocab);
}

absl::Status ByteMlp::EnsureBuffers(int64_t batch) {
  if (batch == batch_) return absl::OkStatus();
  const int64_t in = int64_t{config_.context} * config_.embed;
  struct Want {
    Tensor* t;
    memory::Shape shape;
  };
  for (const Want& w : std::vector<Want>{{&x_, {batch, in}},
                                         {&h_, {batch, config_.hidden}},
                                         {&a_, {batch, config_.hidden}},
                                         {&logits_, {batch, config_.vocab}},
                                         {&dx_, {batch, in}},
                                         {&dh_, {batch, config_.hidden}},
                                         {&da_, {batch, config_.hidden}}}) {
    absl::StatusOr<Tensor> t = Tensor::Empty(w.shape, DType::kF32, allocator_);
    if (!t.ok()) return t.status();
    *w.t = *t;
  }
  batch_ = batch;
  return absl::OkStatus();
}

absl::StatusOr<float> ByteMlp::ForwardBackward(const Tensor& windows, bool backward) {
  const int ctx = config_.context, e = config_.embed, hid = config_.hidden, v = config_.vocab;
  if (windows.dtype() != DType::kI32 || windows.ndim() != 2 || windows.dim(1) != ctx + 1 ||
      !windows.device().is_cpu()) {
    return absl::InvalidArgumentError(absl::StrCat("ByteMlp expects i32 [batch, ", ctx + 1,
                                                   "] host windows, got ", windows.DebugString()));
  }
  const int64_t batch = windows.dim(0);
  if (batch == 0) return absl::InvalidArgumentError("ByteMlp: empty batch");
  const int32_t* tok = windows.data<int32_t>();
  for (int64_t i = 0; i < windows.numel(); ++i) {
    if (tok[i] < 0 || tok[i] >= v) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", tok[i], " at position ", i, " is outside [0, ", v, ")"));
    }
  }
  RETURN_IF_ERROR(EnsureBuffers(batch));
  Param& emb = params_[kEmbedding];
  Param& w1 = params_[kW1];
  Param& b1 = params_[kB1];
  Param& w2 = params_[kW2];
  Param& b2 = params_[kB2];

  // Forward. x[b] = concat(emb[tok[b, 0]], ..., emb[tok[b, ctx-1]]).
  float* x = x_.data<float>();
  const float* embv = emb.value.data<float>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int c = 0; c < ctx; ++c) {
      std::memcpy(x + (b * ctx + c) * e, embv + int64_t{tok[b * (ctx + 1) + c]} * e,
                  sizeof(float) * e);
    }
  }
  RETURN_IF_ERROR(blas_->Gemm(x_, w1.value, h_, {}));
  float* h = h_.data<float>();
  float* a = a_.data<float>();
  const float* b1v = b1.value.data<float>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int j = 0; j < hid; ++j) {
      h[b * hid + j] += b1v[j];
      a[b * hid + j] = std::max(0.0f, h[b * hid + j]);
    }
  }
  RETURN_IF_ERROR(blas_->Gemm(a_, w2.value, logits_, {}));
  float* lg = logits_.data<float>();
  const float* b2v = b2.value.data<float>();
  double loss = 0.0;
  for (int64_t b = 0; b < batch; ++b) {
    float* row = lg + b * v;
    float mx = -INFINITY;
    for (int j = 0; j < v; ++j) mx = std::max(mx, row[j] += b2v[j]);
    double sum = 0.0;
    for (int j = 0; j < v; ++j) sum += std::exp(double(row[j] - mx));
    const int target = tok[b * (ctx + 1) + ctx];
    loss += std::log(sum) + mx - row[target];
    if (backward) {  // row becomes dL/dlogits = (softmax - onehot) / batch
      for (int j = 0; j < v; ++j) {
        row[j] = static_cast<float>(std::exp(double(row[j] - mx)) / sum / double(batch));
      }
      row[target] -= 1.0f / static_cast<float>(batch);
    }
  }
  if (!backward) return static_cast<float>(loss / double(batch));

  // Backward.
  float* db2 = b2.grad.data<float>();
  std::fill(db2, db2 + v, 0.0f);
  for (int64_t b = 0; b < batch; ++b) {
    for (int j = 0; j < v; ++j) db2[j] += lg[b * v + j];
  }
  RETURN_IF_ERROR(blas_->Gemm(a_, logits_, w2.grad, {.trans_a = true}));
  RETURN_IF_ERROR(blas_->Gemm(logits_, w2.value, da_, {.trans_b = true}));
  float* da = da_.data<float>();
  float* dh = dh_.data<float>();
  float* db1 = b1.grad.data<float>();
  std::fill(db1, db1 + hid, 0.0f);
  for (int64_t b = 0; b < batch; ++b) {
    for (int j = 0; j < hid; ++j) {
      dh[b * hid + j] = h[b * hid + j] > 0.0f ? da[b * hid + j] : 0.0f;
      db1[j] += dh[b * hid + j];
    }
  }
  RETURN_IF_ERROR(blas_->Gemm(x_, dh_, w1.grad, {.trans_a = true}));
  RETURN_IF_ERROR(blas_->Gemm(dh_, w1.value, dx_, {.trans_b = true}));
  // Scatter-add into the embedding gradient in a fixed order (deterministic).
  float* demb = emb.grad.data<float>();
  std::fill(demb, demb + emb.grad.numel(), 0.0f);
  const float* dx = dx_.data<float>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int c = 0; c < ctx; ++c) {
      float* dst = demb + int64_t{tok[b * (ctx + 1) + c]} * e;
      const float* src = dx + (b * ctx + c) * e;
      for (int k = 0; k < e; ++k) dst[k] += src[k];
    }
  }
  return static_cast<float>(loss / double(batch));
}

absl::StatusOr<std::vector<float>> ByteMlp::NextLogits(const std::vector<int32_t>& context) {
  if (static_cast<int>(context.size()) != config_.context) {
    return absl::InvalidArgumentError(absl::StrCat("NextLogits needs ", config_.context,
                                                   " ids, got ", context.size()));
  }
  absl::StatusOr<Tensor> w = Tensor::Empty({1, config_.context + 1}, DType::kI32, allocator_);
  if (!w.ok()) return w.status();
  std::copy(context.begin(), context.end(), w->data<int32_t>());
  w->data<int32_t>()[config_.context] = 0;  // placeholder target; its loss is ignored
  absl::StatusOr<float> loss = ForwardBackward(*w, /*backward=*/false);
  if (!loss.ok()) return loss.status();
  const float* lg = logits_.data<float>();
  return std::vector<float>(lg, lg + config_.vocab);
}

}  // namespace tessera::models
