// Chapter 7, ZeRO (zero.hpp) under a real mpirun: the sharding strategies reproduce plain
// data parallelism; each rank holds exactly the bytes of the formulas (measured from its
// tensors, equal to --dry-run's planner); the communication is one reduce-scatter and one
// all-gather of the padded parameters per step; the reduce-scatters start during backward.
// mpi_zero runs at np 2 and 4 (dp = world); mpi_zero_3d at np 8 (2x2x2).
#include "testing.hpp"

namespace test_zero_detail {
using namespace lightron;
using namespace lightron_testing;

ParallelOptions sharded(const std::string& strategy) {
  ParallelOptions o;
  o.sharding = strategy;
  o.ddp_bucket_size = 3000;  // several buckets even for the tiny model
  return o;
}

void zero_vs_data_parallel(const GPTConfig& c, const std::string& strategy, int64_t micro_batch) {
  auto g = init_process_groups(Layout().with_dp(launch_env().world_size));
  const auto t = tiny_train(/*global_batch=*/8, micro_batch);
  const auto plain = run_training(c, t, sharded("no_shard"), *g);
  const auto zero = run_training(c, t, sharded(strategy), *g);
  check_parity(plain, zero);
}

std::vector<Batch> one_global_batch(const GPTConfig& c, const TrainConfig& t, const ProcessGroups& g) {
  MockGPTDataset data(c.vocab_size, c.seq_length, 512, 1);
  DataSampler sampler(data.size(), t.global_batch_size, t.micro_batch_size, int(g.coords.dp), int(g.layout.dp), 1);
  std::vector<Batch> batches;
  for (const auto& indices : sampler.next_global_batch()) batches.push_back(make_batch(data, indices));
  return batches;
}

// The bytes this rank's tensors occupy: weights, gradients (each storage once), AdamW state.
struct Held {
  int64_t parameters = 0, gradients = 0, optimizer = 0;
};
Held held_by(const Trainer& trainer) {
  Held h;
  std::set<const void*> seen;
  for (const auto& p : trainer.params) {
    h.parameters += int64_t(p.storage().nbytes());  // 0 for a weight ZeRO-3 has freed
    if (p.grad().defined() && seen.insert(p.grad().storage().data()).second) h.gradients += p.grad().storage().nbytes();
  }
  if (trainer.distributed) {
    h.parameters += trainer.distributed->weight_shard_bytes();
    h.gradients += trainer.distributed->gradient_shard_bytes();
    h.optimizer = trainer.distributed->optimizer_bytes();
  } else {
    for (const auto& s : trainer.optimizer->slots) h.optimizer += nbytes(s.exp_avg) + nbytes(s.exp_avg_sq);
  }
  return h;
}

// After two steps: measured == the planner's bytes, and the planner == the formula with Ψ' the
// padded elements (each bucket rounded up to a multiple of dp: fewer than dp per bucket).
void memory_is_the_formula(const std::string& strategy, const Layout& layout) {
  auto g = init_process_groups(layout);
  const auto c = tiny_config(GPTConfig::gpt2(), /*layers=*/2 * layout.pp);  // tp 2: 4 heads split
  const auto t = tiny_train(8, 1);
  const auto o = sharded(strategy);
  Trainer trainer(c, t, o, *g);
  for (int64_t it = 1; it <= 2; ++it) trainer.step(one_global_batch(c, t, *g), it);
  const Held held = held_by(trainer);
  const int stage = zero_stage(strategy);
  const auto plan = estimate_memory(c, layout, g->coords, t.micro_batch_size, t.accumulation_steps(layout.dp), 0,
                                    "1f1b", false, stage, o.ddp_bucket_size);
  CHECK(held.parameters == plan.parameter_bytes);
  CHECK(held.gradients == plan.gradient_bytes);
  CHECK(held.optimizer == plan.optimizer_bytes);
  const int64_t psi = plan.parameters, d = layout.dp, padded = trainer.distributed->shard_elements() * d;
  CHECK(padded - psi >= 0);
  CHECK(padded - psi < d * int64_t(trainer.distributed->num_buckets()));
  CHECK(plan.parameter_bytes == (stage == 3 ? 4 * padded / d : 4 * psi));
  CHECK(plan.optimizer_bytes == 8 * padded / d);
  CHECK(plan.gradient_bytes == (stage == 1 ? 4 * padded : 4 * padded / d));
  MESSAGE(fmt::format("{} at {}: Ψ {} (padded {}), bytes: weights {} grads {} adam {} (plain dp: {} {} {})", strategy,
                      layout.dp, psi, padded, held.parameters, held.gradients, held.optimizer, 4 * psi, 4 * psi, 8 * psi));
}

// One step of one micro-batch per rank: a reduce-scatter of every padded bucket (4Ψ' bytes
// handed in) and an all-gather of this rank's slices (4Ψ'/dp); on the wire, (dp-1)/dp of
// 4Ψ' each: together a ring all-reduce of the gradients, which plain dp sends (4Ψ).
void communication_is_the_formula(const std::string& strategy) {
  auto g = init_process_groups(Layout().with_dp(launch_env().world_size));
  const int64_t d = g->layout.dp;
  const auto c = tiny_config(GPTConfig::gpt2());
  const auto t = tiny_train(8, 8 / d);
  Trainer trainer(c, t, sharded(strategy), *g);
  const auto batches = one_global_batch(c, t, *g);
  REQUIRE(batches.size() == 1);
  comm_stats().reset();
  trainer.step(batches, 1);
  const int64_t padded = trainer.distributed->shard_elements() * d;
  int64_t psi = 0;
  for (const auto& p : trainer.params) psi += p.numel();
  const auto rs = comm_stats().get("dp", "reduce_scatter"), ag = comm_stats().get("dp", "all_gather");
  const int64_t buckets = int64_t(trainer.distributed->num_buckets());
  CHECK(rs.calls == buckets);
  CHECK(rs.bytes == 4 * padded);
  // ZeRO-3 gathers each block again for its backward (the root stays whole through it).
  int64_t again = 0, again_calls = 0;
  if (zero_stage(strategy) == 3)
    for (const auto& b : trainer.distributed->weight_buckets())
      if (b.unit != kRootUnit) again += nbytes(b.slice), ++again_calls;
  CHECK(ag.calls == buckets + again_calls);
  CHECK(ag.bytes == 4 * padded / d + again);
  const double wire = double(d - 1) / double(d) * double(rs.bytes) + double(d - 1) * double(ag.bytes);
  const double ring_all_reduce = 2.0 * double(d - 1) / double(d) * 4.0 * double(psi);
  const double formula = ring_all_reduce + (zero_stage(strategy) == 3 ? double(d - 1) * double(again) : 0.0);
  CHECK(std::abs(wire - formula) <= 0.01 * formula);
  CHECK(comm_stats().get("dp", "all_reduce").bytes == 8 + 8);  // the loss and the norm's Σg², nothing else
  MESSAGE(fmt::format("{} dp {}: reduce-scatter {} B, all-gather {} B; on the wire {:.0f} B = {:.2f} x a ring "
                      "all-reduce of the gradients ({:.0f} B)", strategy, d, rs.bytes, ag.bytes, wire,
                      wire / ring_all_reduce, ring_all_reduce));
}

// ZeRO-2: a bucket's reduce-scatter is launched while backward still runs, and afterwards no
// rank holds a full gradient.
void reduce_scatter_overlaps_backward() {
  auto g = init_process_groups(Layout().with_dp(launch_env().world_size));
  const auto c = tiny_config(GPTConfig::gpt2());
  const auto t = tiny_train(8, 8 / g->layout.dp);
  Trainer trainer(c, t, sharded("optim_grads"), *g);
  const auto batch = one_global_batch(c, t, *g).at(0);
  std::vector<std::string> timeline;
  trainer.ddp->observe_this_step([&](size_t b, bool done) {
    timeline.push_back(fmt::format("{} bucket {}", done ? "waited" : "reduce-scatter started", b));
  });
  trainer.distributed->zero_grad();
  trainer.model->loss(batch.tokens, batch.labels).backward();
  timeline.push_back("backward returned");
  trainer.ddp->finish();
  const auto end = std::find(timeline.begin(), timeline.end(), "backward returned");
  const auto started_before = std::count_if(timeline.begin(), end, [](const std::string& e) {
    return e.rfind("reduce-scatter started", 0) == 0;
  });
  MESSAGE(fmt::format("timeline: {}", fmt::join(timeline, "; ")));
  CHECK(trainer.ddp->num_buckets() > 2);
  CHECK(started_before == int64_t(trainer.ddp->num_buckets()));  // all of them, the first long before the end
  CHECK(timeline.front() == "reduce-scatter started bucket 0");
  for (const auto& p : trainer.params) CHECK_FALSE(p.grad().defined());
}

// ZeRO-3: between steps no whole weight exists; sampling-style forwards without gradients
// gather and free as they go; a WholeWeights scope holds them all and lets go.
void weights_are_freed() {
  auto g = init_process_groups(Layout().with_dp(launch_env().world_size));
  const auto c = tiny_config(GPTConfig::gpt2());
  const auto t = tiny_train(8, 1);
  Trainer trainer(c, t, sharded("optim_grads_params"), *g);
  CHECK(trainer.sharded_weights->gathered_bytes() == 0);
  trainer.step(one_global_batch(c, t, *g), 1);
  CHECK(trainer.sharded_weights->gathered_bytes() == 0);
  const auto batch = one_global_batch(c, t, *g).at(0);
  const double eval = trainer.evaluate({batch});
  CHECK(std::isfinite(eval));
  CHECK(trainer.sharded_weights->gathered_bytes() == 0);
  {
    const auto whole = trainer.whole_weights();
    int64_t all = 0;
    for (const auto& p : trainer.params) all += nbytes(p);
    CHECK(trainer.sharded_weights->gathered_bytes() == all);
  }
  CHECK(trainer.sharded_weights->gathered_bytes() == 0);
}

// ZeRO-3 composed with tensor parallelism (tp 2 x dp 2), against one device.
void zero3_with_tp(const GPTConfig& flavour) {
  auto g = init_process_groups(Layout().with_tp(2).with_dp(2));
  const auto c = tiny_config(flavour);
  const auto t = tiny_train(8, 1);
  auto o = sharded("optim_grads_params");
  o.sequence_parallel = true;
  check_parity(run_reference(c, t), run_training(c, t, o, *g));
}

void zero_3d_parity(const GPTConfig& flavour, const std::string& strategy) {
  auto g = init_process_groups(Layout().with_tp(2).with_dp(2).with_pp(2));
  const auto c = tiny_config(flavour, /*layers=*/4);
  const auto t = tiny_train(/*global_batch=*/8, /*micro_batch=*/1);
  auto o = sharded(strategy);
  o.sequence_parallel = true;  // its norms' gradients are summed over tp on the slices
  check_parity(run_reference(c, t), run_training(c, t, o, *g));
}
}  // namespace test_zero_detail

