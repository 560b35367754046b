// Stage 1 under a real mpirun: data parallelism reproduces the single-device run.
// Run by CTest as `mpirun -np 2` and `-np 4` with --test-suite=mpi_dp.
#include "testing.hpp"

namespace test_dp_detail {
using namespace lightron;
using namespace lightron_testing;

std::unique_ptr<ProcessGroups> dp_groups() {
  const int world = launch_env().world_size;
  return init_process_groups(Layout{1, 1, world, 1});
}

void dp_parity(const GPTConfig& c, int64_t micro_batch, const std::string& impl) {
  auto g = dp_groups();
  const auto train = tiny_train(/*global_batch=*/8, micro_batch);
  ParallelOptions o;
  o.ddp_impl = impl;
  o.ddp_bucket_size = 3000;  // several buckets even for the tiny model
  auto ref = run_reference(c, train);
  auto run = run_training(c, train, o, *g);
  check_parity(ref, run);
}
}  // namespace test_dp_detail

using namespace test_dp_detail;

TEST_SUITE("mpi_dp") {
  TEST_CASE("dp parity: bucketed, one micro-batch per rank") { dp_parity(tiny_config(GPTConfig::gpt2()), 8 / launch_env().world_size, "bucketed"); }
  TEST_CASE("dp parity: bucketed, with gradient accumulation") { dp_parity(tiny_config(GPTConfig::gpt2()), 1, "bucketed"); }
  TEST_CASE("dp parity: naive, one micro-batch per rank") { dp_parity(tiny_config(GPTConfig::gpt2()), 8 / launch_env().world_size, "naive"); }
  TEST_CASE("dp parity: naive, with gradient accumulation") { dp_parity(tiny_config(GPTConfig::gpt2()), 1, "naive"); }
  TEST_CASE("dp parity: Llama flavour, bucketed with accumulation") { dp_parity(tiny_config(GPTConfig::llama()), 1, "bucketed"); }

  TEST_CASE("dp accounting: gradients are all-reduced exactly once per optimizer step") {
    auto g = dp_groups();
    const auto c = tiny_config(GPTConfig::gpt2());
    const auto train = tiny_train(8, 1);  // 8 / dp micro-batches per rank
    ParallelOptions o;
    o.ddp_bucket_size = 3000;
    Trainer trainer(c, train, o, *g);
    MockGPTDataset data(c.vocab_size, c.seq_length, 512, 1);
    DataSampler sampler(data.size(), 8, 1, int(g->coords.dp), int(g->layout.dp), 1);
    std::vector<Batch> batches;
    for (const auto& indices : sampler.next_global_batch()) batches.push_back(make_batch(data, indices));
    REQUIRE(batches.size() > 1);
    int64_t grad_bytes = 0;
    for (auto& p : trainer.params) grad_bytes += nbytes(p);
    comm_stats().reset();
    trainer.step(batches, 1);
    const auto c_dp = comm_stats().get("dp", "all_reduce");
    CHECK(c_dp.bytes == grad_bytes + 8);  // every gradient once, plus the loss (one double)
    CHECK(c_dp.calls == int64_t(trainer.ddp->num_buckets()) + 1);
    CHECK(trainer.ddp->num_buckets() > 1);
  }

  TEST_CASE("dp replicas: the weight hash check names the rank that diverged") {
    auto g = dp_groups();
    Trainer trainer(tiny_config(GPTConfig::gpt2()), tiny_train(8, 1), ParallelOptions{}, *g);
    CHECK_NOTHROW(check_replicas(trainer.params, g->dp, 1));
    if (g->coords.dp == 1) {
      torch::NoGradGuard no_grad;
      trainer.params[3].add_(1e-3);
    }
    CHECK_THROWS_WITH(check_replicas(trainer.params, g->dp, 7),
                      doctest::Contains(fmt::format("rank(s) {} differ from rank 0", g->dp.ranks[1]).c_str()));
  }

  TEST_CASE("dp data: ranks read disjoint samples whose union is the whole epoch") {
    auto g = dp_groups();
    const int64_t num_samples = 64;
    DataSampler sampler(num_samples, 8, 1, int(g->coords.dp), int(g->layout.dp), 3);
    std::vector<int64_t> mine;
    for (int64_t b = 0; b < num_samples / 8; ++b)
      for (const auto& micro : sampler.next_global_batch()) mine.insert(mine.end(), micro.begin(), micro.end());
    auto all = all_gather(g->dp, torch::tensor(mine, torch::kLong), 0);
    auto sorted = std::get<0>(all.sort());
    CHECK(torch::equal(sorted, torch::arange(num_samples, torch::kLong)));  // disjoint and complete
  }
}
