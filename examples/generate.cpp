// generate — sample text from a lightron checkpoint (any layout) or a HuggingFace directory
// (config.json + model.safetensors, GPT-2 or Llama). One process.
//
//   build/examples/generate --load runs/ckpt --tokenizer-model data/tokenizer.model \
//       --prompt "Love is" --max-new-tokens 40 --temperature 0.8 --top-k 40
//
// The tokenizer must be the one the model was trained with; temperature 0 is greedy.
#include <lightron/data.hpp>
#include <lightron/generate.hpp>
#include <lightron/hf_export.hpp>

#include <lightron/cli.hpp>

using namespace lightron;

int main(int argc, char** argv) {
  return run_main([&] {
    std::string load, tokenizer_model, prompt = "The ";
    int64_t max_new_tokens = 40, top_k = 40, num_samples = 1;
    double temperature = 0.8;
    uint64_t seed = 1234;
    int num_threads = 2;
    CLI::App app{"lightron: sample text from a checkpoint or a HuggingFace directory"};
    app.add_option("--load", load, "lightron checkpoint or HuggingFace directory")->required();
    app.add_option("--tokenizer-model", tokenizer_model, "SentencePiece .model (its .vocab is next to it)")->required();
    app.add_option("--prompt", prompt);
    app.add_option("--max-new-tokens", max_new_tokens);
    app.add_option("--temperature", temperature, "0: greedy");
    app.add_option("--top-k", top_k, "0: the whole vocabulary");
    app.add_option("--num-samples", num_samples);
    app.add_option("--seed", seed);
    app.add_option("--num-threads", num_threads);
    if (auto exit_code = parse_command_line(app, argc, argv)) return *exit_code;  // --help: 0, a bad flag: 2
    setup_process(num_threads);
    const ModelWeights weights = read_model_weights(load);
    auto model = weights.model();
    const SpmVocab vocab(spm_vocab_path(tokenizer_model));  // next to the model
    require(vocab.size() <= weights.config.vocab_size, "{}: the tokenizer has {} pieces, more than the model's vocabulary "
            "({}); use the tokenizer the model was trained with", tokenizer_model, vocab.size(), weights.config.vocab_size);
    const auto ids = encode_with_cli(tokenizer_model, prompt);
    fmt::print("{}: {} layers, hidden {}, vocab {} | prompt {} tokens | temperature {}, top-k {}\n", load,
               weights.config.num_layers, weights.config.hidden_size, weights.config.vocab_size, ids.size(), temperature,
               top_k);
    for (int64_t i = 0; i < num_samples; ++i) {
      auto out = generate([&](const torch::Tensor& x) { return model->forward(x); }, ids, max_new_tokens,
                          weights.config.seq_length, temperature, top_k, seed + uint64_t(i));
      fmt::print("--- {}\n", vocab.decode(out));
    }
    return 0;
  });
}
