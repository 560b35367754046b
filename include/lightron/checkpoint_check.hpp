// lightron/checkpoint_check.hpp — what a checkpoint (checkpoint.hpp) may claim, checked before
// checkpoint_load.hpp trusts it. A CRC-32 catches a flipped bit, not an edit whose checksums
// were recomputed, nor a run that diverged and saved NaN; so, each a one-line error naming
// the file and the field or tensor (never nlohmann's "[json.exception...]" or a LibTorch
// "Dimension out of range"):
//   * the manifest: every field the loader reads exists and has its type and range, and the
//     files it lists are exactly those its layout saves (one per tp x pp rank of dp 0, cp 0);
//   * each shard's header: F32 tensors only, metadata that is JSON, a global shape that the
//     local one is a slice of, pieces inside both, each file holding 1/tp of a split tensor,
//     and every row of every tensor stored exactly once;
//   * the data: no NaN or inf in any weight or AdamW moment.
// Leaves out: checking values against the model (check_same in checkpoint.hpp does the shape).
// Chapter 5.
#pragma once

#include "checkpoint.hpp"

#include <algorithm>  // sort
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>  // is_same_v: the config fields' types
#include <utility>
#include <vector>

namespace lightron {

// ---- what a manifest may hold ----------------------------------------------------------

// A JSON value as an error shows it: short.
inline std::string short_json(const nlohmann::json& v) {
  const std::string s = v.dump();
  return s.size() > 40 ? s.substr(0, 37) + "..." : s;
}

// What a field of a checkpoint's JSON must be, as its error says it.
constexpr const char* kFieldCount = "an integer >= 0";
constexpr const char* kFieldSize = "an integer >= 1";
constexpr const char* kFieldCrc = "a CRC-32 (an integer below 2^32)";
constexpr const char* kFieldString = "a string";
constexpr const char* kFieldObject = "an object";

// The value at `keys` in `root`, which must be there and be `kind` (one of the above); else
// one line naming `file` and the field, rather than nlohmann's "[json.exception.type_error.302] ...".
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
  const bool ok = kind == kFieldCount    ? integer && v.get<int64_t>() >= 0
                  : kind == kFieldSize   ? integer && v.get<int64_t>() >= 1
                  : kind == kFieldCrc    ? integer && v.get<int64_t>() >= 0 && v.get<int64_t>() <= int64_t(UINT32_MAX)
                  : kind == kFieldString ? v.is_string()
                                         : v.is_object();
  require(ok, "{}: field {} must be {}, got {}", file, field, kind, short_json(v));
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
            : std::is_same_v<T, std::string> ? "a string" : std::is_integral_v<T> ? "an integer" : "a number", short_json(v));
  });
}

