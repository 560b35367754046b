// 02_tensor_parallel — chapter 2: one model split across N ranks, inside every layer. Each rank
// holds whole attention heads, a slice of the MLP and a slice of the vocabulary; the ranks
// meet twice per block in the forward pass and twice in the backward pass (all-reduces).
//
//   mpirun -np 2 --oversubscribe --allow-run-as-root --bind-to none -x OMP_NUM_THREADS=1 \
//       -x MASTER_PORT=29720 build/examples/02_tensor_parallel \
//       --data-path data/fortunes_text_document --tokenizer-model data/tokenizer.model
//
// Add --sequence-parallel to split the activations between the blocks along T as well.
// Rank 0 prints how the embeddings and block 0 were split, the tp group's traffic in one
// forward/backward, and the loss every 10 iterations: the losses of
// `00_single_device --train-iters 50`, since the shards are cut from the same initial
// weights. About 10 s on 2 cores. tutorials/02_tensor_parallel.md walks through it.
#include <lightron/data.hpp>
#include <lightron/tp_model.hpp>
#include <lightron/train.hpp>

#include <lightron/cli.hpp>

#include <cmath>  // sqrt
#include <filesystem>

using namespace lightron;

int main(int argc, char** argv) {
  return run_main([&] {
    std::string data_path, tokenizer_model;
    int64_t train_iters = 50;
    bool sequence_parallel = false;
    int num_threads = 1;
    CLI::App app{"lightron chapter 2: tensor-parallel training of a small GPT"};
    app.add_option("--data-path", data_path, "prefix of a .bin/.idx pair")->required();
    app.add_option("--tokenizer-model", tokenizer_model, "SentencePiece .model (its .vocab is next to it)")->required();
    app.add_option("--train-iters", train_iters, "optimizer steps");
    app.add_flag("--sequence-parallel", sequence_parallel, "split norms/residuals along T over the tp ranks");
    app.add_option("--num-threads", num_threads, "CPU threads per rank");
    if (auto exit_code = parse_command_line(app, argc, argv)) return *exit_code;  // --help: 0, a bad flag: 2
    const LaunchEnv env = start_rank_process(num_threads);  // rank and world size from mpirun's environment

    const SpmVocab vocab(spm_vocab_path(tokenizer_model));
    const GPTConfig model_config = course_gpt_config(vocab.size(), /*tp_size=*/env.world_size);  // as in 00_single_device
    TrainConfig train;
    train.micro_batch_size = train.global_batch_size = 16;
    train.train_iters = train_iters;
    train.lr = 3e-3;
    train.min_lr = 3e-4;
    train.lr_warmup_iters = 50;
    validate_train_config(train, /*dp_size=*/1);
    validate_tensor_parallel(model_config, env.world_size, sequence_parallel);  // heads, F, V divisible by tp

    // [snippet: tp_group]
    auto groups = init_process_groups(Layout().with_tp(env.world_size));
    const Group& tp = groups->tp;
    // [end snippet: tp_group]

    // Every tp rank reads the same batch: tensor parallelism splits the model, not the data.
    IndexedDataset indexed(data_path);
    GPTDataset train_data(indexed, split_documents("969,30,1", indexed.num_sequences()).train,
                          model_config.seq_length, train.seed);
    DataSampler sampler(train_data.size(), train.global_batch_size, train.micro_batch_size, /*dp_rank=*/0,
                        /*dp_size=*/1, train.seed);

    // [snippet: shard_model]
    torch::manual_seed(train.seed);  // the whole single-device model, on every rank ...
    auto model = std::make_shared<GPT>(model_config);
    std::map<std::string, std::vector<int64_t>> full_shape;
    for (const auto& p : model->named_parameters()) full_shape[p.key()] = p.value().sizes().vec();
    const TensorParallelInfo info = apply_tensor_parallel(*model, tp, sequence_parallel);  // ... cut to its shard
    // [end snippet: shard_model]

    auto shape = [](c10::IntArrayRef dims) { return fmt::format("{}", fmt::join(dims, "x")); };  // "384x128"
    print0("tp {}{} | parameter, full shape, how it is split -> its shape on tp rank 0, 1, ...\n", tp.size,
           sequence_parallel ? " with sequence parallel" : "");
    for (const auto& p : model->named_parameters()) {
      const std::string& name = p.key();
      if (name.rfind("h.", 0) == 0 && name.rfind("h.0.", 0) != 0) continue;  // one block shows them all
      auto all = all_gather(tp, torch::tensor(p.value().sizes().vec()).unsqueeze(0), 0);  // (tp, dims): every shape
      std::vector<std::string> per_rank;
      for (int r = 0; r < tp.size; ++r)
        per_rank.push_back(shape({all[r].data_ptr<int64_t>(), size_t(all.size(1))}));
      const int64_t dim = tp_shard_spec(name, model_config).dim;  // the one table apply_tensor_parallel reads
      const char* how = dim < 0                ? "replicated"
                        : dim == 1             ? "row-parallel (W's columns)"
                        : name == "wte.weight" ? "vocab-parallel (rows)"
                                               : "column-parallel (W's rows)";
      print0("  {:<24} {:>9}  {:<27} -> {}\n", name, shape(full_shape[name]), how, fmt::join(per_rank, " "));
    }

    const auto named_params = named_parameters_of(*model);
    std::vector<torch::Tensor> params, counted;  // counted: in this rank's share of the gradient norm
    for (const auto& [name, p] : named_params) {
      params.push_back(p);
      // [snippet: counted]
      if (info.sharded.count(name) || tp.rank == 0) counted.push_back(p);  // shards add up; replicas count once
      // [end snippet: counted]
    }
    AdamW optimizer(named_params, train);

    Timer timer;
    int64_t last_logged = 0;
    for (int64_t it = 1; it <= train.train_iters; ++it) {
      const Batch batch = make_batch(train_data, sampler.next_global_batch()[0]);  // (B, T), the same on every rank
      optimizer.zero_grad();
      comm_stats().reset();
      auto loss = model->loss(batch.tokens, batch.labels);  // vocab-parallel cross-entropy: the full loss
      loss.backward();
      if (it == 1) {
        print0("step 1, forward + backward, on the tp group:");
        for (const auto& [key, c] : comm_stats().counters)
          if (key.first == "tp") print0(" {} x{} ({:.2f} MB)", key.second, c.calls, c.bytes / 1e6);
        print0("\n");
      }
      // [snippet: sp_grads]
      for (auto& p : info.sequence_parallel_params) all_reduce(tp, p.grad());  // each rank saw T/tp of the tokens
      // [end snippet: sp_grads]
      // [snippet: grad_norm]
      auto sq = grad_sq_norm(counted);
      all_reduce(tp, sq);  // Σ‖g‖² over the whole model
      const auto norm = sq.sqrt();
      // [end snippet: grad_norm]
      clip_grads(params, norm, train.clip_grad);
      const double grad_norm = norm.item<double>();
      optimizer.step(lr_at(train, it));  // every rank updates its own shard; replicas stay equal
      if (it == 1 || it % 10 == 0 || it == train.train_iters) {
        print0("iteration {:>4}/{} | loss {:.4f} | grad norm {:.3f} | {:.0f} ms/iter\n", it, train.train_iters,
               loss.item<double>(), grad_norm, timer.seconds() * 1000 / double(it - last_logged));
        timer.reset();
        last_logged = it;
      }
    }
    barrier(groups->world);  // nobody leaves (rank 0 hosts the store) while others still talk
    return 0;
  });
}
