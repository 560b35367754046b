// pretrain_gpt — lightron's full training program, Megatron-LM's flag names, any layout.
//
//   build/examples/pretrain_gpt --data-path data/fortunes_text_document \
//       --tokenizer-model data/tokenizer.model --num-layers 4 --hidden-size 256 \
//       --num-attention-heads 4 --seq-length 128 --micro-batch-size 8 --global-batch-size 16 \
//       --train-iters 200 --lr 1e-3 --sample-tokens 60
//
// Under mpirun (as root, and with more ranks than cores, Open MPI needs the two flags):
//   mpirun -np 2 --allow-run-as-root --oversubscribe build/examples/pretrain_gpt ... \
//       --data-parallel-size 2
#include <lightron/arguments.hpp>
#include <lightron/generate.hpp>
#include <lightron/parity.hpp>  // check_replicas

#if __has_include(<torch/csrc/autograd/profiler_legacy.h>)
#include <torch/csrc/autograd/profiler_legacy.h>  // RecordProfile: bench/profile_step.py
#define LIGHTRON_HAVE_RECORD_PROFILE 1
#endif
#include <lightron/trainer_tools.hpp>

#include <cerrno>
#include <csignal>  // SIGPIPE: bench turns
#include <cstring>  // strerror
#include <filesystem>
#include <memory>
#include <thread>

using namespace lightron;

namespace {

struct Datasets {
  std::unique_ptr<GPTSampleSource> train, valid;
};

Datasets make_datasets(const Arguments& a) {
  const int64_t T = a.model.seq_length;
  if (a.mock_data)
    return {std::make_unique<MockGPTDataset>(a.vocab_size, T, a.mock_samples, a.train.seed),
            std::make_unique<MockGPTDataset>(a.vocab_size, T, a.mock_samples / 16 + 1, a.train.seed + 1)};
  IndexedDataset indexed(a.data_path);
  const auto split = split_documents(a.split, indexed.num_sequences());
  Datasets d;
  d.train = std::make_unique<GPTDataset>(indexed, split.train, T, a.train.seed);
  if (split.valid.size() > 0) d.valid = std::make_unique<GPTDataset>(indexed, split.valid, T, a.train.seed);
  return d;
}

// This rank's own JSON-lines file, PATH.rankN (timeline, communication counters).
struct RankFile {
  std::FILE* file = nullptr;
  RankFile(const std::string& path, const char* flag, int rank) {
    if (path.empty()) return;
    const auto name = fmt::format("{}.rank{}", path, rank);
    file = std::fopen(name.c_str(), "w");
    require(file != nullptr, "{}: cannot open '{}' for writing", flag, name);
  }
  ~RankFile() {
    if (file) std::fclose(file);
  }
};

// bench/throughput.sh: LIGHTRON_BENCH_TURNS=IN:OUT (two FIFOs) makes rank 0 take turns
// with the PyTorch-Python baseline one step at a time, so that a machine whose speed drifts
// slows both alike. Before each iteration it waits for a byte on IN (the baseline's "ready",
// then its steps), after it writes one to OUT; the wait is not timed. After its last iteration
// it waits once more, for the baseline's last step.
struct TakeTurns {
  std::FILE *in = nullptr, *out = nullptr;
  explicit TakeTurns(const char* spec) {
    if (!spec) return;
    std::signal(SIGPIPE, SIG_IGN);  // a write after the other side stopped: an error, not a silent death
    const std::string s = spec;
    const auto colon = s.find(':');
    require(colon != std::string::npos, "LIGHTRON_BENCH_TURNS: '{}' is not IN:OUT", s);
    in = std::fopen(s.substr(0, colon).c_str(), "rb");  // the baseline opens IN to write first,
    out = in ? std::fopen(s.substr(colon + 1).c_str(), "wb") : nullptr;  // then OUT to read
    require(in && out, "LIGHTRON_BENCH_TURNS: cannot open '{}': {}", s, std::strerror(errno));
  }
  ~TakeTurns() {
    for (auto* f : {in, out})
      if (f) std::fclose(f);
  }
  bool on() const { return in != nullptr; }
  void wait() {
    if (on()) require(std::fgetc(in) != EOF, "LIGHTRON_BENCH_TURNS: the other side stopped");
  }
  void pass() {
    if (on()) require(std::fputc('t', out) != EOF && std::fflush(out) == 0, "LIGHTRON_BENCH_TURNS: cannot write");
  }
};

std::vector<Batch> to_batches(const GPTSampleSource& source, const std::vector<std::vector<int64_t>>& micro) {
  std::vector<Batch> batches;
  for (const auto& indices : micro) batches.push_back(make_batch(source, indices));
  return batches;
}

// "" when this rank can create files in `dir` and the file system has `bytes` free, else why
// not (the message's prefix names the rank).
std::string writable_with_room(const std::string& dir, const char* flag, int64_t bytes) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  const auto probe = fs::path(dir) / fmt::format(".write_check.rank{}", global_rank());
  std::FILE* f = ec ? nullptr : std::fopen(probe.c_str(), "w");
  const bool wrote = f != nullptr && std::fputs("lightron", f) >= 0 && std::fflush(f) == 0;
  const std::string why = ec ? ec.message() : std::strerror(errno);
  if (f) std::fclose(f);
  fs::remove(probe, ec);
  if (!wrote) return fmt::format("{} {}: cannot write there ({})", flag, dir, why);
  const auto space = fs::space(dir, ec);
  if (!ec && int64_t(space.available) < bytes)
    return fmt::format("{} {}: {:.1f} MiB free, a checkpoint needs {:.1f} MiB", flag, dir,
                       double(space.available) / (1 << 20), double(bytes) / (1 << 20));
  return "";
}

