// Tests of the data chapter (indexed_dataset.hpp, data.hpp): the Megatron file format byte
// by byte, splits, GPT samples, the mock dataset, the data-parallel sampler and its cursor,
// and the one-line errors a user sees.
#include "testing.hpp"

#include <atomic>
#include <filesystem>
#include <fstream>
#include <set>

namespace test_data_detail {

namespace fs = std::filesystem;
using lightron::UsageError;

// A fresh directory under the system temp dir, removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() /
           fmt::format("lightron_test_data_{}_{}", ::getpid(), counter++);
    lightron::remove_tree(path);
    fs::create_directories(path);
  }
  ~TempDir() { lightron::remove_tree(path); }
  std::string prefix(const std::string& name) const { return (path / name).string(); }
};

inline std::string write_dataset(const TempDir& dir, const std::string& name,
                                 lightron::TokenDtype dtype,
                                 const std::vector<std::vector<int64_t>>& docs) {
  auto prefix = dir.prefix(name);
  lightron::IndexedDatasetWriter writer(prefix, dtype);
  for (const auto& doc : docs) writer.add_document(doc);
  writer.finalize();
  return prefix;
}

inline std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

inline std::vector<int64_t> to_vector(const torch::Tensor& t) {
  auto c = t.contiguous();
  return {c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel()};
}

// Little-endian bytes of an integer, for spelling out the expected .idx file.
template <typename T>
inline std::string le(T value) {
  std::string bytes(sizeof(T), '\0');
  for (size_t k = 0; k < sizeof(T); ++k)
    bytes[k] = static_cast<char>((static_cast<uint64_t>(value) >> (8 * k)) & 0xFF);
  return bytes;
}

// The test cases live in the namespace too: in the unity build other files' using-directives
// must not make these helpers' names ambiguous.

TEST_CASE("data: writer and reader round-trip uint16 and int32") {
  TempDir dir;
  const std::vector<std::vector<int64_t>> docs = {{1, 2, 3}, {}, {65535, 0}, {7}};
  for (auto dtype : {lightron::TokenDtype::kUInt16, lightron::TokenDtype::kInt32}) {
    CAPTURE(static_cast<int>(dtype));
    auto prefix = write_dataset(dir, "rt" + std::to_string(static_cast<int>(dtype)), dtype, docs);
    lightron::IndexedDataset data(prefix);
    CHECK(data.dtype() == dtype);
    REQUIRE(data.num_sequences() == 4);
    CHECK(data.num_tokens() == 6);
    for (int64_t i = 0; i < 4; ++i) CHECK(data.sequence(i) == docs[static_cast<size_t>(i)]);
    CHECK(data.max_token_id() == 65535);
    CHECK(data.document_indices() == std::vector<int64_t>{0, 1, 2, 3, 4});
  }
  auto big = write_dataset(dir, "big", lightron::TokenDtype::kInt32, {{100000, -5}});
  CHECK(lightron::IndexedDataset(big).sequence(0) == std::vector<int64_t>{100000, -5});
  CHECK(lightron::dtype_for_vocab(2048) == lightron::TokenDtype::kUInt16);
  CHECK(lightron::dtype_for_vocab(65500) == lightron::TokenDtype::kInt32);
}

TEST_CASE("data: the .idx bytes are Megatron's MMapIndexedDataset layout") {
  TempDir dir;
  auto prefix = write_dataset(dir, "tiny", lightron::TokenDtype::kUInt16, {{1, 2, 3}, {4, 5}});
  const std::string expected = std::string("MMIDIDX\0\0", 9)  // offset 0: magic
                               + le<uint64_t>(1)              // 9: version
                               + le<uint8_t>(8)               // 17: dtype code (uint16)
                               + le<uint64_t>(2)              // 18: sequences
                               + le<uint64_t>(3)              // 26: document indices
                               + le<int32_t>(3) + le<int32_t>(2)       // 34: lengths
                               + le<int64_t>(0) + le<int64_t>(6)       // 42: byte pointers
                               + le<int64_t>(0) + le<int64_t>(1) + le<int64_t>(2);  // 58
  const auto idx = read_bytes(prefix + ".idx");
  CHECK(idx.size() == 82);
  CHECK(idx == expected);
  CHECK(read_bytes(prefix + ".bin") == le<uint16_t>(1) + le<uint16_t>(2) + le<uint16_t>(3) +
                                           le<uint16_t>(4) + le<uint16_t>(5));
  auto prefix32 = write_dataset(dir, "tiny32", lightron::TokenDtype::kInt32, {{1, 2, 3}, {4, 5}});
  CHECK(read_bytes(prefix32 + ".idx")[17] == 4);                       // int32 code
  CHECK(read_bytes(prefix32 + ".idx").substr(50, 8) == le<int64_t>(12));  // 3 tokens x 4 bytes
}

