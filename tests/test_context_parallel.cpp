// Chapter 8, context parallelism (ring_attention.hpp, context_parallel.hpp):
//   - ring attention on each rank's chunks equals causal attention on the whole sequence,
//     outputs and dQ, dK, dV, at cp 2 and 4, RoPE or none, GQA or not, both splits;
//   - the head-tail split gives every rank the same counted work, the contiguous one does not;
//   - training at cp 2, cp 4, cp 2 x tp 2 (sequence parallel on and off), cp 2 x pp 2,
//     cp 2 x dp 2 (also under ZeRO-1, ZeRO-3, full recompute) and three 8-rank layouts
//     (tp x cp x pp, cp x dp x pp, tp x cp x dp) reproduces one rank's 20 steps;
//   - the bytes sent over the cp group in a step equal the formula; sampling's logits are one rank's;
//   - --dry-run's activations at cp 2 are at most half of cp 1's, and a measured figure agrees.
// (A cp 2 checkpoint resuming at cp 1: test_checkpoint.cpp, suite mpi_ckpt_np4.)
#include "testing.hpp"

namespace test_cp_detail {
using namespace lightron;
using namespace lightron_testing;

// max |a - b| / max |b|
double relative_difference(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>() / b.abs().max().item<double>();
}

// This rank's chunks of a (B, H, T, D) tensor, along T.
torch::Tensor mine(const torch::Tensor& t, int64_t rank, const SequenceSplit& split) {
  return sequence_chunks(t.transpose(1, 2), rank, split).transpose(1, 2).contiguous();
}

// Ring attention over `cp` against causal_attention over the whole sequence (every rank
// computes the whole itself, from the same seed); returns this rank's counted FLOPs.
int64_t check_ring_attention(const Group& cp, bool zigzag, bool rope, int64_t groups) {
  const int64_t B = 2, H = 4, D = 8, T = 8 * cp.size;
  const int64_t cp_size = cp.size;
  CAPTURE(cp_size);
  CAPTURE(zigzag);
  CAPTURE(rope);
  CAPTURE(groups);
  torch::manual_seed(7);
  const auto q = torch::randn({B, H, T, D}), k = torch::randn({B, groups, T, D}), v = torch::randn({B, groups, T, D});
  const auto dout = torch::randn({B, H, T, D});
  auto qf = q.clone().requires_grad_(), kf = k.clone().requires_grad_(), vf = v.clone().requires_grad_();
  auto whole = causal_attention(rope ? apply_rotary(qf, 1e4) : qf, rope ? apply_rotary(kf, 1e4) : kf, vf);
  whole.backward(dout);

  const SequenceSplit split{cp.size, zigzag};
  const auto at = positions_of(cp.rank, split, T / cp.size, torch::kCPU);
  auto ql = mine(q, cp.rank, split).requires_grad_(), kl = mine(k, cp.rank, split).requires_grad_(),
       vl = mine(v, cp.rank, split).requires_grad_();
  ring_attention_flops() = 0;
  auto out = ring_attention(rope ? apply_rotary(ql, 1e4, at) : ql, rope ? apply_rotary(kl, 1e4, at) : kl, vl, cp, split);
  out.backward(mine(dout, cp.rank, split));
  const std::pair<const char*, std::pair<torch::Tensor, torch::Tensor>> compared[] = {
      {"output", {out, whole}}, {"dQ", {ql.grad(), qf.grad()}}, {"dK", {kl.grad(), kf.grad()}}, {"dV", {vl.grad(), vf.grad()}}};
  for (const auto& [what, pair] : compared) {
    const double diff = relative_difference(pair.first, mine(pair.second, cp.rank, split));
    CHECK_MESSAGE(diff <= 1e-5, what << ": relative difference " << diff);
  }
  return ring_attention_flops();
}

std::vector<int64_t> gathered(const Group& g, int64_t value) {
  auto all = all_gather(g, torch::tensor({value}), 0);
  return std::vector<int64_t>(all.data_ptr<int64_t>(), all.data_ptr<int64_t>() + all.numel());
}

// 20 steps of `layout` against one rank's.
void check_training(GPTConfig flavour, const Layout& layout, bool sequence_parallel = false,
                    const std::string& sharding = "no_shard", const std::string& recompute = "") {
  auto g = init_process_groups(layout);
  const auto c = tiny_config(flavour, /*layers=*/4);
  const auto t = tiny_train(/*global_batch=*/8, /*micro_batch=*/2);
  ParallelOptions o;
  o.sequence_parallel = sequence_parallel;
  o.sharding = sharding;
  o.recompute.granularity = recompute;
  MESSAGE(fmt::format("{} tp {} cp {} dp {} pp {}{} {} {}", c.swiglu ? "Llama" : "GPT-2", layout.tp, layout.cp,
                      layout.dp, layout.pp, sequence_parallel ? " sequence parallel" : "", sharding, recompute));
  check_parity(run_reference(c, t), run_training(c, t, o, *g));
}

// One step at cp = world size: the bytes this rank sent over the cp group, against the formula.
void check_communication(GPTConfig flavour) {
  auto g = init_process_groups(Layout().with_cp(int64_t(launch_env().world_size)));
  const auto c = tiny_config(flavour, /*layers=*/4);
  const auto t = tiny_train(/*global_batch=*/4, /*micro_batch=*/2, /*iters=*/1);
  Trainer trainer(c, t, ParallelOptions{}, *g);
  MockGPTDataset data(c.vocab_size, c.seq_length, /*num_samples=*/64, /*seed=*/1);
  const std::vector<Batch> micro{make_batch(data, {0, 1}), make_batch(data, {2, 3})};
  comm_stats().reset();
  trainer.step(micro, 1);
  const int64_t cp = g->layout.cp, sent = comm_stats().get("cp", "send").bytes;
  const auto per_layer = ring_attention_bytes(/*B=*/2, c.query_groups(), c.seq_length / cp, c.head_dim(), cp);
  const int64_t expected = c.num_layers * int64_t(micro.size()) * (per_layer.forward + per_layer.backward);
  MESSAGE(fmt::format("{} cp {}: sent {} B over cp in one step, formula {} B", c.swiglu ? "Llama" : "GPT-2", cp, sent,
                      expected));
  CHECK(std::abs(double(sent - expected)) <= 0.01 * double(expected));
}
}  // namespace test_cp_detail

