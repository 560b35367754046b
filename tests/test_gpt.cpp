// Stage 0: the model itself. The numbers are pinned against PyTorch by reference_check.py
// (which runs the "reference_dump" suite below); here: shapes, names, init, learning.
#include "testing.hpp"

#include <cstdlib>

namespace test_gpt_detail {
using namespace lightron;
using lightron_testing::sizes_are;

GPTConfig tiny(GPTConfig c) { return lightron_testing::tiny_config(c); }
bool has_param(GPT& m, const std::string& name) { return m.named_parameters().find(name) != nullptr; }
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