// The manifest, every field the loader reads checked, and its list of files against its
// layout: the layout tp x cp x dp x pp saves one file per (tp, pp) rank of dp 0 and cp 0.
inline nlohmann::json read_manifest(const std::string& dir) {
  const std::string file = dir + "/manifest.json";
  auto m = nlohmann::json::parse(std::ifstream(file), nullptr, /*allow_exceptions=*/false);
  require(m.is_object() && m.value("format", "") == kCheckpointFormat, "{}: not a {} manifest (unreadable JSON, or "
          "another format)", file, kCheckpointFormat);
  checked_field(m, {"iteration"}, kFieldCount, file);
  checked_field(m, {"data", "consumed_samples"}, kFieldCount, file);
  check_config_types(checked_field(m, {"config"}, kFieldObject, file), file);
  Layout saved;
  for (auto [key, size] : {std::pair<const char*, int64_t*>{"tp", &saved.tp}, {"cp", &saved.cp}, {"dp", &saved.dp},
                           {"pp", &saved.pp}})
    *size = checked_field(m, {"layout", key}, kFieldSize, file).get<int64_t>();
  require(saved.tp <= 32768 && saved.cp <= 32768 && saved.dp <= 32768 && saved.pp <= 32768,
          "{}: field layout has tp {} cp {} dp {} pp {}; at most 32768 each", file, saved.tp, saved.cp, saved.dp, saved.pp);
  if (m.contains("optimizer") && !m["optimizer"].is_null()) checked_field(m, {"optimizer", "step"}, kFieldCount, file);
  if (m.contains("rng")) {
    const auto& hex = checked_field(m, {"rng", "torch_cpu"}, kFieldString, file).get<std::string>();
    const size_t want = rng_state_hex().size();
    require(hex.size() == want && hex.find_first_not_of("0123456789abcdef") == std::string::npos,
            "{}: field rng.torch_cpu must be {} hex digits (the CPU generator's state), got {}", file, want,
            short_json(m["rng"]["torch_cpu"]));
  }
  const auto& files = checked_field(m, {"files"}, kFieldObject, file);
  require(int64_t(files.size()) == saved.tp * saved.pp, "{}: lists {} file(s), but the layout tp {} cp {} dp {} pp {} "
          "saves tp x pp = {}", file, files.size(), saved.tp, saved.cp, saved.dp, saved.pp, saved.tp * saved.pp);
  std::set<std::string> expected;
  for (int64_t pp = 0; pp < saved.pp; ++pp)
    for (int64_t tp = 0; tp < saved.tp; ++tp) expected.insert(rank_file_name(rank_of({tp, 0, 0, pp}, saved)));
  for (const auto& [name, entry] : files.items()) {  // as many as expected: each expected, each once
    require(expected.count(name) == 1, "{}: lists '{}', which the layout tp {} cp {} dp {} pp {} does not save (files "
            "rank_NNNNN.safetensors of its dp 0, cp 0 ranks)", file, name, saved.tp, saved.cp, saved.dp, saved.pp);
    checked_field(m, {"files", name, "bytes"}, kFieldCount, file);
    checked_field(m, {"files", name, "crc32"}, kFieldCrc, file);
  }
  return m;
}

// ---- the data --------------------------------------------------------------------------

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
inline std::vector<int64_t> json_counts(const nlohmann::json& v, int64_t size, const std::string& where, const std::string& what) {
  bool ok = v.is_array() && (size < 0 || int64_t(v.size()) == size);
  for (size_t i = 0; ok && i < v.size(); ++i) ok = v[i].is_number_integer() && v[i].get<int64_t>() >= 0;
  require(ok, "{}: {} must be {} non-negative integers, got {}", where, what, size < 0 ? "a list of" : std::to_string(size), short_json(v));
  return v.get<std::vector<int64_t>>();
}

// ---- the shards' headers -----------------------------------------------------------------

// Where a tensor is stored: (file, its metadata), one per file holding it or a piece of it.
using StoredPieces = std::vector<std::pair<std::string, nlohmann::json>>;

// A tensor split along meta["dim"]: the dim exists, the local shape is a slice of the global
// one, every piece [global start, local start, length] lies inside both, and the file holds
// 1/tp of the rows (tp: the manifest's layout).
inline void check_shard_pieces(const std::string& where, const std::string& name, const nlohmann::json& meta,
                         const std::vector<int64_t>& shape, const std::vector<int64_t>& global, int64_t saved_tp) {
  const auto& d = meta["dim"];
  require(d.is_number_integer() && d.get<int64_t>() >= 0 && d.get<int64_t>() < int64_t(shape.size()),
          "{}: '{}' is split along dim {}, but it has {} dimension(s)", where, name, short_json(d), shape.size());
  const int64_t dim = d.get<int64_t>();
  for (size_t k = 0; k < shape.size(); ++k)
    require(int64_t(k) == dim || shape[k] == global[k], "{}: '{}' has shape [{}], which is not a slice of its "
            "global_shape [{}] along dim {}", where, name, fmt::join(shape, ", "), fmt::join(global, ", "), dim);
  int64_t rows = 0;
  for (const auto& p : meta.contains("pieces") ? meta["pieces"] : nlohmann::json()) {
    const auto v = json_counts(p, 3, where, "each piece [global start, local start, length] of '" + name + "'");
    require(v[2] > 0 && v[0] <= global[dim] && v[2] <= global[dim] - v[0] && v[1] <= shape[dim] && v[2] <= shape[dim] - v[1],
            "{}: the piece [{}] of '{}' lies outside the tensor ({} rows here, {} in the whole)", where,
            fmt::join(v, ", "), name, shape[dim], global[dim]);
    rows += v[2];
  }
  require(rows > 0 && rows * saved_tp == global[dim], "{}: holds {} of the {} rows of '{}', but the manifest's layout "
          "(tp {}) gives each tensor-parallel rank 1/{}: the manifest does not describe these files", where, rows,
          global[dim], name, saved_tp, saved_tp);
}

