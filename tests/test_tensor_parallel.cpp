// Chapter 2 under a real mpirun: tensor parallelism with tp = world (np 2 and 4), and tp2 x dp2.
// Layer by layer against ordinary full layers, the mappings against exact numbers, the
// sharding round trip, then whole-model parity with the single-device run.
#include "testing.hpp"

namespace test_tp_detail {
using namespace lightron;
using namespace lightron_testing;

std::unique_ptr<ProcessGroups> tp_groups(int64_t dp = 1) {
  const int world = launch_env().world_size;
  return init_process_groups(Layout().with_tp(world / dp).with_dp(dp));
}

// The same random tensor on every rank.
torch::Tensor shared_randn(std::vector<int64_t> sizes, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  return torch::randn(sizes, gen, torch::TensorOptions());
}

void check_close(const torch::Tensor& a, const torch::Tensor& b, const std::string& what) {
  const double diff = (a - b).abs().max().item<double>(), scale = b.abs().max().item<double>();
  CHECK_MESSAGE(diff <= 1e-6 * scale + 1e-7, what << ": max |diff| " << diff << " vs scale " << scale);
}

GPTConfig tp_config(GPTConfig c, int64_t tp) {
  c = tiny_config(c);
  if (c.swiglu && tp == 4) {  // G must divide by tp: 8 heads in 4 groups
    c.num_attention_heads = 8;
    c.num_query_groups = 4;
  }
  return c;
}

void tp_parity(GPTConfig flavour, bool sequence_parallel, int64_t dp = 1) {
  auto g = tp_groups(dp);
  const auto c = tp_config(flavour, g->layout.tp);
  const auto train = tiny_train(/*global_batch=*/8, /*micro_batch=*/2);
  ParallelOptions o;
  o.sequence_parallel = sequence_parallel;
  auto ref = run_reference(c, train);
  auto run = run_training(c, train, o, *g);
  check_parity(ref, run);
}

// tp all-reduce / reduce-scatter / all-gather bytes of one training step at `layers`, and
// "replicated": the bytes of the parameters whose gradients are summed over tp (SP only).
std::map<std::string, int64_t> comm_bytes(int64_t layers, bool sequence_parallel, ProcessGroups& g) {
  auto c = tiny_config(GPTConfig::gpt2(), layers);
  ParallelOptions o;
  o.sequence_parallel = sequence_parallel;
  Trainer trainer(c, tiny_train(2, 2, 1), o, g);
  MockGPTDataset data(c.vocab_size, c.seq_length, 64, 1);
  comm_stats().reset();
  trainer.step({make_batch(data, {0, 1})}, 1);
  std::map<std::string, int64_t> bytes;
  for (auto op : {"all_reduce", "reduce_scatter", "all_gather"}) bytes[op] = comm_stats().get("tp", op).bytes;
  for (auto& p : trainer.tp_info.sequence_parallel_params) bytes["replicated"] += p.numel() * 4;
  return bytes;
}
}  // namespace test_tp_detail

using namespace test_tp_detail;

