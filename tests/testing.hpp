// Shared by the test files (they are compiled together as one unity build).
// LibTorch's headers bring glog's one-argument CHECK; doctest's must win, in every file.
#pragma once

#include <lightron/lightron.hpp>

#include <doctest/doctest.h>
#undef CHECK
#define CHECK(...) DOCTEST_CHECK(__VA_ARGS__)

#include <map>

namespace lightron_testing {
using namespace lightron;

inline bool sizes_are(const torch::Tensor& t, std::vector<int64_t> sizes) { return t.sizes().vec() == sizes; }

// A model small enough to train 20 steps in a second, in both flavours.
inline GPTConfig tiny_config(GPTConfig c, int64_t layers = 2) {
  c.num_layers = layers;
  c.hidden_size = 32;
  c.num_attention_heads = 4;
  c.seq_length = 16;
  c.vocab_size = 64;
  if (c.swiglu) {
    c.ffn_hidden_size = 48;
    c.num_query_groups = 2;
  }
  return c;
}

// A model whose activations dominate what a forward leaves behind (T = 64, C = 64): the
// memory tests measure it.
inline GPTConfig memory_config(GPTConfig flavour) {
  auto c = tiny_config(flavour, /*layers=*/4);
  c.hidden_size = 64;
  c.seq_length = 64;
  c.vocab_size = 128;
  if (c.swiglu) c.ffn_hidden_size = 96;
  return c;
}

inline TrainConfig tiny_train(int64_t global_batch, int64_t micro_batch, int64_t iters = 20) {
  TrainConfig t;
  t.global_batch_size = global_batch;
  t.micro_batch_size = micro_batch;
  t.train_iters = iters;
  t.lr = 3e-3;
  t.min_lr = 3e-4;
  t.lr_warmup_iters = 2;
  t.clip_grad = 1.0;
  t.adam_eps = 1e-6;
  return t;
}

using RunResult = ParityRun;  // losses, grad norms, full parameters at the end (parity.hpp)

// Trains `iters` steps of mock data on the given groups; every rank returns the same losses.
inline RunResult run_training(const GPTConfig& c, const TrainConfig& t, const ParallelOptions& o, ProcessGroups& g) {
  MockGPTDataset data(c.vocab_size, c.seq_length, /*num_samples=*/4096, /*seed=*/t.seed);
  DataSampler sampler(data.size(), t.global_batch_size, t.micro_batch_size, int(g.coords.dp), int(g.layout.dp), t.seed);
  Trainer trainer(c, t, o, g);
  return record_run(trainer, data, sampler, t.train_iters);
}

// The single-device run, computed on this rank alone (a world of one).
inline RunResult run_reference(const GPTConfig& c, const TrainConfig& t) {
  return run_training(c, t, ParallelOptions{}, *single_rank_groups());
}

// Stated tolerance for cross-layout parity in fp32: relative 1e-5 on every loss and grad
// norm; on parameters, per tensor, max|a - b| <= 1e-5 · max|ref| + 1e-6 (parity.hpp).
// (tiny_train's adam_eps of 1e-6 keeps Adam from normalising the rounding noise of the
// key bias's zero gradient into steps of size ~lr; with eps 1e-8 the drift reached 1.3e-5
// in 20 steps.)
constexpr double kParityTolerance = 1e-5;

inline void check_parity(const RunResult& ref, const RunResult& run, double tol = kParityTolerance) {
  ParityTolerance tolerance;
  tolerance.relative = tol;
  const ParityReport report = compare_runs(ref, run, tolerance);
  CHECK_MESSAGE(report.equal, report.summary());
  MESSAGE(report.summary());
}

}  // namespace lightron_testing
