// Activation recompute (recompute.hpp): full and selective recompute give the same losses,
// gradient norms and weights as no recompute, bit for bit, on every layout; the flags'
// combinations are checked; and the activation bytes each rank keeps, measured by the
// counting allocator (activation_meter.hpp), agree with the --dry-run estimate (memory.hpp).
#include "testing.hpp"

namespace test_recompute_detail {
using namespace lightron;
using namespace lightron_testing;

RecomputeOptions recompute(const std::string& granularity, const std::string& method = "", int64_t n = 0) {
  RecomputeOptions r;
  r.granularity = granularity;
  r.method = method;
  r.num_layers = n;
  return r;
}

// Every loss and gradient norm as a hex float: equal strings are equal bits.
std::vector<std::string> hex(const RunResult& run) {
  std::vector<std::string> out;
  for (size_t i = 0; i < run.losses.size(); ++i)
    out.push_back(fmt::format("loss {:a} grad norm {:a}", run.losses[i], run.grad_norms[i]));
  return out;
}

// 10 steps of `layout` without recompute and with each kind; the same bits every step.
void check_bit_exact(GPTConfig flavour, int64_t tp, int64_t dp, int64_t pp, bool sequence_parallel,
                     const std::string& schedule = "1f1b", int64_t layers_per_virtual = 0) {
  auto g = pp * tp * dp == 1 ? single_rank_groups()
                             : init_process_groups(Layout().with_tp(tp).with_dp(dp).with_pp(pp));
  const auto c = tiny_config(flavour, /*layers=*/4);
  const auto train = tiny_train(/*global_batch=*/8, /*micro_batch=*/2, /*iters=*/10);
  ParallelOptions o;
  o.sequence_parallel = sequence_parallel;
  o.pipeline_schedule = schedule;
  o.layers_per_virtual_stage = layers_per_virtual;
  const auto none = run_training(c, train, o, *g);
  for (const auto& r : {recompute("full"), recompute("full", "uniform", 2), recompute("full", "block", 1),
                        recompute("selective")}) {
    CAPTURE(r.granularity);
    CAPTURE(r.method);
    CAPTURE(r.num_layers);
    o.recompute = r;
    const auto run = run_training(c, train, o, *g);
    CHECK(hex(run) == hex(none));
    for (const auto& [name, p] : none.params) {
      CAPTURE(name);
      CHECK(torch::equal(run.params.at(name), p));
    }
  }
}
}  // namespace test_recompute_detail

using namespace test_recompute_detail;

TEST_CASE("recompute: full and selective are bit-exact with none at 1x1x1, GPT-2 and Llama") {
  check_bit_exact(GPTConfig::gpt2(), 1, 1, 1, false);
  check_bit_exact(GPTConfig::llama(), 1, 1, 1, false);
}

TEST_CASE("recompute: the flags' combinations are checked") {
  CHECK_NOTHROW(validate_recompute(recompute("full", "block", 2), 2));
  CHECK_THROWS_WITH_AS(validate_recompute(recompute("", "block"), 2),
                       "--recompute-method block needs --recompute-granularity full, got none", UsageError);
  CHECK_THROWS_WITH_AS(validate_recompute(recompute("selective", "uniform"), 2),
                       "--recompute-method uniform needs --recompute-granularity full, got 'selective'", UsageError);
  CHECK_THROWS_WITH_AS(validate_recompute(recompute("selective", "", 2), 2),
                       "--recompute-num-layers 2 needs --recompute-granularity full, got 'selective'", UsageError);
  CHECK_THROWS_WITH_AS(validate_recompute(recompute("full", "", 3), 2),
                       doctest::Contains("--recompute-num-layers (3) must be between 1 and the blocks of a model chunk (2"),
                       UsageError);
  CHECK_THROWS_AS(validate_recompute(recompute("partial"), 2), UsageError);
  CHECK_THROWS_AS(validate_recompute(recompute("full", "random"), 2), UsageError);
}

TEST_CASE("recompute: a region that draws random numbers draws the same ones again in backward") {
  torch::manual_seed(7);
  auto x = torch::randn({4, 8}, torch::requires_grad());
  auto noisy = [](const torch::autograd::variable_list& in) {  // dropout-like: a random mask
    return torch::autograd::variable_list{in[0] * (torch::rand_like(in[0]) > 0.5)};
  };
  torch::manual_seed(1);
  auto expected = noisy({x})[0];
  expected.sum().backward();
  const auto expected_grad = x.grad().clone();
  x.mutable_grad() = torch::Tensor();
  torch::manual_seed(1);
  auto y = checkpoint(noisy, {x})[0];
  torch::rand({100});  // the generator moves on before backward
  y.sum().backward();
  CHECK(torch::equal(y, expected));
  CHECK(torch::equal(x.grad(), expected_grad));
}