using namespace test_zero_detail;

TEST_SUITE("mpi_zero") {
  TEST_CASE("zero parity: ZeRO-1 (optim) reproduces data parallelism, GPT-2, with accumulation") {
    zero_vs_data_parallel(tiny_config(GPTConfig::gpt2()), "optim", 1);
  }
  TEST_CASE("zero parity: ZeRO-2 (optim_grads) reproduces data parallelism, GPT-2, with accumulation") {
    zero_vs_data_parallel(tiny_config(GPTConfig::gpt2()), "optim_grads", 1);
  }
  TEST_CASE("zero parity: ZeRO-3 (optim_grads_params) reproduces data parallelism, GPT-2, with accumulation") {
    zero_vs_data_parallel(tiny_config(GPTConfig::gpt2()), "optim_grads_params", 1);
  }
  TEST_CASE("zero parity: ZeRO-1, 2 and 3, Llama, one micro-batch per rank") {
    for (const char* s : {"optim", "optim_grads", "optim_grads_params"})
      zero_vs_data_parallel(tiny_config(GPTConfig::llama()), s, 8 / launch_env().world_size);
  }
  TEST_CASE("zero memory: each rank holds exactly the planner's bytes, which are the formulas") {
    for (const char* s : {"optim", "optim_grads", "optim_grads_params"})
      memory_is_the_formula(s, Layout().with_dp(launch_env().world_size));
  }
  TEST_CASE("zero communication: a reduce-scatter and an all-gather, the volume of one all-reduce (ZeRO-3: and one "
            "more gather of the blocks)") {
    for (const char* s : {"optim", "optim_grads", "optim_grads_params"}) communication_is_the_formula(s);
  }
  TEST_CASE("zero 3: no whole weight between steps; evaluation gathers and frees; WholeWeights holds them") {
    weights_are_freed();
  }
  TEST_CASE("zero overlap: ZeRO-2's reduce-scatters start during backward; no full gradient is kept") {
    reduce_scatter_overlaps_backward();
  }
}

