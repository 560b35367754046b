// Stage 0: the model itself. The numbers are pinned against PyTorch by reference_check.py
// (which runs the "reference_dump" suite below); here: shapes, names, init, learning.
#include "testing.hpp"

#include <cstdlib>

namespace test_gpt_detail {
using namespace lightron;
using lightron_testing::sizes_are;

GPTConfig tiny(GPTConfig c) { return lightron_testing::tiny_config(c); }
bool has_param(GPT& m, const std::string& name) { return m.named_parameters().find(name) != nullptr; }
// A test that sets ATen's thread count gives the old one back when it ends.
struct ThreadCountRestored {
  int threads = torch::get_num_threads();
  ~ThreadCountRestored() { torch::set_num_threads(threads); }
};
}  // namespace test_gpt_detail

using namespace test_gpt_detail;

TEST_CASE("gpt: both flavours produce (B, T, V) logits with GPT-2 parameter names") {
  for (auto flavour : {lightron::GPTConfig::gpt2(), lightron::GPTConfig::llama()}) {
    auto c = tiny(flavour);
    torch::manual_seed(0);
    GPT model(c);
    auto ids = torch::randint(c.vocab_size, {3, c.seq_length}, torch::kLong);
    CHECK(sizes_are(model.forward(ids), {3, c.seq_length, c.vocab_size}));
    for (auto name : {"wte.weight", "h.0.ln_1.weight", "h.1.attn.c_attn.weight", "h.1.attn.c_proj.weight",
                      "h.0.ln_2.weight", "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight", "ln_f.weight"})
      CHECK_MESSAGE(has_param(model, name), name);
    CHECK(has_param(model, "wpe.weight") == !c.rope());
    CHECK(has_param(model, "lm_head.weight") == !c.tied());
    CHECK(has_param(model, "h.0.attn.c_attn.bias") == c.add_bias_linear);
    CHECK(has_param(model, "h.0.ln_1.bias") == !c.rms_norm());
  }
}

TEST_CASE("gpt: fused shapes follow grouped-query attention and SwiGLU") {
  auto c = tiny(GPTConfig::llama());  // H=4, G=2, D=8, F=48
  GPT model(c);
  auto params = model.named_parameters();
  CHECK(sizes_are(params["h.0.attn.c_attn.weight"], {(4 + 2 * 2) * 8, 32}));
  CHECK(sizes_are(params["h.0.mlp.c_fc.weight"], {2 * 48, 32}));
  CHECK(sizes_are(params["h.0.mlp.c_proj.weight"], {32, 48}));
}

TEST_CASE("gpt: init uses init-method-std, and std/sqrt(2L) for residual projections") {
  auto c = GPTConfig::gpt2();
  c.num_layers = 8;
  c.hidden_size = 256;
  c.vocab_size = 512;
  c.seq_length = 32;
  torch::manual_seed(0);
  GPT model(c);
  auto params = model.named_parameters();
  CHECK(params["h.0.mlp.c_fc.weight"].std().item<double>() == doctest::Approx(0.02).epsilon(0.02));
  CHECK(params["h.0.mlp.c_proj.weight"].std().item<double>() == doctest::Approx(0.02 / 4.0).epsilon(0.02));
  CHECK(params["h.0.attn.c_attn.bias"].abs().max().item<double>() == 0.0);
  CHECK(params["ln_f.weight"].min().item<double>() == 1.0);
}

TEST_CASE("gpt: the seed fixes every weight") {
  auto c = tiny(GPTConfig::llama());
  torch::manual_seed(7);
  GPT a(c);
  torch::manual_seed(7);
  GPT b(c);
  for (const auto& p : a.named_parameters()) CHECK(torch::equal(p.value(), b.named_parameters()[p.key()]));
}

TEST_CASE("gpt: causal — changing a later token does not change earlier logits") {
  auto c = tiny(GPTConfig::llama());
  torch::manual_seed(0);
  GPT model(c);
  auto ids = torch::randint(c.vocab_size, {1, c.seq_length}, torch::kLong);
  auto changed = ids.clone();
  changed[0][c.seq_length - 1] = (ids[0][c.seq_length - 1].item<int64_t>() + 1) % c.vocab_size;
  auto a = model.forward(ids), b = model.forward(changed);
  CHECK(torch::equal(a.narrow(1, 0, c.seq_length - 1), b.narrow(1, 0, c.seq_length - 1)));
  CHECK_FALSE(torch::equal(a, b));
}