TEST_SUITE("mpi_recompute_np2") {
  TEST_CASE("recompute: bit-exact at tp 2 with sequence parallel") { check_bit_exact(GPTConfig::llama(), 2, 1, 1, true); }
  TEST_CASE("recompute: bit-exact at pp 2 with 1F1B") { check_bit_exact(GPTConfig::gpt2(), 1, 1, 2, false); }
  TEST_CASE("recompute: bit-exact at dp 2") { check_bit_exact(GPTConfig::gpt2(), 1, 2, 1, false); }
}

TEST_SUITE("mpi_recompute_np8") {
  TEST_CASE("recompute: bit-exact at 2x2x2 (GPT-2, 1F1B, sequence parallel)") {
    check_bit_exact(GPTConfig::gpt2(), 2, 2, 2, true);
  }
}

namespace test_recompute_detail {
struct MemoryCase {
  std::string name, schedule;
  int64_t tp, pp, layers_per_virtual;
  bool sequence_parallel;
};


// One step on this rank's layout; the most activation bytes its forwards held at once.
int64_t measured_activation_bytes(const GPTConfig& c, const MemoryCase& k, const RecomputeOptions& r, ProcessGroups& g) {
  CountingCPUAllocator::install();
  const auto train = tiny_train(/*global_batch=*/8, /*micro_batch=*/2, /*iters=*/1);
  ParallelOptions o;
  o.sequence_parallel = k.sequence_parallel;
  o.pipeline_schedule = k.schedule;
  o.layers_per_virtual_stage = k.layers_per_virtual;
  o.recompute = r;
  Trainer trainer(c, train, o, g);
  MockGPTDataset data(c.vocab_size, c.seq_length, /*num_samples=*/64, /*seed=*/1);
  std::vector<Batch> micro;
  for (int64_t i = 0; i < train.accumulation_steps(g.layout.dp); ++i) micro.push_back(make_batch(data, {2 * i, 2 * i + 1}));
  trainer.step(micro, 1);
  return trainer.peak_activation_bytes();
}

// For each layout: none, selective and full measured on every rank, against the estimate
// within 10%; full < selective < none on every rank; 1F1B <= AFAB.
void check_measured_memory(GPTConfig flavour, const std::vector<MemoryCase>& cases) {
  const auto c = memory_config(flavour);
  std::map<std::string, int64_t> measured;
  for (const auto& k : cases) {
    auto g = k.tp * k.pp == 1 ? single_rank_groups() : init_process_groups(Layout().with_tp(k.tp).with_pp(k.pp));
    std::vector<int64_t> row;
    for (const auto& r : {recompute(""), recompute("selective"), recompute("full")}) {
      const int64_t bytes = measured_activation_bytes(c, k, r, *g);
      const auto m = estimate_memory(c, g->layout, g->coords, 2, 4, k.layers_per_virtual, k.schedule, k.sequence_parallel,
                                     /*zero_stage=*/0, ParallelOptions{}.ddp_bucket_size, r);
      const std::string name = fmt::format("{} {}", k.name, r.granularity.empty() ? "none" : r.granularity);
      MESSAGE(fmt::format("rank {} {:<28} measured {:>9} B, estimate {:>9} B ({:+.1f}%)", g->rank, name, bytes,
                          m.activation_bytes, 100.0 * double(m.activation_bytes - bytes) / double(bytes)));
      CHECK_MESSAGE(std::abs(double(m.activation_bytes - bytes)) <= 0.1 * double(bytes), name);
      measured[name] = bytes;
      row.push_back(bytes);
    }
    CHECK_MESSAGE((row[2] < row[1] && row[1] < row[0]), k.name);  // full < selective < none
  }
  for (const auto& level : {"none", "selective", "full"})
    if (measured.count(fmt::format("pp2 afab {}", level)))
      CHECK(measured[fmt::format("pp2 1f1b {}", level)] <= measured[fmt::format("pp2 afab {}", level)]);
}
}  // namespace test_recompute_detail

TEST_CASE("recompute memory: 1x1x1 measured activation bytes within 10% of the estimate, GPT-2 and Llama") {
  CHECK(at::detail::getDefaultCPUGenerator().get_state().nbytes() == kCpuRngStateBytes);
  for (auto flavour : {GPTConfig::gpt2(), GPTConfig::llama()})
    check_measured_memory(flavour, {{"1x1x1", "1f1b", 1, 1, 0, false}});
}

TEST_SUITE("mpi_recompute_np2") {
  TEST_CASE("recompute memory: tp 2 (sequence parallel on/off), pp 2 (AFAB, 1F1B, interleaved) within 10%") {
    for (auto flavour : {GPTConfig::gpt2(), GPTConfig::llama()})
      check_measured_memory(flavour, {{"tp2", "1f1b", 2, 1, 0, false},
                                      {"tp2 sp", "1f1b", 2, 1, 0, true},
                                      {"pp2 afab", "afab", 1, 2, 0, false},
                                      {"pp2 1f1b", "1f1b", 1, 2, 0, false},
                                      {"pp2 interleaved", "1f1b", 1, 2, 1, false}});
  }
}
