#include "checkpoint/hf_llama.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "checkpoint/atomic_file.h"
#include "memory/status_macros.h"

namespace tessera::checkpoint {
namespace {

using Json = nlohmann::json;

constexpr int64_t kMaxSize = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxLayers = int64_t{1} << 16;
// config.json and the index are a few KiB to a few MiB; anything far larger is not one.
constexpr int64_t kMaxJsonFileBytes = int64_t{256} << 20;
// How many missing or mismatched names an error lists before summarising.
constexpr size_t kMaxListed = 5;

constexpr char kConfigFile[] = "config.json";
constexpr char kSingleFile[] = "model.safetensors";
constexpr char kIndexFile[] = "model.safetensors.index.json";

struct NamePair {
  const char* tessera;
  const char* hf;
};
// Per-layer parameters, in transformers' registration order.
constexpr NamePair kLayerNames[] = {
    {"attn_norm", "input_layernorm.weight"}, {"wq", "self_attn.q_proj.weight"},
    {"wk", "self_attn.k_proj.weight"},       {"wv", "self_attn.v_proj.weight"},
    {"wo", "self_attn.o_proj.weight"},       {"mlp_norm", "post_attention_layernorm.weight"},
    {"w_gate", "mlp.gate_proj.weight"},      {"w_up", "mlp.up_proj.weight"},
    {"w_down", "mlp.down_proj.weight"},
};
constexpr NamePair kGlobalNames[] = {
    {"embed_tokens", "model.embed_tokens.weight"},
    {"final_norm", "model.norm.weight"},
    {"lm_head", "lm_head.weight"},
};
constexpr char kTesseraLayerPrefix[] = "layers.";
constexpr char kHfLayerPrefix[] = "model.layers.";
constexpr char kInvFreqSuffix[] = "self_attn.rotary_emb.inv_freq";

std::string JoinPath(const std::string& dir, const std::string& file) {
  if (dir.empty()) return file;
  return dir.back() == '/' ? dir + file : absl::StrCat(dir, "/", file);
}

bool IsRegularFile(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// Splits "<prefix><layer>.<rest>" with a canonical decimal layer index (no sign, no leading zero),
// so that the mapping is one-to-one.
bool SplitLayerName(const std::string& name, absl::string_view prefix, int64_t* layer,
                    std::string* rest) {
  if (!absl::StartsWith(name, prefix)) return false;
  const size_t start = prefix.size();
  const size_t dot = name.find('.', start);
  if (dot == std::string::npos || dot == start || dot - start > 9) return false;
  const std::string digits = name.substr(start, dot - start);
  for (char c : digits) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) return false;
  }
  if (digits.size() > 1 && digits[0] == '0') return false;
  if (!absl::SimpleAtoi(digits, layer)) return false;
  *rest = name.substr(dot + 1);
  return true;
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("cannot open ", path));
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > kMaxJsonFileBytes) {
    ::close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": not a regular file of at most ", kMaxJsonFileBytes, " bytes"));
  }
  std::string bytes(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::read(fd, &bytes[done], bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : EIO;
      ::close(fd);
      return absl::ErrnoToStatus(err, absl::StrCat("cannot read ", path));
    }
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  return bytes;
}

absl::StatusOr<Json> ReadJsonObject(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadSmallFile(path));
  Json json;
  try {
    json = Json::parse(text);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON: ", e.what()));
  }
  if (!json.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": a JSON ", json.type_name(), ", not an object"));
  }
  return json;
}

// Typed access to config.json keys; `where` is the file path. Optional keys that are absent or
// null leave the output unchanged.
class ConfigReader {
 public:
  ConfigReader(const Json& json, std::string where) : json_(json), where_(std::move(where)) {}