TEST_CASE("train: AdamW + schedule fit a fixed batch (loss falls by 2x in 30 steps)") {
  for (auto flavour : {GPTConfig::gpt2(), GPTConfig::llama()}) {
    auto c = tiny(flavour);
    torch::manual_seed(0);
    GPT model(c);
    TrainConfig t;
    t.lr = 1e-2;
    t.train_iters = 30;
    t.lr_warmup_iters = 3;
    AdamW opt(named_parameters_of(model), t);
    auto ids = torch::randint(c.vocab_size, {4, c.seq_length + 1}, torch::kLong);
    auto x = ids.narrow(1, 0, c.seq_length), y = ids.narrow(1, 1, c.seq_length);
    double first = 0, last = 0;
    for (int64_t it = 1; it <= t.train_iters; ++it) {
      opt.zero_grad();
      auto loss = model.loss(x, y);
      loss.backward();
      opt.step(lr_at(t, it));
      (it == 1 ? first : last) = loss.item<double>();
    }
    CHECK(last < first / 2);
  }
}

TEST_CASE("train: learning-rate schedule") {
  TrainConfig t;
  t.lr = 1.0;
  t.min_lr = 0.1;
  t.lr_warmup_iters = 10;
  t.train_iters = 110;
  CHECK(lr_at(t, 5) == doctest::Approx(0.5));
  CHECK(lr_at(t, 10) == doctest::Approx(1.0));
  CHECK(lr_at(t, 60) == doctest::Approx(0.55));  // half-way through cosine
  CHECK(lr_at(t, 110) == doctest::Approx(0.1));
  t.lr_decay_style = "linear";
  CHECK(lr_at(t, 35) == doctest::Approx(1.0 - 0.9 * 0.25));
  t.lr_decay_style = "constant";
  CHECK(lr_at(t, 100) == doctest::Approx(1.0));
}

TEST_CASE("train: AdamW matches torch.optim.AdamW's update rule on one step") {
  auto p = torch::tensor({1.0, -2.0}).set_requires_grad(true);
  TrainConfig t;
  t.weight_decay = 0.1;
  AdamW opt({{"w", p}}, t);  // 1-D: not decayed
  p.mutable_grad() = torch::tensor({0.5, 0.25});
  opt.step(0.1);
  // Step 1: m̂ = g, v̂ = g², update = lr · g / (|g| + eps) = ±lr.
  CHECK(p[0].item<double>() == doctest::Approx(0.9));
  CHECK(p[1].item<double>() == doctest::Approx(-2.1));
}

// kernels.hpp: AdamW in one pass against the _foreach_ form, over 5 steps with weight decay
// (FMA and the order of the two divisions differ: a few ulps).
TEST_CASE("kernels: adamw_one_pass takes the _foreach_ AdamW's steps") {
  const ThreadCountRestored restore;
  torch::set_num_threads(1);  // one thread: the _foreach_ form
  CHECK_FALSE(adamw_one_pass_applies({torch::zeros({4})}, {torch::zeros({4})}, {torch::zeros({4})}, {torch::zeros({4})}));
  torch::set_num_threads(2);
  torch::manual_seed(0);
  TrainConfig t;
  t.weight_decay = 0.1;
  auto make = [] { return std::vector<torch::Tensor>{torch::randn({70000}), torch::randn({3, 5})}; };
  auto p = make(), m = make(), v = make();
  for (auto& x : v) x.abs_();
  std::vector<torch::Tensor> p1, m1, v1;
  for (size_t i = 0; i < p.size(); ++i) p1.push_back(p[i].clone()), m1.push_back(m[i].clone()), v1.push_back(v[i].clone());
  AdamW reference({}, t);
  for (int step = 1; step <= 5; ++step) {
    const auto g = make();
    reference.step_count = step;
    reference.foreach_adamw(p, g, m, v, /*lr=*/1e-2, t.weight_decay);
    const auto version = p1[0]._version();
    REQUIRE(adamw_one_pass_applies(p1, g, m1, v1));
    adamw_one_pass(p1, g, m1, v1, step, 1e-2, t.adam_beta1, t.adam_beta2, t.weight_decay, t.adam_eps);
    CHECK(p1[0]._version() > version);  // autograd sees the weights change
  }
  for (size_t i = 0; i < p.size(); ++i) {
    CHECK(torch::allclose(p1[i], p[i], /*rtol=*/1e-6, /*atol=*/1e-7));
    CHECK(torch::allclose(m1[i], m[i], 1e-6, 1e-7));
    CHECK(torch::allclose(v1[i], v[i], 1e-6, 1e-7));
  }
  CHECK_FALSE(adamw_one_pass_applies({p[0].to(torch::kDouble)}, {p[0]}, {p[0]}, {p[0]}));
  CHECK_FALSE(adamw_one_pass_applies({p[1].t()}, {p[0]}, {p[0]}, {p[0]}));  // not contiguous
}

