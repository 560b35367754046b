// mpirun -np 4 --oversubscribe --allow-run-as-root --bind-to none -x OMP_NUM_THREADS=1 -x MASTER_PORT=29770 build/examples/05_zero --strategy optim_grads
//
// 05_zero — chapter 7: ZeRO. Chapter 1's data-parallel loop, written out again, with the
// training state sharded over the dp group instead of copied to every rank:
//   --strategy no_shard     plain data parallelism (chapter 1): every rank holds everything;
//   --strategy optim        ZeRO-1: each rank keeps AdamW's moments for 1/dp of the weights;
//   --strategy optim_grads  ZeRO-2: ... and only the averaged gradients of that 1/dp;
//   --strategy optim_grads_params  ZeRO-3: ... and only that 1/dp of the weights, each block's
//                           gathered while it computes (zero3.hpp).
// (pretrain_gpt's --data-parallel-sharding-strategy has the same names.) Rank 0 prints, after
// the first step, the bytes every rank holds (weights + gradients + AdamW) next to what plain
// data parallelism holds, and the planner's formula; the bytes the dp group sent in one step;
// then the loss every 5 iterations, which is the same for every strategy (the same seed, data
// and steps: only where the numbers live changes). Mock data (random tokens) unless
// --data-path and --tokenizer-model are given. About 10 s on 2 cores. tutorials/07_zero.md.
#include <lightron/data.hpp>
#include <lightron/gpt.hpp>
#include <lightron/memory.hpp>  // estimate_memory: the planner of --dry-run
#include <lightron/zero3.hpp>

#include <lightron/cli.hpp>

#include <set>

using namespace lightron;

// The bytes this rank's tensors occupy: weights (ZeRO-3: the slices, and any weight gathered
// at the moment), gradients (each storage once: under data parallelism and ZeRO-1 they are
// views into the buckets), AdamW's two moments.
struct Held {
  int64_t weights = 0, gradients = 0, adam = 0;
  int64_t total() const { return weights + gradients + adam; }
};
Held held_by(const std::vector<torch::Tensor>& params, const AdamW* optimizer, const DistributedOptimizer* zero) {
  Held h;
  std::set<const void*> seen;
  for (const auto& p : params) {
    h.weights += int64_t(p.storage().nbytes());  // 0 for a weight ZeRO-3 has freed
    if (p.grad().defined() && seen.insert(p.grad().storage().data()).second) h.gradients += p.grad().storage().nbytes();
  }
  if (zero) {
    h.weights += zero->weight_shard_bytes();      // ZeRO-3
    h.gradients += zero->gradient_shard_bytes();  // ZeRO-2/3: the full gradients were freed during backward
    h.adam = zero->optimizer_bytes();
  } else {
    for (const auto& s : optimizer->slots) h.adam += nbytes(s.exp_avg) + nbytes(s.exp_avg_sq);
  }
  return h;
}

