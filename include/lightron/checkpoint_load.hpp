// lightron/checkpoint_load.hpp — reading a checkpoint (checkpoint.hpp) back, under any layout.
//   1. find it: --load names a --save directory (latest.json, or else the newest iteration
//      directory with a manifest) or one iter_* directory. Newer directories without a
//      manifest are interrupted saves: skipped, and said so;
//   2. check it: every rank reads the manifest and the files' headers (checkpoint_check.hpp:
//      field types, the layout against the files, dtype, pieces, rows); rank 0 compares every
//      file's size and CRC-32 with the manifest and looks for NaN/inf in every tensor, and
//      every rank hears the verdict, so all refuse the same file with the same one-line error;
//   3. reshard: each rank reassembles the full tensors it needs from the pieces the files
//      describe (global shape; global start, local start, length per block), then cuts its
//      own shard with tp_shard_spec. Loading under the saving layout is the same path.
// Leaves out: reading only the bytes a rank needs (files are read whole). Chapter 5.
#pragma once

#include "checkpoint.hpp"
#include "checkpoint_check.hpp"  // read_manifest, the shards' headers, NaN

namespace lightron {

struct FoundCheckpoint {
  std::string path;                  // the iteration directory to load
  std::vector<std::string> skipped;  // newer, incomplete ones
};

inline FoundCheckpoint find_checkpoint(const std::string& dir) {
  namespace fs = std::filesystem;
  require(fs::is_directory(dir), "--load {}: no such directory", dir);
  if (fs::exists(dir + "/manifest.json")) return {dir, {}};
  auto complete = [&](int64_t it) { return fs::exists(iteration_dir(dir, it) + "/manifest.json"); };
  std::map<int64_t, std::vector<std::string>> incomplete;  // iteration -> directories
  int64_t chosen = -1, newest = -1;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (!entry.is_directory() || name.rfind("iter_", 0) != 0 || name.size() < 12) continue;
    const int64_t it = std::atoll(name.substr(5, 7).c_str());
    if (name.size() == 12 && complete(it)) newest = std::max(newest, it);
    else incomplete[it].push_back(entry.path().string());
  }
  const auto latest = nlohmann::json::parse(std::ifstream(dir + "/latest.json"), nullptr, /*allow_exceptions=*/false);
  if (latest.is_object() && latest.contains("iteration") && latest["iteration"].is_number_integer() &&
      complete(latest["iteration"].get<int64_t>()))
    chosen = latest["iteration"].get<int64_t>();
  else if (newest >= 0)
    print0("--load {}: latest.json is missing or points to an incomplete directory; using the newest complete "
           "checkpoint, iteration {}\n", dir, newest), chosen = newest;
  require(chosen >= 0, "--load {}: no complete checkpoint here (no iter_* directory with a manifest.json{})", dir,
          incomplete.empty() ? "" : "; only interrupted saves");
  FoundCheckpoint found{iteration_dir(dir, chosen), {}};
  for (const auto& [it, dirs] : incomplete)
    if (it > chosen) found.skipped.insert(found.skipped.end(), dirs.begin(), dirs.end());
  return found;
}

// "" if the file matches its manifest entry, else the one-line reason (naming the file).
inline std::string check_file(const std::string& path, const nlohmann::json& expected) {
  const std::string hint = "the checkpoint is damaged: load an earlier one (--load DIR/iter_NNNNNNN)";
  if (!std::filesystem::exists(path)) return fmt::format("{}: missing, but the manifest lists it; {}", path, hint);
  const auto bytes = int64_t(std::filesystem::file_size(path)), want = expected.at("bytes").get<int64_t>();
  if (bytes != want) return fmt::format("{}: truncated or overwritten ({} bytes, the manifest says {}); {}", path, bytes, want, hint);
  std::ifstream in(path, std::ios::binary);
  std::vector<char> buffer(1 << 20);
  uint32_t crc = 0;
  while (in.read(buffer.data(), std::streamsize(buffer.size())) || in.gcount() > 0) crc = crc32(buffer.data(), size_t(in.gcount()), crc);
  const auto want_crc = expected.at("crc32").get<uint32_t>();
  if (crc != want_crc)
    return fmt::format("{}: checksum mismatch (CRC-32 {:08x}, the manifest says {:08x}); {}", path, crc, want_crc, hint);
  return "";
}

class CheckpointReader {
 public:
  std::string path;  // the iteration directory
  std::vector<std::string> skipped;
  nlohmann::json manifest;
  int64_t saved_tp = 1;  // the manifest's layout

  // A collective over `world` (a default Group: this process alone). `device`: where the
  // group's collectives run (NCCL needs CUDA tensors).
  explicit CheckpointReader(const std::string& dir, const Group& world = Group{}, torch::Device device = torch::kCPU) {
    auto found = find_checkpoint(dir);
    path = found.path, skipped = found.skipped;
    manifest = read_manifest(path);  // every rank: the same manifest, the same verdict
    saved_tp = manifest["layout"]["tp"].get<int64_t>();
    std::string problem;  // rank 0 reads every file; the others learn which one failed
    auto verdict = torch::full({1}, -1, torch::kLong);
    if (world.rank == 0) {
      int64_t i = 0;
      for (const auto& [file, expected] : manifest["files"].items()) {
        problem = check_file(path + "/" + file, expected);
        if (problem.empty()) problem = check_contents(path + "/" + file);
        if (!problem.empty()) {
          verdict[0] = i;
          break;
        }
        ++i;
      }
    }
    verdict = verdict.to(device);
    broadcast(world, verdict, 0);
    const int64_t bad = verdict.cpu()[0].item<int64_t>();
    if (bad >= 0) throw UsageError(world.rank == 0 ? problem : fmt::format("{}: file {} of the manifest is damaged", path, bad));
    for (const auto& [file, expected] : manifest["files"].items()) {  // the headers say who holds what
      std::ifstream in(path + "/" + file, std::ios::binary);
      std::string bytes(8, '\0');
      in.read(bytes.data(), 8);
      uint64_t n = 0;
      std::memcpy(&n, bytes.data(), 8);
      bytes.resize(8 + std::min<uint64_t>(n, expected.at("bytes").get<uint64_t>()));
      in.read(bytes.data() + 8, std::streamsize(bytes.size() - 8));
      index_shard_header(path, file, safetensors_header(bytes, path + "/" + file), saved_tp, index_);
    }
    for (const auto& [name, stored] : index_) check_tensor_rows(path, name, stored);
  }

