// lightron/hf_export.hpp — HuggingFace model directories (config.json + model.safetensors)
// for the two flavours, as one rename table (hf_names) read in both directions:
//   GPT-2 (GPT2LMHeadModel): "transformer." + our name. Its Conv1D layers store W as
//     (in, out), the transpose of our Linear's (out, in); lm_head is wte, so it is not written.
//   Llama (LlamaForCausalLM): model.embed_tokens, model.layers.N.{input_layernorm,
//     self_attn.{q,k,v}_proj (our fused c_attn rows [Q | K | V], cut at tp_shard_spec's
//     blocks), self_attn.o_proj, post_attention_layernorm, mlp.{gate,up}_proj (c_fc rows
//     [gate | up]), mlp.down_proj}, model.norm, lm_head. RoPE needs no permutation: lightron
//     rotates halves, (x1 cos - x2 sin, x2 cos + x1 sin), as HF's Llama does.
// The weights come from a checkpoint of any layout, consolidated (checkpoint_load.hpp).
// Leaves out: tokenizer files, other architectures, HF's multi-file index. Chapter 5.
#pragma once

#include "checkpoint_load.hpp"

namespace lightron {

// "gpt2" or "llama": the HuggingFace architecture that computes what this config does.
inline std::string hf_flavour(const GPTConfig& c) {
  const bool gpt2 = !c.rope() && !c.rms_norm() && !c.swiglu && c.add_bias_linear && c.tied() &&
                    c.query_groups() == c.num_attention_heads;
  const bool llama = c.rope() && c.rms_norm() && c.swiglu && !c.add_bias_linear;
  require(gpt2 || llama, "HuggingFace export: the model is neither GPT-2 (learned positions, LayerNorm, GELU, biases, "
          "tied embeddings, no query groups) nor Llama (rope, RMSNorm, SwiGLU, no biases)");
  return gpt2 ? "gpt2" : "llama";
}

// HF's names for our parameter `name`; several names: our rows are theirs stacked (dim 0).
inline std::vector<std::string> hf_names(const std::string& name, const std::string& flavour) {
  if (flavour == "gpt2") return {"transformer." + name};
  static const std::map<std::string, std::vector<std::string>> top = {
      {"wte.weight", {"model.embed_tokens.weight"}}, {"ln_f.weight", {"model.norm.weight"}},
      {"lm_head.weight", {"lm_head.weight"}}};
  static const std::map<std::string, std::vector<std::string>> block = {
      {"ln_1.weight", {"input_layernorm.weight"}},
      {"attn.c_attn.weight", {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"}},
      {"attn.c_proj.weight", {"self_attn.o_proj.weight"}},
      {"ln_2.weight", {"post_attention_layernorm.weight"}},
      {"mlp.c_fc.weight", {"mlp.gate_proj.weight", "mlp.up_proj.weight"}},
      {"mlp.c_proj.weight", {"mlp.down_proj.weight"}}};
  if (top.count(name)) return top.at(name);
  const size_t dot = name.find('.', 2);  // h.N.rest
  require(name.rfind("h.", 0) == 0 && dot != std::string::npos && block.count(name.substr(dot + 1)),
          "HuggingFace Llama: no name for parameter '{}'", name);
  std::vector<std::string> out;
  for (const auto& n : block.at(name.substr(dot + 1))) out.push_back("model.layers." + name.substr(2, dot - 2) + "." + n);
  return out;
}

// GPT-2's Conv1D weights (every matrix inside a block) are stored transposed.
inline bool hf_transposed(const std::string& name, const std::string& flavour) {
  return flavour == "gpt2" && name.rfind("h.", 0) == 0 && name_ends_with(name, ".weight") &&
         (name.find(".attn.c_") != std::string::npos || name.find(".mlp.c_") != std::string::npos);
}

inline nlohmann::json hf_config(const GPTConfig& c) {
  if (hf_flavour(c) == "gpt2")
    return {{"architectures", {"GPT2LMHeadModel"}}, {"model_type", "gpt2"}, {"vocab_size", c.vocab_size},
            {"n_positions", c.max_positions()}, {"n_ctx", c.max_positions()}, {"n_embd", c.hidden_size},
            {"n_layer", c.num_layers}, {"n_head", c.num_attention_heads},
            {"n_inner", c.ffn() == 4 * c.hidden_size ? nlohmann::json() : nlohmann::json(c.ffn())},
            {"activation_function", "gelu_new"}, {"layer_norm_epsilon", c.norm_epsilon},
            {"initializer_range", c.init_method_std}, {"tie_word_embeddings", true}, {"resid_pdrop", 0.0},
            {"embd_pdrop", 0.0}, {"attn_pdrop", 0.0}, {"torch_dtype", "float32"}};
  return {{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"}, {"vocab_size", c.vocab_size},
          {"hidden_size", c.hidden_size}, {"intermediate_size", c.ffn()}, {"num_hidden_layers", c.num_layers},
          {"num_attention_heads", c.num_attention_heads}, {"num_key_value_heads", c.query_groups()},
          {"head_dim", c.head_dim()}, {"max_position_embeddings", c.max_positions()}, {"rms_norm_eps", c.norm_epsilon},
          {"rope_theta", c.rotary_base}, {"hidden_act", "silu"}, {"tie_word_embeddings", c.tied()},
          {"attention_bias", false}, {"mlp_bias", false}, {"initializer_range", c.init_method_std},
          {"torch_dtype", "float32"}};
}

inline GPTConfig config_from_hf(const nlohmann::json& j, const std::string& path) {
  try {
    const std::string type = j.at("model_type").get<std::string>();
    require(type == "gpt2" || type == "llama", "{}: model_type '{}': only gpt2 and llama are supported", path, type);
    GPTConfig c = type == "gpt2" ? GPTConfig::gpt2() : GPTConfig::llama();
    if (type == "gpt2") {
      c.num_layers = j.at("n_layer"), c.hidden_size = j.at("n_embd"), c.num_attention_heads = j.at("n_head");
      c.ffn_hidden_size = j.value("n_inner", nlohmann::json()).is_number() ? j["n_inner"].get<int64_t>() : 0;
      c.max_position_embeddings = j.at("n_positions"), c.norm_epsilon = j.value("layer_norm_epsilon", 1e-5);
      const std::string act = j.value("activation_function", "gelu_new");
      require(act == "gelu_new" || act == "gelu_pytorch_tanh", "{}: activation_function '{}': lightron's GPT-2 uses "
              "the tanh GELU (gelu_new)", path, act);
    } else {
      c.num_layers = j.at("num_hidden_layers"), c.hidden_size = j.at("hidden_size");
      c.ffn_hidden_size = j.at("intermediate_size"), c.num_attention_heads = j.at("num_attention_heads");
      c.num_query_groups = j.value("num_key_value_heads", c.num_attention_heads);
      c.max_position_embeddings = j.at("max_position_embeddings"), c.norm_epsilon = j.value("rms_norm_eps", 1e-6);
      c.rotary_base = j.value("rope_theta", 10000.0);
      c.untie_embeddings_and_output_weights = !j.value("tie_word_embeddings", false);
      require(j.value("hidden_act", "silu") == "silu" && j.value("rope_scaling", nlohmann::json()).is_null() &&
              !j.value("attention_bias", false) && !j.value("mlp_bias", false),
              "{}: only plain Llama is supported (hidden_act silu, no rope_scaling, no biases)", path);
    }
    c.vocab_size = j.at("vocab_size"), c.seq_length = c.max_position_embeddings;
    c.init_method_std = j.value("initializer_range", 0.02);
    return c;
  } catch (const nlohmann::json::exception& e) {
    throw UsageError(fmt::format("{}: {}", path, first_line(e.what())));
  }
}

// Our full weights -> HF's tensors, in HF's names and layout.
inline NamedTensors to_hf(const std::map<std::string, torch::Tensor>& weights, const GPTConfig& c) {
  const std::string flavour = hf_flavour(c);
  NamedTensors out;
  for (const auto& [name, t] : weights) {
    const auto names = hf_names(name, flavour);
    const auto parts = names.size() == 1 ? std::vector<torch::Tensor>{t} : t.split_with_sizes(tp_shard_spec(name, c).blocks, 0);
    for (size_t i = 0; i < names.size(); ++i)
      out.emplace_back(names[i], (hf_transposed(name, flavour) ? parts[i].t() : parts[i]).contiguous());
  }
  return out;
}

// HF's tensors -> our full weights, each checked against the shape the config implies.
inline std::map<std::string, torch::Tensor> from_hf(const std::map<std::string, torch::Tensor>& hf, const GPTConfig& c,
                                                    const std::string& where) {
  const std::string flavour = hf_flavour(c);
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : GPT(c).named_parameters()) {  // a model of this config: its names and shapes
    std::vector<torch::Tensor> parts;
    for (const auto& n : hf_names(p.key(), flavour)) {
      auto it = hf.find(n);
      require(it != hf.end(), "{}: no tensor '{}' (for lightron's {})", where, n, p.key());
      parts.push_back(hf_transposed(p.key(), flavour) ? it->second.t() : it->second);
    }
    auto t = torch::cat(parts, 0).to(torch::kFloat).contiguous();
    require(t.sizes() == p.value().sizes(), "{}: {} is {}, but config.json implies {}", where, hf_names(p.key(), flavour)[0],
            fmt::join(t.sizes(), "x"), fmt::join(p.value().sizes(), "x"));
    out[p.key()] = t;
  }
  return out;
}

inline void export_hf(const std::string& dir, const GPTConfig& c, const std::map<std::string, torch::Tensor>& weights) {
  std::filesystem::create_directories(dir);
  write_safetensors(dir + "/model.safetensors", to_hf(weights, c), {{"format", "pt"}});
  write_file_atomically(dir + "/config.json", hf_config(c).dump(2) + "\n");
}

// A model's config and full weights, from either kind of directory.
struct ModelWeights {
  GPTConfig config;
  std::map<std::string, torch::Tensor> weights;

  // A single-device GPT holding these weights.
  std::shared_ptr<GPT> model() const {
    auto m = std::make_shared<GPT>(config);
    torch::NoGradGuard no_grad;
    for (auto& p : m->named_parameters()) p.value().copy_(weights.at(p.key()));
    return m;
  }
};

inline ModelWeights import_hf(const std::string& dir) {
  const std::string config_path = dir + "/config.json";
  const auto j = nlohmann::json::parse(std::ifstream(config_path), nullptr, /*allow_exceptions=*/false);
  require(j.is_object(), "{}: missing or not valid JSON (a HuggingFace model directory has config.json)", config_path);
  ModelWeights m{config_from_hf(j, config_path), {}};
  const std::string path = dir + "/model.safetensors";
  m.weights = from_hf(read_safetensors(path).tensors, m.config, path);
  return m;
}

// A HuggingFace directory (it has config.json) or a lightron checkpoint of any layout.
inline ModelWeights read_model_weights(const std::string& dir) {
  if (std::filesystem::exists(dir + "/config.json")) return import_hf(dir);
  CheckpointReader reader(dir);
  return {config_from_json(reader.manifest.at("config")), reader.consolidate(/*with_optimizer=*/false)};
}

}  // namespace lightron
