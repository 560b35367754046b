// 00_single_device — chapter 0: train a small GPT in one process, the whole loop in view.
//
//   build/examples/00_single_device --data-path data/fortunes_text_document \
//       --tokenizer-model data/tokenizer.model
//
// Prints the model and data sizes, one line every 10 iterations (loss, learning rate,
// gradient norm, ms/iter; the loss falls from 7.6 = ln 2048 to about 5.5 in 150 iterations), and
// two samples of generated text. About 12 s on 2 idle cores. tutorials/00_single_device.md
// walks through it; examples/pretrain_gpt.cpp is the same loop with every flag.
#include <lightron/data.hpp>
#include <lightron/generate.hpp>
#include <lightron/gpt.hpp>
#include <lightron/train.hpp>

#include <lightron/cli.hpp>

#include <cmath>  // sqrt
#include <filesystem>

using namespace lightron;

int main(int argc, char** argv) {
  return run_main([&] {
    std::string data_path, tokenizer_model;
    int64_t train_iters = 150;
    int num_threads = 2;
    CLI::App app{"lightron chapter 0: train a small GPT on one process"};
    app.add_option("--data-path", data_path, "prefix of a .bin/.idx pair")->required();
    app.add_option("--tokenizer-model", tokenizer_model, "SentencePiece .model (its .vocab is next to it)")->required();
    app.add_option("--train-iters", train_iters, "optimizer steps");
    app.add_option("--num-threads", num_threads, "CPU threads");
    if (auto exit_code = parse_command_line(app, argc, argv)) return *exit_code;  // --help: 0, a bad flag: 2
    setup_process(num_threads);

    // The model: GPT-2 flavour, small enough for a laptop CPU.
    SpmVocab vocab(spm_vocab_path(tokenizer_model));  // spm_train writes both
    const GPTConfig model_config = course_gpt_config(vocab.size());  // L 4, C 128, H 4, T 64 (gpt_config.hpp)

    TrainConfig train;
    train.micro_batch_size = train.global_batch_size = 16;  // B
    train.train_iters = train_iters;
    train.lr = 3e-3;
    train.min_lr = 3e-4;
    train.lr_warmup_iters = 50;
    validate_train_config(train, /*dp_size=*/1);

    // The data: documents -> train split -> samples of T+1 tokens -> batches of B samples.
    IndexedDataset indexed(data_path);
    const SplitRanges split = split_documents("969,30,1", indexed.num_sequences());
    GPTDataset train_data(indexed, split.train, model_config.seq_length, train.seed);
    DataSampler sampler(train_data.size(), train.global_batch_size, train.micro_batch_size,
                        /*dp_rank=*/0, /*dp_size=*/1, train.seed);

    torch::manual_seed(train.seed);  // fixes every initial weight
    auto model = std::make_shared<GPT>(model_config);
    const auto named_params = named_parameters_of(*model);
    std::vector<torch::Tensor> params;
    int64_t num_params = 0;
    for (const auto& [name, p] : named_params) params.push_back(p), num_params += p.numel();
    AdamW optimizer(named_params, train);
    print0("model: {} parameters (L {}, C {}, H {}, T {}, V {}) | data: {} training samples | batch {}\n", num_params,
           model_config.num_layers, model_config.hidden_size, model_config.num_attention_heads,
           model_config.seq_length, model_config.vocab_size, train_data.size(), train.global_batch_size);

    Timer timer;
    int64_t last_logged = 0;
    for (int64_t it = 1; it <= train.train_iters; ++it) {
      // [snippet: step]
      const Batch batch = make_batch(train_data, sampler.next_global_batch()[0]);  // (B, T) each
      optimizer.zero_grad();
      auto loss = model->loss(batch.tokens, batch.labels);  // forward: mean cross-entropy
      loss.backward();                                      // backward: p.grad() for every p
      const auto norm = grad_sq_norm(params).sqrt();
      clip_grads(params, norm, train.clip_grad);
      const double grad_norm = norm.item<double>();
      const double lr = lr_at(train, it);                   // warmup, then cosine decay
      optimizer.step(lr);
      // [end snippet: step]
      if (it == 1 || it % 10 == 0 || it == train.train_iters) {
        const double ms_per_iter = timer.seconds() * 1000 / double(it - last_logged);
        print0("iteration {:>4}/{} | loss {:.4f} | lr {:.2e} | grad norm {:.3f} | {:.0f} ms/iter\n", it,
               train.train_iters, loss.item<double>(), lr, grad_norm, ms_per_iter);
        timer.reset();
        last_logged = it;
      }
    }

    // Sampling: encode a prompt, extend it token by token, decode.
    const char* prompts[] = {"The", "Love is"};
    for (uint64_t i = 0; i < 2; ++i) {
      auto ids = generate([&](const torch::Tensor& x) { return model->forward(x); },
                          encode_with_cli(tokenizer_model, prompts[i]), /*new_tokens=*/40, model_config.seq_length,
                          /*temperature=*/0.8, /*top_k=*/40, /*seed=*/train.seed + i);
      print0("--- {}\n", vocab.decode(ids));
    }
    return 0;
  });
}
