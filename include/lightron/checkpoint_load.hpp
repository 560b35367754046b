// lightron/checkpoint_load.hpp — reading a checkpoint (checkpoint.hpp) back, under any layout.
//   1. find it: --load names a --save directory (latest.json, or else the newest iteration
//      directory with a manifest) or one iter_* directory. Newer directories without a
//      manifest are interrupted saves: skipped, and said so;
//   2. check it: every rank checks each manifest field's type and range, and that what the
//      manifest claims agrees with the files' headers (file names and the layout, F32 dtype,
//      pieces inside their tensors, every row stored exactly once); rank 0 compares every
//      file's size and CRC-32 with the manifest and looks for NaN/inf in every tensor, and
//      every rank hears the verdict, so all refuse the same file with the same one-line error;
//   3. reshard: each rank reassembles the full tensors it needs from the pieces the files
//      describe (global shape; global start, local start, length per block), then cuts its
//      own shard with tp_shard_spec. Loading under the saving layout is the same path.
// Leaves out: reading only the bytes a rank needs (files are read whole). Chapter 5.
#pragma once

#include "checkpoint.hpp"

#include <algorithm>  // sort
#include <set>
#include <tuple>
#include <type_traits>  // is_same_v: the config fields' types

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

// ---- what a manifest may hold ----------------------------------------------------------

// A JSON value as an error shows it: short.
inline std::string shown(const nlohmann::json& v) {
  const std::string s = v.dump();
  return s.size() > 40 ? s.substr(0, 37) + "..." : s;
}

// The value at `keys` in `root`, which must be there and be of `kind`: "a count" (integer
// >= 0), "a size" (integer >= 1), "a CRC-32" (integer < 2^32), "a string", "an object"; else
// one line naming `file` and the field, rather than nlohmann's "[json.exception.type_error...]".
inline const nlohmann::json& checked_field(const nlohmann::json& root, const std::vector<std::string>& keys,
                                           const std::string& kind, const std::string& file) {
  const std::string field = fmt::format("{}", fmt::join(keys, "."));
  const nlohmann::json* at = &root;
  for (const auto& key : keys) {
    require(at->is_object() && at->contains(key), "{}: field {} is missing", file, field);
    at = &(*at)[key];
  }
  const auto& v = *at;
  const bool integer = v.is_number_integer() && (v.is_number_unsigned() ? v.get<uint64_t>() <= uint64_t(INT64_MAX) : true);
  const bool ok = kind == "a count"    ? integer && v.get<int64_t>() >= 0
                  : kind == "a size"   ? integer && v.get<int64_t>() >= 1
                  : kind == "a CRC-32" ? integer && v.get<int64_t>() >= 0 && v.get<int64_t>() <= int64_t(UINT32_MAX)
                  : kind == "a string" ? v.is_string()
                                       : v.is_object();
  require(ok, "{}: field {} must be {}, got {}", file, field, kind, shown(v));
  return v;
}

// The model description: each field lightron's GPTConfig knows must have that field's type.
inline void check_config_types(const nlohmann::json& config, const std::string& file) {
  GPTConfig types;
  for_each_config_field(types, [&](const char* key, const auto& value) {
    using T = std::decay_t<decltype(value)>;
    if (!config.contains(key)) return;
    const auto& v = config[key];
    const bool ok = std::is_same_v<T, bool> ? v.is_boolean() : std::is_same_v<T, std::string> ? v.is_string()
                    : std::is_integral_v<T> ? v.is_number_integer() : v.is_number();
    require(ok, "{}: field config.{} must be {}, got {}", file, key, std::is_same_v<T, bool> ? "true or false"
            : std::is_same_v<T, std::string> ? "a string" : std::is_integral_v<T> ? "an integer" : "a number", shown(v));
  });
}