// kernels.hpp: the loss's in-place backward against log_softmax + nll_loss's, bit for bit.
TEST_CASE("kernels: cross_entropy_loss gives log_softmax + nll_loss's loss and gradient exactly") {
  torch::manual_seed(0);
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    auto x = (3 * torch::randn({37, 1000})).to(dtype).set_requires_grad(true);
    auto y = torch::randint(1000, {37}, torch::kLong);
    auto loss = lightron::cross_entropy_loss(x, y);
    (2.5 * loss).backward();
    auto x0 = x.detach().clone().set_requires_grad(true);
    auto loss0 = torch::nll_loss(torch::log_softmax(x0, -1, torch::kFloat), y);
    (2.5 * loss0).backward();
    const float got = loss.item<float>(), want = loss0.item<float>();
    CHECK(got == want);
    CHECK((x.grad().scalar_type() == dtype));
    CHECK(torch::equal(x.grad(), x0.grad()));
  }
}

TEST_CASE("kernels: cross_entropy_loss refuses what it cannot do rather than answer wrongly") {
  auto x = torch::randn({4, 10}).set_requires_grad(true);
  auto y = torch::tensor({1, 2, 3, 4}, torch::kLong);
  auto loss = lightron::cross_entropy_loss(x, y);
  loss.backward(/*gradient=*/{}, /*retain_graph=*/true);
  CHECK_THROWS_WITH_AS(loss.backward(), doctest::Contains("backward ran twice"), c10::Error);
  auto again = lightron::cross_entropy_loss(x, y);
  CHECK_THROWS_WITH_AS(torch::autograd::grad({again}, {x}, torch::autograd::variable_list{}, /*retain_graph=*/true,
                                             /*create_graph=*/true),
                       doctest::Contains("no double backward"), c10::Error);
  CHECK_THROWS_AS(lightron::cross_entropy_loss(x, torch::tensor({1, 2, 3, -100}, torch::kLong)), c10::Error);  // no ignored labels
}

TEST_CASE("kernels: attention with a head per thread gives the unfused attention's output and gradients") {
  const ThreadCountRestored restore;
  torch::set_num_threads(1);  // one thread: the unfused form
  CHECK_FALSE(CausalAttentionCPU::applies(torch::zeros({1, 2, 4, 4}), torch::zeros({1, 2, 4, 4}), torch::zeros({1, 2, 4, 4})));
  torch::set_num_threads(2);
  for (const int64_t D : {16, 12}) {  // sqrt(12) is not a power of two
    torch::manual_seed(0);
    auto q = torch::randn({2, 3, 20, D}).set_requires_grad(true), k = torch::randn({2, 3, 20, D}).set_requires_grad(true),
         v = torch::randn({2, 3, 20, D}).set_requires_grad(true);
    auto q0 = q.detach().clone().set_requires_grad(true), k0 = k.detach().clone().set_requires_grad(true),
         v0 = v.detach().clone().set_requires_grad(true);
    REQUIRE(CausalAttentionCPU::applies(q, k, v));
    const auto w = torch::randn({2, 3, 20, D});
    const auto y = CausalAttentionCPU::apply(q, k, v), y0 = causal_attention_unfused(q0, k0, v0);
    (y * w).sum().backward();
    (y0 * w).sum().backward();
    // measured: y, dq and dv identical; dk up to 4.8e-7 apart (values up to 2.8), the sums' order
    CHECK(torch::allclose(y, y0, /*rtol=*/1e-5, /*atol=*/1e-6));
    CHECK(torch::allclose(q.grad(), q0.grad(), 1e-5, 1e-6));
    CHECK(torch::allclose(k.grad(), k0.grad(), 1e-5, 1e-6));
    CHECK(torch::allclose(v.grad(), v0.grad(), 1e-5, 1e-6));
  }
  auto x = torch::randn({1, 2, 4, 4}).set_requires_grad(true);  // second derivatives: refused, not missing
  CHECK_THROWS_WITH_AS(torch::autograd::grad({CausalAttentionCPU::apply(x, x, x).sum()}, {x}, {}, /*retain_graph=*/true,
                                             /*create_graph=*/true),
                       doctest::Contains("no double backward"), c10::Error);
  CHECK_FALSE(CausalAttentionCPU::applies(torch::zeros({1, 2, 4, 4}, torch::kDouble), torch::zeros({1, 2, 4, 4}),
                                          torch::zeros({1, 2, 4, 4})));
}