  absl::Status Int(const char* key, bool required, int64_t* out) const {
    const Json* v = Find(key);
    if (v == nullptr) return Absent(key, required);
    if (!v->is_number_integer() ||
        (v->is_number_unsigned() &&
         v->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))) {
      return WrongType(key, "an integer", *v);
    }
    *out = v->get<int64_t>();
    return absl::OkStatus();
  }
  absl::Status Number(const char* key, bool required, double* out) const {
    const Json* v = Find(key);
    if (v == nullptr) return Absent(key, required);
    if (!v->is_number()) return WrongType(key, "a number", *v);
    *out = v->get<double>();
    return absl::OkStatus();
  }
  absl::Status Bool(const char* key, bool* out) const {
    const Json* v = Find(key);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_boolean()) return WrongType(key, "true or false", *v);
    *out = v->get<bool>();
    return absl::OkStatus();
  }
  absl::Status String(const char* key, std::string* out) const {
    const Json* v = Find(key);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_string()) return WrongType(key, "a string", *v);
    *out = v->get<std::string>();
    return absl::OkStatus();
  }
  // The compact JSON of `key`, or "" when absent or null.
  std::string Raw(const char* key) const {
    const Json* v = Find(key);
    return v == nullptr ? "" : v->dump();
  }

 private:
  const Json* Find(const char* key) const {
    auto it = json_.find(key);
    return it == json_.end() || it->is_null() ? nullptr : &*it;
  }
  absl::Status Absent(const char* key, bool required) const {
    if (!required) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(where_, ": missing \"", key, "\""));
  }
  absl::Status WrongType(const char* key, const char* expected, const Json& v) const {
    return absl::InvalidArgumentError(
        absl::StrCat(where_, ": \"", key, "\" must be ", expected, ", not ", v.dump()));
  }

  const Json& json_;
  const std::string where_;
};

std::string ListFirst(const std::vector<std::string>& items) {
  std::vector<std::string> shown(items.begin(), items.begin() + std::min(items.size(), kMaxListed));
  std::string s = absl::StrJoin(shown, ", ");
  if (items.size() > kMaxListed) absl::StrAppend(&s, ", ... (", items.size(), " in all)");
  return s;
}

// Removes `path` if it exists; a file that is not there is fine.
absl::Status RemoveIfPresent(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot remove stale ", path));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateHfLlamaConfig(const HfLlamaConfig& c, const std::string& where) {
  const std::pair<const char*, int64_t> sizes[] = {
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"vocab_size", c.vocab_size},
      {"max_position_embeddings", c.max_position_embeddings},
  };
  for (const auto& [key, value] : sizes) {
    if (value <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": ", key, " must be positive, not ", value));
    }
    // Bounds that keep every parameter's element count far from int64 overflow.
    if (value > kMaxSize) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": ", key, " ", value, " is larger than ", kMaxSize));
    }
  }
  if (c.num_hidden_layers > kMaxLayers) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": num_hidden_layers ", c.num_hidden_layers, " exceeds ", kMaxLayers));
  }
  if (!(c.rms_norm_eps > 0) || !std::isfinite(c.rms_norm_eps)) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": rms_norm_eps must be positive and finite, not ", c.rms_norm_eps));
  }
  if (!(c.rope_theta > 0) || !std::isfinite(c.rope_theta)) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": rope_theta must be positive and finite, not ", c.rope_theta));
  }
  if (c.hidden_size % c.num_attention_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": hidden_size ", c.hidden_size,
                                                   " is not divisible by num_attention_heads ",
                                                   c.num_attention_heads));
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": num_attention_heads ", c.num_attention_heads,
                     " is not divisible by num_key_value_heads ", c.num_key_value_heads));
  }
  return absl::OkStatus();
}

absl::StatusOr<HfLlamaConfig> ReadHfLlamaConfig(const std::string& path) {
  ASSIGN_OR_RETURN(Json json, ReadJsonObject(path));
  return ParseHfLlamaConfig(json, path);
}

