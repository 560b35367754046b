// lightron/checkpoint.hpp — saving and resuming a run with the same layout: each rank
// writes its parameters, AdamW moments and counters to one file, under a temporary name
// that is renamed when complete, so a crash never leaves a half-written file under the
// real name. (Resharding to another layout and HuggingFace export are later steps.)
// Introduced in tutorial stage 0.
#pragma once

#include "train.hpp"

#include <filesystem>
#include <fstream>

namespace lightron {

struct CheckpointCounters {
  int64_t iteration = 0, consumed_samples = 0;
};

inline std::string rank_checkpoint_path(const std::string& dir, int rank) { return fmt::format("{}/rank_{:05d}.pt", dir, rank); }

inline void save_rank_checkpoint(const std::string& dir, int rank, const AdamW& optimizer, CheckpointCounters counters) {
  std::filesystem::create_directories(dir);
  c10::Dict<std::string, torch::Tensor> state;
  for (const auto& s : optimizer.slots) {
    state.insert("param." + s.name, s.param.detach());
    state.insert("exp_avg." + s.name, s.exp_avg);
    state.insert("exp_avg_sq." + s.name, s.exp_avg_sq);
  }
  state.insert("iteration", torch::tensor(counters.iteration));
  state.insert("consumed_samples", torch::tensor(counters.consumed_samples));
  state.insert("adam_step", torch::tensor(optimizer.step_count));
  const auto bytes = torch::pickle_save(state);
  const std::string path = rank_checkpoint_path(dir, rank);
  std::ofstream(path + ".tmp", std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  std::filesystem::rename(path + ".tmp", path);
}

// Restores parameters and optimizer state in place; refuses a different model shape.
inline CheckpointCounters load_rank_checkpoint(const std::string& dir, int rank, AdamW& optimizer) {
  const std::string path = rank_checkpoint_path(dir, rank);
  std::ifstream in(path, std::ios::binary);
  require(in.good(), "--load: {} not found (was it saved with the same number of ranks and layout?)", path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto state = torch::pickle_load(bytes).toGenericDict();
  auto get = [&](const std::string& key) {
    require(state.contains(key), "--load: {} has no '{}' (saved with a different model or layout?)", path, key);
    return state.at(key).toTensor();
  };
  torch::NoGradGuard no_grad;
  for (auto& s : optimizer.slots) {
    auto saved = get("param." + s.name);
    require(saved.sizes() == s.param.sizes(), "--load: {} is {} in {}, but {} in this model", s.name,
            fmt::join(saved.sizes(), "x"), path, fmt::join(s.param.sizes(), "x"));
    s.param.copy_(saved);
    s.exp_avg.copy_(get("exp_avg." + s.name));
    s.exp_avg_sq.copy_(get("exp_avg_sq." + s.name));
  }
  optimizer.step_count = get("adam_step").item<int64_t>();
  return {get("iteration").item<int64_t>(), get("consumed_samples").item<int64_t>()};
}

}  // namespace lightron
