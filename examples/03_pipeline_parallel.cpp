// 03_pipeline_parallel — chapter 3: the model cut into consecutive slices of blocks, one per
// rank; micro-batches flow through the ranks like cars through a car wash.
//
//   mpirun -np 2 --oversubscribe --allow-run-as-root --bind-to none -x OMP_NUM_THREADS=1 \
//       -x MASTER_PORT=29730 build/examples/03_pipeline_parallel \
//       --data-path data/fortunes_text_document --tokenizer-model data/tokenizer.model \
//       --pipeline-schedule afab
//   mpirun -np 4 --oversubscribe --allow-run-as-root --bind-to none -x OMP_NUM_THREADS=1 \
//       -x MASTER_PORT=29731 build/examples/03_pipeline_parallel \
//       --data-path data/fortunes_text_document --tokenizer-model data/tokenizer.model \
//       --pipeline-schedule 1f1b --num-layers-per-virtual-pipeline-stage 1
//
// One stage per rank (8 layers: -np 2, 4 or 8). Rank 0 prints the loss, what each rank held,
// the last step's timeline and the bubble: on the wall clock, replayed from the measured costs,
// and in theory. About 15 s on 2 cores. tutorials/03_pipeline_parallel.md walks through it.
#include <lightron/data.hpp>
#include <lightron/pipeline_engine.hpp>
#include <lightron/train.hpp>

#include <lightron/cli.hpp>

#include <filesystem>
#include <cstring>  // memcpy

using namespace lightron;