absl::StatusOr<HfLlamaConfig> ParseHfLlamaConfig(const nlohmann::json& json, const std::string& path) {
  if (!json.is_object()) return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  const ConfigReader r(json, path);
  HfLlamaConfig c;
  RETURN_IF_ERROR(r.Int("hidden_size", true, &c.hidden_size));
  RETURN_IF_ERROR(r.Int("intermediate_size", true, &c.intermediate_size));
  RETURN_IF_ERROR(r.Int("num_hidden_layers", true, &c.num_hidden_layers));
  RETURN_IF_ERROR(r.Int("num_attention_heads", true, &c.num_attention_heads));
  c.num_key_value_heads = c.num_attention_heads;
  RETURN_IF_ERROR(r.Int("num_key_value_heads", false, &c.num_key_value_heads));
  RETURN_IF_ERROR(r.Int("vocab_size", true, &c.vocab_size));
  RETURN_IF_ERROR(r.Number("rms_norm_eps", true, &c.rms_norm_eps));
  // Newer transformers releases nest RoPE settings in "rope_parameters" and call torch_dtype
  // "dtype"; the top-level keys win when both are present.
  const Json no_rope_parameters = Json::object();
  auto rope_parameters = json.find("rope_parameters");
  const ConfigReader rope(rope_parameters != json.end() && rope_parameters->is_object()
                              ? *rope_parameters
                              : no_rope_parameters,
                          path + ": \"rope_parameters\"");
  RETURN_IF_ERROR(rope.Number("rope_theta", false, &c.rope_theta));
  RETURN_IF_ERROR(r.Number("rope_theta", false, &c.rope_theta));
  RETURN_IF_ERROR(r.Int("max_position_embeddings", true, &c.max_position_embeddings));
  RETURN_IF_ERROR(r.Bool("tie_word_embeddings", &c.tie_word_embeddings));
  RETURN_IF_ERROR(r.String("dtype", &c.torch_dtype));
  RETURN_IF_ERROR(r.String("torch_dtype", &c.torch_dtype));
  c.rope_scaling = r.Raw("rope_scaling");
  std::string rope_type = "default";
  RETURN_IF_ERROR(rope.String("rope_type", &rope_type));
  if (c.rope_scaling.empty() && rope_type != "default") c.rope_scaling = r.Raw("rope_parameters");
  RETURN_IF_ERROR(ValidateHfLlamaConfig(c, path));

  // Variants whose weights have other names or shapes than LlamaParamSpecs gives: refuse them
  // here rather than fail later with a confusing shape mismatch.
  int64_t head_dim = c.head_dim();
  RETURN_IF_ERROR(r.Int("head_dim", false, &head_dim));
  if (head_dim != c.head_dim()) {
    return absl::UnimplementedError(absl::StrCat(
        path, ": head_dim ", head_dim, " differs from hidden_size / num_attention_heads = ",
        c.head_dim(), ", which tessera's LLaMA requires"));
  }
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    bool bias = false;
    RETURN_IF_ERROR(r.Bool(key, &bias));
    if (bias) {
      return absl::UnimplementedError(
          absl::StrCat(path, ": ", key, " is true; tessera's LLaMA has no biases"));
    }
  }
  std::string act = "silu";
  RETURN_IF_ERROR(r.String("hidden_act", &act));
  if (act != "silu") {
    return absl::UnimplementedError(
        absl::StrCat(path, ": hidden_act is \"", act, "\"; tessera's LLaMA uses silu (SwiGLU)"));
  }
  return c;
}

absl::Status WriteHfLlamaConfig(const std::string& path, const HfLlamaConfig& c) {
  ASSIGN_OR_RETURN(nlohmann::ordered_json json, HfLlamaConfigJson(c, absl::StrCat("cannot write ", path)));
  const std::string text = json.dump(2) + "\n";
  const absl::string_view pieces[] = {text};
  return WriteFileAtomically(path, pieces);
}