TEST_SUITE("mpi_zero_tp") {
  TEST_CASE("zero 3 with tp 2 (sequence parallel) x dp 2 reproduces one device, GPT-2") { zero3_with_tp(GPTConfig::gpt2()); }
  TEST_CASE("zero 3 with tp 2 (sequence parallel) x dp 2 reproduces one device, Llama") { zero3_with_tp(GPTConfig::llama()); }
  TEST_CASE("zero 3 with tp 2 x dp 2: memory is the planner's") {
    memory_is_the_formula("optim_grads_params", Layout().with_tp(2).with_dp(2));
  }
}

TEST_SUITE("mpi_zero_3d") {
  TEST_CASE("zero 2x2x2: ZeRO-1 with tp (sequence parallel) and pp reproduces one device, GPT-2") {
    zero_3d_parity(GPTConfig::gpt2(), "optim");
  }
  TEST_CASE("zero 2x2x2: ZeRO-2 reproduces one device, Llama") { zero_3d_parity(GPTConfig::llama(), "optim_grads"); }
  TEST_CASE("zero 2x2x2: memory of every rank is the planner's") {
    memory_is_the_formula("optim", Layout().with_tp(2).with_dp(2).with_pp(2));
    memory_is_the_formula("optim_grads", Layout().with_tp(2).with_dp(2).with_pp(2));
  }
}