// What would otherwise fail after hours of training, checked before step 1: the validation
// split against the batch, the tokenizer that --sample-tokens needs, and (on every rank, for
// its own files) that --save can be written and has room for a checkpoint.
void check_before_training(const Arguments& a, const Datasets& data, const Trainer& trainer, const Group& world) {
  if (a.train.eval_interval > 0) {
    require(data.valid != nullptr, "--eval-interval {}: --split {} leaves no documents for validation; give the "
            "second weight more, or set --eval-interval 0", a.train.eval_interval, a.split);
    require(data.valid->size() >= a.train.global_batch_size, "--eval-interval {}: the validation split holds {} "
            "samples, fewer than one global batch ({}); give it more weight in --split or lower --global-batch-size",
            a.train.eval_interval, data.valid->size(), a.train.global_batch_size);
  }
  std::string failure;
  try {
    if (a.sample_tokens > 0) encode_with_cli(a.tokenizer_model, "The ");
  } catch (const UsageError& e) {
    failure = fmt::format("--sample-tokens {}: {}", a.sample_tokens, e.what());
  }
  int64_t bytes = 0;  // this rank's share of a checkpoint: weights and both AdamW moments
  for (const auto& p : trainer.params) bytes += 3 * nbytes(p);  // (under ZeRO too: the state is saved whole)
  auto total = torch::tensor({bytes}, torch::kLong);
  all_reduce(world, total);
  if (failure.empty() && !a.save.empty()) failure = writable_with_room(a.save, "--save", total.item<int64_t>());
  agree_on_failure(world, failure);  // the first rank that failed says why
}

// --dry-run: the memory of every rank of the layout, from the flags alone.
void print_dry_run(const Arguments& a) {
  print0("dry run: layout tp {} cp {} dp {} pp {}, micro-batch {}, {} micro-batches per step, schedule {}, {} chunk(s) "
         "per rank{}\n", a.layout.tp, a.layout.cp, a.layout.dp, a.layout.pp, a.train.micro_batch_size,
         a.train.accumulation_steps(a.layout.dp), a.layout.pp > 1 ? a.pipeline_schedule : "none",
         virtual_stages(a.model.num_layers, a.layout.pp, a.num_layers_per_virtual_pipeline_stage),
         std::string(a.sharding == "no_shard" ? "" : ", sharding " + a.sharding) +
             (a.recompute.granularity.empty() ? "" : ", recompute " + a.recompute.granularity));
  const bool cp = a.layout.cp > 1;  // a column of its own only when it splits anything
  print0("{:>5} {:>4}{} {:>4} {:>4} {:>12} {:>12} {:>12} {:>12} {:>14} {:>12}\n", "rank", "tp", cp ? "   cp" : "", "dp",
         "pp", "parameters", "params MiB", "grads MiB", "adam MiB", "activ. MiB (~)", "total MiB");
  const double mib = 1024.0 * 1024.0;
  for (int64_t r = 0; r < a.layout.world(); ++r) {
    const Coords c = coords_of(r, a.layout);
    const auto m = estimate_memory(a.model, a.layout, c, a.train.micro_batch_size, a.train.accumulation_steps(a.layout.dp),
                                   a.num_layers_per_virtual_pipeline_stage, a.pipeline_schedule, a.sequence_parallel,
                                   zero_stage(a.sharding), a.ddp_bucket_size, a.recompute);
    const double total = double(m.parameter_bytes + m.gradient_bytes + m.optimizer_bytes + m.activation_bytes);
    print0("{:>5} {:>4}{} {:>4} {:>4} {:>12} {:>12.2f} {:>12.2f} {:>12.2f} {:>14.2f} {:>12.2f}\n", r, c.tp,
           cp ? fmt::format(" {:>4}", c.cp) : "", c.dp, c.pp, m.parameters, m.parameter_bytes / mib,
           m.gradient_bytes / mib, m.optimizer_bytes / mib, m.activation_bytes / mib, total / mib);
  }
}