int main(int argc, char** argv) {
  return run_main([&] {
    std::string data_path, tokenizer_model, schedule = "1f1b";
    int64_t layers_per_virtual_stage = 0;
    TrainConfig train;
    train.micro_batch_size = 2;
    train.train_iters = 30;
    const int64_t num_layers = 8;
    CLI::App app{"lightron chapter 3: pipeline-parallel training of a small GPT"};
    app.add_option("--data-path", data_path, "prefix of a .bin/.idx pair")->required();
    app.add_option("--tokenizer-model", tokenizer_model, "SentencePiece .model (its .vocab is next to it)")->required();
    app.add_option("--pipeline-schedule", schedule, "afab or 1f1b");
    app.add_option("--num-layers-per-virtual-pipeline-stage", layers_per_virtual_stage,
                   "> 0: interleaved 1f1b, each rank holding several slices");
    app.add_option("--micro-batch-size", train.micro_batch_size, "samples per micro-batch; 16 per step in all");
    app.add_option("--train-iters", train.train_iters, "optimizer steps");
    if (auto exit_code = parse_command_line(app, argc, argv)) return *exit_code;  // --help: 0, a bad flag: 2
    const LaunchEnv env = start_rank_process(/*num_threads=*/1);  // rank and world size from mpirun's environment

    const SpmVocab vocab(spm_vocab_path(tokenizer_model));
    GPTConfig model_config = course_gpt_config(vocab.size());  // as in 00_single_device,
    model_config.num_layers = num_layers;                       // with 8 layers to cut
    train.global_batch_size = 16;  // m = 16 / micro-batch-size micro-batches per step
    train.lr = 3e-3;
    train.lr_warmup_iters = 10;
    validate_train_config(train, /*dp_size=*/1);
    const int64_t p = env.world_size, m = train.accumulation_steps(1);
    require(p >= 2, "a pipeline needs at least 2 ranks; launch with mpirun -np 2 (or 4, 8)");
    validate_pipeline(num_layers, p, layers_per_virtual_stage, m, schedule);  // fail fast
    const int64_t v = virtual_stages(num_layers, p, layers_per_virtual_stage);

    auto groups = init_process_groups(Layout().with_pp(p));
    IndexedDataset indexed(data_path);
    GPTDataset train_data(indexed, split_documents("969,30,1", indexed.num_sequences()).train,
                          model_config.seq_length, train.seed);
    DataSampler sampler(train_data.size(), train.global_batch_size, train.micro_batch_size, 0, 1, train.seed);

    // [snippet: pp_compose]
    torch::manual_seed(train.seed);
    auto model = std::make_shared<GPT>(model_config);  // whole, from the seed: the weights of one device
    PipelineStage stage = apply_pipeline_parallel(model, groups->coords.pp, p, v);  // keep this stage's layers
    PipelineEngine engine(stage, *groups, model_config.hidden_size, /*seq_divisor=*/1);  // runs the schedule
    const auto named_params = named_parameters_of(*model);  // this stage's only: so is the optimizer state
    std::vector<torch::Tensor> params;
    for (const auto& [name, param] : named_params) params.push_back(param);
    AdamW optimizer(named_params, train);
    // [end snippet]

    // [snippet: pp_step]
    // One optimizer step: the schedule, the tied embedding, the norm, the update.
    auto step = [&](const std::vector<Batch>& micro_batches, int64_t iteration) {
      optimizer.zero_grad(/*set_to_none=*/true);
      auto loss = engine.run(micro_batches, schedule, /*train=*/true);  // pp: F and B of every micro-batch
      if (stage.holds_tied_embedding() && !planted_bug("skip_embedding_all_reduce"))
        all_reduce(groups->embedding, model->wte->weight.grad());  // embedding: first + last stage
      auto sq = grad_sq_norm(parameters_of(stage.counted_once(named_params)));  // the tied copy once
      all_reduce(groups->pp, sq);  // pp: each stage its own layers (tp would come first: chapter 4)
      const auto norm = sq.sqrt();
      clip_grads(params, norm, train.clip_grad);
      optimizer.step(lr_at(train, iteration));
      return std::make_pair(loss.item<double>(), norm.item<double>());
    };
    // [end snippet]
    print0("pp {} | schedule {}{} | {} micro-batches of {} per step\n", p, schedule,
           v > 1 ? fmt::format(" interleaved over v = {} chunks per rank", v) : "", m, train.micro_batch_size);

    double wall = 0, replayed = 0;  // summed over iterations 6, 7, ... (the first ones warm caches up)
    const double measured = std::max(1.0, train.train_iters - 5.0);
    for (int64_t it = 1; it <= train.train_iters; ++it) {
      std::vector<Batch> micro;  // the m micro-batches of this step
      for (const auto& indices : sampler.next_global_batch()) micro.push_back(make_batch(train_data, indices));
      const auto [loss, grad_norm] = step(micro, it);
      if (it > 5) {
        // [snippet: pp_bubble]
        auto mine = torch::tensor(engine.measured_bubble(), torch::kDouble);
        all_reduce(groups->pp, mine, /*average=*/true);
        wall += mine.item<double>();
        replayed += engine.replayed_bubble();  // a collective: every rank calls it
        // [end snippet: pp_bubble]
      }
      if (it == 1 || it % 10 == 0 || it == train.train_iters)
        print0("iteration {:>4}/{} | loss {:.4f} | grad norm {:.3f} | {:.0f} ms/step\n", it, train.train_iters, loss,
               grad_norm, engine.step_seconds * 1000);
    }

    // Rank 0 prints one line from each pipeline rank, in order (gathered as bytes).
    auto print_per_rank = [&](const std::string& line) {
      auto bytes = torch::zeros({1, 128}, torch::kUInt8);  // zero-terminated
      std::memcpy(bytes.data_ptr(), line.data(), std::min<size_t>(line.size(), 127));
      auto all = all_gather(groups->pp, bytes, 0);  // (p, 128)
      for (int64_t s = 0; s < p; ++s) print0("{}\n", static_cast<const char*>(all[s].data_ptr()));
    };
    std::string layers;  // this rank's chunks, e.g. "[0,1] [4,5]"
    for (const auto& chunk : stage.chunks) layers += fmt::format("[{}] ", fmt::join(chunk, ","));
    layers += stage.has_embedding() ? "+wte,wpe" : stage.has_head() ? "+ln_f,head" : "";
    int64_t num_params = 0;
    for (const auto& param : params) num_params += param.numel();
    print0("\n{:>4} {:<26} {:>10} {:>9}\n", "rank", "layers (per chunk)", "parameters", "in flight");
    print_per_rank(fmt::format("{:>4} {:<26} {:>10} {:>9}", groups->rank, layers, num_params, engine.peak_in_flight));

    // The last step on every rank's clock: digits are forwards of micro-batch k, letters
    // backwards (a = 0, b = 1, ...), dots idle. An action first waits for its message.
    auto span = torch::tensor(engine.step_seconds, torch::kDouble);
    all_reduce_max(groups->pp, span);
    const double seconds_per_column = span.item<double>() / 96;
    std::string row(96, '.');
    double waited_until = 0;
    for (const auto& e : engine.timeline) {
      if (e.kind == "wait") {
        waited_until = e.end;
        continue;
      }
      const char mark = e.kind == "F" ? char('0' + e.micro_batch % 10) : char('a' + e.micro_batch % 26);
      const auto end = std::min(row.size(), size_t(e.end / seconds_per_column));
      for (auto col = size_t(std::max(e.start, waited_until) / seconds_per_column); col < end; ++col) row[col] = mark;
    }
    print0("\nlast step, {:.0f} ms:\n", span.item<double>() * 1000);
    print_per_rank(fmt::format("  rank {} |{}|", groups->rank, row));
    print0("\nbubble (idle fraction of a step; mean of iterations 6-{}):\n"
           "  wall clock {:.3f}  (time not spent in F or B, averaged over the ranks)\n"
           "  replayed   {:.3f}  (the schedule replayed with each action's measured CPU time)\n"
           "  theory     {:.3f}  ((p-1)/(v m+p-1) with p {}, v {}, m {})\n",
           train.train_iters, wall / measured, replayed / measured, theoretical_bubble(m, p, v), p, v, m);
    barrier(groups->world);
    return 0;
  });
}
