// Stage 1 under a real mpirun: data parallelism reproduces the single-device run.
// Run by CTest as `mpirun -np 2` and `-np 4` with --test-suite=mpi_dp.
#include "testing.hpp"

namespace test_dp_detail {
using namespace lightron;
using namespace lightron_testing;

std::unique_ptr<ProcessGroups> dp_groups() {
  const int world = launch_env().world_size;
  return init_process_groups(Layout().with_dp(world));
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

// A researcher's own loop around BucketedDataParallel: forward, backward, finish(), the
// optimizer, and nothing else (no reset, no set-up call per step). `mode` picks how the
// gradients are cleared and accumulated.
enum class UserLoop { kOneMicroBatch, kAccumulateWithGuard, kAccumulateWithoutGuard, kSetToNone };

RunResult user_loop(const GPTConfig& c, const TrainConfig& t, const Group& dp, UserLoop mode) {
  MockGPTDataset data(c.vocab_size, c.seq_length, /*num_samples=*/512, /*seed=*/t.seed);
  DataSampler sampler(data.size(), t.global_batch_size, t.micro_batch_size, dp.rank, dp.size, t.seed);
  torch::manual_seed(t.seed);
  GPT model(c);
  const auto named = named_parameters_of(model);
  std::vector<torch::Tensor> params;
  for (const auto& [name, p] : named) params.push_back(p);
  AdamW optimizer(named, t);
  BucketedDataParallel ddp(named, dp, /*bucket_elements=*/3000);
  RunResult r;
  for (int64_t it = 1; it <= t.train_iters; ++it) {
    optimizer.zero_grad(/*set_to_none=*/mode == UserLoop::kSetToNone);
    const auto micro_batches = sampler.next_global_batch();
    auto loss = torch::zeros({}, torch::kDouble);
    for (size_t m = 0; m < micro_batches.size(); ++m) {
      BucketedDataParallel::NoSync no_sync;
      if (mode != UserLoop::kAccumulateWithoutGuard && m + 1 < micro_batches.size()) no_sync = ddp.no_sync();
      const Batch b = make_batch(data, micro_batches[m]);
      auto micro_loss = model.loss(b.tokens, b.labels) / double(micro_batches.size());
      micro_loss.backward();
      loss += micro_loss.detach().to(torch::kDouble);
    }
    ddp.finish();
    all_reduce(dp, loss, /*average=*/true);
    const auto norm = grad_sq_norm(params).sqrt();
    clip_grads(params, norm, t.clip_grad);
    optimizer.step(lr_at(t, it));
    r.losses.push_back(loss.item<double>());
    r.grad_norms.push_back(norm.item<double>());
  }
  check_replicas(params, dp, t.train_iters);  // throws, naming a rank whose weights differ
  for (const auto& [name, p] : named) r.params[name] = p.detach().clone();
  return r;
}

void user_loop_parity(UserLoop mode) {
  auto g = dp_groups();
  const int64_t micro = mode == UserLoop::kOneMicroBatch ? 8 / g->dp.size : 1;
  const auto train = tiny_train(/*global_batch=*/8, micro, /*iters=*/10);
  const auto c = tiny_config(GPTConfig::gpt2());
  auto ref = user_loop(c, train, Group{}, mode);  // one rank (a group of one): the whole batch
  auto run = user_loop(c, train, g->dp, mode);
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

  TEST_CASE("dp user loop: forward, backward, finish(), optimizer; nothing else") { user_loop_parity(UserLoop::kOneMicroBatch); }
  TEST_CASE("dp user loop: accumulation through no_sync()") { user_loop_parity(UserLoop::kAccumulateWithGuard); }
  TEST_CASE("dp user loop: accumulation without no_sync() costs traffic, not correctness") {
    user_loop_parity(UserLoop::kAccumulateWithoutGuard);
  }
  TEST_CASE("dp user loop: gradients cleared to none are moved back into the buckets") {
    user_loop_parity(UserLoop::kSetToNone);
  }

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

  TEST_CASE("groups: one rank's wish to go through host memory is every rank's (the transport is agreed)") {
    const LaunchEnv env = launch_env();
    GroupOptions opt;
    opt.through_host = env.rank == env.world_size - 1;  // say, the last rank's host has fewer GPUs than ranks
    auto g = init_process_groups(Layout().with_dp(env.world_size), opt);
    CHECK(g->world.through_host);
    CHECK(g->dp.through_host);
    auto x = torch::full({3}, float(env.rank));
    all_reduce(g->dp, x);
    CHECK(x[2].item<float>() == float(env.world_size * (env.world_size - 1) / 2));
    CHECK(!init_process_groups(Layout().with_dp(env.world_size))->dp.through_host);  // nobody asks: NCCL/Gloo as usual
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
