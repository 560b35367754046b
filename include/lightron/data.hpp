// lightron/data.hpp — from token files to batches: train/valid/test splits of the documents,
// GPT samples of T+1 tokens that run across document boundaries, a learnable mock dataset,
// and a data-parallel sampler whose cursor (`consumed_samples`) a checkpoint saves.
// (SentencePiece decoding and encoding: tokenizer.hpp.)
//
// Leaves out: Megatron's blended datasets, its on-disk sample-index cache, the
// end-of-document attention mask and position reset, and batch-size ramp-up.
// Introduced in chapter 0.
#pragma once

#include "core.hpp"
#include "indexed_dataset.hpp"
#include "tokenizer.hpp"  // data/tokenizer.vocab -> text, text -> ids

#include <algorithm>  // upper_bound
#include <cmath>   // nearbyint
#include <cstdio>  // popen
#include <cstdlib>  // mkstemp
#include <filesystem>
#include <fstream>
#include <random>  // mt19937_64
#include <sstream>

#include <unistd.h>  // close

namespace lightron {

// ---- splits ---------------------------------------------------------------------------

// Documents [begin, end) of an indexed dataset (one sequence = one document here).
struct DocRange {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
};
struct SplitRanges {
  DocRange train, valid, test;
};

// --split "969,30,1" (or "969/30/1"; missing weights are 0) over n documents, as Megatron's
// get_train_valid_test_split_: with w normalised, valid = round(w_1 n) and test = round(w_2 n)
// (Python's round: half to even), train = the rest, in that order. Where Megatron would give
// a negative train part we shrink test, then valid, instead.
inline SplitRanges split_documents(const std::string& split, int64_t n) {
  auto fail = [&](const std::string& why) {
    return UsageError(fmt::format("--split '{}': {}; expected up to three non-negative weights "
                                  "like 969,30,1", split, why));
  };
  const char separator = split.find('/') != std::string::npos ? '/' : ',';
  std::vector<double> w;
  std::stringstream in(split);
  if (!split.empty() && split.back() == separator) throw fail("it ends with a separator");
  for (std::string part; std::getline(in, part, separator);) {
    size_t used = 0;
    double x = 0;
    try { x = std::stod(part, &used); } catch (const std::exception&) { used = 0; }
    if (used == 0 || part.find_first_not_of(" \t", used) != std::string::npos)
      throw fail(fmt::format("'{}' is not a number", part));
    if (!(x >= 0 && std::isfinite(x))) throw fail(fmt::format("{} is not a weight >= 0", part));
    w.push_back(x);
  }
  if (w.empty() || w.size() > 3) throw fail(fmt::format("{} weights", w.size()));
  w.resize(3, 0.0);
  const double sum = w[0] + w[1] + w[2];
  if (!(sum > 0)) throw fail("the weights sum to 0");
  auto part = [&](double weight) {
    return static_cast<int64_t>(std::nearbyint(weight / sum * static_cast<double>(n)));
  };
  const int64_t valid = std::min(part(w[1]), n);
  const int64_t test = std::min(part(w[2]), n - valid);
  const int64_t train = n - valid - test;
  return {{0, train}, {train, train + valid}, {train + valid, n}};
}

// ---- samples --------------------------------------------------------------------------

// What a trainer draws samples from: sample i is T+1 token ids, x = [0, T), y = [1, T+1).
struct GPTSampleSource {
  virtual ~GPTSampleSource() = default;
  virtual int64_t size() const = 0;                // samples in one epoch
  virtual torch::Tensor get(int64_t i) const = 0;  // (T+1,) int64; i >= size() wraps
};

// A permutation of [0, n) that is the same on every platform (std::shuffle is not).
inline std::vector<int64_t> shuffled_range(int64_t n, uint64_t seed) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  std::mt19937_64 rng(seed);
  for (int64_t i = n - 1; i > 0; --i)  // Fisher-Yates
    std::swap(order[static_cast<size_t>(i)], order[rng() % static_cast<uint64_t>(i + 1)]);
  return order;
}

