#include "checkpoint/hf_llama.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "checkpoint/test_util.h"
#include "memory/cpu_allocator.h"

namespace tessera::checkpoint {
namespace {

using memory::DType;
using memory::Shape;
using memory::Tensor;
using testing::ListDir;
using testing::MakeTempDir;
using testing::ReadFileOrDie;
using testing::WriteFileOrDie;
using Json = nlohmann::json;

HfLlamaConfig TinyConfig() {
  HfLlamaConfig c;
  c.hidden_size = 8;
  c.intermediate_size = 16;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.vocab_size = 32;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000.0;
  c.max_position_embeddings = 64;
  c.torch_dtype = "bfloat16";
  return c;
}

void ExpectSameConfig(const HfLlamaConfig& a, const HfLlamaConfig& b) {
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.num_hidden_layers, b.num_hidden_layers);
  EXPECT_EQ(a.num_attention_heads, b.num_attention_heads);
  EXPECT_EQ(a.num_key_value_heads, b.num_key_value_heads);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);
  EXPECT_EQ(a.rope_theta, b.rope_theta);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.torch_dtype, b.torch_dtype);
  EXPECT_EQ(a.rope_scaling, b.rope_scaling);
}

// Every parameter of `config`, filled with random values in `dtype` (never all zeros).
std::map<std::string, Tensor> RandomParams(const HfLlamaConfig& config, DType dtype,
                                           memory::Allocator* alloc, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::map<std::string, Tensor> params;
  for (const ParamSpec& spec : LlamaParamSpecs(config)) {
    Tensor t = *Tensor::Empty(spec.shape, dtype, alloc);
    for (int64_t i = 0; i < t.numel(); ++i) {
      memory::StoreFromFloat(t.raw_data(), dtype, static_cast<size_t>(i), dist(rng));
    }
    params[spec.name] = t;
  }
  return params;
}

bool SameBytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && a.nbytes() == b.nbytes() &&
         std::memcmp(a.raw_data(), b.raw_data(), a.nbytes()) == 0;
}

bool Contains(const absl::Status& s, const std::string& text) {
  return s.message().find(text) != std::string::npos;
}

void ExpectCheckpointHolds(const std::string& dir, const HfLlamaConfig& config,
                           const std::map<std::string, Tensor>& params) {
  memory::CpuAllocator alloc;
  auto ckpt = HfCheckpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  ExpectSameConfig((*ckpt)->config(), config);
  std::vector<std::string> expected_names;
  for (const ParamSpec& spec : LlamaParamSpecs(config)) expected_names.push_back(spec.name);
  EXPECT_EQ((*ckpt)->names(), expected_names);
  for (const auto& [name, expected] : params) {
    SCOPED_TRACE(name);
    auto view = (*ckpt)->Get(name);
    ASSERT_TRUE(view.ok()) << view.status();
    EXPECT_TRUE(SameBytes(*view, expected));
    auto copy = (*ckpt)->Get(name, &alloc);
    ASSERT_TRUE(copy.ok()) << copy.status();
    EXPECT_TRUE(SameBytes(*copy, expected));
  }
}

// --- config.json ---

TEST(HfLlamaConfig, WriteThenReadRoundTripsAndLooksLikeTransformers) {
  const std::string path = MakeTempDir() + "/config.json";
  HfLlamaConfig c = TinyConfig();
  c.tie_word_embeddings = true;
  c.rope_scaling = R"({"factor":8.0,"rope_type":"llama3"})";
  ASSERT_TRUE(WriteHfLlamaConfig(path, c).ok());
  auto read = ReadHfLlamaConfig(path);
  ASSERT_TRUE(read.ok()) << read.status();
  ExpectSameConfig(*read, c);
  EXPECT_EQ(read->head_dim(), 4);

  const Json json = Json::parse(ReadFileOrDie(path));
  EXPECT_EQ(json.at("architectures"), Json::array({"LlamaForCausalLM"}));
  EXPECT_EQ(json.at("model_type"), "llama");
  EXPECT_EQ(json.at("hidden_act"), "silu");
  EXPECT_EQ(json.at("num_key_value_heads"), 1);
  EXPECT_EQ(json.at("rms_norm_eps"), 1e-5);
  EXPECT_EQ(json.at("rope_scaling").at("rope_type"), "llama3");
}

