// 04_hybrid_3d — chapter 4: the three kinds of parallelism at once, on one grid of ranks:
// tensor parallel inside each pipeline stage, pipeline stages in a row, data-parallel copies
// of the whole row. 8 ranks = tp 2 x dp 2 x pp 2.
//
//   mpirun -np 8 --oversubscribe --allow-run-as-root --bind-to none -x OMP_NUM_THREADS=1 \
//       -x MASTER_PORT=29740 build/examples/04_hybrid_3d \
//       --data-path data/fortunes_text_document --tokenizer-model data/tokenizer.model
//
// Rank 0 prints the grid (every rank's coordinates and the members of its groups), the loss
// every 10 iterations (those of `00_single_device --train-iters 100`: the model, data and
// steps are the same, only cut differently) and two samples of generated text.
// About 25 s on 2 cores. tutorials/04_hybrid_3d.md walks through it.
#include <lightron/data.hpp>
#include <lightron/generate.hpp>
#include <lightron/trainer_tools.hpp>

#include <lightron/cli.hpp>

#include <filesystem>

using namespace lightron;

int main(int argc, char** argv) {
  return run_main([&] {
    std::string data_path, tokenizer_model;
    Layout layout = Layout().with_tp(2).with_pp(2);  // dp = ranks / (tp x pp), below
    ParallelOptions options;
    TrainConfig train;
    train.train_iters = 100;
    CLI::App app{"lightron chapter 4: tensor x data x pipeline parallel training of a small GPT"};
    app.add_option("--data-path", data_path, "prefix of a .bin/.idx pair")->required();
    app.add_option("--tokenizer-model", tokenizer_model, "SentencePiece .model (its .vocab is next to it)")->required();
    app.add_option("--tensor-model-parallel-size", layout.tp);
    app.add_option("--pipeline-model-parallel-size", layout.pp);
    app.add_flag("--sequence-parallel", options.sequence_parallel, "split norms/residuals along T over tp");
    app.add_option("--train-iters", train.train_iters, "optimizer steps");
    if (auto exit_code = parse_command_line(app, argc, argv)) return *exit_code;  // --help: 0, a bad flag: 2
    const LaunchEnv env = start_rank_process(/*num_threads=*/1);  // rank and world size from mpirun's environment
    require(layout.tp >= 1 && layout.pp >= 1, "--tensor-model-parallel-size ({}) and --pipeline-model-parallel-size "
            "({}) must be at least 1", layout.tp, layout.pp);
    require(env.world_size % (layout.tp * layout.pp) == 0, "the number of ranks ({}) must be a multiple of tp ({}) x "
            "pp ({}); launch with mpirun -np {}", env.world_size, layout.tp, layout.pp, 2 * layout.tp * layout.pp);
    layout.dp = env.world_size / (layout.tp * layout.pp);

    const SpmVocab vocab(spm_vocab_path(tokenizer_model));
    const GPTConfig model_config = course_gpt_config(vocab.size(), layout.tp);  // as in 00_single_device
    train.micro_batch_size = 4;
    train.global_batch_size = 16;  // = micro 4 x 2 micro-batches (the pipeline's m) x dp 2
    train.lr = 3e-3;
    train.min_lr = 3e-4;
    train.lr_warmup_iters = 50;
    validate_train_config(train, layout.dp);  // and the rest, before the rendezvous: fail fast
    validate_tensor_parallel(model_config, layout.tp, options.sequence_parallel);
    validate_pipeline(model_config.num_layers, layout.pp, 0, train.accumulation_steps(layout.dp), "1f1b");

    auto groups = init_process_groups(layout);
    const ProcessGroups& g = *groups;
    // The grid, gathered by rank 0: coordinates, then the global ranks of the tp, dp, pp groups.
    std::vector<int64_t> mine{g.rank, g.coords.tp, g.coords.dp, g.coords.pp};
    for (const Group* group : {&g.tp, &g.dp, &g.pp}) mine.insert(mine.end(), group->ranks.begin(), group->ranks.end());
    auto grid = all_gather(g.world, torch::tensor(mine).unsqueeze(0), 0);  // (ranks, 4 + tp + dp + pp)
    print0("layout tp {} x dp {} x pp {} | rank = tp_rank + tp (dp_rank + dp pp_rank)\n", layout.tp, layout.dp,
           layout.pp);
    print0("rank  tp  dp  pp   tp group   dp group   pp group\n");
    for (int64_t r = 0; r < g.world_size; ++r) {
      const int64_t* x = grid[r].data_ptr<int64_t>();
      auto members = [x](int64_t from, int64_t n) {  // global ranks, e.g. "{0,4}"
        return fmt::format("{{{}}}", fmt::join(x + from, x + from + n, ","));
      };
      print0("{:>4} {:>3} {:>3} {:>3}   {:<10} {:<10} {}\n", x[0], x[1], x[2], x[3], members(4, layout.tp),
             members(4 + layout.tp, layout.dp), members(4 + layout.tp + layout.dp, layout.pp));
    }

    IndexedDataset indexed(data_path);
    GPTDataset train_data(indexed, split_documents("969,30,1", indexed.num_sequences()).train,
                          model_config.seq_length, train.seed);
    // Each dp rank reads its slice of the global batch; the tp and pp ranks of one copy read the same.
    // [snippet: sampler]
    DataSampler sampler(train_data.size(), train.global_batch_size, train.micro_batch_size, int(g.coords.dp),
                        int(layout.dp), train.seed);
    Trainer trainer(model_config, train, options, *groups);  // the whole model, sharded, then cut to this stage
    // [end snippet: sampler]

    Timer timer;
    int64_t last_logged = 0;
    for (int64_t it = 1; it <= train.train_iters; ++it) {
      std::vector<Batch> micro;
      for (const auto& indices : sampler.next_global_batch()) micro.push_back(make_batch(train_data, indices));
      const double loss = trainer.step(micro, it);  // pipeline schedule, tp inside, dp gradients, AdamW
      if (it == 1 || it % 10 == 0 || it == train.train_iters) {
        print0("iteration {:>4}/{} | loss {:.4f} | grad norm {:.3f} | {:.0f} ms/iter\n", it, train.train_iters, loss,
               trainer.grad_norm, timer.seconds() * 1000 / double(it - last_logged));
        timer.reset();
        last_logged = it;
      }
    }

    // Sampling is a collective: every rank runs the same steps with the same seed.
    const char* prompts[] = {"The", "Love is"};
    for (uint64_t i = 0; i < 2; ++i) {
      // [snippet: sample]
      auto ids = generate([&](const torch::Tensor& x) { return full_logits(trainer, x); },
                          encode_with_cli(tokenizer_model, prompts[i]), /*new_tokens=*/40, model_config.seq_length,
                          /*temperature=*/0.8, /*top_k=*/40, /*seed=*/train.seed + i);
      // [end snippet: sample]
      print0("--- {}\n", vocab.decode(ids));
    }
    barrier(groups->world);
    return 0;
  });
}
