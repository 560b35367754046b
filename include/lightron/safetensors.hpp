// lightron/safetensors.hpp — the safetensors file format, read and written by hand:
//     8 bytes    N, the header's length (little-endian u64)
//     N bytes    JSON: {"wte.weight": {"dtype": "F32", "shape": [64, 32],
//                                       "data_offsets": [0, 8192]}, ...,
//                       "__metadata__": {"any key": "a string"}}
//     the rest   every tensor's raw little-endian bytes, back to back
// Unlike a pickle, nothing in it is executable, and any reader can load it (HuggingFace's,
// or the thirty lines in tests/hf_check.py). Also here: CRC-32, to refuse a corrupted file,
// and writing a file atomically (temporary name, fsync, rename), so that a crash never
// leaves a half-written file under the real name.
// Leaves out: memory-mapping (files are read whole), big-endian hosts.
// Introduced in chapter 5 (checkpoints).
#pragma once

#include "core.hpp"

#include <fmt/ranges.h>  // fmt::join
#include <nlohmann/json.hpp>
#include <unistd.h>  // fsync

#include <array>
#include <cstdio>
#include <cstring>  // memcpy
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <vector>

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data is little-endian, as this host must be");

namespace lightron {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// CRC-32 as zlib.crc32 (reflected polynomial 0xEDB88320): crc32("123456789") = 0xCBF43926.
// Pass the previous value as `crc` to continue over a file read in pieces.
inline uint32_t crc32(const char* data, size_t size, uint32_t crc = 0) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (size_t i = 0; i < size; ++i) crc = table[(crc ^ static_cast<uint8_t>(data[i])) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  require(in.good(), "{}: cannot open the file", path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Writes path.tmp, flushes it to disk, then renames it to path: readers see the old file or
// the whole new one, never a part.
inline void write_file_atomically(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  require(f != nullptr, "{}: cannot open for writing (is the directory writable?)", tmp);
  const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size() && std::fflush(f) == 0 &&
                  ::fsync(fileno(f)) == 0;
  std::fclose(f);
  require(ok, "{}: writing {} bytes failed (is the disk full?)", tmp, bytes.size());
  std::filesystem::rename(tmp, path);
}

// safetensors dtype names.
inline std::string safetensors_dtype(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat: return "F32";
    case torch::kDouble: return "F64";
    case torch::kBFloat16: return "BF16";
    case torch::kHalf: return "F16";
    case torch::kLong: return "I64";
    case torch::kInt: return "I32";
    case torch::kByte: return "U8";
    case torch::kBool: return "BOOL";
    default: throw UsageError(fmt::format("safetensors: no dtype name for {}", c10::toString(t)));
  }
}
inline torch::ScalarType scalar_type_of(const std::string& dtype, const std::string& path) {
  static const std::map<std::string, torch::ScalarType> types = {
      {"F32", torch::kFloat}, {"F64", torch::kDouble}, {"BF16", torch::kBFloat16}, {"F16", torch::kHalf},
      {"I64", torch::kLong}, {"I32", torch::kInt}, {"U8", torch::kByte}, {"BOOL", torch::kBool}};
  auto it = types.find(dtype);
  require(it != types.end(), "{}: unsupported dtype '{}' in the header", path, dtype);
  return it->second;
}

// The file's bytes: header (padded with spaces to 8 bytes, as the reference writer does),
// then the tensors in the given order.
inline std::string safetensors_bytes(const NamedTensors& tensors, const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  std::vector<torch::Tensor> data;
  int64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    data.push_back(t.detach().cpu().contiguous());
    const int64_t size = nbytes(data.back());
    header[name] = {{"dtype", safetensors_dtype(t.scalar_type())}, {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + size}}};
    offset += size;
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  const uint64_t n = json.size();
  std::memcpy(out.data(), &n, 8);
  out.reserve(8 + json.size() + static_cast<size_t>(offset));
  out += json;
  for (const auto& t : data)
    if (t.numel() > 0) out.append(static_cast<const char*>(t.data_ptr()), static_cast<size_t>(nbytes(t)));
  return out;
}

inline void write_safetensors(const std::string& path, const NamedTensors& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  write_file_atomically(path, safetensors_bytes(tensors, metadata));
}

struct SafetensorsFile {
  std::map<std::string, torch::Tensor> tensors;
  std::map<std::string, std::string> metadata;
};

// The header alone (the first 8 + N bytes are enough); `path` names the file in errors.
inline nlohmann::json safetensors_header(const std::string& bytes, const std::string& path) {
  require(bytes.size() >= 8, "{}: truncated ({} bytes; a safetensors file starts with an 8-byte header length)", path,
          bytes.size());
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  require(n <= bytes.size() - 8, "{}: truncated ({} bytes, but the header alone claims {})", path, bytes.size(), n + 8);
  auto header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<int64_t>(n), nullptr,
                                      /*allow_exceptions=*/false);
  require(header.is_object(), "{}: the header is not a JSON object (a corrupted or non-safetensors file)", path);
  return header;
}

// Parses a whole file; every inconsistency is one line naming the file.
inline SafetensorsFile parse_safetensors(const std::string& bytes, const std::string& path) {
  const auto header = safetensors_header(bytes, path);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  const int64_t data_start = 8 + static_cast<int64_t>(n), available = static_cast<int64_t>(bytes.size()) - data_start;
  SafetensorsFile file;
  try {
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        file.metadata = entry.get<std::map<std::string, std::string>>();
        continue;
      }
      const auto shape = entry.at("shape").get<std::vector<int64_t>>();
      const auto offsets = entry.at("data_offsets").get<std::vector<int64_t>>();
      const auto dtype = scalar_type_of(entry.at("dtype").get<std::string>(), path);
      int64_t size = int64_t(c10::elementSize(dtype));  // from the header, before anything is allocated
      for (int64_t d : shape)
        require(d >= 0 && !__builtin_mul_overflow(size, d, &size), "{}: '{}' has an impossible shape [{}]", path, name,
                fmt::join(shape, ", "));
      require(offsets.size() == 2 && offsets[0] >= 0 && offsets[1] - offsets[0] == size,
              "{}: '{}' has data_offsets [{}] for {} bytes of data", path, name, fmt::join(offsets, ", "), size);
      require(offsets[1] <= available, "{}: truncated ({} bytes of data, but '{}' ends at byte {})", path, available,
              name, offsets[1]);
      auto t = torch::empty(shape, dtype);
      if (t.numel() > 0) std::memcpy(t.data_ptr(), bytes.data() + data_start + offsets[0], static_cast<size_t>(nbytes(t)));
      file.tensors[name] = t;
    }
  } catch (const nlohmann::json::exception& e) {
    throw UsageError(fmt::format("{}: malformed header ({})", path, first_line(e.what())));
  }
  return file;
}

inline SafetensorsFile read_safetensors(const std::string& path) { return parse_safetensors(read_file(path), path); }

}  // namespace lightron