TEST(HfLlamaConfig, OptionalKeysTakeTransformersDefaults) {
  const std::string path = MakeTempDir() + "/config.json";
  WriteFileOrDie(path, R"({"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
      "num_attention_heads": 2, "num_key_value_heads": null, "vocab_size": 32,
      "rms_norm_eps": 1e-6, "max_position_embeddings": 64, "rope_scaling": null,
      "bos_token_id": 1, "attention_bias": false})");
  auto c = ReadHfLlamaConfig(path);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 2);
  EXPECT_EQ(c->rope_theta, 10000.0);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->torch_dtype, "");
  EXPECT_EQ(c->rope_scaling, "");
  EXPECT_EQ(c->rms_norm_eps, 1e-6);
}

TEST(HfLlamaConfig, UnderstandsNewerTransformersSpellings) {
  const std::string path = MakeTempDir() + "/config.json";
  const std::string base = R"({"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
      "num_attention_heads": 2, "vocab_size": 32, "rms_norm_eps": 1e-6,
      "max_position_embeddings": 64, "dtype": "float16", )";
  WriteFileOrDie(path, base + R"("rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})");
  auto c = ReadHfLlamaConfig(path);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_theta, 5e5);
  EXPECT_EQ(c->torch_dtype, "float16");
  EXPECT_EQ(c->rope_scaling, "");

  WriteFileOrDie(path, base + R"("rope_parameters": {"rope_type": "llama3", "factor": 8.0,
      "rope_theta": 5e5}})");
  c = ReadHfLlamaConfig(path);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_theta, 5e5);
  EXPECT_NE(c->rope_scaling.find("llama3"), std::string::npos) << c->rope_scaling;
}

