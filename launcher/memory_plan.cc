#include "launcher/memory_plan.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "memory/dtype.h"

namespace tessera::launcher {
namespace {

std::string GiB(int64_t bytes) { return absl::StrFormat("%.1f GiB", static_cast<double>(bytes) / (1 << 30)); }

// One decoder layer's parameters (its parameter group): two norms, q, k, v, o, gate, up, down.
int64_t LayerElements(const models::LlamaConfig& c) {
  const int64_t h = c.hidden_size, hd = c.head_dim();
  return 2 * h + (c.num_heads + 2 * c.num_kv_heads + c.num_heads) * hd * h + 3 * c.intermediate_size * h;
}

}  // namespace

std::string DevicePlan::ToString() const {
  std::string s = param_chunks > 0 ? absl::StrCat(GiB(total()), " (parameter chunks ", GiB(param_chunks))
                                   : absl::StrCat(GiB(total()), " (compute copy ", GiB(weights));
  if (master > 0) absl::StrAppend(&s, ", fp32 master ", GiB(master));
  absl::StrAppend(&s, ", gradients ", GiB(gradients));
  if (optimizer > 0) absl::StrAppend(&s, ", optimizer state ", GiB(optimizer));
  absl::StrAppend(&s, ", activations ~", GiB(activations), ")");
  return s;
}

DevicePlan PlanDeviceMemory(const models::LlamaConfig& config, const models::LlamaRuntime& runtime,
                            int64_t micro_batch, int64_t seq_len, int64_t optimizer_device_bytes,
                            int ranks, int zero_stage) {
  const int64_t n = config.NumParameters();
  const int64_t t = static_cast<int64_t>(memory::SizeOf(runtime.compute_dtype));
  const int64_t g = static_cast<int64_t>(memory::SizeOf(runtime.grad_dtype));
  const int64_t h = config.hidden_size, f = config.intermediate_size, v = config.vocab_size;
  const int64_t qkv = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim();
  DevicePlan p;
  p.weights = n * t;
  p.master = runtime.compute_dtype == memory::DType::kF32 || runtime.external_master ? 0 : n * 4;
  // Weight gradients in grad_dtype over the flat layout, plus f32 norm and embedding gradients when
  // that is bf16 (see LlamaModel).
  p.gradients = n * g + (g == 4 ? 0 : (v * h + (2 * config.num_layers + 1) * h) * 4);
  p.optimizer = optimizer_device_bytes < 0 ? n * 8 : optimizer_device_bytes;
  const models::ParamChunkConfig& pc = runtime.param_chunks;
  if (pc.enabled && pc.policy != memory::PlacementPolicy::kCompute && pc.compute_budget_bytes >= 0) {
    // Compute copies and weight gradients in chunks, at most the budget of them on the device; the
    // norm and embedding gradients stay in their f32 buffer.
    p.param_chunks = std::min(pc.compute_budget_bytes, n * (pc.grads_in_place ? t : t + g));
    p.weights = 0;
    p.gradients -= n * g;
  } else if (pc.enabled && pc.grads_in_place) {
    // All on the device, the weight gradients in the compute copy's place (the LM head's apart).
    p.gradients -= (n - v * h) * g;
  }
  const int64_t groups = config.num_layers + 2;
  // The widest parameter group: the LM head with the final norm, or a layer.
  const int64_t widest = std::max(v * h + h, LayerElements(config));
  if (zero_stage >= 1 && zero_stage <= 2 && ranks > 1 && optimizer_device_bytes < 0) {
    p.optimizer = (p.optimizer + ranks - 1) / ranks + groups * 8;
  }
  if (pc.enabled && zero_stage >= 1 && zero_stage <= 2 && ranks > 1) {
    // The collectives' staging buffers (launcher::Trainer): the widest group and one part of it.
    p.gradients += (widest + (widest + ranks - 1) / ranks) * t;
  }
  if (!pc.enabled && zero_stage >= 1 && zero_stage <= 2 && ranks > 1) {
    // A group that does not cut into size() whole parts goes through zero-padded buffers of size()
    // parts and one part (launcher::Trainer): its gradients' under ZeRO-2, its f32 master weights'
    // when the model keeps them and gathers them (not a chunked state's, optimizer_device_bytes >= 0,
    // with 16-bit compute: the state gathers those), its compute copy's when that is separate.
    const int64_t w = ranks;
    const int64_t layer = LayerElements(config);
    const bool master = !runtime.external_master && !(optimizer_device_bytes >= 0 && t != 4);
    const int64_t per = (zero_stage >= 2 ? g : 0) + (master ? 4 : 0) + (t == 4 ? 0 : t);
    auto padded = [&](int64_t elems) { return elems % w == 0 ? 0 : ((elems + w - 1) / w) * (w + 1) * per; };
    p.gradients += padded(v * h) + config.num_layers * padded(layer) + padded(v * h + h);
  }
  if (zero_stage == 3 && ranks >= 1) {
    // ZeRO-3: 1/size() of every parameter-sized buffer (a part per group, rounded up), plus two
    // gather buffers of the widest group, its compute copy and f32 gradients each.
    const int64_t w = ranks;
    auto part = [&](int64_t bytes, int64_t per_elem) { return (bytes + w - 1) / w + groups * per_elem; };
    p.weights = part(p.weights, t);
    p.master = p.master > 0 ? part(p.master, 4) : 0;
    p.gradients = part(p.gradients, 4) + 2 * widest * (t + 4);
    p.optimizer = p.optimizer > 0 ? part(p.optimizer, 8) : 0;
    if (runtime.shard.host != nullptr) {  // the parts in host memory: only the gather buffers here
      p.weights = p.master = 0;
      p.gradients = 2 * widest * (t + 4);
    }
  }
  const int64_t tokens = micro_batch * seq_len;
  // Per token and layer, what the backward keeps (residual h1, h2, the norms' outputs, qkv, the
  // attention output, gate/up and SwiGLU's output); with recomputation only h1 per layer and one
  // layer's full set. Then the backward's scratch and one logits chunk.
  const int64_t per_layer = (5 * h + qkv + 3 * f) * t;
  const int64_t saved = runtime.recompute ? config.num_layers * h * t + per_layer : config.num_layers * per_layer;
  const int64_t scratch = (3 * h + qkv + 3 * f) * t;
  const int64_t chunk_tokens = runtime.lm_head_chunk_tokens > 0
                                   ? runtime.lm_head_chunk_tokens
                                   : std::max<int64_t>(1, models::LlamaRuntime::kAutoLogitsBytes / (v * t));
  p.activations = tokens * (saved + scratch) + std::min(tokens, chunk_tokens) * v * t;
  return p;
}

absl::Status CheckDevicePlan(const DevicePlan& plan, const std::string& model_name, const std::string& device,
                             int64_t free_bytes, std::string* warning) {
  const std::string hints =
      "; what helps: --optimizer_state=chunked (fp32 master weights and AdamW moments off the device), "
      "--grad_dtype=bf16 with --dtype=bf16 (half the gradients), --recompute and a smaller "
      "--micro_batch (activations)";
  if (plan.parameter_bytes() > free_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(model_name, " needs ", plan.ToString(), " on ", device,
                                                     " but ", GiB(free_bytes), " are free", hints));
  }
  if (warning != nullptr) {
    warning->clear();
    if (plan.total() > free_bytes) {
      *warning = absl::StrCat(model_name, " may not fit ", device, ": about ", plan.ToString(), " against ",
                              GiB(free_bytes), " free", hints);
    }
  }
  return absl::OkStatus();
}

