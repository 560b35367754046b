// The guards of a long run (guards.hpp), on one rank: a planted NaN stops the step before the
// update and names the parameter and the iteration; a planted spike is skipped (the weights
// and the AdamW state stay bit-identical) and training goes on; the spike rule's medians; the
// metrics file stays JSON with a NaN in it. The multi-rank cases (who speaks, every rank
// skipping alike, signals) run under mpirun in tests/guards_test.sh.
#include "testing.hpp"

#include <cstdlib>  // setenv
#include <fstream>

namespace test_guards_detail {
using namespace lightron_testing;

// LIGHTRON_TEST_FAULT while a Trainer is built (its hook is registered then).
struct PlantedFault {
  explicit PlantedFault(const char* spec) { setenv("LIGHTRON_TEST_FAULT", spec, 1); }
  ~PlantedFault() { unsetenv("LIGHTRON_TEST_FAULT"); }
};

std::vector<Batch> batches_for(const GPTConfig& c, DataSampler& sampler, const MockGPTDataset& data) {
  std::vector<Batch> out;
  for (const auto& indices : sampler.next_global_batch()) out.push_back(make_batch(data, indices));
  return out;
}

std::vector<torch::Tensor> snapshot(const std::vector<torch::Tensor>& tensors) {
  std::vector<torch::Tensor> out;
  for (const auto& t : tensors) out.push_back(t.detach().clone());
  return out;
}

bool bit_identical(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  for (size_t i = 0; i < a.size(); ++i)
    if (!torch::equal(a[i], b[i])) return false;
  return true;
}

TEST_SUITE("guards") {
  TEST_CASE("guards: the spike rule waits for a full window and compares with the running medians") {
    SpikeRule rule(/*factor=*/3, /*window=*/4);
    CHECK_FALSE(rule.is_spike(100, 100));  // nothing to compare with yet
    for (double x : {2.0, 1.0, 3.0}) rule.accept(x, x);
    CHECK_FALSE(rule.is_spike(100, 1));  // three of four
    rule.accept(2.5, 2.5);               // window 1, 2, 2.5, 3: median 2.5
    CHECK(rule.is_spike(7.6, 1));        // loss above 3 x 2.5
    CHECK(rule.is_spike(1, 7.6));        // grad norm above 3 x 2.5
    CHECK_FALSE(rule.is_spike(7.4, 7.4));
    rule.accept(10, 10);  // the oldest (2) leaves: 1, 3, 2.5, 10 -> median 3
    CHECK_FALSE(rule.is_spike(8.9, 8.9));
    CHECK(rule.is_spike(9.1, 1));
    CHECK_FALSE(SpikeRule(0, 4).enabled());
  }

  TEST_CASE("guards: a planted NaN gradient stops the step before the update, naming parameter and iteration") {
    const auto c = tiny_config(GPTConfig::gpt2());
    auto t = tiny_train(4, 2);
    std::unique_ptr<Trainer> trainer;
    {
      PlantedFault fault("nan@2:0");
      trainer = std::make_unique<Trainer>(c, t, ParallelOptions{}, *single_rank_groups());
    }
    MockGPTDataset data(c.vocab_size, c.seq_length, 256, 1);
    DataSampler sampler(data.size(), 4, 2, 0, 1, 1);
    trainer->step(batches_for(c, sampler, data), 1);
    const auto before = snapshot(trainer->params);
    const int64_t steps = trainer->optimizer->step_count;
    CHECK_THROWS_WITH_AS(trainer->step(batches_for(c, sampler, data), 2),
                         "iteration 2: non-finite value (NaN or inf) in the gradient of h.1.mlp.c_proj.weight on rank 0; "
                         "stopped before the update: the weights and the last checkpoint are untouched (lower --lr, or "
                         "--no-check-for-nan-in-loss-and-grad to train on regardless)",
                         RuntimeFailure);
    CHECK(bit_identical(before, trainer->params));
    CHECK(trainer->optimizer->step_count == steps);
  }

  TEST_CASE("guards: with the check off, a NaN trains on; the metrics line holds null, not nan") {
    const auto c = tiny_config(GPTConfig::llama());
    auto t = tiny_train(4, 2);
    t.check_for_nan_in_loss_and_grad = false;
    std::unique_ptr<Trainer> trainer;
    {
      PlantedFault fault("nan@1:0");
      trainer = std::make_unique<Trainer>(c, t, ParallelOptions{}, *single_rank_groups());
    }
    MockGPTDataset data(c.vocab_size, c.seq_length, 256, 1);
    DataSampler sampler(data.size(), 4, 2, 0, 1, 1);
    StepMetrics m;
    m.iteration = 1;
    m.loss = trainer->step(batches_for(c, sampler, data), 1);
    m.grad_norm = trainer->grad_norm;
    CHECK(std::isnan(m.grad_norm));
    const auto path = std::filesystem::temp_directory_path() / fmt::format("lightron_guards_{}.jsonl", ::getpid());
    {
      MetricsLog log(path.string());
      log.log(m, 1);
      m.loss = std::numeric_limits<double>::infinity();
      log.log(m, 1);
    }
    std::ifstream in(path);
    std::string first, second;
    std::getline(in, first);
    std::getline(in, second);
    std::filesystem::remove(path);
    CHECK(first.find("\"grad_norm\": null") != std::string::npos);
    CHECK(second.find("\"loss\": null, \"loss_hex\": \"inf\"") != std::string::npos);
    CHECK(first.find("nan,") == std::string::npos);
  }

  TEST_CASE("guards: a planted spike is skipped bit-exactly (weights and AdamW state), then training goes on") {
    const auto c = tiny_config(GPTConfig::gpt2());
    auto t = tiny_train(4, 2);
    t.skip_spike_factor = 5;
    t.skip_spike_window = 4;
    std::unique_ptr<Trainer> trainer;
    {
      PlantedFault fault("spike@7:0");
      trainer = std::make_unique<Trainer>(c, t, ParallelOptions{}, *single_rank_groups());
    }
    MockGPTDataset data(c.vocab_size, c.seq_length, 256, 1);
    DataSampler sampler(data.size(), 4, 2, 0, 1, 1);
    for (int64_t it = 1; it <= 6; ++it) {
      trainer->step(batches_for(c, sampler, data), it);
      CHECK(trainer->updated);
    }
    std::vector<torch::Tensor> state = trainer->params;
    for (const auto& s : trainer->optimizer->slots) state.insert(state.end(), {s.exp_avg, s.exp_avg_sq});
    const auto before = snapshot(state);
    const int64_t steps = trainer->optimizer->step_count;
    trainer->step(batches_for(c, sampler, data), 7);
    CHECK_FALSE(trainer->updated);
    CHECK(trainer->grad_norm > 20);
    CHECK(bit_identical(before, state));
    CHECK(trainer->optimizer->step_count == steps);
    CHECK(trainer->guard->skipped_iterations == 1);
    trainer->step(batches_for(c, sampler, data), 8);
    CHECK(trainer->updated);
    CHECK_FALSE(bit_identical(before, state));
  }

  TEST_CASE("guards: ModelTrainer (your own model) stops at a NaN gradient too") {
    const auto c = tiny_config(GPTConfig::gpt2());
    torch::manual_seed(1);
    auto model = std::make_shared<GPT>(c);
    ModelTrainer<GPT> trainer(model, tiny_train(4, 2), *single_rank_groups());
    int64_t calls = 0;  // once per micro-batch: a NaN in step 2's first, as a model might make one
    model->ln_f->weight.register_hook([&calls](torch::Tensor g) {
      return ++calls == 3 ? g * std::numeric_limits<float>::quiet_NaN() : g;
    });
    MockGPTDataset data(c.vocab_size, c.seq_length, 256, 1);
    DataSampler sampler(data.size(), 4, 2, 0, 1, 1);
    trainer.step(batches_for(c, sampler, data), 1);  // two micro-batches: calls 1 and 2
    CHECK_THROWS_WITH_AS(trainer.step(batches_for(c, sampler, data), 2),
                         doctest::Contains("iteration 2: non-finite value (NaN or inf) in the gradient of ln_f.weight"),
                         RuntimeFailure);
  }

  TEST_CASE("guards: a failure met by one rank alone is reported by that rank") {
    auto g = single_rank_groups();
    CHECK_NOTHROW(agree_on_failure(g->world, ""));
    CHECK_THROWS_AS(agree_on_failure(g->world, "rank 0: --save x: cannot write there"), LocalUsageError);
  }
}

}  // namespace test_guards_detail
