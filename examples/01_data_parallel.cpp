// 01_data_parallel — chapter 1: the loop of 00_single_device on N ranks, each with a full copy of
// the model and its own slice of every global batch; gradients are averaged across ranks.
//
//   mpirun -np 2 --oversubscribe --allow-run-as-root -x OMP_NUM_THREADS=1 \
//       build/examples/01_data_parallel --data-path data/fortunes_text_document \
//       --tokenizer-model data/tokenizer.model --ddp-impl bucketed --check-weight-hash-interval 50
//
// Open MPI refuses to start as root without --allow-run-as-root, and refuses more ranks than
// cores without --oversubscribe; -x passes the variable to every rank (one thread each).
// Rank 0 prints one line every 10 iterations: the loss averaged over the ranks, and whether the
// replicas' weights still hash equal. The global batch is fixed (16), so -np 1 takes the
// same steps with 2 micro-batches of gradient accumulation. tutorials/01_data_parallel.md.
#include <lightron/data.hpp>
#include <lightron/data_parallel.hpp>
#include <lightron/parity.hpp>  // check_replicas
#include <lightron/gpt.hpp>
#include <lightron/train.hpp>

#include <lightron/cli.hpp>

#include <cmath>  // sqrt
#include <filesystem>

using namespace lightron;

int main(int argc, char** argv) {
  return run_main([&] {
    std::string data_path, tokenizer_model, ddp_impl = "bucketed";
    int64_t train_iters = 150, micro_batch_size = 8, global_batch_size = 16, bucket_size = 250000;
    int64_t check_weight_hash_interval = 0;
    int num_threads = 1;
    CLI::App app{"lightron chapter 1: data-parallel training of a small GPT"};
    app.add_option("--data-path", data_path, "prefix of a .bin/.idx pair")->required();
    app.add_option("--tokenizer-model", tokenizer_model, "SentencePiece .model (its .vocab is next to it)")->required();
    app.add_option("--train-iters", train_iters, "optimizer steps");
    app.add_option("--micro-batch-size", micro_batch_size, "samples per forward/backward");
    app.add_option("--global-batch-size", global_batch_size, "samples per step, all ranks together");
    app.add_option("--ddp-impl", ddp_impl, "naive or bucketed")->check(CLI::IsMember({"naive", "bucketed"}));
    app.add_option("--ddp-bucket-size", bucket_size, "elements per gradient bucket");
    app.add_option("--check-weight-hash-interval", check_weight_hash_interval, "0 disables");
    app.add_option("--num-threads", num_threads, "CPU threads per rank");
    if (auto exit_code = parse_command_line(app, argc, argv)) return *exit_code;  // --help: 0, a bad flag: 2
    const LaunchEnv env = start_rank_process(num_threads);  // rank and world size from mpirun's environment

    const SpmVocab vocab(spm_vocab_path(tokenizer_model));
    const GPTConfig model_config = course_gpt_config(vocab.size(), /*tp_size=*/1);  // as in 00_single_device
    TrainConfig train;
    train.micro_batch_size = micro_batch_size;
    train.global_batch_size = global_batch_size;
    train.train_iters = train_iters;
    train.lr = 3e-3;
    train.min_lr = 3e-4;
    train.lr_warmup_iters = 50;
    validate_train_config(train, /*dp_size=*/env.world_size);  // before the rendezvous: fail fast

    // [snippet: groups]
    auto groups = init_process_groups(Layout().with_dp(env.world_size));
    const Group& dp = groups->dp;
    // [end snippet: groups]

    IndexedDataset indexed(data_path);
    GPTDataset train_data(indexed, split_documents("969,30,1", indexed.num_sequences()).train,
                          model_config.seq_length, train.seed);
    // Every rank shuffles the same way and takes its own contiguous slice of each global batch.
    DataSampler sampler(train_data.size(), train.global_batch_size, train.micro_batch_size, dp.rank, dp.size,
                        train.seed);

    torch::manual_seed(train.seed);  // the same seed on every rank: identical replicas
    auto model = std::make_shared<GPT>(model_config);
    const auto named_params = named_parameters_of(*model);
    std::vector<torch::Tensor> params;
    for (const auto& [name, p] : named_params) params.push_back(p);
    AdamW optimizer(named_params, train);
    std::unique_ptr<BucketedDataParallel> ddp;  // declared after groups: destroyed before them
    if (ddp_impl == "bucketed") ddp = std::make_unique<BucketedDataParallel>(named_params, dp, bucket_size);
    const int64_t accumulation = train.accumulation_steps(dp.size);
    print0("{} rank(s) | dp {} | {} | global batch {} = micro {} x accumulation {} x dp {}\n", env.world_size, dp.size,
           ddp ? fmt::format("bucketed: {} buckets", ddp->num_buckets()) : "naive: one all-reduce per parameter",
           train.global_batch_size, train.micro_batch_size, accumulation, dp.size);

    Timer timer;
    int64_t last_logged = 0;
    for (int64_t it = 1; it <= train.train_iters; ++it) {
      const auto micro_batches = sampler.next_global_batch();  // this rank's slice only
      optimizer.zero_grad();  // in place: under ddp the gradients are views into its buckets
      auto loss = torch::zeros({}, torch::kDouble);
      // [snippet: accumulation]
      for (int64_t m = 0; m < accumulation; ++m) {
        BucketedDataParallel::NoSync no_sync;  // only the last backward communicates:
        if (ddp && m + 1 < accumulation) no_sync = ddp->no_sync();  // the earlier ones only accumulate
        const Batch batch = make_batch(train_data, micro_batches[m]);
        auto micro_loss = model->loss(batch.tokens, batch.labels) / double(accumulation);
        micro_loss.backward();  // bucketed: all-reduces start here, as buckets fill
        loss += micro_loss.detach().to(torch::kDouble);
      // [end snippet: accumulation]
      }
      // [snippet: average_gradients]
      if (ddp) ddp->finish();                       // wait for the buckets' all-reduces
      else all_reduce_gradients(params, dp);        // naive: one all-reduce per parameter, now
      // [end snippet: average_gradients]
      all_reduce(dp, loss, /*average=*/true);       // for the log line only
      const auto norm = grad_sq_norm(params).sqrt();
      clip_grads(params, norm, train.clip_grad);
      const double grad_norm = norm.item<double>();
      optimizer.step(lr_at(train, it));
      const bool check = check_weight_hash_interval > 0 && it % check_weight_hash_interval == 0;
      if (check) check_replicas(params, dp, it);  // throws, naming the rank that diverged
      if (it == 1 || it % 10 == 0 || it == train.train_iters) {
        print0("iteration {:>4}/{} | loss {:.4f} | grad norm {:.3f} | {:.0f} ms/iter{}\n", it, train.train_iters,
               loss.item<double>(), grad_norm, timer.seconds() * 1000 / double(it - last_logged),
               check ? " | replicas identical" : "");
        timer.reset();
        last_logged = it;
      }
    }
    barrier(groups->world);  // nobody leaves (rank 0 hosts the store) while others still talk
    return 0;
  });
}
