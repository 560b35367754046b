// lightron/indexed_dataset.hpp — token ids on disk in Megatron-LM's MMapIndexedDataset
// layout (megatron/core/datasets/indexed_dataset.py), so that files made by Megatron's
// tools/preprocess_data.py load here and ours load there.
//
//   PREFIX.idx  "MMIDIDX\0\0" (9 bytes) | version u64 = 1 | dtype code u8 |
//               sequence count N u64 | document count D u64 |
//               lengths int32[N] | byte pointers int64[N] | document indices int64[D]
//   PREFIX.bin  the tokens of every sequence back to back, in the dtype above
//
// All integers are little-endian. Document indices start at 0 and end at N (one entry per
// document boundary, so D = documents + 1); our writer stores one sequence per document.
//
// Leaves out: Megatron's sentence splitting (several sequences in one document), the legacy
// non-mmap "TNTIDX" format, multimodal modes, and big-endian machines.
// Introduced in chapter 0.
#pragma once

#include "core.hpp"

#include <fcntl.h>     // open
#include <sys/mman.h>  // mmap
#include <unistd.h>    // close

#include <cstdint>
#include <cstring>  // memcpy
#include <filesystem>
#include <fstream>
#include <iterator>  // istreambuf_iterator
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace lightron {

// Megatron's dtype codes (DType in indexed_dataset.py). Only the integer ones hold tokens.
enum class TokenDtype : uint8_t {
  kUInt8 = 1, kInt8 = 2, kInt16 = 3, kInt32 = 4, kInt64 = 5, kFloat64 = 6, kFloat32 = 7,
  kUInt16 = 8,
};

// The first 9 bytes of every .idx file.
constexpr char kIndexMagic[] = "MMIDIDX\x00\x00";
constexpr size_t kIndexMagicSize = sizeof(kIndexMagic) - 1;  // 9
// The only .idx version there is.
constexpr uint64_t kIndexVersion = 1;
// magic + version + dtype code + sequence count + document count.
constexpr size_t kIndexHeaderSize = kIndexMagicSize + 8 + 1 + 8 + 8;  // 34
// Ends every message about a missing or broken data file.
constexpr const char* kDataHint = "run `make data` or examples/preprocess_data";

// Megatron's choice (best_fitting_dtype): two bytes a token while the vocabulary fits.
inline TokenDtype dtype_for_vocab(int64_t vocab_size) {
  return vocab_size < 65500 ? TokenDtype::kUInt16 : TokenDtype::kInt32;
}

namespace detail {

// Calls f(T{}) with the C++ type stored for `dtype`; float and unknown codes are an error.
template <typename F>
inline void visit_token_dtype(TokenDtype dtype, const std::string& where, F&& f) {
  switch (dtype) {
    case TokenDtype::kUInt8: return f(uint8_t{});
    case TokenDtype::kInt8: return f(int8_t{});
    case TokenDtype::kInt16: return f(int16_t{});
    case TokenDtype::kInt32: return f(int32_t{});
    case TokenDtype::kInt64: return f(int64_t{});
    case TokenDtype::kUInt16: return f(uint16_t{});
    default:
      throw UsageError(fmt::format("{}: unsupported dtype code {} (token ids must be uint8, int8, "
                                   "int16, int32, int64 or uint16); {}",
                                   where, static_cast<int>(dtype), kDataHint));
  }
}

inline int64_t token_bytes(TokenDtype dtype, const std::string& where) {
  int64_t bytes = 0;
  visit_token_dtype(dtype, where, [&](auto zero) { bytes = sizeof(zero); });
  return bytes;
}

// A read-only memory map of a whole file, unmapped when the last copy goes away.
struct MappedFile {
  const char* data = nullptr;
  size_t size = 0;
  MappedFile(const std::string& path, size_t bytes) : size(bytes) {
    if (size == 0) return;  // mmap refuses empty files; an empty dataset has nothing to read
    int fd = ::open(path.c_str(), O_RDONLY);
    require(fd >= 0, "{}: cannot open for reading; {}", path, kDataHint);
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
    ::close(fd);
    require(p != MAP_FAILED, "{}: mmap of {} bytes failed; {}", path, size, kDataHint);
    data = static_cast<const char*>(p);
  }
  ~MappedFile() {
    if (data) ::munmap(const_cast<char*>(data), size);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
};

inline void require_file(const std::string& path) {
  require(std::filesystem::is_regular_file(path), "{}: file not found; {}", path, kDataHint);
}

// Little-endian POD at `offset` of `bytes` (memcpy: .idx arrays are not aligned).
template <typename T>
inline T idx_load(const std::string& bytes, size_t offset) {
  T value;
  std::memcpy(&value, bytes.data() + offset, sizeof(T));
  return value;
}

template <typename T>
inline void idx_store(std::ofstream& out, T value) {
  out.write(reinterpret_cast<const char*>(&value), sizeof(T));
}

}  // namespace detail

// Writes PREFIX.bin as documents arrive and PREFIX.idx at finalize().
class IndexedDatasetWriter {
 public:
  IndexedDatasetWriter(std::string prefix, TokenDtype dtype)
      : prefix_(std::move(prefix)), dtype_(dtype) {
    token_bytes_ = detail::token_bytes(dtype_, prefix_ + ".idx");
    auto dir = std::filesystem::path(prefix_).parent_path();
    if (!dir.empty()) std::filesystem::create_directories(dir);
    bin_.open(prefix_ + ".bin", std::ios::binary | std::ios::trunc);
    require(bin_.good(), "{}.bin: cannot open for writing; check --output-prefix", prefix_);
  }

  // One document = one sequence. Every id must fit the dtype (uint16: 0..65535).
  void add_document(const std::vector<int64_t>& tokens) {
    require(!finalized_, "{}: add_document after finalize", prefix_);
    require(tokens.size() <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
            "{}: a document of {} tokens does not fit the int32 length field", prefix_,
            tokens.size());
    std::vector<char> buffer(tokens.size() * token_bytes_);
    detail::visit_token_dtype(dtype_, prefix_ + ".idx", [&](auto zero) {
      using T = decltype(zero);
      for (size_t k = 0; k < tokens.size(); ++k) {
        require(tokens[k] >= std::numeric_limits<T>::min() &&
                    tokens[k] <= std::numeric_limits<T>::max(),
                "{}: token id {} does not fit the dataset dtype (check --vocab-size)", prefix_,
                tokens[k]);
        T value = static_cast<T>(tokens[k]);
        std::memcpy(buffer.data() + k * sizeof(T), &value, sizeof(T));
      }
    });
    bin_.write(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    lengths_.push_back(static_cast<int32_t>(tokens.size()));
    num_tokens_ += static_cast<int64_t>(tokens.size());
  }

  void finalize() {
    require(!finalized_, "{}: finalize called twice", prefix_);
    finalized_ = true;
    bin_.close();
    require(!bin_.fail(), "{}.bin: write failed (disk full?)", prefix_);
    std::ofstream idx(prefix_ + ".idx", std::ios::binary | std::ios::trunc);
    require(idx.good(), "{}.idx: cannot open for writing; check --output-prefix", prefix_);
    auto n = static_cast<uint64_t>(lengths_.size());
    idx.write(kIndexMagic, kIndexMagicSize);
    detail::idx_store<uint64_t>(idx, kIndexVersion);
    detail::idx_store<uint8_t>(idx, static_cast<uint8_t>(dtype_));
    detail::idx_store<uint64_t>(idx, n);      // sequences
    detail::idx_store<uint64_t>(idx, n + 1);  // document boundaries
    for (int32_t length : lengths_) detail::idx_store<int32_t>(idx, length);
    int64_t pointer = 0;  // byte offset of each sequence in .bin
    for (int32_t length : lengths_) {
      detail::idx_store<int64_t>(idx, pointer);
      pointer += length * token_bytes_;
    }
    for (uint64_t d = 0; d <= n; ++d) detail::idx_store<int64_t>(idx, static_cast<int64_t>(d));
    require(idx.good(), "{}.idx: write failed (disk full?)", prefix_);
  }

  int64_t num_documents() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t num_tokens() const { return num_tokens_; }

 private:
  std::string prefix_;
  TokenDtype dtype_;
  int64_t token_bytes_ = 0;
  std::ofstream bin_;
  std::vector<int32_t> lengths_;
  int64_t num_tokens_ = 0;
  bool finalized_ = false;
};

// Reads PREFIX.idx into memory and maps PREFIX.bin; checks that the two agree. Copying it
// copies the index (12 bytes a sequence), never the tokens.
class IndexedDataset {
 public:
  explicit IndexedDataset(std::string prefix) : prefix_(std::move(prefix)) {
    const std::string idx_path = prefix_ + ".idx", bin_path = prefix_ + ".bin";
    detail::require_file(idx_path);
    detail::require_file(bin_path);
    std::ifstream in(idx_path, std::ios::binary);
    const std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    require(bytes.size() >= kIndexMagicSize &&
                std::memcmp(bytes.data(), kIndexMagic, kIndexMagicSize) == 0,
            "{}: bad magic (not a Megatron MMapIndexedDataset index); {}", idx_path, kDataHint);
    require(bytes.size() >= kIndexHeaderSize, "{}: truncated header ({} bytes); {}", idx_path,
            bytes.size(), kDataHint);
    auto version = detail::idx_load<uint64_t>(bytes, kIndexMagicSize);
    require(version == kIndexVersion, "{}: unsupported version {} (only {}); {}", idx_path,
            version, kIndexVersion, kDataHint);
    dtype_ = static_cast<TokenDtype>(detail::idx_load<uint8_t>(bytes, kIndexMagicSize + 8));
    const int64_t token_bytes = detail::token_bytes(dtype_, idx_path);
    const auto n = detail::idx_load<uint64_t>(bytes, kIndexMagicSize + 9);
    const auto d = detail::idx_load<uint64_t>(bytes, kIndexMagicSize + 17);
    const size_t expected = kIndexHeaderSize + n * (4 + 8) + d * 8;
    require(n < (uint64_t{1} << 40) && d < (uint64_t{1} << 40) && bytes.size() == expected,
            "{}: {} bytes, but {} sequences and {} document indices need {}: truncated or "
            "corrupt; {}", idx_path, bytes.size(), n, d, expected, kDataHint);
    size_t offset = kIndexHeaderSize;
    int64_t total = 0;
    for (uint64_t i = 0; i < n; ++i, offset += 4) {
      lengths_.push_back(detail::idx_load<int32_t>(bytes, offset));
      require(lengths_.back() >= 0, "{}: negative length of sequence {}; {}", idx_path, i,
              kDataHint);
    }
    for (uint64_t i = 0; i < n; ++i, offset += 8) {
      pointers_.push_back(detail::idx_load<int64_t>(bytes, offset));
      require(pointers_.back() == total * token_bytes,
              "{}: byte pointer of sequence {} disagrees with the lengths: corrupt; {}", idx_path,
              i, kDataHint);
      total += lengths_[i];
    }
    for (uint64_t i = 0; i < d; ++i, offset += 8)
      document_indices_.push_back(detail::idx_load<int64_t>(bytes, offset));
    num_tokens_ = total;
    const auto bin_size = std::filesystem::file_size(bin_path);
    require(bin_size == static_cast<uintmax_t>(total * token_bytes),
            "{}: {} bytes, but {} says {} tokens of {} bytes = {}: truncated or corrupt; {}",
            bin_path, bin_size, idx_path, total, token_bytes, total * token_bytes, kDataHint);
    bin_ = std::make_shared<const detail::MappedFile>(bin_path, static_cast<size_t>(bin_size));
  }

  int64_t num_sequences() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t num_tokens() const { return num_tokens_; }
  int64_t sequence_length(int64_t i) const { return lengths_.at(static_cast<size_t>(i)); }
  TokenDtype dtype() const { return dtype_; }
  const std::string& prefix() const { return prefix_; }
  // Megatron's document boundaries, in sequences: {0, ..., num_sequences()}.
  const std::vector<int64_t>& document_indices() const { return document_indices_; }

  // out[0, count) = tokens [offset, offset + count) of sequence i, widened to int64.
  void copy_tokens(int64_t i, int64_t offset, int64_t count, int64_t* out) const {
    require(offset >= 0 && count >= 0 && offset + count <= sequence_length(i),
            "{}.bin: tokens [{}, {}) outside sequence {} of length {}", prefix_, offset,
            offset + count, i, sequence_length(i));
    const char* src = bin_->data + pointers_[static_cast<size_t>(i)];
    detail::visit_token_dtype(dtype_, prefix_, [&](auto zero) {  // dtype checked on open
      using T = decltype(zero);
      for (int64_t k = 0; k < count; ++k) {
        T value;
        std::memcpy(&value, src + (offset + k) * static_cast<int64_t>(sizeof(T)), sizeof(T));
        out[k] = value;
      }
    });
  }

  std::vector<int64_t> sequence(int64_t i) const {
    std::vector<int64_t> tokens(static_cast<size_t>(sequence_length(i)));
    copy_tokens(i, 0, sequence_length(i), tokens.data());
    return tokens;
  }

  // The largest id in the whole .bin (-1 if empty): compare it with --vocab-size. O(tokens).
  int64_t max_token_id() const {
    int64_t max_id = -1;
    std::vector<int64_t> tokens;
    for (int64_t i = 0; i < num_sequences(); ++i) {
      tokens.resize(static_cast<size_t>(sequence_length(i)));
      copy_tokens(i, 0, sequence_length(i), tokens.data());
      for (int64_t t : tokens) max_id = std::max(max_id, t);
    }
    return max_id;
  }

 private:
  std::string prefix_;
  TokenDtype dtype_ = TokenDtype::kUInt16;
  std::vector<int32_t> lengths_;           // tokens per sequence
  std::vector<int64_t> pointers_;          // byte offset of each sequence in .bin
  std::vector<int64_t> document_indices_;  // {0, ..., num_sequences()}
  int64_t num_tokens_ = 0;
  std::shared_ptr<const detail::MappedFile> bin_;
};

}  // namespace lightron