TEST(HfLlamaConfig, BadConfigsGiveErrorsNamingTheFileAndKey) {
  const std::string base = R"("intermediate_size": 16, "num_hidden_layers": 2, "vocab_size": 32,
      "max_position_embeddings": 64)";
  // A config with `extra` keys; rms_norm_eps = 1e-6 unless `extra` sets it.
  auto with = [&](const std::string& extra) {
    const std::string eps =
        extra.find("rms_norm_eps") == std::string::npos ? ", \"rms_norm_eps\": 1e-6" : "";
    return "{" + base + eps + ", " + extra + "}";
  };
  const std::string ok_heads = R"("hidden_size": 8, "num_attention_heads": 2)";
  using C = absl::StatusCode;
  const struct {
    std::string name, text;
    C code;
    std::string expected;
  } cases[] = {
      {"not JSON", "{\"hidden_size\": ", C::kInvalidArgument, "not valid JSON"},
      {"not an object", "[1]", C::kInvalidArgument, "not an object"},
      {"missing key", with(R"("num_attention_heads": 2)"), C::kInvalidArgument,
       "missing \"hidden_size\""},
      {"string size", with(R"("hidden_size": "8", "num_attention_heads": 2)"), C::kInvalidArgument,
       "\"hidden_size\" must be an integer"},
      {"fractional size", with(R"("hidden_size": 8.5, "num_attention_heads": 2)"),
       C::kInvalidArgument, "\"hidden_size\" must be an integer"},
      {"zero size", with(R"("hidden_size": 0, "num_attention_heads": 2)"), C::kInvalidArgument,
       "hidden_size must be positive"},
      {"negative heads", with(R"("hidden_size": 8, "num_attention_heads": -2)"),
       C::kInvalidArgument, "num_attention_heads must be positive"},
      {"huge size", with(R"("hidden_size": 1000000000000, "num_attention_heads": 2)"),
       C::kInvalidArgument, "larger than"},
      {"heads do not divide hidden", with(R"("hidden_size": 8, "num_attention_heads": 3)"),
       C::kInvalidArgument, "hidden_size 8 is not divisible by num_attention_heads 3"},
      {"kv heads do not divide heads",
       with(R"("hidden_size": 8, "num_attention_heads": 4, "num_key_value_heads": 3)"),
       C::kInvalidArgument, "num_attention_heads 4 is not divisible by num_key_value_heads 3"},
      {"eps not a number", with(ok_heads + R"(, "rms_norm_eps": "small")"), C::kInvalidArgument,
       "\"rms_norm_eps\" must be a number"},
      {"eps missing", "{" + base + ", " + ok_heads + "}", C::kInvalidArgument,
       "missing \"rms_norm_eps\""},
      {"zero eps", with(ok_heads + R"(, "rms_norm_eps": 0)"), C::kInvalidArgument,
       "rms_norm_eps must be positive"},
      {"bad theta", with(ok_heads + R"(, "rope_theta": 0)"), C::kInvalidArgument,
       "rope_theta must be positive"},
      {"tie not a bool", with(ok_heads + R"(, "tie_word_embeddings": "yes")"), C::kInvalidArgument,
       "\"tie_word_embeddings\" must be true or false"},
      {"torch_dtype not a string", with(ok_heads + R"(, "torch_dtype": 16)"), C::kInvalidArgument,
       "\"torch_dtype\" must be a string"},
      {"other head_dim", with(ok_heads + R"(, "head_dim": 8)"), C::kUnimplemented, "head_dim 8"},
      {"biases", with(ok_heads + R"(, "attention_bias": true)"), C::kUnimplemented,
       "attention_bias"},
      {"gelu", with(ok_heads + R"(, "hidden_act": "gelu")"), C::kUnimplemented, "gelu"},
  };
  const std::string dir = MakeTempDir();
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string path = dir + "/config.json";
    WriteFileOrDie(path, c.text);
    auto config = ReadHfLlamaConfig(path);
    ASSERT_FALSE(config.ok());
    EXPECT_EQ(config.status().code(), c.code) << config.status();
    EXPECT_TRUE(Contains(config.status(), path)) << config.status();
    EXPECT_TRUE(Contains(config.status(), c.expected)) << config.status();
  }
  auto missing = ReadHfLlamaConfig(dir + "/nope.json");
  EXPECT_TRUE(absl::IsNotFound(missing.status())) << missing.status();
  EXPECT_TRUE(Contains(missing.status(), dir + "/nope.json"));
}

TEST(HfLlamaConfig, WriteRefusesAnInvalidConfig) {
  const std::string dir = MakeTempDir();
  HfLlamaConfig c = TinyConfig();
  c.num_key_value_heads = 3;
  absl::Status s = WriteHfLlamaConfig(dir + "/config.json", c);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_TRUE(Contains(s, dir + "/config.json")) << s;
  EXPECT_TRUE(ListDir(dir).empty());
}

// --- names ---