  bool has(const std::string& name) const { return index_.count(name) > 0; }

  // The full tensor, assembled from every file that holds a piece of it (checked on construction).
  torch::Tensor full(const std::string& name) {
    auto it = index_.find(name);
    require(it != index_.end(), "--load {}: the checkpoint has no '{}' (saved from another model?)", path, name);
    torch::Tensor out;
    for (const auto& [file, meta] : it->second) {
      if (!files_.count(file)) files_[file] = read_safetensors(path + "/" + file);
      const torch::Tensor& local = files_[file].tensors.at(name);
      if (!meta.contains("dim")) return local;  // stored whole
      const int64_t dim = meta["dim"].get<int64_t>();
      if (!out.defined()) out = torch::empty(meta.at("global_shape").get<std::vector<int64_t>>(), local.options());
      for (const auto& p : meta.at("pieces"))
        out.narrow(dim, p[0].get<int64_t>(), p[2].get<int64_t>()).copy_(local.narrow(dim, p[1].get<int64_t>(), p[2].get<int64_t>()));
    }
    return out;
  }

  // Every tensor of the checkpoint, whole: the weights, and the AdamW moments if asked.
  std::map<std::string, torch::Tensor> consolidate(bool with_optimizer = true) {
    std::map<std::string, torch::Tensor> out;
    for (const auto& entry : index_)
      if (with_optimizer || entry.first.rfind("exp_avg", 0) != 0) out[entry.first] = full(entry.first);
    return out;
  }

 private:
  std::map<std::string, StoredPieces> index_;     // name -> (file, pieces)
  std::map<std::string, SafetensorsFile> files_;  // read on first use
};

// Restores a Trainer's state in place (trainer.hpp calls this), under this run's layout,
// whatever the saving one was. A collective over every rank; refuses another model shape.
inline CheckpointCounters load_checkpoint(const std::string& dir, const LoadOptions& o, const CheckpointModel& model,
                                          const TrainConfig& t, AdamW& optimizer, const ProcessGroups& g) {
  CheckpointReader reader(dir, g.world, device_of(optimizer));
  for (const auto& s : reader.skipped)
    print0("--load: skipped {}: incomplete (its save was interrupted before the manifest was written)\n", s);
  const auto& m = reader.manifest;
  model.check_same(m.at("config"), reader.path);
  const bool with_optimizer = !o.finetune && !o.no_load_optim && m.value("optimizer", nlohmann::json()).is_object();
  torch::NoGradGuard no_grad;
  for (auto& s : optimizer.slots) {
    const ShardSpec spec = g.layout.tp > 1 ? model.spec_of(s.name) : ShardSpec{};
    auto restore = [&](torch::Tensor& into, const std::string& key) {
      const auto whole = reader.full(key);
      auto want = into.sizes().vec();  // the whole tensor's shape in this run
      if (spec.dim >= 0) want[size_t(spec.dim)] *= g.layout.tp;
      require(whole.sizes() == want, "--load {}: {} is {} there, {} here", reader.path, key, fmt::join(whole.sizes(), "x"),
              fmt::join(want, "x"));
      into.copy_(shard(whole, spec, g.coords.tp, g.layout.tp));
    };
    restore(s.param, s.name);
    if (with_optimizer) restore(s.exp_avg, "exp_avg." + s.name), restore(s.exp_avg_sq, "exp_avg_sq." + s.name);
    else s.exp_avg.zero_(), s.exp_avg_sq.zero_();
  }
  optimizer.step_count = with_optimizer ? m["optimizer"].at("step").get<int64_t>() : 0;
  const bool with_rng = !o.finetune && !o.no_load_rng && m.contains("rng");
  if (with_rng) set_rng_state_hex(m["rng"].at("torch_cpu").get<std::string>());
  const auto& l = m.at("layout");
  print0("loaded {} (saved as tp {} cp {} dp {} pp {}): weights{}{}{}\n", reader.path, l.at("tp").get<int64_t>(),
         l.at("cp").get<int64_t>(), l.at("dp").get<int64_t>(), l.at("pp").get<int64_t>(),
         with_optimizer ? ", AdamW state" : ", fresh AdamW", with_rng ? ", RNG state" : "",
         o.finetune ? " (--finetune: iteration and samples start from 0)" : ", counters");
  if (!o.finetune && m.contains("lr_schedule") && m["lr_schedule"] != schedule_to_json(t))
    print0("note: the learning-rate schedule differs from the checkpoint's ({} there, {} here); the flags win\n",
           m["lr_schedule"].dump(), schedule_to_json(t).dump());
  if (o.finetune) return {};
  return {m.at("iteration").get<int64_t>(), m.at("data").at("consumed_samples").get<int64_t>()};
}

}  // namespace lightron