// The documents of one split, in an order shuffled by `seed`, read as one token stream;
// sample i = stream[i T, i T + T + 1), so consecutive samples share one token (as Megatron).
// Requests past one epoch wrap around to the same samples; the sampler reorders them.
class GPTDataset : public GPTSampleSource {
 public:
  GPTDataset(IndexedDataset indexed, DocRange docs, int64_t seq_length, uint64_t seed)
      : indexed_(std::move(indexed)), seq_length_(seq_length) {
    require(docs.begin >= 0 && docs.begin <= docs.end && docs.end <= indexed_.num_sequences(),
            "{}: documents [{}, {}) outside the {} in the dataset", indexed_.prefix(), docs.begin,
            docs.end, indexed_.num_sequences());
    require(seq_length > 0, "--seq-length ({}) must be positive", seq_length);
    for (int64_t k : shuffled_range(docs.size(), seed)) {
      order_.push_back(docs.begin + k);
      starts_.push_back(num_tokens_);
      num_tokens_ += indexed_.sequence_length(docs.begin + k);
    }
    require(num_tokens_ > seq_length, "{}: documents [{}, {}) hold {} tokens, fewer than "
            "--seq-length + 1 ({}); use more data, a shorter --seq-length or another --split",
            indexed_.prefix(), docs.begin, docs.end, num_tokens_, seq_length + 1);
  }

  int64_t size() const override { return (num_tokens_ - 1) / seq_length_; }
  int64_t num_tokens() const { return num_tokens_; }

  torch::Tensor get(int64_t i) const override {
    require(i >= 0, "{}: sample index {} is negative", indexed_.prefix(), i);
    auto sample = torch::empty({seq_length_ + 1}, torch::kInt64);  // (T+1,)
    int64_t* out = sample.data_ptr<int64_t>();
    int64_t position = (i % size()) * seq_length_, needed = seq_length_ + 1;
    // The last document that starts at or before `position` (empty ones are skipped).
    auto k = static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), position) -
                                 starts_.begin() - 1);
    for (; needed > 0; ++k) {
      const int64_t offset = position - starts_[k];
      const int64_t count = std::min(needed, indexed_.sequence_length(order_[k]) - offset);
      indexed_.copy_tokens(order_[k], offset, count, out);
      out += count, position += count, needed -= count;
    }
    return sample;
  }

 private:
  IndexedDataset indexed_;
  int64_t seq_length_;
  std::vector<int64_t> order_;   // sequence ids in stream order
  std::vector<int64_t> starts_;  // where order_[k] starts in the stream
  int64_t num_tokens_ = 0;
};

// A mixer of 64-bit integers (splitmix64): unrelated outputs for neighbouring inputs.
inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Samples without files, for tests and the no-data quick start: token k of sample i is
// (a + k s) mod V with a start a and a stride s in [1, kMockMaxStride] drawn from (seed, i).
// A model that reads the first tokens can predict the rest, so the loss falls.
class MockGPTDataset : public GPTSampleSource {
 public:
  // Strides are 1..kMockMaxStride: enough variety that the model must infer s from context.
  static constexpr int64_t kMockMaxStride = 8;

  MockGPTDataset(int64_t vocab_size, int64_t seq_length, int64_t num_samples, uint64_t seed)
      : vocab_size_(vocab_size), seq_length_(seq_length), num_samples_(num_samples), seed_(seed) {
    require(vocab_size >= 2 && seq_length >= 1 && num_samples >= 1,
            "mock data needs --vocab-size >= 2 ({}), --seq-length >= 1 ({}) and at least one "
            "sample ({})", vocab_size, seq_length, num_samples);
  }

  int64_t size() const override { return num_samples_; }

  torch::Tensor get(int64_t i) const override {
    const uint64_t h = mix64(seed_ ^ mix64(static_cast<uint64_t>(i % num_samples_)));
    const auto start = static_cast<int64_t>(h % static_cast<uint64_t>(vocab_size_));
    const auto stride = 1 + static_cast<int64_t>((h >> 32) % kMockMaxStride);
    return (torch::arange(seq_length_ + 1, torch::kInt64) * stride + start) % vocab_size_;
  }

 private:
  int64_t vocab_size_, seq_length_, num_samples_;
  uint64_t seed_;
};

// ---- sampler --------------------------------------------------------------------------