TEST(LlamaNames, SpecsHaveHfShapesAndMapBothWays) {
  const std::vector<ParamSpec> specs = LlamaParamSpecs(TinyConfig());
  ASSERT_EQ(specs.size(), 1u + 2 * 9 + 2);
  std::map<std::string, ParamSpec> by_name;
  for (const ParamSpec& s : specs) by_name[s.name] = s;
  ASSERT_EQ(by_name.size(), specs.size());
  EXPECT_EQ(specs.front().name, "embed_tokens");
  EXPECT_EQ(specs.back().name, "lm_head");
  const struct {
    const char* name;
    const char* hf_name;
    Shape shape;
  } expected[] = {
      {"embed_tokens", "model.embed_tokens.weight", {32, 8}},
      {"layers.0.attn_norm", "model.layers.0.input_layernorm.weight", {8}},
      {"layers.0.wq", "model.layers.0.self_attn.q_proj.weight", {8, 8}},
      {"layers.1.wk", "model.layers.1.self_attn.k_proj.weight", {4, 8}},  // 1 kv head of dim 4
      {"layers.1.wv", "model.layers.1.self_attn.v_proj.weight", {4, 8}},
      {"layers.1.wo", "model.layers.1.self_attn.o_proj.weight", {8, 8}},
      {"layers.1.mlp_norm", "model.layers.1.post_attention_layernorm.weight", {8}},
      {"layers.0.w_gate", "model.layers.0.mlp.gate_proj.weight", {16, 8}},
      {"layers.0.w_up", "model.layers.0.mlp.up_proj.weight", {16, 8}},
      {"layers.0.w_down", "model.layers.0.mlp.down_proj.weight", {8, 16}},
      {"final_norm", "model.norm.weight", {8}},
      {"lm_head", "lm_head.weight", {32, 8}},
  };
  for (const auto& e : expected) {
    SCOPED_TRACE(e.name);
    ASSERT_EQ(by_name.count(e.name), 1u);
    EXPECT_EQ(by_name[e.name].hf_name, e.hf_name);
    EXPECT_EQ(by_name[e.name].shape, e.shape);
  }
  for (const ParamSpec& s : specs) {
    EXPECT_EQ(*HfNameFromTesseraName(s.name), s.hf_name);
    auto back = TesseraNameFromHfName(s.hf_name);
    ASSERT_TRUE(back.ok() && back->has_value()) << s.hf_name;
    EXPECT_EQ(**back, s.name);
  }
  EXPECT_EQ(*HfNameFromTesseraName("layers.31.w_down"), "model.layers.31.mlp.down_proj.weight");

  HfLlamaConfig tied = TinyConfig();
  tied.tie_word_embeddings = true;
  const std::vector<ParamSpec> tied_specs = LlamaParamSpecs(tied);
  EXPECT_EQ(tied_specs.size(), specs.size() - 1);
  EXPECT_EQ(tied_specs.back().name, "final_norm");
}

TEST(LlamaNames, InvFreqIsSkippedAndUnknownNamesAreErrors) {
  auto inv_freq = TesseraNameFromHfName("model.layers.7.self_attn.rotary_emb.inv_freq");
  ASSERT_TRUE(inv_freq.ok()) << inv_freq.status();
  EXPECT_FALSE(inv_freq->has_value());
  for (const char* hf :
       {"model.layers.0.self_attn.q_proj.bias", "model.layers.01.mlp.up_proj.weight",
        "model.layers.x.mlp.up_proj.weight", "model.layers..mlp.up_proj.weight", "model.layers.0",
        "model.norm.bias", "embed_tokens", "", "model.layers.-1.input_layernorm.weight"}) {
    auto r = TesseraNameFromHfName(hf);
    EXPECT_TRUE(absl::IsInvalidArgument(r.status())) << hf;
    EXPECT_TRUE(Contains(r.status(), std::string("'") + hf + "'")) << r.status();
  }
  for (const char* name : {"layers.0.bias", "layers.01.wq", "layers.+1.wq", "layers.0.wq.x",
                           "model.embed_tokens.weight", "lm_head.weight", "layers", ""}) {
    auto r = HfNameFromTesseraName(name);
    EXPECT_TRUE(absl::IsInvalidArgument(r.status())) << name;
  }
}

// --- checkpoints ---

TEST(HfCheckpoint, UnshardedRoundTripIsBitExact) {
  memory::CpuAllocator alloc;
  const HfLlamaConfig config = TinyConfig();
  const auto params = RandomParams(config, DType::kBF16, &alloc, 1);
  const std::string dir = MakeTempDir() + "/ckpt";  // created by the writer
  ASSERT_TRUE(WriteHfCheckpoint(dir, config, params).ok());
  EXPECT_EQ(ListDir(dir), (std::vector<std::string>{"config.json", "model.safetensors"}));
  ExpectCheckpointHolds(dir, config, params);
  auto file = SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(file.ok());
  EXPECT_EQ((*file)->metadata().at("format"), "pt");  // transformers refuses files without it
  EXPECT_TRUE((*file)->contains("model.layers.1.mlp.down_proj.weight"));
}