// --dry-run --measure: every rank of the layout as a thread of this process (groups through a
// shared HashStore), one training step each on mock data, with the counting allocator on: the
// most activation bytes each rank's forwards held at once, next to the estimate.
void print_measured_activations(const Arguments& a) {
  CountingCPUAllocator::install();
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::vector<int64_t> measured(a.layout.world());
  std::vector<std::exception_ptr> failed(a.layout.world());
  std::vector<std::thread> ranks;
  for (int64_t r = 0; r < a.layout.world(); ++r)
    ranks.emplace_back([&, r] {
      try {
        auto g = make_process_groups(store, int(r), a.layout);
        Trainer trainer(a.model, a.train, parallel_options(a), *g);
        MockGPTDataset data(a.model.vocab_size, a.model.seq_length, a.train.global_batch_size, a.train.seed);
        DataSampler sampler(data.size(), a.train.global_batch_size, a.train.micro_batch_size, int(g->coords.dp),
                            int(a.layout.dp), a.train.seed);
        trainer.step(to_batches(data, sampler.next_global_batch()), 1);
        measured[r] = trainer.peak_activation_bytes();
      } catch (...) {
        failed[r] = std::current_exception();
      }
    });
  for (auto& t : ranks) t.join();
  for (auto& e : failed)
    if (e) std::rethrow_exception(e);
  print0("activations, one step per rank measured (activation_meter.hpp):\n{:>5} {:>14} {:>14} {:>10}\n", "rank",
         "estimate MiB", "measured MiB", "difference");
  for (int64_t r = 0; r < a.layout.world(); ++r) {
    const auto m = estimate_memory(a.model, a.layout, coords_of(r, a.layout), a.train.micro_batch_size,
                                   a.train.accumulation_steps(a.layout.dp), a.num_layers_per_virtual_pipeline_stage,
                                   a.pipeline_schedule, a.sequence_parallel, zero_stage(a.sharding), a.ddp_bucket_size,
                                   a.recompute);
    print0("{:>5} {:>14.2f} {:>14.2f} {:>9.1f}%\n", r, double(m.activation_bytes) / (1 << 20),
           double(measured[r]) / (1 << 20), 100.0 * double(m.activation_bytes - measured[r]) / double(measured[r]));
  }
}

void print_samples(const Arguments& a, Trainer& trainer) {
  if (a.sample_tokens <= 0 || a.tokenizer_model.empty()) return;
  SpmVocab vocab(spm_vocab_path(a.tokenizer_model));
  const char* prompts[] = {"The ", "A computer", "Love is", "You will", "Never"};
  print0("\nsamples (temperature {}, top-k {}):\n", a.temperature, a.top_k);
  for (int64_t i = 0; i < std::min<int64_t>(a.num_samples_to_print, 5); ++i) {
    auto prompt = encode_with_cli(a.tokenizer_model, prompts[i]);
    auto ids = generate([&](const torch::Tensor& x) { return full_logits(trainer, x); }, prompt, a.sample_tokens,
                        a.model.seq_length, a.temperature, a.top_k, a.train.seed + i);
    print0("--- {}\n", vocab.decode(ids));
  }
}

}  // namespace