// Which samples each data-parallel rank reads, step after step. Epoch e visits the samples
// in the order shuffled_range(num_samples, seed + e); a global batch is the next
// global_batch_size of them, and dp rank r takes the contiguous slice
// [r GBS/dp, (r+1) GBS/dp), cut into micro-batches. A partial global batch at the end of an
// epoch is dropped (drop last): those samples are skipped for that epoch only.
class DataSampler {
 public:
  // The cursor: samples consumed by all dp ranks together. Save it in a checkpoint and set
  // it again to resume with exactly the batches that would have come next.
  int64_t consumed_samples = 0;

  DataSampler(int64_t num_samples, int64_t global_batch_size, int64_t micro_batch_size,
              int dp_rank, int dp_size, uint64_t seed)
      : num_samples_(num_samples), global_batch_size_(global_batch_size),
        micro_batch_size_(micro_batch_size), dp_rank_(dp_rank), dp_size_(dp_size), seed_(seed) {
    require(micro_batch_size > 0 && dp_size > 0 && dp_rank >= 0 && dp_rank < dp_size,
            "--micro-batch-size ({}) must be positive and dp rank {} within data-parallel "
            "size {}", micro_batch_size, dp_rank, dp_size);
    require(global_batch_size > 0 && global_batch_size % (micro_batch_size * dp_size) == 0,
            "--global-batch-size ({}) must be a positive multiple of --micro-batch-size ({}) x "
            "data-parallel size ({})", global_batch_size, micro_batch_size, dp_size);
    require(num_samples >= global_batch_size, "the dataset has {} samples, fewer than "
            "--global-batch-size ({}); use more data or a smaller batch", num_samples,
            global_batch_size);
  }

  int64_t num_micro_batches() const {
    return global_batch_size_ / (micro_batch_size_ * dp_size_);
  }
  int64_t batches_per_epoch() const { return num_samples_ / global_batch_size_; }
  int64_t epoch() const { return consumed_samples / (batches_per_epoch() * global_batch_size_); }

  // This rank's micro-batches of the next global batch (sample indices); advances the cursor.
  std::vector<std::vector<int64_t>> next_global_batch() {
    require(consumed_samples >= 0 && consumed_samples % global_batch_size_ == 0,
            "consumed samples ({}) is not a multiple of --global-batch-size ({}): resume with "
            "the batch size the checkpoint was trained with", consumed_samples,
            global_batch_size_);
    if (permutation_epoch_ != epoch()) {
      permutation_ = shuffled_range(num_samples_, seed_ + static_cast<uint64_t>(epoch()));
      permutation_epoch_ = epoch();
    }
    const int64_t used_per_epoch = batches_per_epoch() * global_batch_size_;
    // [snippet: rank_slice]
    const int64_t per_rank = global_batch_size_ / dp_size_;
    int64_t next = consumed_samples % used_per_epoch + dp_rank_ * per_rank;
    // [end snippet: rank_slice]
    std::vector<std::vector<int64_t>> micro_batches(static_cast<size_t>(num_micro_batches()));
    for (auto& micro : micro_batches)
      for (int64_t b = 0; b < micro_batch_size_; ++b)
        micro.push_back(permutation_[static_cast<size_t>(next++)]);
    consumed_samples += global_batch_size_;
    return micro_batches;
  }

 private:
  int64_t num_samples_, global_batch_size_, micro_batch_size_;
  int dp_rank_, dp_size_;
  uint64_t seed_;
  std::vector<int64_t> permutation_;  // the sample order of epoch permutation_epoch_
  int64_t permutation_epoch_ = -1;
};

struct Batch {
  torch::Tensor tokens;  // (B, T) int64, the inputs x
  torch::Tensor labels;  // (B, T) int64, the targets y: x shifted left by one
};

inline Batch make_batch(const GPTSampleSource& source, const std::vector<int64_t>& indices) {
  require(!indices.empty(), "make_batch needs at least one sample index");
  std::vector<torch::Tensor> rows;
  for (int64_t i : indices) rows.push_back(source.get(i));
  // [snippet: make_batch]
  auto samples = torch::stack(rows);  // (B, T+1)
  return {samples.slice(1, 0, -1).contiguous(), samples.slice(1, 1).contiguous()};
  // [end snippet: make_batch]
}

}  // namespace lightron