absl::StatusOr<nlohmann::ordered_json> HfLlamaConfigJson(const HfLlamaConfig& c, const std::string& where) {
  RETURN_IF_ERROR(ValidateHfLlamaConfig(c, where));
  nlohmann::ordered_json json = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"hidden_act", "silu"},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"vocab_size", c.vocab_size},
      {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope_theta},
      {"max_position_embeddings", c.max_position_embeddings},
      {"tie_word_embeddings", c.tie_word_embeddings},
  };
  if (!c.torch_dtype.empty()) json["torch_dtype"] = c.torch_dtype;
  try {
    if (!c.rope_scaling.empty())
      json["rope_scaling"] = nlohmann::ordered_json::parse(c.rope_scaling);
  } catch (const nlohmann::ordered_json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", e.what()));
  }
  return json;
}

std::vector<ParamSpec> LlamaParamSpecs(const HfLlamaConfig& c) {
  CHECK_OK(ValidateHfLlamaConfig(c, "LlamaParamSpecs"));
  const int64_t hidden = c.hidden_size, kv_dim = c.num_key_value_heads * c.head_dim();
  const int64_t inter = c.intermediate_size;
  const memory::Shape layer_shapes[] = {
      {hidden}, {hidden, hidden}, {kv_dim, hidden}, {kv_dim, hidden}, {hidden, hidden},
      {hidden}, {inter, hidden},  {inter, hidden},  {hidden, inter},
  };
  static_assert(sizeof(layer_shapes) / sizeof(layer_shapes[0]) ==
                sizeof(kLayerNames) / sizeof(kLayerNames[0]));
  std::vector<ParamSpec> specs;
  specs.push_back({kGlobalNames[0].tessera, kGlobalNames[0].hf, {c.vocab_size, hidden}});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    for (size_t p = 0; p < sizeof(kLayerNames) / sizeof(kLayerNames[0]); ++p) {
      specs.push_back({absl::StrCat(kTesseraLayerPrefix, i, ".", kLayerNames[p].tessera),
                       absl::StrCat(kHfLayerPrefix, i, ".", kLayerNames[p].hf), layer_shapes[p]});
    }
  }
  specs.push_back({kGlobalNames[1].tessera, kGlobalNames[1].hf, {hidden}});
  if (!c.tie_word_embeddings) {
    specs.push_back({kGlobalNames[2].tessera, kGlobalNames[2].hf, {c.vocab_size, hidden}});
  }
  return specs;
}

absl::StatusOr<std::string> HfNameFromTesseraName(const std::string& name) {
  for (const NamePair& g : kGlobalNames) {
    if (name == g.tessera) return std::string(g.hf);
  }
  int64_t layer;
  std::string rest;
  if (SplitLayerName(name, kTesseraLayerPrefix, &layer, &rest)) {
    for (const NamePair& p : kLayerNames) {
      if (rest == p.tessera) return absl::StrCat(kHfLayerPrefix, layer, ".", p.hf);
    }
  }
  return absl::InvalidArgumentError(
      absl::StrCat("'", name, "' is not a tessera LLaMA parameter name"));
}

absl::StatusOr<std::optional<std::string>> TesseraNameFromHfName(const std::string& hf_name) {
  for (const NamePair& g : kGlobalNames) {
    if (hf_name == g.hf) return std::optional<std::string>(g.tessera);
  }
  int64_t layer;
  std::string rest;
  if (SplitLayerName(hf_name, kHfLayerPrefix, &layer, &rest)) {
    for (const NamePair& p : kLayerNames) {
      if (rest == p.hf) {
        return std::optional<std::string>(absl::StrCat(kTesseraLayerPrefix, layer, ".", p.tessera));
      }
    }
    if (rest == kInvFreqSuffix) return std::optional<std::string>();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("'", hf_name, "' is not a Hugging Face LLaMA parameter name"));
}