int main(int argc, char** argv) {
  return run_main([&] {
    const LaunchEnv env = launch_env();
    global_rank() = env.rank;
    Arguments a = parse_arguments(argc, argv, "lightron: pretrain a GPT on any tp x dp x pp layout");
    if (a.dry_run) {  // the layout's ranks, computed here in one process
      validate_arguments(a, a.layout.tp * a.layout.cp * a.layout.pp * std::max<int64_t>(1, a.layout.dp));
      print_dry_run(a);
      if (a.measure) print_measured_activations(a);
      return 0;
    }
    // before any thread starts: every later thread inherits the blocked signals (guards.hpp)
    const EarlyExit early_exit(a.exit_signal_handler, a.exit_interval, a.exit_duration_in_mins);
    validate_arguments(a, env.world_size);  // before anything big is allocated
    setup_process(a.num_threads);
    const DevicePlan plan = plan_device(a.device == "cuda", env, torch::cuda::device_count(), a.through_host);
    const torch::Device device = plan.device;
    GroupOptions group_options;
    group_options.timeout = std::chrono::milliseconds(int64_t(a.distributed_timeout_seconds * 1000));
    group_options.cuda = device.is_cuda();
    group_options.through_host = plan.through_host;
    auto groups = init_process_groups(a.layout, group_options);
    if (groups->world.through_host && env.world_size > 1)  // agreed: another rank's host may be the shared one
      print0("lightron: {}collectives go over Gloo through host memory\n",
             plan.shared ? fmt::format("{} ranks share {} GPU(s): ", env.local_world_size > 0 ? env.local_world_size
                                                                     : env.world_size, torch::cuda::device_count())
                         : a.through_host ? "--through-host: " : "ranks elsewhere share GPUs: ");
    print0("lightron: {} rank(s) via {} on {}{} | layout tp {} cp {} dp {} pp {} | vocab {} padded to {} (multiple of "
           "{} x tp)\n", env.world_size, env.launcher, a.device, a.bf16 ? " (bf16)" : "", a.layout.tp, a.layout.cp,
           a.layout.dp, a.layout.pp, a.vocab_size, a.model.vocab_size, a.make_vocab_size_divisible_by);

    auto data = make_datasets(a);
    ParallelOptions options = parallel_options(a);
    options.device = device;
    Trainer trainer(a.model, a.train, options, *groups);
    const int64_t num_params = [&] {  // the whole model's (this rank holds a part of it)
      int64_t n = 0;
      for (const auto& [name, shape] : parameter_shapes(a.model)) n += c10::multiply_integers(shape);
      return n;
    }();
    print0("model: {} parameters ({} layers, hidden {}, heads {}, seq {}) | global batch {} = micro {} x {} "
           "accumulation x dp {}\n", num_params, a.model.num_layers, a.model.hidden_size, a.model.num_attention_heads,
           a.model.seq_length, a.train.global_batch_size, a.train.micro_batch_size,
           a.train.accumulation_steps(a.layout.dp), a.layout.dp);

    DataSampler sampler(data.train->size(), a.train.global_batch_size, a.train.micro_batch_size,
                        int(groups->coords.dp), int(a.layout.dp), a.train.seed);
    int64_t first_iteration = 1;
    if (!a.load.empty()) {
      const auto counters = load_checkpoint(a.load, trainer, {a.finetune, a.no_load_optim, a.no_load_rng});
      first_iteration = counters.iteration + 1;
      sampler.consumed_samples = counters.consumed_samples;
      print0("resumed from {} at iteration {} ({} samples consumed)\n", a.load, counters.iteration,
             counters.consumed_samples);
    }
    int64_t saved_at = first_iteration - 1;  // the last iteration on disk: no second save of it
    check_before_training(a, data, trainer, groups->world);
    // Default peaks: H100/H200 SXM dense bf16 989 TFLOP/s (fp32 67); on the CPU, measured here.
    const double peak = a.peak_tflops > 0 ? a.peak_tflops : device.is_cuda() ? (a.bf16 ? 989.0 : 67.0)
                                                                             : measured_gemm_tflops(groups->world);
    if (a.peak_tflops <= 0 && !device.is_cuda())
      print0("MFU against the fp32 GEMM rate measured on rank 0: {:.3f} TFLOP/s (--peak-tflops sets it)\n", peak);
    comm_stats().reset();  // --comm-file counts each iteration's calls, not the set-up's (nor the barrier above)

    MetricsLog metrics(a.metrics_file, a.tensorboard_dir);
    RankFile timeline(a.layout.pp > 1 ? a.timeline_file : "", "--timeline-file", groups->rank);
    RankFile comm(a.comm_file, "--comm-file", groups->rank);
    const double flops = flops_per_token(num_params, a.model.num_layers, a.model.hidden_size, a.model.seq_length);
    Timer interval;
    // bench/profile_step.py: LIGHTRON_PROFILE_TRACE=FILE records the ATen ops of iteration
    // LIGHTRON_PROFILE_ITERATION (default 3) as a Chrome trace, on rank 0.
    const char* trace = groups->rank == 0 ? std::getenv("LIGHTRON_PROFILE_TRACE") : nullptr;
    const char* traced = std::getenv("LIGHTRON_PROFILE_ITERATION");
    const int64_t traced_iteration = traced ? std::atoll(traced) : 3;
    TakeTurns turns(groups->rank == 0 ? std::getenv("LIGHTRON_BENCH_TURNS") : nullptr);  // the others follow rank 0
    for (int64_t it = first_iteration; it <= a.train.train_iters; ++it) {
      turns.wait();
      if (turns.on()) interval.reset();  // the other side's step is not this one's time
      auto batches = to_batches(*data.train, sampler.next_global_batch());
#ifdef LIGHTRON_HAVE_RECORD_PROFILE
      std::unique_ptr<torch::autograd::profiler::RecordProfile> profile;
      if (trace && it == traced_iteration) profile = std::make_unique<torch::autograd::profiler::RecordProfile>(trace);
#else
      require(!trace, "LIGHTRON_PROFILE_TRACE: this LibTorch has no legacy profiler (RecordProfile)");
#endif
      const double loss = trainer.step(batches, it);
#ifdef LIGHTRON_HAVE_RECORD_PROFILE
      profile.reset();  // writes the trace
#endif
      if (timeline.file) fmt::print(timeline.file, "{}", trainer.engine->timeline_json(it));
      if (comm.file) fmt::print(comm.file, "{}\n", comm_stats().json(it));
      comm_stats().reset();
      if (a.check_weight_hash_interval > 0 && it % a.check_weight_hash_interval == 0) {
        const auto weights = trainer.whole_weights();  // ZeRO-3: gathered to be hashed
        check_replicas(trainer.params, groups->dp_cp, it);  // dp and cp ranks hold the same weights
      }
      if (it % a.train.log_interval == 0 || it == a.train.train_iters) {
        const int64_t iters = it % a.train.log_interval == 0 ? a.train.log_interval : it % a.train.log_interval;
        StepMetrics m;
        m.iteration = it;
        m.consumed_samples = sampler.consumed_samples;
        m.lr = lr_at(a.train, it);
        m.loss = loss;
        m.grad_norm = trainer.grad_norm;
        m.ms_per_iter = interval.seconds() * 1000 / double(iters);
        m.tokens_per_s = double(a.train.global_batch_size * a.model.seq_length) / (m.ms_per_iter / 1000);
        m.tflops = m.tokens_per_s * flops / 1e12 / double(env.world_size);  // per rank
        m.mfu = m.tflops / peak;
        m.peak_mib = peak_memory_mib(device);
        m.skipped_iterations = trainer.guard->skipped_iterations;
        metrics.log(m, a.train.train_iters);
        if (a.layout.pp > 1) {
          auto wall = torch::tensor(trainer.engine->measured_bubble(), torch::kDouble);
          all_reduce(groups->pp, wall, /*average=*/true);
          const double replayed = trainer.engine->replayed_bubble();
          const int64_t v = trainer.stage.num_virtual, micro = a.train.accumulation_steps(a.layout.dp);
          print0(" pipeline bubble: {:.3f} wall clock, {:.3f} replayed with measured costs, {:.3f} in theory "
                 "((p-1)/(v m+p-1), p {} v {} m {})\n", wall.item<double>(), replayed,
                 theoretical_bubble(micro, a.layout.pp, v), a.layout.pp, v, micro);
        }
        interval.reset();
      }
      if (a.train.eval_interval > 0 && data.valid && it % a.train.eval_interval == 0) {
        DataSampler eval_sampler(data.valid->size(), a.train.global_batch_size, a.train.micro_batch_size,
                                 int(groups->coords.dp), int(a.layout.dp), a.train.seed);
        double sum = 0;
        for (int64_t e = 0; e < a.train.eval_iters; ++e)
          sum += trainer.evaluate(to_batches(*data.valid, eval_sampler.next_global_batch()));
        metrics.log_eval(it, sum / double(std::max<int64_t>(1, a.train.eval_iters)));
        interval.reset();
      }
      if (!a.save.empty() && a.save_interval > 0 && it % a.save_interval == 0) {
        save_checkpoint(a.save, {it, sampler.consumed_samples}, trainer);
        saved_at = it;
      }
      if (const std::string why = early_exit.reason(it, groups->world); !why.empty() && it < a.train.train_iters) {
        if (!a.save.empty() && saved_at < it) save_checkpoint(a.save, {it, sampler.consumed_samples}, trainer);
        print0("exiting at iteration {} of {} ({}): {}\n", it, a.train.train_iters, why,
               a.save.empty() ? "nothing saved (no --save)" : "checkpoint in " + a.save);
        barrier(groups->world);
        return 0;
      }
      turns.pass();
    }
    turns.wait();  // the other side's last step
    if (!a.save.empty() && saved_at < a.train.train_iters) save_checkpoint(a.save, {a.train.train_iters, sampler.consumed_samples}, trainer);
    print_samples(a, trainer);
    barrier(groups->world);
    return 0;
  });
}
