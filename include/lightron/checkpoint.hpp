// lightron/checkpoint.hpp — sharded checkpoints that any layout can load:
//   <save>/iter_0000010/rank_00003.safetensors  each rank of dp rank 0: its shards of the
//        parameters and AdamW moments (exp_avg.<name>, exp_avg_sq.<name>); for each, the
//        global shape and where its rows sit in the full tensor (safetensors.hpp);
//   <save>/iter_0000010/manifest.json  config, layout, iteration, consumed samples, the
//        learning-rate schedule, AdamW's step, the RNG state, every file's size and CRC-32;
//   <save>/latest.json  {"iteration": 10, "directory": "iter_0000010"}.
// A save is atomic. The directory is iter_0000010.tmp while ranks write (each file under a
// temporary name, renamed when complete); after a barrier rank 0 writes the manifest, renames
// the directory, and writes latest.json last. A crash leaves at worst a *.tmp directory,
// which loading skips, and says so. A write that fails (a full disk, a path it cannot create)
// is reported by the rank that met it, with the path. Reading it back: checkpoint_load.hpp.
// Leaves out: asynchronous saving. (ZeRO's AdamW state arrives whole: trainer_tools.hpp.) Chapter 5.
#pragma once

#include "pipeline_parallel.hpp"  // pp_rank_of_parameter: who saves a parameter
#include "process_groups.hpp"
#include "safetensors.hpp"
#include "tp_model.hpp"
#include "train.hpp"

#include <ATen/CPUGeneratorImpl.h>  // getDefaultCPUGenerator

#include <algorithm>  // replace
#include <cerrno>
#include <cstring>  // strerror