// One file's header: every tensor F32, its metadata a JSON object in a string whose global
// shape agrees with the tensor's (check_shard_pieces when split); adds each tensor's (file,
// metadata) to `index`.
inline void index_shard_header(const std::string& dir, const std::string& file, const nlohmann::json& header,
                               int64_t saved_tp, std::map<std::string, StoredPieces>& index) {
  const std::string where = dir + "/" + file;
  const auto metadata = header.contains("__metadata__") ? header["__metadata__"] : nlohmann::json::object();
  require(metadata.is_object(), "{}: the header's __metadata__ must be an object, got {}", where, short_json(metadata));
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    const auto dtype = entry.is_object() ? entry.value("dtype", nlohmann::json()) : entry;
    require(dtype == "F32", "{}: '{}' is stored as {}; lightron checkpoints hold F32 tensors only (an edited header?)",
            where, name, short_json(dtype));
    const auto shape = json_counts(entry.value("shape", nlohmann::json()), -1, where, "the shape of '" + name + "'");
    const auto text = metadata.value(name, nlohmann::json("{}"));
    auto meta = nlohmann::json::parse(text.is_string() ? text.get<std::string>() : "", nullptr, /*allow_exceptions=*/false);
    require(meta.is_object(), "{}: the metadata of '{}' must be a JSON object in a string, got {}", where, name, short_json(text));
    const auto global = meta.contains("global_shape") ? json_counts(meta["global_shape"], int64_t(shape.size()), where,
                                                               "the global_shape of '" + name + "'") : shape;
    if (meta.contains("dim")) check_shard_pieces(where, name, meta, shape, global, saved_tp);
    else require(global == shape, "{}: '{}' is stored whole with shape [{}], but its global_shape says [{}]", where,
                 name, fmt::join(shape, ", "), fmt::join(global, ", "));
    index[name].push_back({file, meta});
  }
}

// Every row of a sharded tensor in exactly one piece of one file; a whole tensor in one file.
// `path`: the iteration directory.
inline void check_tensor_rows(const std::string& path, const std::string& name, const StoredPieces& stored) {
  const auto& [first_file, first] = stored.front();
  if (!first.contains("dim")) {
    require(stored.size() == 1, "{}: '{}' is stored whole in {} and again in {}: the files were edited", path, name,
            first_file, stored[1].first);
    return;
  }
  std::vector<std::tuple<int64_t, int64_t, std::string>> pieces;  // global [start, end), file
  for (const auto& [file, meta] : stored) {
    require(meta.contains("dim") && meta["dim"] == first["dim"] && meta["global_shape"] == first["global_shape"],
            "{}: '{}' is stored in {} and in {} as different tensors (whole or split another way)", path, name,
            first_file, file);
    for (const auto& p : meta["pieces"])
      pieces.emplace_back(p[0].get<int64_t>(), p[0].get<int64_t>() + p[2].get<int64_t>(), file);
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

}  // namespace lightron
