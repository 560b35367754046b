// lightron/generate.hpp — sampling text from a trained model: temperature and top-k over the
// last position's logits, one token at a time (no KV cache: the whole window is recomputed,
// which is fine for the small models of the tutorials).
//
// `logits_fn` maps ids (1, t) to logits (1, t, V); a parallel model passes its collective
// forward, and every rank must then call generate() with the same seed to stay in step.
// Introduced in chapter 0.
#pragma once

#include "core.hpp"

namespace lightron {

// Draws one id from the last position's logits (V,): softmax(logits / temperature) restricted
// to the top_k most likely ids (top_k <= 0: all). temperature 0 means greedy.
inline int64_t sample_next(const torch::Tensor& logits, double temperature, int64_t top_k, torch::Generator& gen) {
  auto l = logits.to(torch::kFloat);
  if (temperature <= 0) return l.argmax().item<int64_t>();
  l = l / temperature;
  if (top_k > 0 && top_k < l.size(0)) {
    auto kth = std::get<0>(l.topk(top_k)).min();
    l = l.masked_fill(l < kth, -INFINITY);
  }
  return torch::multinomial(torch::softmax(l, -1), 1, /*replacement=*/false, gen).item<int64_t>();
}

inline std::vector<int64_t> generate(const std::function<torch::Tensor(const torch::Tensor&)>& logits_fn,
                                     std::vector<int64_t> ids, int64_t new_tokens, int64_t window, double temperature,
                                     int64_t top_k, uint64_t seed) {
  torch::NoGradGuard no_grad;
  auto gen = at::detail::createCPUGenerator(seed);
  for (int64_t i = 0; i < new_tokens; ++i) {
    const int64_t start = std::max<int64_t>(0, static_cast<int64_t>(ids.size()) - window);
    auto context = torch::tensor(std::vector<int64_t>(ids.begin() + start, ids.end()), torch::kLong).unsqueeze(0);
    auto logits = logits_fn(context);  // (1, t, V)
    ids.push_back(sample_next(logits[0][logits.size(1) - 1], temperature, top_k, gen));
  }
  return ids;
}

}  // namespace lightron