// The manifest, every field the loader reads checked, and its list of files against its
// layout: the layout tp x cp x dp x pp saves one file per (tp, pp) rank of dp 0 and cp 0.
inline nlohmann::json read_manifest(const std::string& dir) {
  const std::string file = dir + "/manifest.json";
  auto m = nlohmann::json::parse(std::ifstream(file), nullptr, /*allow_exceptions=*/false);
  require(m.is_object() && m.value("format", "") == kCheckpointFormat, "{}: not a {} manifest (unreadable JSON, or "
          "another format)", file, kCheckpointFormat);
  checked_field(m, {"iteration"}, "a count", file);
  checked_field(m, {"data", "consumed_samples"}, "a count", file);
  check_config_types(checked_field(m, {"config"}, "an object", file), file);
  Layout saved;
  for (auto [key, size] : {std::pair<const char*, int64_t*>{"tp", &saved.tp}, {"cp", &saved.cp}, {"dp", &saved.dp},
                           {"pp", &saved.pp}})
    *size = checked_field(m, {"layout", key}, "a size", file).get<int64_t>();
  require(saved.tp <= 32768 && saved.pp <= 32768, "{}: field layout has tp {} and pp {}; at most 32768 each", file,
          saved.tp, saved.pp);
  if (m.contains("optimizer") && !m["optimizer"].is_null()) checked_field(m, {"optimizer", "step"}, "a count", file);
  if (m.contains("rng")) {
    const auto& hex = checked_field(m, {"rng", "torch_cpu"}, "a string", file).get<std::string>();
    const size_t want = rng_state_hex().size();
    require(hex.size() == want && hex.find_first_not_of("0123456789abcdef") == std::string::npos,
            "{}: field rng.torch_cpu must be {} hex digits (the CPU generator's state), got {}", file, want, shown(m["rng"]["torch_cpu"]));
  }
  std::set<std::string> expected;
  for (int64_t pp = 0; pp < saved.pp; ++pp)
    for (int64_t tp = 0; tp < saved.tp; ++tp) expected.insert(rank_file_name(rank_of({tp, 0, 0, pp}, saved)));
  std::set<std::string> listed;
  for (const auto& [name, entry] : checked_field(m, {"files"}, "an object", file).items()) {
    require(expected.count(name) == 1, "{}: lists '{}', which the layout tp {} cp {} dp {} pp {} does not save (files "
            "rank_NNNNN.safetensors of its dp 0, cp 0 ranks)", file, name, saved.tp, saved.cp, saved.dp, saved.pp);
    checked_field(m, {"files", name, "bytes"}, "a count", file), checked_field(m, {"files", name, "crc32"}, "a CRC-32", file);
    listed.insert(name);
  }
  require(listed == expected, "{}: lists {} file(s), but the layout tp {} cp {} dp {} pp {} saves {} ({} ... {})", file,
          listed.size(), saved.tp, saved.cp, saved.dp, saved.pp, expected.size(), *expected.begin(), *expected.rbegin());
  return m;
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

// "" if every tensor of a (checksummed) file parses and is finite, else the reason: a run
// that diverged saves NaN with a perfectly good checksum.
inline std::string check_contents(const std::string& path) {
  try {
    for (const auto& [name, t] : read_safetensors(path).tensors) {
      if (!t.is_floating_point()) continue;
      const int64_t bad = t.numel() - torch::isfinite(t).sum().item<int64_t>();
      if (bad > 0)
        return fmt::format("{}: '{}' holds {} non-finite value(s) (NaN or inf): the run that saved it had diverged; "
                           "load an earlier checkpoint (--load DIR/iter_NNNNNNN)", path, name, bad);
    }
  } catch (const UsageError& e) {
    return e.what();
  }
  return "";
}

// The integers of a JSON array that must hold `size` counts (any size if size < 0), or a
// one-line error naming `where` and `what`.
inline std::vector<int64_t> counts(const nlohmann::json& v, int64_t size, const std::string& where, const std::string& what) {
  bool ok = v.is_array() && (size < 0 || int64_t(v.size()) == size);
  for (size_t i = 0; ok && i < v.size(); ++i) ok = v[i].is_number_integer() && v[i].get<int64_t>() >= 0;
  require(ok, "{}: {} must be {} non-negative integers, got {}", where, what, size < 0 ? "a list of" : std::to_string(size), shown(v));
  return v.get<std::vector<int64_t>>();
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
      index_file(file, safetensors_header(bytes, path + "/" + file));
    }
    for (const auto& [name, stored] : index_) check_rows(name, stored);
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
  std::map<std::string, std::vector<std::pair<std::string, nlohmann::json>>> index_;  // name -> (file, pieces)
  std::map<std::string, SafetensorsFile> files_;                                      // read on first use

  // One file's header: every tensor F32, its metadata a JSON object whose global shape
  // agrees with the tensor's and whose pieces lie inside both; sharded along `dim`, the file
  // holds 1/tp of the rows (tp: the manifest's layout).
  void index_file(const std::string& file, const nlohmann::json& header) {
    const std::string where = path + "/" + file;
    const auto metadata = header.contains("__metadata__") ? header["__metadata__"] : nlohmann::json::object();
    require(metadata.is_object(), "{}: the header's __metadata__ must be an object, got {}", where, shown(metadata));
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") continue;
      const auto dtype = entry.is_object() ? entry.value("dtype", nlohmann::json()) : entry;
      require(dtype == "F32", "{}: '{}' is stored as {}; lightron checkpoints hold F32 tensors only (an edited header?)",
              where, name, shown(dtype));
      const auto shape = counts(entry.value("shape", nlohmann::json()), -1, where, "the shape of '" + name + "'");
      const auto text = metadata.value(name, nlohmann::json("{}"));
      auto meta = nlohmann::json::parse(text.is_string() ? text.get<std::string>() : "", nullptr, /*allow_exceptions=*/false);
      require(meta.is_object(), "{}: the metadata of '{}' must be a JSON object in a string, got {}", where, name, shown(text));
      const auto global = meta.contains("global_shape") ? counts(meta["global_shape"], int64_t(shape.size()), where,
                                                                 "the global_shape of '" + name + "'") : shape;
      if (meta.contains("dim")) check_pieces(where, name, meta, shape, global);
      else require(global == shape, "{}: '{}' is stored whole with shape [{}], but its global_shape says [{}]", where,
                   name, fmt::join(shape, ", "), fmt::join(global, ", "));
      index_[name].push_back({file, meta});
    }
  }

  void check_pieces(const std::string& where, const std::string& name, const nlohmann::json& meta,
                    const std::vector<int64_t>& shape, const std::vector<int64_t>& global) {
    const auto& d = meta["dim"];
    require(d.is_number_integer() && d.get<int64_t>() >= 0 && d.get<int64_t>() < int64_t(shape.size()),
            "{}: '{}' is split along dim {}, but it has {} dimension(s)", where, name, shown(d), shape.size());
    const int64_t dim = d.get<int64_t>();
    for (size_t k = 0; k < shape.size(); ++k)
      require(int64_t(k) == dim || shape[k] == global[k], "{}: '{}' has shape [{}], which is not a slice of its "
              "global_shape [{}] along dim {}", where, name, fmt::join(shape, ", "), fmt::join(global, ", "), dim);
    int64_t rows = 0;
    for (const auto& p : meta.contains("pieces") ? meta["pieces"] : nlohmann::json()) {
      const auto v = counts(p, 3, where, "each piece [global start, local start, length] of '" + name + "'");
      require(v[2] > 0 && v[0] <= global[dim] && v[2] <= global[dim] - v[0] && v[1] <= shape[dim] &&
              v[2] <= shape[dim] - v[1], "{}: the piece [{}] of '{}' lies "
              "outside the tensor ({} rows here, {} in the whole)", where, fmt::join(v, ", "), name, shape[dim], global[dim]);
      rows += v[2];
    }
    require(rows > 0 && rows * saved_tp == global[dim], "{}: holds {} of the {} rows of '{}', but the manifest's layout "
            "(tp {}) gives each tensor-parallel rank 1/{}: the manifest does not describe these files", where, rows,
            global[dim], name, saved_tp, saved_tp);
  }

  // Every row of a sharded tensor in exactly one piece of one file; a whole tensor in one file.
  void check_rows(const std::string& name, const std::vector<std::pair<std::string, nlohmann::json>>& stored) {
    const auto& [first_file, first] = stored.front();
    if (!first.contains("dim")) {
      require(stored.size() == 1, "{}: '{}' is stored whole in {} and again in {}: the files were edited", path, name,
              first_file, stored[1].first);
      return;
    }
    std::vector<std::tuple<int64_t, int64_t, std::string>> pieces;  // global [start, end), file
    for (const auto& [file, meta] : stored) {
      require(meta.contains("dim") && first.contains("dim") && meta["dim"] == first["dim"] &&
              meta["global_shape"] == first["global_shape"], "{}: '{}' is stored in {} and in {} as different tensors "
              "(whole or split another way)", path, name, first_file, file);
      for (const auto& p : meta["pieces"]) pieces.emplace_back(p[0].get<int64_t>(), p[0].get<int64_t>() + p[2].get<int64_t>(), file);
    }
    std::sort(pieces.begin(), pieces.end());
    int64_t next = 0;
    std::string previous = first_file;
    for (const auto& [start, end, file] : pieces) {
      require(start >= next, "{}: rows {}..{} of '{}' are stored twice ({} and {}): the files were edited", path, start,
              std::min(end, next) - 1, name, previous, file);
      require(start == next, "{}: rows {}..{} of '{}' are in no file (a missing file?)", path, next, start - 1, name);
      next = end, previous = file;
    }
    const int64_t size = first["global_shape"][first["dim"].get<size_t>()].get<int64_t>();
    require(next == size, "{}: rows {}..{} of '{}' are in no file (a missing file?)", path, next, size - 1, name);
  }
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