using namespace test_cp_detail;

TEST_CASE("cp: the head-tail split's positions and chunks; the counted work per rank") {
  const SequenceSplit zigzag{4, true}, contiguous{4, false};
  CHECK(positions_of(1, zigzag, 4, torch::kCPU).equal(torch::tensor({2, 3, 12, 13})));
  CHECK(positions_of(1, contiguous, 4, torch::kCPU).equal(torch::tensor({4, 5, 6, 7})));
  const auto ids = torch::arange(16).view({1, 16});
  CHECK(sequence_chunks(ids, 3, zigzag).equal(torch::tensor({{6, 7, 8, 9}})));
  // 2·cp+1 chunk pairs each under head-tail; 3 for rank 0 and 15 for rank 3 when contiguous
  const int64_t pair = 7 * 2 * 1 * 1 * 2 * 2 * 1;
  CHECK(attention_work(4, zigzag, 1, 1, 16, 1) == std::vector<int64_t>(4, 9 * pair));
  CHECK(attention_work(4, contiguous, 1, 1, 16, 1) == std::vector<int64_t>{3 * pair, 7 * pair, 11 * pair, 15 * pair});
}

TEST_SUITE("mpi_cp") {
  TEST_CASE("cp attention: ring attention equals whole-sequence causal attention within 1e-5 (outputs, dQ, dK, dV)") {
    auto g = init_process_groups(Layout().with_cp(int64_t(launch_env().world_size)));
    for (bool zigzag : {true, false})
      for (bool rope : {false, true})
        for (int64_t groups : {4, 2}) check_ring_attention(g->cp, zigzag, rope, groups);
  }

  TEST_CASE("cp work: head-tail FLOPs equal on every rank within 5%, contiguous ones not; both as counted") {
    auto g = init_process_groups(Layout().with_cp(int64_t(launch_env().world_size)));
    const int64_t cp = g->cp.size;
    for (bool zigzag : {true, false}) {
      const auto flops = gathered(g->cp, check_ring_attention(g->cp, zigzag, /*rope=*/false, /*groups=*/4));
      CHECK(flops == attention_work(cp, SequenceSplit{cp, zigzag}, /*B=*/2, /*H=*/4, /*T=*/8 * cp, /*D=*/8));
      const double spread = double(*std::max_element(flops.begin(), flops.end())) /
                            double(*std::min_element(flops.begin(), flops.end()));
      MESSAGE(fmt::format("cp {} {}: FLOPs per rank {} (max / min {:.2f})", cp, zigzag ? "head-tail" : "contiguous",
                          fmt::join(flops, " "), spread));
      if (zigzag) CHECK(spread <= 1.05);
      else CHECK(spread >= 2.0);  // (4·cp-1)/3 chunk pairs, last rank to first: 7/3 at cp 2, 5 at cp 4
    }
  }

  TEST_CASE("cp parity: cp = world size reproduces one rank, GPT-2 and Llama") {
    check_training(GPTConfig::gpt2(), Layout().with_cp(int64_t(launch_env().world_size)));
    check_training(GPTConfig::llama(), Layout().with_cp(int64_t(launch_env().world_size)));
  }

  TEST_CASE("cp sampling: full_logits of a 5-token prompt (padded on the right, split, gathered) equal one rank's") {
    auto g = init_process_groups(Layout().with_cp(int64_t(launch_env().world_size)));
    for (auto flavour : {GPTConfig::gpt2(), GPTConfig::llama()}) {
      const auto c = tiny_config(flavour, /*layers=*/2);
      const auto t = tiny_train(/*global_batch=*/2, /*micro_batch=*/2);
      Trainer one(c, t, ParallelOptions{}, *single_rank_groups()), split(c, t, ParallelOptions{}, *g);
      const auto prompt = torch::tensor({{3, 1, 4, 1, 5}});
      const auto expected = full_logits(one, prompt), got = full_logits(split, prompt);
      CHECK(sizes_are(got, {1, 5, c.vocab_size}));
      CHECK(relative_difference(got, expected) <= 1e-5);
    }
  }

  TEST_CASE("cp communication: bytes over the cp group in a step equal the formula within 1%") {
    check_communication(GPTConfig::gpt2());
    check_communication(GPTConfig::llama());
  }
}