namespace lightron {

struct CheckpointCounters {
  int64_t iteration = 0, consumed_samples = 0;
};

// What --load restores besides the weights (Megatron-LM's flags).
struct LoadOptions {
  bool finetune = false;       // weights only: iteration and samples start from 0, fresh AdamW
  bool no_load_optim = false;  // fresh AdamW moments and step
  bool no_load_rng = false;    // keep this run's random state
};

// Written into every manifest; a reader refuses anything else.
constexpr const char* kCheckpointFormat = "lightron-checkpoint-1";

inline std::string iteration_dir(const std::string& dir, int64_t iteration) {
  return fmt::format("{}/iter_{:07d}", dir, iteration);
}
inline std::string rank_file_name(int64_t rank) { return fmt::format("rank_{:05d}.safetensors", rank); }

// ---- the manifest ----------------------------------------------------------------------

// Every GPTConfig field and its name: one list for writing and for reading.
template <typename Config, typename F>
inline void for_each_config_field(Config& c, F&& f) {
  f("num_layers", c.num_layers), f("hidden_size", c.hidden_size), f("ffn_hidden_size", c.ffn_hidden_size);
  f("num_attention_heads", c.num_attention_heads), f("num_query_groups", c.num_query_groups);
  f("seq_length", c.seq_length), f("max_position_embeddings", c.max_position_embeddings);
  f("vocab_size", c.vocab_size), f("normalization", c.normalization);
  f("position_embedding_type", c.position_embedding_type), f("swiglu", c.swiglu);
  f("untie_embeddings_and_output_weights", c.untie_embeddings_and_output_weights);
  f("add_bias_linear", c.add_bias_linear), f("init_method_std", c.init_method_std);
  f("rotary_base", c.rotary_base), f("norm_epsilon", c.norm_epsilon);
}
inline nlohmann::json config_to_json(const GPTConfig& c) {
  nlohmann::json j;
  for_each_config_field(c, [&](const char* key, const auto& value) { j[key] = value; });
  return j;
}
inline GPTConfig config_from_json(const nlohmann::json& j) {
  GPTConfig c;
  for_each_config_field(c, [&](const char* key, auto& value) {
    if (j.contains(key)) j.at(key).get_to(value);
  });
  return c;
}

// Refuses another model: one line naming the field and both values. seq_length and the
// init std do not shape the weights; "0 = derived" fields compare by what they stand for.
inline void check_same_model(const GPTConfig& saved, const GPTConfig& now, const std::string& where) {
  auto shape_of = [](GPTConfig c) {
    c.ffn_hidden_size = c.ffn(), c.num_query_groups = c.query_groups(), c.max_position_embeddings = c.max_positions();
    c.seq_length = 0, c.init_method_std = 0;
    return config_to_json(c);
  };
  const auto a = shape_of(saved), b = shape_of(now);
  for_each_config_field(saved, [&](const std::string& key, const auto&) {  // in the order of the flags
    const auto& value = a.at(key);
    if (b.at(key) == value) return;
    std::string flag = key;
    std::replace(flag.begin(), flag.end(), '_', '-');
    throw UsageError(fmt::format(
        "--load {}: the checkpoint's model has {} {}, this run has {} {}; a different model shape cannot be loaded: "
        "pass the flags it was saved with (its manifest.json lists them){}", where, flag, value.dump(), flag,
        b.at(key).dump(), key == "vocab_size" ? " (the vocabulary is padded to a multiple of "
                                                "--make-vocab-size-divisible-by x tp: choose one that gives the same size)" : ""));
  });
}

// The default CPU generator's state (torch::manual_seed, randn, dropout) as hex.
inline std::string rng_state_hex() {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  const auto state = gen.get_state();
  std::string hex;
  for (int64_t i = 0; i < state.numel(); ++i) hex += fmt::format("{:02x}", state.data_ptr<uint8_t>()[i]);
  return hex;
}
inline void set_rng_state_hex(const std::string& hex) {
  auto state = torch::empty({int64_t(hex.size() / 2)}, torch::kByte);
  for (int64_t i = 0; i < state.numel(); ++i) state.data_ptr<uint8_t>()[i] = uint8_t(std::stoi(hex.substr(2 * i, 2), nullptr, 16));
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

// The TrainConfig fields that shape lr_at(): the scheduler's whole state besides the iteration.
inline nlohmann::json schedule_to_json(const TrainConfig& t) {
  return {{"lr", t.lr}, {"min_lr", t.min_lr}, {"lr_decay_style", t.lr_decay_style},
          {"lr_warmup_iters", t.lr_warmup_iters}, {"lr_decay_iters", t.lr_decay_iters > 0 ? t.lr_decay_iters : t.train_iters}};
}

// ---- writing ---------------------------------------------------------------------------

// A rank's part of one tensor: with spec.dim >= 0, the rows tp_rank holds of every block
// (tp_shard_spec); otherwise `local` is the whole tensor.
struct ShardedTensor {
  std::string name;
  torch::Tensor local;
  ShardSpec spec;
  int64_t tp_rank = 0, tp_size = 1;
};

// Stored next to each tensor: {"global_shape": [...], "dim": d, "pieces": [[global start,
// local start, length], ...]}, one piece per block; no dim: the tensor is whole.
inline nlohmann::json shard_metadata(const ShardedTensor& s) {
  auto global = s.local.sizes().vec();
  nlohmann::json meta;
  if (s.spec.dim >= 0) {
    int64_t g = 0, l = 0;
    for (int64_t block : s.spec.blocks) {
      const int64_t part = block / s.tp_size;
      meta["pieces"].push_back({g + s.tp_rank * part, l, part});
      g += block, l += part;
    }
    global[s.spec.dim] = g;
    meta["dim"] = s.spec.dim;
  }
  meta["global_shape"] = global;
  return meta;
}

// What a checkpoint needs to know of a model besides its optimizer's tensors: a description
// for the manifest (lightron's GPT: its config), how to refuse a checkpoint of another model,
// how each parameter splits over tp, and which pipeline rank saves a parameter that several
// hold. lightron's GPT and any model built from the tensor-parallel layers (its splits read
// from the module tree; no pipeline) have one each.
struct CheckpointModel {
  nlohmann::json description;
  std::function<ShardSpec(const std::string&)> spec_of;
  std::function<void(const nlohmann::json& saved, const std::string& where)> check_same;
  // Whether pipeline rank pp_rank saves a parameter it holds; empty: it does.
  std::function<bool(const std::string& name, int64_t pp_rank, int64_t pp_size)> saved_by_pp_rank;
};
// GPT cut into pp_size x num_virtual chunks (pipeline_parallel.hpp): a parameter is saved by
// its owner, pp_rank_of_parameter (a tied wte by rank 0, not by the last rank's copy).
inline CheckpointModel checkpoint_model(const GPTConfig& c, int64_t num_virtual = 1) {
  auto saved_by = [c, num_virtual](const std::string& name, int64_t pp_rank, int64_t pp_size) {
    require(pp_rank_holds_parameter(name, c.num_layers, pp_size, num_virtual, pp_rank, c.tied()),
            "checkpoint: pipeline rank {} holds '{}', which a cut into {} x {} chunks puts elsewhere; pass the "
            "stage's num_virtual to checkpoint_model(config, num_virtual)", pp_rank, name, pp_size, num_virtual);
    return pp_rank_of_parameter(name, c.num_layers, pp_size, num_virtual) == pp_rank;
  };
  return {config_to_json(c), [c](const std::string& name) { return tp_shard_spec(name, c); },
          [c](const nlohmann::json& saved, const std::string& where) { check_same_model(config_from_json(saved), c, where); },
          saved_by};
}
inline CheckpointModel checkpoint_model(const torch::nn::Module& model, const nlohmann::json& description) {
  auto specs = std::make_shared<std::map<std::string, ShardSpec>>(tp_shard_specs(model));
  return {description,
          [specs](const std::string& name) { return specs->count(name) ? specs->at(name) : ShardSpec{}; },
          [description](const nlohmann::json& saved, const std::string& where) {
            require(saved == description, "--load {}: the checkpoint holds another model ({} there, {} here)", where,
                    saved.dump(), description.dump());
          }};
}

// This rank's share: parameters and moments, each stored once across the grid: dp (and cp)
// ranks > 0 hold replicas, replicated parameters come from tp rank 0, and a parameter that
// several pipeline ranks hold from its owner (the last stage's tied copy of wte is the first
// stage's tensor, bit for bit).
inline std::vector<ShardedTensor> checkpoint_shards(const AdamW& optimizer, const CheckpointModel& model,
                                                    const ProcessGroups& g) {
  std::vector<ShardedTensor> out;
  if (g.coords.dp != 0 || g.coords.cp != 0) return out;
  for (const auto& s : optimizer.slots) {
    const ShardSpec spec = g.layout.tp > 1 ? model.spec_of(s.name) : ShardSpec{};
    if (spec.dim < 0 && g.coords.tp != 0) continue;
    if (model.saved_by_pp_rank && !model.saved_by_pp_rank(s.name, g.coords.pp, g.layout.pp)) continue;
    out.push_back({s.name, s.param.detach(), spec, g.coords.tp, g.layout.tp});
    out.push_back({"exp_avg." + s.name, s.exp_avg, spec, g.coords.tp, g.layout.tp});
    out.push_back({"exp_avg_sq." + s.name, s.exp_avg_sq, spec, g.coords.tp, g.layout.tp});
  }
  return out;
}

// Fault injection for tests/checkpoint_test.sh: LIGHTRON_TEST_CRASH_IN_SAVE=<rank> makes that
// rank die halfway through writing its file, as a crash or `kill -9` would.
inline void crash_here_if_testing(const std::string& path, const std::string& bytes, int64_t rank) {
  const char* victim = std::getenv("LIGHTRON_TEST_CRASH_IN_SAVE");
  if (victim == nullptr || std::atoll(victim) != rank) return;
  std::ofstream(path + ".tmp", std::ios::binary).write(bytes.data(), std::streamsize(bytes.size() / 2));
  fmt::print(stderr, "LIGHTRON_TEST_CRASH_IN_SAVE: rank {} dies halfway through writing {}\n", rank, path);
  std::fflush(stderr);
  std::_Exit(3);
}

// A file operation of the save, whose failure (a full disk, a bad path) run_main prints on this rank.
template <typename F>
inline void on_this_rank(const std::string& what, F&& f) {
  errno = 0;
  try {
    f();
  } catch (const std::exception& e) {  // errno says why a write failed, when the message does not
    const std::string message = first_line(e.what()), reason = errno != 0 ? std::strerror(errno) : "";
    throw RuntimeFailure(fmt::format("checkpoint: cannot {}: {}{}", what, message,
                                     reason.empty() || message.find(reason) != std::string::npos ? "" : " [" + reason + "]"));
  }
}

// One checkpoint, collectively over `world`: every rank writes its shards (maybe none), then
// rank 0 completes `manifest` with the files' sizes and CRC-32s and commits the directory.
// A rank whose launcher is gone writes nothing and commits nothing (resilience.hpp).
inline void write_checkpoint(const std::string& dir, int64_t iteration, nlohmann::json manifest,
                             const std::vector<ShardedTensor>& mine, const Group& world, torch::Device device) {
  namespace fs = std::filesystem;
  const std::string final_dir = iteration_dir(dir, iteration), staging = final_dir + ".tmp";
  stop_if_launcher_gone();
  if (world.rank == 0)
    on_this_rank("create " + staging, [&] { lightron::remove_tree(staging), fs::create_directories(staging); });
  barrier(world);
  auto files = torch::zeros({world.size, 2}, torch::kLong);  // (bytes, CRC-32) per rank; 0 bytes: no file
  if (!mine.empty()) {
    NamedTensors tensors;
    std::map<std::string, std::string> metadata;
    for (const auto& s : mine) tensors.emplace_back(s.name, s.local), metadata[s.name] = shard_metadata(s).dump();
    const std::string bytes = safetensors_bytes(tensors, metadata), path = staging + "/" + rank_file_name(world.rank);
    crash_here_if_testing(path, bytes, world.rank);
    on_this_rank("write this rank's shard", [&] { write_file_atomically(path, bytes); });
    files[world.rank][0] = int64_t(bytes.size());
    files[world.rank][1] = int64_t(crc32(bytes.data(), bytes.size()));
  }
  files = files.to(device);
  all_reduce(world, files);  // every rank has finished writing once this returns
  files = files.cpu();
  if (world.rank == 0) {
    manifest["iteration"] = iteration;
    manifest["files"] = nlohmann::json::object();
    for (int64_t r = 0; r < world.size; ++r)
      if (files[r][0].item<int64_t>() > 0)
        manifest["files"][rank_file_name(r)] = {{"bytes", files[r][0].item<int64_t>()}, {"crc32", files[r][1].item<int64_t>()}};
    stop_if_launcher_gone();  // the last moment before the commit
    on_this_rank("commit " + final_dir, [&] {
      write_file_atomically(staging + "/manifest.json", manifest.dump(2) + "\n");
      lightron::remove_tree(final_dir);  // an older save of the same iteration, if any
      fs::rename(staging, final_dir);
      const nlohmann::json latest = {{"iteration", iteration}, {"directory", fs::path(final_dir).filename().string()}};
      write_file_atomically(dir + "/latest.json", latest.dump(2) + "\n");  // the commit
    });
  }
  barrier(world);
}

inline torch::Device device_of(const AdamW& optimizer) { return optimizer.slots.at(0).param.device(); }

// Saves a model's training state (Trainer and ModelTrainer call this): a collective over every rank.
inline void save_checkpoint(const std::string& dir, CheckpointCounters counters, const CheckpointModel& model,
                            const TrainConfig& t, const AdamW& optimizer, const ProcessGroups& g) {
  const nlohmann::json manifest = {
      {"format", kCheckpointFormat}, {"config", model.description},
      {"layout", {{"tp", g.layout.tp}, {"cp", g.layout.cp}, {"dp", g.layout.dp}, {"pp", g.layout.pp}}},
      {"lr_schedule", schedule_to_json(t)},
      {"data", {{"consumed_samples", counters.consumed_samples}, {"global_batch_size", t.global_batch_size}, {"seed", t.seed}}},
      {"optimizer", {{"name", "AdamW"}, {"step", optimizer.step_count}, {"beta1", optimizer.beta1},
                     {"beta2", optimizer.beta2}, {"eps", optimizer.eps}, {"weight_decay", optimizer.weight_decay}}},
      {"rng", {{"torch_cpu", rng_state_hex()}}}};
  write_checkpoint(dir, counters.iteration, manifest, checkpoint_shards(optimizer, model, g), g.world, device_of(optimizer));
  print0("saved checkpoint {}\n", iteration_dir(dir, counters.iteration));
}

// Full weights from one process (convert_checkpoint --import-hf): a 1x1x1 checkpoint of
// iteration 0 without AdamW or RNG state, which --load reads under any layout.
inline void save_weights(const std::string& dir, const GPTConfig& c, const std::map<std::string, torch::Tensor>& weights) {
  std::vector<ShardedTensor> whole;
  for (const auto& [name, t] : weights) whole.push_back({name, t, ShardSpec{}});
  const nlohmann::json manifest = {
      {"format", kCheckpointFormat}, {"config", config_to_json(c)},
      {"layout", {{"tp", 1}, {"cp", 1}, {"dp", 1}, {"pp", 1}}}, {"data", {{"consumed_samples", 0}}}, {"optimizer", nullptr}};
  write_checkpoint(dir, /*iteration=*/0, manifest, whole, Group{}, torch::kCPU);
}

}  // namespace lightron