TEST_CASE("data: splits follow Megatron's rounding") {
  auto s = lightron::split_documents("969,30,1", 1000);
  CHECK(s.train.begin == 0);
  CHECK(s.train.size() == 969);
  CHECK(s.valid.size() == 30);
  CHECK(s.test.size() == 1);
  CHECK(s.test.end == 1000);
  // Megatron: valid and test rounded on their own (half to even), train takes the rest.
  auto t = lightron::split_documents("1,1,1", 10);
  CHECK(t.train.size() == 4);
  CHECK(t.valid.size() == 3);
  CHECK(t.test.size() == 3);
  auto u = lightron::split_documents("98/2", 50);  // '/' works too; a missing weight is 0
  CHECK(u.train.size() == 49);
  CHECK(u.valid.size() == 1);
  CHECK(u.test.size() == 0);
  CHECK(lightron::split_documents("0,1,1", 3).train.size() == 0);  // never negative
  for (const char* bad : {"", "abc", "1,x,1", "1,2,3,4", "0,0,0", "-1,2,3", "1,,2", "1,2,",
                          "1e400,1,1"}) {
    CAPTURE(bad);
    CHECK_THROWS_WITH_AS(lightron::split_documents(bad, 100), doctest::Contains("--split"),
                         UsageError);
  }
}

TEST_CASE("data: GPT samples run across document boundaries; y is x shifted by one") {
  TempDir dir;
  // Documents hold consecutive numbers so that any stream order is easy to check.
  auto prefix = write_dataset(dir, "gpt", lightron::TokenDtype::kUInt16,
                              {{0, 1, 2}, {10, 11, 12, 13}, {}, {20, 21}, {30, 31, 32, 33, 34}});
  lightron::IndexedDataset indexed(prefix);
  lightron::GPTDataset data(indexed, {0, 5}, /*seq_length=*/3, /*seed=*/1234);
  CHECK(data.num_tokens() == 14);
  CHECK(data.size() == (14 - 1) / 3);
  // Reassembling the samples gives the documents back, whole, in some order.
  std::vector<int64_t> stream;
  for (int64_t i = 0; i < data.size(); ++i) {
    auto sample = to_vector(data.get(i));
    REQUIRE(sample.size() == 4);
    if (i > 0) CHECK(sample.front() == stream.back());  // neighbours share one token
    stream.insert(stream.end(), sample.begin() + (i == 0 ? 0 : 1), sample.end());
  }
  std::multiset<int64_t> seen(stream.begin(), stream.end());
  CHECK(seen.size() == 13);  // 4 samples of 3 new tokens + 1: all but one token
  int boundaries = 0;
  for (size_t k = 1; k < stream.size(); ++k) boundaries += stream[k] / 10 != stream[k - 1] / 10;
  CHECK(boundaries >= 2);  // samples crossed documents
  for (size_t k = 1; k < stream.size(); ++k)
    if (stream[k] / 10 == stream[k - 1] / 10) CHECK(stream[k] == stream[k - 1] + 1);
  CHECK(to_vector(data.get(data.size() + 1)) == to_vector(data.get(1)));  // wraps
  // Same seed, same order; the batch is x and y = x shifted by one.
  lightron::GPTDataset again(indexed, {0, 5}, 3, 1234);
  auto batch = lightron::make_batch(again, {0, 2});
  CHECK(batch.tokens.sizes() == torch::IntArrayRef({2, 3}));
  CHECK(batch.labels.sizes() == torch::IntArrayRef({2, 3}));
  CHECK(batch.tokens.dtype() == torch::kInt64);
  CHECK(to_vector(batch.tokens[0]) == std::vector<int64_t>(stream.begin(), stream.begin() + 3));
  CHECK(to_vector(batch.labels[0]) == std::vector<int64_t>(stream.begin() + 1, stream.begin() + 4));
  CHECK(torch::equal(batch.tokens.slice(1, 1), batch.labels.slice(1, 0, -1)));
  // A split that is too short for one sample names the flag to change.
  CHECK_THROWS_WITH_AS(lightron::GPTDataset(indexed, {3, 4}, 3, 0),
                       doctest::Contains("--seq-length"), UsageError);
}