TEST(HfCheckpoint, ShardedRoundTripWritesAnIndexAndRespectsTheShardSize) {
  memory::CpuAllocator alloc;
  const HfLlamaConfig config = TinyConfig();
  const auto params = RandomParams(config, DType::kF32, &alloc, 2);
  int64_t total = 0;
  for (const auto& [name, t] : params) total += static_cast<int64_t>(t.nbytes());
  const int64_t max_shard_bytes = 1500;  // embed_tokens alone is 1024 bytes; a layer 2368
  const std::string dir = MakeTempDir();
  ASSERT_TRUE(WriteHfCheckpoint(dir, config, params, max_shard_bytes).ok());
  ExpectCheckpointHolds(dir, config, params);

  const Json index = Json::parse(ReadFileOrDie(dir + "/model.safetensors.index.json"));
  EXPECT_EQ(index.at("metadata").at("total_size"), total);
  const Json& weight_map = index.at("weight_map");
  EXPECT_EQ(weight_map.size(), params.size());
  std::set<std::string> shard_names;
  for (const auto& entry : weight_map) shard_names.insert(entry.get<std::string>());
  const int n = static_cast<int>(shard_names.size());
  ASSERT_GT(n, 2);
  std::vector<std::string> expected_files = {"config.json", "model.safetensors.index.json"};
  for (int i = 1; i <= n; ++i) {
    char name[64];
    std::snprintf(name, sizeof(name), "model-%05d-of-%05d.safetensors", i, n);
    EXPECT_EQ(shard_names.count(name), 1u) << name;
    expected_files.push_back(name);
    auto shard = SafetensorsFile::Open(dir + "/" + name);
    ASSERT_TRUE(shard.ok()) << shard.status();
    // A shard exceeds the limit only when it holds a single tensor larger than the limit.
    EXPECT_TRUE(static_cast<int64_t>((*shard)->data_bytes()) <= max_shard_bytes ||
                (*shard)->names().size() == 1)
        << name;
  }
  std::sort(expected_files.begin(), expected_files.end());
  EXPECT_EQ(ListDir(dir), expected_files);
  // Greedy in parameter order: the first shard starts with embed_tokens.
  EXPECT_EQ(weight_map.at("model.embed_tokens.weight"), *shard_names.begin());
}

TEST(HfCheckpoint, SwitchingLayoutsRemovesTheStaleEntryFile) {
  memory::CpuAllocator alloc;
  const HfLlamaConfig config = TinyConfig();
  const std::string dir = MakeTempDir();
  const auto first = RandomParams(config, DType::kBF16, &alloc, 3);
  ASSERT_TRUE(WriteHfCheckpoint(dir, config, first, 1000).ok());
  const auto second = RandomParams(config, DType::kBF16, &alloc, 4);
  ASSERT_TRUE(WriteHfCheckpoint(dir, config, second).ok());
  EXPECT_NE(access((dir + "/model.safetensors.index.json").c_str(), F_OK), 0);
  ExpectCheckpointHolds(dir, config, second);
  const auto third = RandomParams(config, DType::kBF16, &alloc, 5);
  ASSERT_TRUE(WriteHfCheckpoint(dir, config, third, 1000).ok());
  EXPECT_NE(access((dir + "/model.safetensors").c_str(), F_OK), 0);
  ExpectCheckpointHolds(dir, config, third);
}