absl::StatusOr<std::unique_ptr<HfCheckpoint>> HfCheckpoint::Open(const std::string& dir) {
  std::unique_ptr<HfCheckpoint> ckpt(new HfCheckpoint);
  ckpt->dir_ = dir;
  ASSIGN_OR_RETURN(ckpt->config_, ReadHfLlamaConfig(JoinPath(dir, kConfigFile)));
  ckpt->specs_ = LlamaParamSpecs(ckpt->config_);

  // Which file holds each HF tensor.
  std::map<std::string, const SafetensorsFile*> location;
  const std::string single_path = JoinPath(dir, kSingleFile);
  const std::string index_path = JoinPath(dir, kIndexFile);
  const bool has_single = IsRegularFile(single_path), has_index = IsRegularFile(index_path);
  if (has_single && has_index) {
    return absl::FailedPreconditionError(absl::StrCat(dir, ": both ", kSingleFile, " and ",
                                                      kIndexFile, " exist; one of them is stale"));
  }
  if (has_single) {
    ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(single_path));
    for (const std::string& name : file->names()) location[name] = file.get();
    ckpt->files_.push_back(std::move(file));
  } else if (has_index) {
    ASSIGN_OR_RETURN(Json index, ReadJsonObject(index_path));
    auto weight_map = index.find("weight_map");
    if (weight_map == index.end() || !weight_map->is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": \"weight_map\" is missing or not an object"));
    }
    std::map<std::string, std::string> shard_of;  // HF tensor name -> shard file name
    std::map<std::string, const SafetensorsFile*> shards;
    for (auto it = weight_map->begin(); it != weight_map->end(); ++it) {
      if (!it->is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map entry of '",
                                                       it.key(), "' is not a file name string"));
      }
      const std::string shard = it->get<std::string>();
      // Shards live in the checkpoint directory: no paths, so an index cannot point elsewhere.
      if (shard.empty() || shard == "." || shard == ".." || shard.find('/') != std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": tensor '", it.key(),
                                                       "' maps to '", shard,
                                                       "', not a file name in ", dir));
      }
      shard_of[it.key()] = shard;
      if (shards.count(shard) == 0) {
        absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
            SafetensorsFile::Open(JoinPath(dir, shard));
        if (!file.ok()) {
          return absl::Status(file.status().code(),
                              absl::StrCat(index_path, ": shard '", shard, "' (of tensor '",
                                           it.key(), "'): ", file.status().message()));
        }
        shards[shard] = file->get();
        ckpt->files_.push_back(*std::move(file));
      }
    }
    for (const auto& [name, shard] : shard_of) {
      if (!shards[shard]->contains(name)) {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": maps tensor '", name,
                                                       "' to shard '", shard, "', which lacks it"));
      }
      location[name] = shards[shard];
    }
    for (const auto& [shard, file] : shards) {
      for (const std::string& name : file->names()) {
        auto it = shard_of.find(name);
        if (it == shard_of.end() || it->second != shard) {
          return absl::InvalidArgumentError(absl::StrCat(
              index_path, ": shard '", shard, "' holds tensor '", name, "', which the index ",
              it == shard_of.end() ? "does not list" : "maps to '" + it->second + "'"));
        }
      }
    }
  } else {
    return absl::NotFoundError(absl::StrCat(dir, ": no ", kSingleFile, " or ", kIndexFile,
                                            " (only safetensors checkpoints are supported)"));
  }

  std::map<std::string, const ParamSpec*> expected;
  for (const ParamSpec& spec : ckpt->specs_) expected[spec.name] = &spec;
  for (const auto& [hf_name, file] : location) {
    absl::StatusOr<std::optional<std::string>> name = TesseraNameFromHfName(hf_name);
    if (!name.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(file->path(), ": unexpected tensor ", name.status().message()));
    }
    if (!name->has_value()) continue;  // an inv_freq buffer
    if (ckpt->config_.tie_word_embeddings && **name == "lm_head") continue;
    if (expected.count(**name) == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          file->path(), ": tensor '", hf_name, "' is not a parameter of the model in ",
          JoinPath(dir, kConfigFile), " (", ckpt->config_.num_hidden_layers, " layers)"));
    }
    ckpt->params_[**name] = Location{file, hf_name};
  }

  std::vector<std::string> missing, mismatched;
  for (const ParamSpec& spec : ckpt->specs_) {
    auto it = ckpt->params_.find(spec.name);
    if (it == ckpt->params_.end()) {
      missing.push_back(spec.hf_name);
      continue;
    }
    const TensorInfo info = *it->second.file->info(spec.hf_name);
    if (info.shape != spec.shape) {
      mismatched.push_back(absl::StrCat(spec.hf_name, " is ", memory::ShapeToString(info.shape),
                                        ", expected ", memory::ShapeToString(spec.shape)));
    } else if (!memory::IsFloating(info.dtype)) {
      mismatched.push_back(absl::StrCat(spec.hf_name, " is ", SafetensorsDTypeName(info.dtype),
                                        ", expected a floating-point dtype"));
    }
  }
  if (!missing.empty() || !mismatched.empty()) {
    std::string msg = absl::StrCat(dir, ": does not match its ", kConfigFile, ":");
    if (!missing.empty()) absl::StrAppend(&msg, " missing ", ListFirst(missing), ";");
    if (!mismatched.empty()) absl::StrAppend(&msg, " mismatched ", ListFirst(mismatched), ";");
    msg.pop_back();
    return absl::InvalidArgumentError(msg);
  }
  return ckpt;
}