int64_t AutoStateDeviceBudget(const DevicePlan& without_state, int64_t free_bytes, int64_t state_bytes,
                              int64_t margin, int64_t min_useful) {
  const int64_t left = free_bytes - without_state.total() - margin;
  if (left < min_useful) return 0;
  return std::min(left, state_bytes);
}


std::string HostPlan::ToString() const {
  std::string s = absl::StrCat(GiB(total()), " (");
  std::string sep;
  auto part = [&](const char* what, int64_t bytes) {
    if (bytes <= 0) return;
    absl::StrAppend(&s, sep, what, " ", GiB(bytes));
    sep = ", ";
  };
  part("optimizer state", optimizer);
  part("parameter chunks", param_chunks);
  part("ZeRO-3 parts", zero3_parts);
  part("update staging", staging);
  return s + ")";
}

HostPlan PlanHostMemory(const models::LlamaConfig& config, const models::LlamaRuntime& runtime,
                        int64_t optimizer_host_bytes, int ranks, int zero_stage) {
  const int64_t n = config.NumParameters();
  const int64_t t = static_cast<int64_t>(memory::SizeOf(runtime.compute_dtype));
  const int64_t g = static_cast<int64_t>(memory::SizeOf(runtime.grad_dtype));
  HostPlan p;
  p.optimizer = std::max<int64_t>(0, optimizer_host_bytes);
  const models::ParamChunkConfig& pc = runtime.param_chunks;
  if (pc.enabled && pc.policy != memory::PlacementPolicy::kCompute) {
    const int64_t all = n * (pc.grads_in_place ? t : t + g);
    p.param_chunks = pc.policy == memory::PlacementPolicy::kHost ? all
                     : pc.compute_budget_bytes < 0            ? 0
                                                              : std::max<int64_t>(0, all - pc.compute_budget_bytes);
  }
  if (runtime.shard.host != nullptr) {  // (a model takes host parts only with a communicator)
    // f32 gradients, the master weights (unless the optimizer's state holds them), the compute copy.
    const int64_t master = runtime.external_master ? 0 : 4;
    const int64_t w = std::max(1, ranks), per = 4 + master + (runtime.compute_dtype == memory::DType::kF32 ? 0 : t);
    p.zero3_parts = (n + w - 1) / w * per + (config.num_layers + 2) * per;  // each group's part rounded up
  }
  if (p.optimizer > 0 && runtime.shard.host == nullptr && !(pc.enabled && pc.policy == memory::PlacementPolicy::kHost)) {
    // Gradients on the device for host-state updates: two slots of the largest piece's f32 gradient
    // and compute copy. A piece is a parameter, with ZeRO the part of it inside this rank's part of
    // its group: the embedding's, the LM head's (its group has the final norm too) or a layer's
    // largest matrix's.
    const int64_t h = config.hidden_size, v = config.vocab_size, f = config.intermediate_size;
    const int64_t layer = LayerElements(config);
    const int64_t w = zero_stage >= 1 ? std::max(1, ranks) : 1;
    auto piece = [&](int64_t numel, int64_t group) { return std::min(numel, (group + w - 1) / w); };
    const int64_t matrix = std::max(f * h, config.num_heads * config.head_dim() * h);  // gate/up/down, q or o
    const int64_t largest = std::max({piece(v * h, v * h), piece(v * h, v * h + h), piece(matrix, layer)});
    p.staging = 2 * largest * (4 + t);
  }
  return p;
}

absl::Status CheckHostPlan(const HostPlan& plan, int local_ranks, const std::string& model_name,
                           int64_t available_bytes) {
  const int64_t need = plan.total() * std::max(1, local_ranks);
  if (need <= available_bytes) return absl::OkStatus();
  const std::string what = local_ranks > 1 ? absl::StrCat(GiB(need), " of host memory on this node (", local_ranks,
                                                          " ranks of ", plan.ToString(), " each)")
                                           : absl::StrCat(plan.ToString(), " of host memory");
  return absl::ResourceExhaustedError(absl::StrCat(
      model_name, " needs ", what, " but ", GiB(available_bytes), " are available; what helps: --optimizer_host_mb "
      "with --optimizer_nvme (optimizer state beyond the budget on NVMe), keeping more on the device (--optimizer_placement=auto, --param_device_mb), "
      "or more nodes (ZeRO shards the state and ZeRO-3's parts over the ranks)"));
}

}  // namespace tessera::launcher