TEST(HfCheckpoint, TiedEmbeddingsServeLmHeadFromEmbedTokens) {
  memory::CpuAllocator alloc;
  HfLlamaConfig config = TinyConfig();
  config.tie_word_embeddings = true;
  auto params = RandomParams(config, DType::kBF16, &alloc, 6);
  ASSERT_EQ(params.count("lm_head"), 0u);
  const std::string dir = MakeTempDir();
  ASSERT_TRUE(WriteHfCheckpoint(dir, config, params).ok());
  ExpectCheckpointHolds(dir, config, params);
  auto ckpt = HfCheckpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  auto lm_head = (*ckpt)->Get("lm_head");
  ASSERT_TRUE(lm_head.ok()) << lm_head.status();
  EXPECT_TRUE(SameBytes(*lm_head, params.at("embed_tokens")));

  params["lm_head"] = params.at("embed_tokens");
  absl::Status s = WriteHfCheckpoint(MakeTempDir(), config, params);
  EXPECT_TRUE(absl::IsInvalidArgument(s) && Contains(s, "tie_word_embeddings")) << s;
}

TEST(WriteHfCheckpoint, RejectsWrongTensorSetsBeforeWritingAnything) {
  memory::CpuAllocator alloc;
  const HfLlamaConfig config = TinyConfig();
  const auto good = RandomParams(config, DType::kBF16, &alloc, 7);
  const std::string dir = MakeTempDir();
  auto missing = good;
  missing.erase("layers.1.w_up");
  auto wrong_shape = good;
  wrong_shape["layers.0.wk"] = *Tensor::Zeros({8, 8}, DType::kBF16, &alloc);
  auto integer = good;
  integer["final_norm"] = *Tensor::Zeros({8}, DType::kI32, &alloc);
  auto extra = good;
  extra["layers.2.wq"] = good.at("layers.0.wq");
  const struct {
    const char* name;
    std::map<std::string, Tensor> params;
    std::string expected;
  } cases[] = {{"missing", missing, "no tensor for 'layers.1.w_up'"},
               {"wrong shape", wrong_shape, "'layers.0.wk'"},
               {"integer", integer, "'final_norm'"},
               {"extra", extra, "'layers.2.wq' is not a parameter"}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    absl::Status s = WriteHfCheckpoint(dir, config, c.params);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
    EXPECT_TRUE(Contains(s, dir) && Contains(s, c.expected)) << s;
  }
  EXPECT_TRUE(ListDir(dir).empty());
  EXPECT_FALSE(WriteHfCheckpoint(dir, config, good, 0).ok());
}

// Rewrites dir/model.safetensors after `edit` changes its tensors (by HF name).
void EditSingleFile(const std::string& dir,
                    const std::function<void(std::map<std::string, Tensor>*)>& edit,
                    memory::Allocator* alloc) {
  const std::string path = dir + "/model.safetensors";
  std::map<std::string, Tensor> tensors;
  {
    auto file = SafetensorsFile::Open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    for (const std::string& name : (*file)->names()) tensors[name] = *(*file)->Get(name, alloc);
  }
  edit(&tensors);
  std::vector<std::pair<std::string, Tensor>> list(tensors.begin(), tensors.end());
  ASSERT_TRUE(WriteSafetensors(path, list).ok());
}