std::vector<std::string> HfCheckpoint::names() const {
  std::vector<std::string> names;
  names.reserve(specs_.size());
  for (const ParamSpec& spec : specs_) names.push_back(spec.name);
  return names;
}

absl::StatusOr<memory::Tensor> HfCheckpoint::Get(const std::string& tessera_name,
                                                 memory::Allocator* allocator) const {
  const std::string name =
      config_.tie_word_embeddings && tessera_name == "lm_head" ? "embed_tokens" : tessera_name;
  auto it = params_.find(name);
  if (it == params_.end()) {
    return absl::NotFoundError(absl::StrCat(dir_, ": no parameter '", tessera_name, "'"));
  }
  return it->second.file->Get(it->second.hf_name, allocator);
}

void HfCheckpoint::ReleasePages(const std::string& tessera_name) const {
  const std::string name =
      config_.tie_word_embeddings && tessera_name == "lm_head" ? "embed_tokens" : tessera_name;
  auto it = params_.find(name);
  if (it != params_.end()) it->second.file->ReleasePages(it->second.hf_name);
}

absl::StatusOr<std::unique_ptr<HfCheckpointWriter>> HfCheckpointWriter::Open(const std::string& dir,
                                                                             const HfLlamaConfig& config,
                                                                             const std::vector<TensorSpec>& tensors,
                                                                             int64_t max_shard_bytes) {
  const std::string where = absl::StrCat("cannot write HF checkpoint ", dir);
  RETURN_IF_ERROR(ValidateHfLlamaConfig(config, where));
  if (max_shard_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": max_shard_bytes must be positive, not ", max_shard_bytes));
  }
  const std::vector<ParamSpec> specs = LlamaParamSpecs(config);
  std::map<std::string, const ParamSpec*> expected;
  for (const ParamSpec& spec : specs) expected[spec.name] = &spec;
  std::map<std::string, const TensorSpec*> declared;
  for (const TensorSpec& t : tensors) {
    auto it = expected.find(t.name);
    if (it == expected.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": '", t.name, "' is not a parameter of this config",
          t.name == "lm_head" ? " (tie_word_embeddings is true: lm_head is embed_tokens)" : ""));
    }
    if (!declared.emplace(t.name, &t).second) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": '", t.name, "' is given twice"));
    }
    if (t.shape != it->second->shape || !memory::IsFloating(t.dtype)) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": '", t.name, "' is ", memory::DTypeName(t.dtype), " ",
                                                     memory::ShapeToString(t.shape), ", expected ",
                                                     memory::ShapeToString(it->second->shape),
                                                     " of a floating-point dtype"));
    }
  }
  // Shards filled greedily in parameter order, as transformers does.
  std::unique_ptr<HfCheckpointWriter> w(new HfCheckpointWriter());
  w->dir_ = dir;
  w->config_ = config;
  int shard = 0;
  int64_t shard_bytes = 0;
  bool shard_empty = true;
  for (const ParamSpec& spec : specs) {
    auto it = declared.find(spec.name);
    if (it == declared.end()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": no tensor for '", spec.name, "'"));
    }
    const int64_t bytes = memory::NumElements(spec.shape) * static_cast<int64_t>(memory::SizeOf(it->second->dtype));
    if (!shard_empty && shard_bytes + bytes > max_shard_bytes) ++shard, shard_bytes = 0;
    w->route_[spec.name] = {shard, spec.hf_name};
    shard_empty = false;
    shard_bytes += bytes;
    w->total_bytes_ += bytes;
  }
  const int shards = shard + 1;
  // Each shard's tensors in the order they will come.
  std::vector<std::vector<TensorSpec>> files(shards);
  for (const TensorSpec& t : tensors) {
    const auto& [s, hf_name] = w->route_[t.name];
    files[s].push_back({hf_name, t.dtype, t.shape});
  }
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 && ::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    return absl::ErrnoToStatus(errno, absl::StrCat(where, ": mkdir"));
  }
  // transformers refuses safetensors files whose metadata lacks a known "format".
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  for (int s = 0; s < shards; ++s) {
    char file_name[64];
    std::snprintf(file_name, sizeof(file_name), "model-%05d-of-%05d.safetensors", s + 1, shards);
    w->shard_files_.push_back(shards == 1 ? std::string(kSingleFile) : std::string(file_name));
    ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsWriter> f,
                     SafetensorsWriter::Open(JoinPath(dir, w->shard_files_.back()), std::move(files[s]), metadata));
    w->shards_.push_back(std::move(f));
  }
  return w;
}