TEST_SUITE("mpi_cp_np2") {
  TEST_CASE("cp memory: --dry-run activations at cp 2 at most half of cp 1's; measured within 10%") {
    auto g = init_process_groups(Layout().with_cp(2));
    for (auto flavour : {GPTConfig::gpt2(), GPTConfig::llama()}) {
      const auto c = memory_config(flavour);
      const auto one = estimate_memory(c, Layout(), Coords{}, 2, 1, 0, "1f1b", false);
      const auto two = estimate_memory(c, g->layout, g->coords, 2, 1, 0, "1f1b", false);
      CountingCPUAllocator::install();
      Trainer trainer(c, tiny_train(/*global_batch=*/2, /*micro_batch=*/2, /*iters=*/1), ParallelOptions{}, *g);
      MockGPTDataset data(c.vocab_size, c.seq_length, /*num_samples=*/64, /*seed=*/1);
      trainer.step({make_batch(data, {0, 1})}, 1);
      const int64_t measured = trainer.peak_activation_bytes();
      MESSAGE(fmt::format("{}: activations cp 1 {} B (estimate), cp 2 {} B (estimate, {:.3f} of cp 1), measured {} B "
                          "({:+.1f}%)", c.swiglu ? "Llama" : "GPT-2", one.activation_bytes, two.activation_bytes,
                          double(two.activation_bytes) / double(one.activation_bytes), measured,
                          100.0 * double(two.activation_bytes - measured) / double(measured)));
      CHECK(2 * two.activation_bytes <= one.activation_bytes);
      CHECK(std::abs(double(two.activation_bytes - measured)) <= 0.1 * double(measured));
    }
  }
}

TEST_SUITE("mpi_cp_np4") {
  TEST_CASE("cp parity: cp 2 x tp 2 (sequence parallel off and on), GPT-2 and Llama") {
    for (auto flavour : {GPTConfig::gpt2(), GPTConfig::llama()})
      for (bool sp : {false, true}) check_training(flavour, Layout().with_tp(2).with_cp(2), sp);
  }
  TEST_CASE("cp parity: cp 2 x pp 2 and cp 2 x dp 2, GPT-2 and Llama") {
    for (auto flavour : {GPTConfig::gpt2(), GPTConfig::llama()}) {
      check_training(flavour, Layout().with_cp(2).with_pp(2));
      check_training(flavour, Layout().with_cp(2).with_dp(2));
    }
  }
  TEST_CASE("cp parity: cp 2 x dp 2 under ZeRO-1 and ZeRO-3 (sharded over dp x cp), and with full recompute") {
    check_training(GPTConfig::llama(), Layout().with_cp(2).with_dp(2), false, "optim");
    check_training(GPTConfig::gpt2(), Layout().with_cp(2).with_dp(2), false, "optim_grads_params");
    check_training(GPTConfig::gpt2(), Layout().with_cp(2).with_dp(2), false, "no_shard", "full");
  }
}

TEST_SUITE("mpi_cp_np8") {
  TEST_CASE("cp parity: tp 2 x cp 2 x pp 2 (sequence parallel) and cp 2 x dp 2 x pp 2, GPT-2 and Llama") {
    for (auto flavour : {GPTConfig::gpt2(), GPTConfig::llama()}) {
      check_training(flavour, Layout().with_tp(2).with_cp(2).with_pp(2), /*sequence_parallel=*/true);
      check_training(flavour, Layout().with_cp(2).with_dp(2).with_pp(2));
    }
  }
  TEST_CASE("cp parity: tp 2 x cp 2 x dp 2 (sequence parallel), Llama") {
    check_training(GPTConfig::llama(), Layout().with_tp(2).with_cp(2).with_dp(2), /*sequence_parallel=*/true);
  }
}
