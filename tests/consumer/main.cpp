// consumer — a program outside lightron that uses it as any project would (built twice by
// tests/consumer_test.sh: against an installed lightron, and with add_subdirectory). It
// includes everything, builds a small GPT and prints the shape of one forward's logits.
#include <lightron/lightron.hpp>

int main() {
  return lightron::run_main([] {
    torch::manual_seed(0);
    lightron::GPTConfig config = lightron::GPTConfig::gpt2();
    config.num_layers = 2;           // L
    config.hidden_size = 32;         // C
    config.num_attention_heads = 4;  // H
    config.seq_length = 8;           // T
    config.vocab_size = 128;         // V
    lightron::GPT model(config);
    const auto ids = torch::randint(config.vocab_size, {2, config.seq_length}, torch::kLong);  // (B, T)
    const auto logits = model.forward(ids);                                                     // (B, T, V)
    fmt::print("lightron consumer: logits ({})\n", fmt::join(logits.sizes(), ", "));
    return logits.sizes().vec() == std::vector<int64_t>{2, config.seq_length, config.vocab_size} ? 0 : 1;
  });
}