TEST_CASE("data: mock samples are deterministic and learnable") {
  lightron::MockGPTDataset a(/*vocab_size=*/64, /*seq_length=*/16, /*num_samples=*/100, 7);
  lightron::MockGPTDataset b(64, 16, 100, 7), c(64, 16, 100, 8);
  CHECK(a.size() == 100);
  bool differs = false;
  for (int64_t i = 0; i < 10; ++i) {
    auto x = to_vector(a.get(i));
    REQUIRE(x.size() == 17);
    CHECK(x == to_vector(b.get(i)));
    differs |= x != to_vector(c.get(i));
    const int64_t stride = ((x[1] - x[0]) % 64 + 64) % 64;
    CHECK(stride >= 1);
    CHECK(stride <= lightron::MockGPTDataset::kMockMaxStride);
    for (size_t k = 1; k < x.size(); ++k) CHECK(x[k] == (x[k - 1] + stride) % 64);
  }
  CHECK(differs);
  CHECK(to_vector(a.get(3)) != to_vector(a.get(4)));
}

TEST_CASE("data: the sampler gives dp ranks disjoint slices and resumes from its cursor") {
  const int64_t num_samples = 103, gbs = 8, micro = 2;  // 12 batches an epoch, 7 dropped
  for (int dp : {1, 2, 4}) {
    CAPTURE(dp);
    std::vector<lightron::DataSampler> ranks;
    for (int r = 0; r < dp; ++r) ranks.emplace_back(num_samples, gbs, micro, r, dp, 42);
    CHECK(ranks[0].num_micro_batches() == gbs / (micro * dp));
    for (int epoch = 0; epoch < 2; ++epoch) {
      std::vector<std::set<int64_t>> per_rank(static_cast<size_t>(dp));
      std::vector<int64_t> all;
      for (int64_t step = 0; step < ranks[0].batches_per_epoch(); ++step) {
        for (int r = 0; r < dp; ++r) {
          CHECK(ranks[static_cast<size_t>(r)].epoch() == epoch);
          auto micro_batches = ranks[static_cast<size_t>(r)].next_global_batch();
          REQUIRE(micro_batches.size() == static_cast<size_t>(gbs / (micro * dp)));
          for (const auto& mb : micro_batches) {
            REQUIRE(mb.size() == static_cast<size_t>(micro));
            per_rank[static_cast<size_t>(r)].insert(mb.begin(), mb.end());
            all.insert(all.end(), mb.begin(), mb.end());
          }
        }
      }
      std::set<int64_t> union_set(all.begin(), all.end());
      CHECK(all.size() == 96);        // nothing read twice ...
      CHECK(union_set.size() == 96);  // ... and every rank's slice is disjoint
      size_t sum = 0;
      for (const auto& s : per_rank) sum += s.size();
      CHECK(sum == 96);
      // Exactly the first 96 samples of this epoch's shuffle.
      auto order = lightron::shuffled_range(num_samples, 42 + static_cast<uint64_t>(epoch));
      CHECK(union_set == std::set<int64_t>(order.begin(), order.begin() + 96));
    }
    CHECK(ranks[0].consumed_samples == 2 * 96);
  }
  // Resume: a new sampler with the saved cursor continues with the same batches.
  lightron::DataSampler run(num_samples, gbs, micro, 1, 2, 5);
  for (int k = 0; k < 15; ++k) run.next_global_batch();  // crosses into epoch 1
  lightron::DataSampler resumed(num_samples, gbs, micro, 1, 2, 5);
  resumed.consumed_samples = run.consumed_samples;
  for (int k = 0; k < 12; ++k) CHECK(resumed.next_global_batch() == run.next_global_batch());
  // Epochs differ in order.
  lightron::DataSampler e(num_samples, gbs, micro, 0, 1, 5);
  auto first = e.next_global_batch();
  e.consumed_samples = 96;
  CHECK(e.next_global_batch() != first);
}