TEST(HfCheckpoint, OpenReportsMissingMismatchedAndUnexpectedTensors) {
  memory::CpuAllocator alloc;
  const HfLlamaConfig config = TinyConfig();
  const auto params = RandomParams(config, DType::kBF16, &alloc, 8);
  using Tensors = std::map<std::string, Tensor>;
  const struct {
    const char* name;
    std::function<void(Tensors*)> edit;
    std::string expected;
  } cases[] = {
      {"missing",
       [](Tensors* t) {
         t->erase("model.layers.1.mlp.up_proj.weight");
         t->erase("model.norm.weight");
       },
       "missing model.layers.1.mlp.up_proj.weight, model.norm.weight"},
      {"wrong shape",
       [&](Tensors* t) {
         (*t)["model.layers.0.self_attn.k_proj.weight"] =
             *Tensor::Zeros({8, 8}, DType::kBF16, &alloc);
       },
       "mismatched model.layers.0.self_attn.k_proj.weight is [8, 8], expected [4, 8]"},
      {"integer dtype",
       [&](Tensors* t) { (*t)["model.norm.weight"] = *Tensor::Zeros({8}, DType::kI32, &alloc); },
       "model.norm.weight is I32, expected a floating-point dtype"},
      {"unknown tensor",
       [&](Tensors* t) {
         (*t)["model.layers.0.self_attn.q_proj.bias"] = *Tensor::Zeros({8}, DType::kBF16, &alloc);
       },
       "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"},
      {"extra layer",
       [&](Tensors* t) {
         (*t)["model.layers.2.input_layernorm.weight"] = *Tensor::Zeros({8}, DType::kBF16, &alloc);
       },
       "'model.layers.2.input_layernorm.weight' is not a parameter of the model"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string dir = MakeTempDir();
    ASSERT_TRUE(WriteHfCheckpoint(dir, config, params).ok());
    EditSingleFile(dir, c.edit, &alloc);
    auto ckpt = HfCheckpoint::Open(dir);
    ASSERT_FALSE(ckpt.ok());
    EXPECT_TRUE(absl::IsInvalidArgument(ckpt.status())) << ckpt.status();
    EXPECT_TRUE(Contains(ckpt.status(), dir)) << ckpt.status();
    EXPECT_TRUE(Contains(ckpt.status(), c.expected)) << ckpt.status();
  }
}

TEST(HfCheckpoint, OldInvFreqBuffersAreSkipped) {
  memory::CpuAllocator alloc;
  const HfLlamaConfig config = TinyConfig();
  const auto params = RandomParams(config, DType::kBF16, &alloc, 9);
  const std::string dir = MakeTempDir();
  ASSERT_TRUE(WriteHfCheckpoint(dir, config, params).ok());
  EditSingleFile(
      dir,
      [&](std::map<std::string, Tensor>* t) {
        for (int i = 0; i < 2; ++i) {
          (*t)["model.layers." + std::to_string(i) + ".self_attn.rotary_emb.inv_freq"] =
              *Tensor::Zeros({2}, DType::kF32, &alloc);
        }
      },
      &alloc);
  ExpectCheckpointHolds(dir, config, params);
}

TEST(HfCheckpoint, BadDirectoriesGiveClearErrors) {
  memory::CpuAllocator alloc;
  const HfLlamaConfig config = TinyConfig();
  const auto params = RandomParams(config, DType::kBF16, &alloc, 10);

  {  // bad config.json
    const std::string dir = MakeTempDir();
    ASSERT_TRUE(WriteHfCheckpoint(dir, config, params).ok());
    WriteFileOrDie(dir + "/config.json", "{\"hidden_size\": 8");
    auto ckpt = HfCheckpoint::Open(dir);
    EXPECT_TRUE(absl::IsInvalidArgument(ckpt.status())) << ckpt.status();
    EXPECT_TRUE(Contains(ckpt.status(), dir + "/config.json")) << ckpt.status();
  }
  {  // no weights at all
    const std::string dir = MakeTempDir();
    ASSERT_TRUE(WriteHfLlamaConfig(dir + "/config.json", config).ok());
    auto ckpt = HfCheckpoint::Open(dir);
    EXPECT_TRUE(absl::IsNotFound(ckpt.status())) << ckpt.status();
    EXPECT_TRUE(Contains(ckpt.status(), "model.safetensors")) << ckpt.status();
  }
  {  // both layouts present
    const std::string dir = MakeTempDir();
    ASSERT_TRUE(WriteHfCheckpoint(dir, config, params, 1000).ok());
    ASSERT_TRUE(WriteHfCheckpoint(dir + "/single", config, params).ok());
    ASSERT_EQ(
        ::rename((dir + "/single/model.safetensors").c_str(), (dir + "/model.safetensors").c_str()),
        0);
    auto ckpt = HfCheckpoint::Open(dir);
    EXPECT_TRUE(absl::IsFailedPrecondition(ckpt.status())) << ckpt.status();
    EXPECT_TRUE(Contains(ckpt.status(), "stale")) << ckpt.status();
  }
  {  // unknown parameter name
    auto ckpt = HfCheckpoint::Open(MakeTempDir());
    EXPECT_FALSE(ckpt.ok());
    const std::string dir = MakeTempDir();
    ASSERT_TRUE(WriteHfCheckpoint(dir, config, params).ok());
    auto good = HfCheckpoint::Open(dir);
    ASSERT_TRUE(good.ok()) << good.status();
    EXPECT_TRUE(absl::IsNotFound((*good)->Get("layers.2.wq").status()));
    EXPECT_TRUE(absl::IsNotFound((*good)->Get("model.norm.weight").status()));
  }
}

TEST(HfCheckpoint, BrokenShardedIndexesGiveClearErrors) {
  memory::CpuAllocator alloc;
  const HfLlamaConfig config = TinyConfig();
  const auto params = RandomParams(config, DType::kBF16, &alloc, 11);
  const std::string index_name = "/model.safetensors.index.json";
  using Shards = std::vector<std::string>;
  // Each edit breaks the checkpoint and returns what the error must say.
  const struct {
    const char* name;
    std::function<std::string(const std::string& dir, const Shards& shards, Json* index)> edit;
  } cases[] = {
      {"missing shard",
       [](const std::string& dir, const Shards& shards, Json*) {
         EXPECT_EQ(::unlink((dir + "/" + shards[1]).c_str()), 0);
         return "shard '" + shards[1] + "'";
       }},
      {"truncated shard",
       [](const std::string& dir, const Shards& shards, Json*) {
         EXPECT_EQ(::truncate((dir + "/" + shards[2]).c_str(), 40), 0);
         return shards[2] + ": header length";
       }},
      {"tensor not in its shard",
       [](const std::string&, const Shards& shards, Json* index) {
         (*index)["weight_map"]["model.norm.weight"] = shards[0];
         return "maps tensor 'model.norm.weight' to shard '" + shards[0] + "', which lacks it";
       }},
      {"tensor not in the index",
       [](const std::string&, const Shards&, Json* index) {
         (*index)["weight_map"].erase("model.norm.weight");
         return std::string("holds tensor 'model.norm.weight', which the index does not list");
       }},
      {"path in shard name",
       [](const std::string&, const Shards& shards, Json* index) {
         (*index)["weight_map"]["model.norm.weight"] = "../" + shards.back();
         return std::string("not a file name");
       }},
      {"no weight_map",
       [](const std::string&, const Shards&, Json* index) {
         index->erase("weight_map");
         return std::string("\"weight_map\" is missing");
       }},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string dir = MakeTempDir();
    ASSERT_TRUE(WriteHfCheckpoint(dir, config, params, 1000).ok());
    Json index = Json::parse(ReadFileOrDie(dir + index_name));
    std::set<std::string> shard_set;
    for (const auto& entry : index.at("weight_map")) shard_set.insert(entry.get<std::string>());
    const Shards shards(shard_set.begin(), shard_set.end());
    ASSERT_GE(shards.size(), 3u);
    ASSERT_EQ(ListDir(dir).size(), 2 + shards.size());  // config, index, shards
    const std::string expected = c.edit(dir, shards, &index);
    WriteFileOrDie(dir + index_name, index.dump());
    auto ckpt = HfCheckpoint::Open(dir);
    ASSERT_FALSE(ckpt.ok());
    EXPECT_TRUE(Contains(ckpt.status(), dir)) << ckpt.status();
    EXPECT_TRUE(Contains(ckpt.status(), expected)) << ckpt.status();
  }
}

}  // namespace
}  // namespace tessera::checkpoint