TEST_SUITE("mpi_tp") {
  TEST_CASE("tp mappings: backward passes give exact numbers") {
    auto g = tp_groups();
    const int p = g->tp.size, r = g->tp.rank;
    const double ranks_sum = p * (p + 1) / 2.0;  // Σ (r + 1)
    auto x = torch::full({2, 3}, double(r + 1), torch::kDouble).requires_grad_();
    copy_to_tp_region(x, g->tp).backward(torch::full({2, 3}, double(r + 1), torch::kDouble));
    CHECK(x.grad()[1][2].item<double>() == ranks_sum);  // f: all-reduce backward
    x.mutable_grad().zero_();
    auto y = reduce_from_tp_region(x, g->tp);
    CHECK(y[0][0].item<double>() == ranks_sum);  // g: all-reduce forward ...
    y.backward(torch::full({2, 3}, 7.0, torch::kDouble));
    CHECK(x.grad()[0][0].item<double>() == 7.0);  // ... identity backward
    auto z = torch::full({2, 2}, double(r), torch::kDouble).requires_grad_();
    auto gathered = gather_from_tp_region(z, g->tp);  // (2, 2p)
    CHECK(gathered[1][2 * p - 1].item<double>() == double(p - 1));
    gathered.backward(torch::arange(4 * p, torch::kDouble).view({2, 2 * p}));
    CHECK(z.grad()[1][1].item<double>() == double(2 * p + 2 * r + 1));  // row 1, this rank's 2nd column
    auto w = torch::arange(2 * p, torch::kDouble).view({1, 2 * p}).requires_grad_();
    auto mine = scatter_to_tp_region(w, g->tp);
    CHECK(mine[0][0].item<double>() == double(2 * r));
    mine.backward(torch::full({1, 2}, double(r + 1), torch::kDouble));
    CHECK(w.grad()[0][2 * p - 1].item<double>() == double(p));  // gathered from the last rank
  }

  TEST_CASE("tp layers: column, row, embedding and cross-entropy match full layers") {
    auto g = tp_groups();
    const int64_t p = g->tp.size, r = g->tp.rank, in = 8, out = 4 * p, B = 2, T = 3;
    auto x = shared_randn({B, T, in}, 1).requires_grad_();
    auto dy = shared_randn({B, T, out}, 2);
    auto w = shared_randn({out, in}, 3), b = shared_randn({out}, 4);
    // Column: Y = XA + b, A split by columns (rows of our (out, in) weight).
    auto wf = w.clone().requires_grad_(), bf = b.clone().requires_grad_();
    auto xf = x.detach().clone().requires_grad_();
    (torch::linear(xf, wf, bf) * dy).sum().backward();
    ShardSpec rows{0, {out}};
    ColumnParallelLinear column(shard(w, rows, r, p), shard(b, rows, r, p), g->tp, false, /*gather=*/true);
    auto y = column.forward(x);
    check_close(y, torch::linear(x, w, b).detach(), "column output");
    (y * dy).sum().backward();
    check_close(x.grad(), xf.grad(), "column input grad");
    check_close(column.weight.grad(), shard(wf.grad(), rows, r, p), "column weight grad");
    check_close(column.bias.grad(), shard(bf.grad(), rows, r, p), "column bias grad");
    // Row: A split by rows (columns of our weight), input already split, bias once.
    auto w2 = shared_randn({in, out}, 5), b2 = shared_randn({in}, 6), dz = shared_randn({B, T, in}, 7);
    auto h = shared_randn({B, T, out}, 8).requires_grad_();
    auto w2f = w2.clone().requires_grad_(), b2f = b2.clone().requires_grad_();
    auto hf = h.detach().clone().requires_grad_();
    (torch::linear(hf, w2f, b2f) * dz).sum().backward();
    ShardSpec cols{1, {out}};
    RowParallelLinear row(shard(w2, cols, r, p), b2.clone(), g->tp, false);
    auto z = row.forward(scatter_to_tp_region(h, g->tp));
    check_close(z, torch::linear(h, w2, b2).detach(), "row output");
    (z * dz).sum().backward();
    check_close(h.grad(), hf.grad(), "row input grad");
    check_close(row.weight.grad(), shard(w2f.grad(), cols, r, p), "row weight grad");
    check_close(row.bias.grad(), b2f.grad(), "row bias grad");
    // Vocab-parallel embedding and cross-entropy.
    const int64_t V = 5 * p;
    auto table = shared_randn({V, in}, 9);
    auto ids = torch::randint(V, {B, T}, at::detail::createCPUGenerator(10), torch::kLong);
    auto tf = table.clone().requires_grad_();
    auto de = shared_randn({B, T, in}, 11);
    (torch::embedding(tf, ids) * de).sum().backward();
    VocabParallelEmbedding emb(shard(table, rows.dim == 0 ? ShardSpec{0, {V}} : rows, r, p), g->tp);
    auto e = emb.forward(ids);
    check_close(e, torch::embedding(table, ids), "embedding output");
    (e * de).sum().backward();
    check_close(emb.weight.grad(), shard(tf.grad(), ShardSpec{0, {V}}, r, p), "embedding grad");
    auto logits = shared_randn({B, T, V}, 12);
    auto lf = logits.clone().requires_grad_();
    auto full_loss = lightron::cross_entropy_loss(lf, ids);
    full_loss.backward();
    auto lp = shard(logits, ShardSpec{2, {V}}, r, p).requires_grad_();
    auto loss = vocab_parallel_cross_entropy(lp, ids, g->tp);
    check_close(loss, full_loss.detach(), "cross-entropy");
    loss.backward();
    check_close(lp.grad(), shard(lf.grad(), ShardSpec{2, {V}}, r, p), "cross-entropy grad");
  }

  TEST_CASE("tp sharding is exact: gathering the shards gives the original tensors, element by element") {
    auto g = tp_groups();
    for (auto flavour : {GPTConfig::gpt2(), GPTConfig::llama()}) {
      auto c = tp_config(flavour, g->layout.tp);
      torch::manual_seed(1234);
      GPT whole(c);
      Trainer trainer(c, tiny_train(8, 2), ParallelOptions{}, *g);  // seeds 1234 and shards
      auto gathered = full_parameters(trainer);
      REQUIRE(gathered.size() == whole.named_parameters().size());
      for (auto& p : whole.named_parameters()) CHECK_MESSAGE(torch::equal(gathered.at(p.key()), p.value()), p.key());
      CHECK(!trainer.tp_info.sharded.empty());
    }
  }

  TEST_CASE("tp parity: GPT-2") { tp_parity(GPTConfig::gpt2(), false); }
  TEST_CASE("tp parity: GPT-2 with sequence parallel") { tp_parity(GPTConfig::gpt2(), true); }
  TEST_CASE("tp parity: Llama") { tp_parity(GPTConfig::llama(), false); }
  TEST_CASE("tp parity: Llama with sequence parallel") { tp_parity(GPTConfig::llama(), true); }

  TEST_CASE("tp accounting: 2 all-reduces forward and 2 backward of B·T·C per block") {
    auto g = tp_groups();
    const int64_t B = 2, T = 16, C = 32, bytes = B * T * C * 4;
    auto one = comm_bytes(1, false, *g), two = comm_bytes(2, false, *g);
    CHECK(two["all_reduce"] - one["all_reduce"] == 4 * bytes);
    CHECK(two["reduce_scatter"] == 0);
    // Sequence parallel: each all-reduce becomes a reduce-scatter (of B·T·C) plus an
    // all-gather (of this rank's B·T/p·C); the per-block norm and row-bias gradients
    // (ln_1, ln_2: weight and bias; two row biases) are summed over tp once per step.
    auto sp1 = comm_bytes(1, true, *g), sp2 = comm_bytes(2, true, *g);
    CHECK(sp2["reduce_scatter"] - sp1["reduce_scatter"] == 4 * bytes);
    CHECK(sp2["all_gather"] - sp1["all_gather"] == 4 * bytes / g->tp.size);
    CHECK(sp2["all_reduce"] - sp1["all_reduce"] == 6 * C * 4);
    // The whole step, exactly: the output layer adds an all-gather forward and a
    // reduce-scatter backward; the embedding a reduce-scatter forward (each rank keeps its
    // T/p tokens, no all-reduce) and an all-gather backward. All-reduces left: the loss's
    // three of B·T floats, the replicated gradients, and the 8-byte gradient norm.
    auto check_step = [&](int64_t L, std::map<std::string, int64_t>& sp) {
      CHECK(sp["reduce_scatter"] == (4 * L + 2) * bytes);
      CHECK(sp["all_gather"] == (4 * L + 2) * bytes / g->tp.size);
      CHECK(sp["all_reduce"] == 3 * B * T * 4 + sp["replicated"] + 8);
    };
    check_step(1, sp1);
    check_step(2, sp2);
  }

  TEST_CASE("sequence-parallel embedding: a reduce-scatter along T, wpe added once, exact gradients") {
    auto g = tp_groups();
    const int64_t p = g->tp.size, r = g->tp.rank, B = 2, T = 2 * p, C = 8, V = 5 * p;
    auto table = shared_randn({V, C}, 21), positions = shared_randn({T, C}, 22), de = shared_randn({B, T, C}, 23);
    auto ids = torch::randint(V, {B, T}, at::detail::createCPUGenerator(24), torch::kLong);
    auto tf = table.clone().requires_grad_(), pf = positions.clone().requires_grad_();
    auto full = torch::embedding(tf, ids) + torch::embedding(pf, torch::arange(T));  // (B, T, C)
    (full * de).sum().backward();
    VocabParallelEmbedding wte(shard(table, ShardSpec{0, {V}}, r, p), g->tp, /*sp=*/true);
    SequenceShardedPositions wpe(positions.clone(), g->tp);
    comm_stats().reset();
    auto x = wte.forward(ids) + wpe.forward(torch::arange(T));  // (B, T/p, C)
    check_close(x, full.detach().chunk(p, 1)[r], "this rank's T/p of the embedding");
    (x * de.chunk(p, 1)[r]).sum().backward();
    check_close(wte.weight.grad(), shard(tf.grad(), ShardSpec{0, {V}}, r, p), "wte grad");
    all_reduce(g->tp, wpe.weight.grad());  // as the trainer does for sequence_parallel_params
    check_close(wpe.weight.grad(), pf.grad(), "wpe grad, summed over tp");
    CHECK(comm_stats().get("tp", "reduce_scatter").calls == 1);
    CHECK(comm_stats().get("tp", "reduce_scatter").bytes == B * T * C * 4);  // forward: the whole (B, T, C)
    CHECK(comm_stats().get("tp", "all_gather").bytes == B * T / p * C * 4);  // backward: this rank's gradient
    CHECK(comm_stats().get("tp", "all_reduce").calls == 1);                  // only the wpe sum above
  }
}

TEST_SUITE("mpi_tp_dp") {
  TEST_CASE("tp2 x dp2 parity: GPT-2") { tp_parity(GPTConfig::gpt2(), false, /*dp=*/2); }
  TEST_CASE("tp2 x dp2 parity: Llama with sequence parallel") { tp_parity(GPTConfig::llama(), true, /*dp=*/2); }
}