TEST_CASE("data: errors name the file or flag and say what to do") {
  TempDir dir;
  CHECK_THROWS_WITH_AS(lightron::IndexedDataset(dir.prefix("nothing")),
                       doctest::Contains("nothing.idx: file not found; run `make data`"),
                       UsageError);
  auto prefix = write_dataset(dir, "ok", lightron::TokenDtype::kUInt16, {{1, 2, 3}, {4, 5}});
  const auto idx = read_bytes(prefix + ".idx"), bin = read_bytes(prefix + ".bin");
  auto rewrite = [](const std::string& path, const std::string& bytes) {
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  };
  rewrite(prefix + ".bin", bin.substr(0, bin.size() - 2));
  CHECK_THROWS_WITH_AS(lightron::IndexedDataset{prefix},
                       doctest::Contains("ok.bin: 8 bytes, but"), UsageError);
  CHECK_THROWS_WITH_AS(lightron::IndexedDataset{prefix}, doctest::Contains("truncated"),
                       UsageError);
  rewrite(prefix + ".bin", bin);
  CHECK(lightron::IndexedDataset(prefix).num_tokens() == 5);
  rewrite(prefix + ".idx", "NOTMAGIC!" + idx.substr(9));
  CHECK_THROWS_WITH_AS(lightron::IndexedDataset{prefix}, doctest::Contains("ok.idx: bad magic"),
                       UsageError);
  rewrite(prefix + ".idx", idx.substr(0, 9) + le<uint64_t>(2) + idx.substr(17));
  CHECK_THROWS_WITH_AS(lightron::IndexedDataset{prefix},
                       doctest::Contains("ok.idx: unsupported version 2"), UsageError);
  rewrite(prefix + ".idx", idx.substr(0, 17) + le<uint8_t>(7) + idx.substr(18));
  CHECK_THROWS_WITH_AS(lightron::IndexedDataset{prefix},
                       doctest::Contains("ok.idx: unsupported dtype code 7"), UsageError);
  rewrite(prefix + ".idx", idx.substr(0, idx.size() - 8));
  CHECK_THROWS_WITH_AS(lightron::IndexedDataset{prefix}, doctest::Contains("ok.idx: 74 bytes"),
                       UsageError);
  fs::remove(prefix + ".bin");
  CHECK_THROWS_WITH_AS(lightron::IndexedDataset{prefix},
                       doctest::Contains("ok.bin: file not found"), UsageError);
  CHECK_THROWS_WITH_AS(lightron::DataSampler(100, 10, 4, 0, 1, 0),
                       doctest::Contains("--global-batch-size (10) must be a positive multiple "
                                         "of --micro-batch-size (4) x data-parallel size (1)"),
                       UsageError);
  CHECK_THROWS_WITH_AS(lightron::DataSampler(100, 8, 2, 0, 8, 0),
                       doctest::Contains("--global-batch-size"), UsageError);
  CHECK_THROWS_WITH_AS(lightron::split_documents("1,2,3,4", 10),
                       doctest::Contains("--split '1,2,3,4'"), UsageError);
  lightron::IndexedDatasetWriter writer(dir.prefix("small"), lightron::TokenDtype::kUInt16);
  CHECK_THROWS_WITH_AS(writer.add_document({70000}), doctest::Contains("--vocab-size"),
                       UsageError);
}

TEST_CASE("data: SentencePiece pieces decode to text") {
  TempDir dir;
  const auto path = dir.prefix("t.vocab");
  std::ofstream(path) << "<unk>\t0\n<s>\t0\n</s>\t0\n<n>\t0\n<0x41>\t0\n"
                         "\xE2\x96\x81Hello\t-1\n,\t-2\n\xE2\x96\x81world\t-3\n";
  lightron::SpmVocab vocab(path);
  CHECK(vocab.size() == 8);
  CHECK(vocab.decode({1, 5, 6, 7, 3, 4, 2, 0, 999}) == " Hello, world\nA");
  CHECK_THROWS_WITH_AS(lightron::SpmVocab(dir.prefix("missing.vocab")),
                       doctest::Contains("missing.vocab: file not found"), UsageError);
  CHECK_THROWS_WITH_AS(lightron::encode_with_cli(dir.prefix("missing.model"), "hi"),
                       doctest::Contains("missing.model"), UsageError);
}

#ifdef LIGHTRON_SOURCE_DIR
TEST_CASE("data: the prepared corpus loads, and spm_encode + decode give the text back") {
  const std::string data_dir = std::string(LIGHTRON_SOURCE_DIR) + "/data/";
  if (!fs::exists(data_dir + "tokenizer.model") ||
      !fs::exists(data_dir + "fortunes_text_document.idx")) {
    MESSAGE("skipped: no prepared corpus (run `make data`)");
    return;
  }
  lightron::IndexedDataset corpus(data_dir + "fortunes_text_document");
  lightron::SpmVocab vocab(data_dir + "tokenizer.vocab");
  CHECK(vocab.size() == 2048);
  CHECK(corpus.max_token_id() < vocab.size());
  CHECK(corpus.sequence(0).back() == 2);  // --append-eod: </s>
  auto ids = lightron::encode_with_cli(data_dir + "tokenizer.model", "Hello, world!\nBye.");
  CHECK(ids.size() >= 4);
  CHECK(vocab.decode(ids) == " Hello, world!\nBye.");  // SentencePiece's leading space kept
}
#endif

}  // namespace test_data_detail