TEST_CASE("kernels: linear with its two backward products at once gives torch::linear's output and gradients") {
  const ThreadCountRestored restore;
  torch::set_num_threads(2);  // LinearCPU applies with more than one thread
  for (const bool with_bias : {true, false}) {
    torch::manual_seed(0);
    auto x = torch::randn({3, 5, 16}).set_requires_grad(true), w = torch::randn({24, 16}).set_requires_grad(true);
    auto b = with_bias ? torch::randn({24}).set_requires_grad(true) : torch::Tensor();
    auto x0 = x.detach().clone().set_requires_grad(true), w0 = w.detach().clone().set_requires_grad(true);
    auto b0 = with_bias ? b.detach().clone().set_requires_grad(true) : torch::Tensor();
    REQUIRE(LinearCPU::applies(x, w));
    const auto dy = torch::randn({3, 5, 24});
    const auto y = lightron::linear(x, w, b), y0 = torch::linear(x0, w0, b0);
    (y * dy).sum().backward();
    (y0 * dy).sum().backward();
    // the same products as torch::linear's backward, each on one thread at these sizes: bit for bit
    CHECK(torch::equal(y, y0));
    CHECK(torch::equal(x.grad(), x0.grad()));
    CHECK(torch::equal(w.grad(), w0.grad()));
    if (with_bias) CHECK(torch::equal(b.grad(), b0.grad()));
  }
  auto frozen = torch::randn({4, 8});  // no gradient wanted for the input: only dW is computed
  auto w = torch::randn({2, 8}).set_requires_grad(true);
  lightron::linear(frozen, w).sum().backward();
  CHECK(torch::allclose(w.grad(), frozen.sum(0).expand({2, 8}), 1e-5, 1e-6));
  CHECK_THROWS_WITH_AS(torch::autograd::grad({lightron::linear(frozen, w).sum()}, {w}, {}, /*retain_graph=*/true,
                                             /*create_graph=*/true),
                       doctest::Contains("no double backward"), c10::Error);
}

TEST_CASE("kernels: gelu in the CPU's vectors is as close to the exact tanh GELU as LibTorch's, and propagates NaN") {
  const ThreadCountRestored restore;
  torch::manual_seed(0);
  const auto x = torch::cat({torch::linspace(-12, 12, 240000), 4 * torch::randn({10000})}), dy = torch::randn_like(x);
  const auto x64 = x.to(torch::kDouble);
  const auto y64 = torch::gelu(x64, "tanh"), dx64 = at::gelu_backward(dy.to(torch::kDouble), x64, "tanh");
  // the largest of |a - exact| - 1e-6 |exact|: measured 2.7e-10 (y) and 3.0e-6 (dx) for each
  // instruction set, LibTorch's own gelu 1.5e-7 and 3.6e-6 (not asserted: it is not lightron's)
  const auto excess = [](const torch::Tensor& a, const torch::Tensor& exact) {
    return ((a.to(torch::kDouble) - exact).abs() - 1e-6 * exact.abs()).max().item<double>();
  };
#ifdef LIGHTRON_GELU_KERNEL
  using Run = void (*)(const float*, const float*, float*, int64_t);
  std::vector<std::tuple<const char*, Run, Run>> sets{{"sse", gelu_simd::run_sse<false>, gelu_simd::run_sse<true>}};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    sets.emplace_back("avx2", gelu_simd::run_avx2<false>, gelu_simd::run_avx2<true>);
  if (__builtin_cpu_supports("avx512f")) sets.emplace_back("avx512", gelu_simd::run_avx512<false>, gelu_simd::run_avx512<true>);
  for (const auto& [name, forward, backward] : sets) {
    CAPTURE(name);
    auto y = torch::empty_like(x), dx = torch::empty_like(x);
    forward(x.data_ptr<float>(), nullptr, y.data_ptr<float>(), x.numel());
    backward(x.data_ptr<float>(), dy.data_ptr<float>(), dx.data_ptr<float>(), x.numel());
    CHECK(excess(y, y64) <= 1e-9);
    CHECK(excess(dx, dx64) <= 1e-5);
  }
#endif
  torch::set_num_threads(1);  // one thread: LibTorch's gelu
  CHECK_FALSE(GeluCPU::applies(x));
  torch::set_num_threads(2);
#ifdef LIGHTRON_GELU_KERNEL
  REQUIRE(GeluCPU::applies(x));
#endif
  auto xg = x.view({-1, 50}).t().set_requires_grad(true);  // not contiguous, through autograd
  const auto y = gelu_tanh(xg);
  (y * dy.view({-1, 50}).t()).sum().backward();
  CHECK(excess(y.t().reshape(-1), y64) <= 1e-9);
  CHECK(excess(xg.grad().t().reshape(-1), dx64) <= 1e-5);
  const auto odd = torch::tensor({NAN, -20.0f, 20.0f, 0.0f, -1e30f, 1e30f});  // odd sizes: a tail
  const auto y_odd = gelu_tanh(odd.repeat({7}));
  CHECK(std::isnan(y_odd[0].item<float>()));
  CHECK(torch::equal(y_odd.slice(0, 1, 6), torch::tensor({0.0f, 20.0f, 0.0f, 0.0f, 1e30f})));
#ifdef LIGHTRON_GELU_KERNEL
  auto z = torch::randn({8}).set_requires_grad(true);  // second derivatives: refused, not missing
  CHECK_THROWS_WITH_AS(torch::autograd::grad({gelu_tanh(z).sum()}, {z}, {}, /*retain_graph=*/true, /*create_graph=*/true),
                       doctest::Contains("no double backward"), c10::Error);
#endif
}