int main(int argc, char** argv) {
  return run_main([&] {
    std::string strategy = "optim_grads", data_path, tokenizer_model;
    int64_t train_iters = 10, micro_batch_size = 2, global_batch_size = 16, bucket_size = 100000, vocab_size = 2048;
    CLI::App app{"lightron chapter 7: ZeRO-1, 2 and 3, the data-parallel step with the training state sharded"};
    app.add_option("--strategy", strategy, "no_shard, optim (ZeRO-1), optim_grads (ZeRO-2), optim_grads_params (ZeRO-3)")
        ->check(CLI::IsMember({"no_shard", "optim", "optim_grads", "optim_grads_params"}));
    app.add_option("--train-iters", train_iters, "optimizer steps");
    app.add_option("--micro-batch-size", micro_batch_size, "samples per forward/backward");
    app.add_option("--global-batch-size", global_batch_size, "samples per step, all ranks together");
    app.add_option("--ddp-bucket-size", bucket_size, "elements per gradient bucket");
    app.add_option("--vocab-size", vocab_size, "for mock data");
    app.add_option("--data-path", data_path, "prefix of a .bin/.idx pair (default: mock data)");
    app.add_option("--tokenizer-model", tokenizer_model, "SentencePiece .model, with --data-path");
    if (auto exit_code = parse_command_line(app, argc, argv)) return *exit_code;  // --help: 0, a bad flag: 2
    require(data_path.empty() == tokenizer_model.empty(), "give both --data-path and --tokenizer-model, or neither "
            "(mock data)");
    const LaunchEnv env = start_rank_process(/*num_threads=*/1);  // rank and world size from mpirun's environment

    if (!tokenizer_model.empty()) vocab_size = SpmVocab(spm_vocab_path(tokenizer_model)).size();
    const GPTConfig model_config = course_gpt_config(vocab_size);  // as in 00_single_device
    TrainConfig train;
    train.micro_batch_size = micro_batch_size;
    train.global_batch_size = global_batch_size;
    train.train_iters = train_iters;
    train.lr = 3e-3;
    train.min_lr = 3e-4;
    train.lr_warmup_iters = 5;
    validate_train_config(train, /*dp_size=*/env.world_size);  // before the rendezvous: fail fast

    auto groups = init_process_groups(Layout().with_dp(env.world_size));
    const Group& dp = groups->dp;
    // ZeRO shards over dp; with one rank there is nothing to shard (as in Trainer).
    const int stage = dp.size > 1 ? zero_stage(strategy) : 0;

    std::unique_ptr<GPTSampleSource> train_data;
    std::unique_ptr<IndexedDataset> indexed;
    if (data_path.empty()) {
      train_data = std::make_unique<MockGPTDataset>(model_config.vocab_size, model_config.seq_length,
                                                    /*num_samples=*/4096, train.seed);
    } else {
      indexed = std::make_unique<IndexedDataset>(data_path);
      train_data = std::make_unique<GPTDataset>(*indexed, split_documents("969,30,1", indexed->num_sequences()).train,
                                                model_config.seq_length, train.seed);
    }
    DataSampler sampler(train_data->size(), train.global_batch_size, train.micro_batch_size, dp.rank, dp.size,
                        train.seed);

    torch::manual_seed(train.seed);  // the same seed on every rank: identical replicas
    auto model = std::make_shared<GPT>(model_config);
    const auto named_params = named_parameters_of(*model);
    const auto params = parameters_of(named_params);

    // [snippet: zero_compose]
    // Plain dp: a whole AdamW and buckets that all-reduce. ZeRO: the optimizer owns this rank's
    // slices, and tells the buckets how to communicate (reduce-scatter; ZeRO-2/3: then free).
    // ZeRO-3 buckets by block (zero_units) and frees the whole weights (ShardedWeights).
    std::unique_ptr<AdamW> optimizer;
    std::unique_ptr<DistributedOptimizer> distributed;
    if (stage > 0) {
      std::vector<std::string> names;
      for (const auto& [name, p] : named_params) names.push_back(name);
      distributed = std::make_unique<DistributedOptimizer>(named_params, dp, train, stage, bucket_size,
                                                           zero_units(names, stage, /*tied_shared=*/false));
    } else {
      optimizer = std::make_unique<AdamW>(named_params, train);
    }
    BucketedDataParallel ddp(named_params, dp, bucket_size,
                             distributed ? distributed->communication() : BucketCommunication{});
    std::shared_ptr<ShardedWeights> sharded_weights;  // keep it: the model's wrappers hold it weakly
    if (stage == 3) sharded_weights = ShardedWeights::apply(*model, *distributed, dp);
    // [end snippet: zero_compose]
    const int64_t accumulation = train.accumulation_steps(dp.size);
    print0("{} rank(s) | dp {} | --strategy {} ({}) | {} buckets | global batch {} = micro {} x accumulation {} x "
           "dp {}\n", env.world_size, dp.size, strategy, stage > 0 ? fmt::format("ZeRO-{}", stage) : "not sharded",
           ddp.num_buckets(), train.global_batch_size,
           train.micro_batch_size, accumulation, dp.size);

    for (int64_t it = 1; it <= train.train_iters; ++it) {
      const auto micro_batches = sampler.next_global_batch();  // this rank's slice only
      comm_stats().reset();                                    // to print one step's bytes
      // [snippet: zero_loop]
      if (distributed) distributed->zero_grad();  // ZeRO-2: the gradient shard; the full ones are gone
      else optimizer->zero_grad();                // in place: the gradients are views into the buckets
      auto loss = torch::zeros({}, torch::kDouble);
      for (int64_t m = 0; m < accumulation; ++m) {
        BucketedDataParallel::NoSync no_sync;  // ZeRO-2: a no-op, every backward reduce-scatters
        if (m + 1 < accumulation) no_sync = ddp.no_sync();
        const Batch batch = make_batch(*train_data, micro_batches[m]);
        auto micro_loss = model->loss(batch.tokens, batch.labels) / double(accumulation);
        micro_loss.backward();  // full buckets start their all-reduce / reduce-scatter here
        loss += micro_loss.detach().to(torch::kDouble);
      }
      ddp.finish();  // dp: averaged gradients; ZeRO: this rank's averaged slices
      all_reduce(dp, loss, /*average=*/true);  // for the log line only
      torch::Tensor sq;
      if (distributed) {
        sq = distributed->grad_sq_norm(named_params);  // Σg² over this rank's slices (dp only: all count) ...
        all_reduce(dp, sq);                         // ... summed over dp: the whole gradient's
      } else {
        sq = grad_sq_norm(params);
      }
      const auto norm = sq.sqrt();
      if (distributed) {
        distributed->step(lr_at(train, it), norm, train.clip_grad);  // clip, AdamW on the slices, all-gather (ZeRO-3: not)
      } else {
        clip_grads(params, norm, train.clip_grad);
        optimizer->step(lr_at(train, it));
      }
      // [end snippet: zero_loop]
      if (it == 1) {  // what each rank holds, next to plain data parallelism and the planner's formula
        const Held h = held_by(params, optimizer.get(), distributed.get());
        const auto mine = torch::tensor({h.weights, h.gradients, h.adam}, torch::kLong);
        const auto all = all_gather(groups->world, mine, 0).view({dp.size, 3});
        int64_t psi = 0;
        for (const auto& p : params) psi += p.numel();
        const auto plan = estimate_memory(model_config, groups->layout, groups->coords, train.micro_batch_size,
                                          accumulation, 0, "1f1b", false, stage, bucket_size);
        print0("Ψ = {} parameters; padded Ψ' = {} (each bucket rounded up to a multiple of dp {})\n", psi,
               distributed ? distributed->shard_elements() * dp.size : psi, dp.size);
        print0("bytes per rank after step 1: weights + gradients + AdamW = total | plain dp: 4Ψ + 4Ψ + 8Ψ = 16Ψ\n");
        for (int64_t r = 0; r < dp.size; ++r) {
          const Held other{all[r][0].item<int64_t>(), all[r][1].item<int64_t>(), all[r][2].item<int64_t>()};
          print0("  rank {}: {} + {} + {} = {} | plain dp: {} + {} + {} = {} | {:.2f}x\n", r, other.weights,
                 other.gradients, other.adam, other.total(), 4 * psi, 4 * psi, 8 * psi, 16 * psi,
                 double(other.total()) / double(16 * psi));
        }
        const bool planned = h.weights == plan.parameter_bytes && h.gradients == plan.gradient_bytes &&
                             h.adam == plan.optimizer_bytes;
        print0("the planner (--dry-run) says {} + {} + {}: {}\n", plan.parameter_bytes, plan.gradient_bytes,
               plan.optimizer_bytes, planned ? "equal" : "DIFFERENT");
        require(planned, "[rank {}] holds {} + {} + {} bytes, the planner says {} + {} + {}", groups->rank, h.weights,
                h.gradients, h.adam, plan.parameter_bytes, plan.gradient_bytes, plan.optimizer_bytes);
        const auto bytes = [](const char* op) { return comm_stats().get("dp", op).bytes; };
        print0("dp collectives in step 1, bytes handed in per rank: all_reduce {} | reduce_scatter {} | all_gather {}\n",
               bytes("all_reduce"), bytes("reduce_scatter"), bytes("all_gather"));
        // Sent per rank by ring algorithms: all-reduce 2(d-1)/d of its buffer, reduce-scatter
        // (d-1)/d, all-gather (d-1) times its input. Not counted: the loss (8 bytes) and,
        // under ZeRO, Σg² (8 bytes), both all-reduced.
        const double d = double(dp.size), gradient_all_reduce = double(bytes("all_reduce") - (distributed ? 16 : 8));
        const double wire = 2 * (d - 1) / d * gradient_all_reduce + (d - 1) / d * double(bytes("reduce_scatter")) +
                            (d - 1) * double(bytes("all_gather"));
        print0("gradients and weights on the wire, per rank: {:.0f} bytes | one ring all-reduce of 4Ψ: {:.0f}\n", wire,
               2 * (d - 1) / d * double(4 * psi));
      }
      if (it == 1 || it % 5 == 0)
        print0("iteration {:>3}/{} | loss {:.6f} | grad norm {:.6f}\n", it, train.train_iters, loss.item<double>(),
               norm.item<double>());
    }
    barrier(groups->world);  // nobody leaves (rank 0 hosts the store) while others still talk
    return 0;
  });
}
