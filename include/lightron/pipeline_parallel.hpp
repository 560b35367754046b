// lightron/pipeline_parallel.hpp — pipeline parallelism, part 1: who holds which layers.
// The model's blocks are cut into p·v consecutive chunks (v = 1, or v virtual stages per
// rank for the interleaved schedule); pipeline rank s keeps chunks s, s + p, s + 2p, …
// The first chunk also owns the embeddings, the last one the final norm, the output layer
// and the loss. Everything else is dropped from this rank's model, so its parameters (and
// its optimizer state) are those of its stage only. Parameter names stay global ("h.5.…").
// One function answers "which pipeline rank owns this parameter" (pp_rank_of_parameter):
// the cut, the memory estimate, the gradient norm and the checkpoint all ask it.
//
// Tied embeddings: the last stage keeps its own copy of wte.weight for the output layer;
// after backward the two copies' gradients are summed over the embedding group (first and
// last stage), so both stay equal, as Megatron-LM does. Rank 0 owns it (counts and saves it).
// pipeline_schedule.hpp orders the micro-batches, pipeline_engine.hpp runs them. Chapter 3.
#pragma once

#include "gpt.hpp"
#include "process_groups.hpp"

#include <algorithm>  // find

namespace lightron {

// Layers of every model chunk: p·v chunks; when L is not a multiple of p·v the first
// L mod (p·v) chunks get one layer more (the interleaved schedule requires a multiple).
inline std::vector<std::vector<int64_t>> chunk_layers(int64_t num_layers, int64_t num_chunks) {
  std::vector<std::vector<int64_t>> chunks(num_chunks);
  int64_t layer = 0;
  for (int64_t c = 0; c < num_chunks; ++c)
    for (int64_t i = 0; i < num_layers / num_chunks + (c < num_layers % num_chunks ? 1 : 0); ++i)
      chunks[c].push_back(layer++);
  return chunks;
}

// The pipeline rank that owns a parameter (holds, counts and saves it), by its global name:
// a layer's parameters ("h.5.attn.c_attn.weight") belong to the rank of the chunk holding
// that layer, wte and wpe to rank 0 (a tied wte too: the last rank's copy is not its own),
// ln_f and lm_head to the last rank.
// [snippet: pp_rank_of_parameter]
inline int64_t pp_rank_of_parameter(const std::string& name, int64_t num_layers, int64_t pp_size, int64_t num_virtual) {
  if (name.rfind("wte.", 0) == 0 || name.rfind("wpe.", 0) == 0) return 0;
  if (name.rfind("h.", 0) != 0) return pp_size - 1;  // ln_f, lm_head
  const int64_t layer = std::stoll(name.substr(2, name.find('.', 2) - 2));
  const auto chunks = chunk_layers(num_layers, pp_size * num_virtual);
  for (size_t c = 0; c < chunks.size(); ++c)
    if (std::find(chunks[c].begin(), chunks[c].end(), layer) != chunks[c].end()) return int64_t(c) % pp_size;
  throw UsageError(fmt::format("pp_rank_of_parameter: '{}' names layer {}, but the model has {} layers (--num-layers)",
                               name, layer, num_layers));
}
// [end snippet: pp_rank_of_parameter]

// Whether pipeline rank pp_rank keeps a parameter: those it owns and, with a tied embedding,
// the last rank's copy of wte for its output layer.
inline bool pp_rank_holds_parameter(const std::string& name, int64_t num_layers, int64_t pp_size, int64_t num_virtual,
                                    int64_t pp_rank, bool tied_embedding) {
  const bool tied_copy = tied_embedding && pp_rank == pp_size - 1 && name == "wte.weight";
  return tied_copy || pp_rank_of_parameter(name, num_layers, pp_size, num_virtual) == pp_rank;
}

// v from --num-layers-per-virtual-pipeline-stage (0: no interleaving).
inline int64_t virtual_stages(int64_t num_layers, int64_t pp, int64_t layers_per_virtual_stage) {
  return layers_per_virtual_stage > 0 ? num_layers / (pp * layers_per_virtual_stage) : 1;
}

inline void validate_pipeline(int64_t num_layers, int64_t pp, int64_t layers_per_virtual_stage, int64_t micro_batches,
                              const std::string& schedule) {
  require(num_layers >= pp, "--num-layers ({}) must be at least --pipeline-model-parallel-size ({})", num_layers, pp);
  require(schedule == "1f1b" || schedule == "afab", "--pipeline-schedule must be 1f1b or afab, got '{}'", schedule);
  if (layers_per_virtual_stage <= 0) return;
  require(pp > 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1");
  require(num_layers % (pp * layers_per_virtual_stage) == 0,
          "--num-layers ({}) must be divisible by --pipeline-model-parallel-size ({}) x "
          "--num-layers-per-virtual-pipeline-stage ({}) for the interleaved schedule",
          num_layers, pp, layers_per_virtual_stage);
  require(micro_batches % pp == 0,
          "the interleaved schedule needs the number of micro-batches ({} = global batch / (micro batch x dp)) to be "
          "a multiple of --pipeline-model-parallel-size ({})", micro_batches, pp);
}

struct PipelineStage {
  std::shared_ptr<GPT> model;                // only this rank's parts remain
  std::vector<std::vector<int64_t>> chunks;  // global layer numbers of the chunks held here
  int64_t pp_rank = 0, pp_size = 1, num_virtual = 1;
  bool bf16 = false;  // forward under bf16 autocast (CUDA)
  bool has_embedding() const { return pp_rank == 0; }         // in chunk 0
  bool has_head() const { return pp_rank == pp_size - 1; }    // in chunk v - 1
  int64_t global_chunk(int64_t c) const { return c * pp_size + pp_rank; }
  bool is_first_chunk(int64_t c) const { return global_chunk(c) == 0; }
  bool is_last_chunk(int64_t c) const { return global_chunk(c) == pp_size * num_virtual - 1; }

  // Chunk c's blocks; the first chunk takes token ids (B, T), the others activations.
  torch::Tensor forward_chunk(int64_t c, const torch::Tensor& input) {
    AutocastGuard autocast(bf16);
    auto x = is_first_chunk(c) ? model->embed(input) : input;  // (B, T, C)
    std::vector<std::shared_ptr<Block>> blocks;
    for (int64_t layer : chunks[c]) blocks.push_back(model->blocks[layer]);
    return model->run_blocks(blocks, x);
  }
  torch::Tensor loss(const torch::Tensor& x, const torch::Tensor& labels) {
    AutocastGuard autocast(bf16);
    return model->loss_fn(model->logits(x), labels);
  }

  // One of the two copies of a tied wte (pp > 1, first or last rank): their gradients are
  // summed over the embedding group after backward.
  bool holds_tied_embedding() const { return pp_size > 1 && model->config.tied() && model->wte != nullptr; }
  // The parameters this rank owns (pp_rank_of_parameter), e.g. to count each once in the
  // gradient norm: the last rank's copy of a tied wte is left out.
  std::vector<std::pair<std::string, torch::Tensor>> counted_once(
      const std::vector<std::pair<std::string, torch::Tensor>>& named_params) const {
    std::vector<std::pair<std::string, torch::Tensor>> out;
    for (const auto& [name, p] : named_params)
      if (pp_rank_of_parameter(name, model->config.num_layers, pp_size, num_virtual) == pp_rank) out.emplace_back(name, p);
    return out;
  }
};

// Cuts `model` down to pipeline rank `pp_rank`'s chunks, in place: the blocks of other
// chunks go, and so do the embeddings and the head unless this rank holds them
// (pp_rank_holds_parameter).
inline PipelineStage apply_pipeline_parallel(std::shared_ptr<GPT> model, int64_t pp_rank, int64_t pp_size,
                                             int64_t num_virtual) {
  PipelineStage stage{model, {}, pp_rank, pp_size, num_virtual};
  const auto& c = model->config;
  auto all = chunk_layers(c.num_layers, pp_size * num_virtual);
  std::vector<bool> keep(model->blocks.size(), false);
  // [snippet: pp_keep_chunks]
  for (int64_t k = 0; k < num_virtual; ++k) {
    stage.chunks.push_back(all[stage.global_chunk(k)]);
    for (int64_t layer : stage.chunks.back()) keep[layer] = true;
  }
  // [end snippet: pp_keep_chunks]
  if (pp_size == 1) return stage;
  for (size_t layer = 0; layer < keep.size(); ++layer) {
    if (keep[layer]) continue;
    model->h->unregister_module(std::to_string(layer));
    model->blocks[layer] = nullptr;
  }
  auto holds = [&](const std::string& name) {
    return pp_rank_holds_parameter(name, c.num_layers, pp_size, num_virtual, pp_rank, c.tied());
  };
  if (!holds("ln_f.weight")) {  // with the output layer (a tied one holds wte: drop it first)
    model->unregister_module("ln_f");
    if (!c.tied()) model->unregister_module("lm_head");
    model->ln_f = nullptr;
    model->lm_head = nullptr;
  }
  if (!holds("wte.weight")) {
    model->unregister_module("wte");
    model->wte = nullptr;
  }
  if (model->wpe && !holds("wpe.weight")) {
    model->unregister_module("wpe");
    model->wpe = nullptr;
  }
  return stage;
}

}  // namespace lightron