absl::Status HfCheckpointWriter::Append(const std::string& tessera_name, const memory::Tensor& tensor) {
  auto it = route_.find(tessera_name);
  if (it == route_.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot write HF checkpoint ", dir_, ": '", tessera_name, "' was not declared"));
  }
  return shards_[it->second.first]->Append(it->second.second, tensor);
}

absl::Status HfCheckpointWriter::Commit() {
  // (Each shard checks that all of its tensors came.)
  for (auto& f : shards_) RETURN_IF_ERROR(f->Commit());
  const std::string single_path = JoinPath(dir_, kSingleFile);
  const std::string index_path = JoinPath(dir_, kIndexFile);
  if (shards_.size() == 1) {
    RETURN_IF_ERROR(RemoveIfPresent(index_path));
  } else {
    nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
    for (const ParamSpec& spec : LlamaParamSpecs(config_)) {
      const auto& [s, hf_name] = route_.at(spec.name);
      weight_map[hf_name] = shard_files_[s];
    }
    const nlohmann::ordered_json index = {{"metadata", {{"total_size", total_bytes_}}},
                                          {"weight_map", weight_map}};
    const std::string text = index.dump(2) + "\n";
    const absl::string_view pieces[] = {text};
    RETURN_IF_ERROR(WriteFileAtomically(index_path, pieces));
    RETURN_IF_ERROR(RemoveIfPresent(single_path));
  }
  return WriteHfLlamaConfig(JoinPath(dir_, kConfigFile), config_);
}

absl::Status WriteHfCheckpoint(const std::string& dir, const HfLlamaConfig& config,
                               const std::map<std::string, memory::Tensor>& tensors,
                               int64_t max_shard_bytes) {
  std::vector<TensorSpec> declared;
  for (const auto& [name, t] : tensors) {
    if (!t.defined()) {
      return absl::InvalidArgumentError(absl::StrCat("cannot write HF checkpoint ", dir, ": '", name, "' is undefined"));
    }
    declared.push_back({name, t.dtype(), t.shape()});
  }
  ASSIGN_OR_RETURN(std::unique_ptr<HfCheckpointWriter> w,
                   HfCheckpointWriter::Open(dir, config, declared, max_shard_bytes));
  for (const auto& [name, t] : tensors) RETURN_IF_ERROR(w->Append(name, t));
  return w->Commit();
}

}  // namespace tessera::checkpoint