// Writes the model's weights, a batch, logits, loss and gradients for reference_check.py.
TEST_CASE("reference dump" * doctest::test_suite("reference_dump")) {
  const char* dir = std::getenv("LIGHTRON_DUMP_DIR");
  REQUIRE_MESSAGE(dir != nullptr, "set LIGHTRON_DUMP_DIR (tests/reference_check.py does)");
  for (auto [name, flavour] : {std::pair{"gpt2", GPTConfig::gpt2()}, std::pair{"llama", GPTConfig::llama()}}) {
    auto c = tiny(flavour);
    c.rotary_base = 500.0;
    torch::manual_seed(1);
    GPT model(c);
    {  // non-trivial norms and biases, so that the check sees them
      torch::NoGradGuard no_grad;
      for (auto& p : model.named_parameters())
        if (p.key().find("ln_") != std::string::npos || p.key().find("bias") != std::string::npos)
          p.value().add_(torch::randn_like(p.value()) * 0.1);
    }
    auto ids = torch::randint(c.vocab_size, {2, c.seq_length + 1}, torch::kLong);
    auto x = ids.narrow(1, 0, c.seq_length).contiguous(), y = ids.narrow(1, 1, c.seq_length).contiguous();
    auto logits = model.forward(x);
    auto loss = model.loss_fn(logits, y);
    loss.backward();
    c10::Dict<std::string, torch::Tensor> dump;
    auto integer = [](int64_t v) { return torch::tensor(v, torch::kLong); };
    auto real = [](double v) { return torch::tensor(v, torch::kDouble); };
    dump.insert("config.num_layers", integer(c.num_layers));
    dump.insert("config.hidden_size", integer(c.hidden_size));
    dump.insert("config.ffn_hidden_size", integer(c.ffn_hidden_size));
    dump.insert("config.num_attention_heads", integer(c.num_attention_heads));
    dump.insert("config.num_query_groups", integer(c.num_query_groups));
    dump.insert("config.seq_length", integer(c.seq_length));
    dump.insert("config.max_position_embeddings", integer(c.max_position_embeddings));
    dump.insert("config.vocab_size", integer(c.vocab_size));
    dump.insert("config.normalization", integer(c.rms_norm() ? 1 : 0));
    dump.insert("config.position_embedding_type", integer(c.rope() ? 1 : 0));
    dump.insert("config.swiglu", integer(c.swiglu));
    dump.insert("config.untie", integer(!c.tied()));
    dump.insert("config.bias", integer(c.add_bias_linear));
    dump.insert("config.rotary_base", real(c.rotary_base));
    dump.insert("config.norm_epsilon", real(c.norm_epsilon));
    for (auto& p : model.named_parameters()) {
      dump.insert("param." + p.key(), p.value().detach());
      dump.insert("grad." + p.key(), p.value().grad());
    }
    dump.insert("tokens", x);
    dump.insert("labels", y);
    dump.insert("logits", logits.detach());
    dump.insert("loss", loss.detach());
    auto bytes = torch::pickle_save(dump);
    std::ofstream(std::string(dir) + "/" + name + ".pt", std::ios::binary).write(bytes.data(), bytes.size());
  }
}
