// lightron/arguments.hpp — Megatron-LM's flag names, parsed with CLI11, and one validation
// pass over all of them before anything big is allocated. A TOML file given with --config
// can hold the same settings (`num-layers = 4`).
//
// This header is for the programs in examples/ (it needs CLI11); the library headers
// take plain structs (GPTConfig, TrainConfig, Layout) and never parse flags themselves.
// Introduced in chapter 0; later chapters add their flags here.
#pragma once

#include "data.hpp"
#include "gpt.hpp"
#include "memory.hpp"
#include "pipeline_parallel.hpp"
#include "process_groups.hpp"
#include "tp_model.hpp"
#include "train.hpp"
#include "trainer.hpp"

#include "cli.hpp"  // parse_command_line (CLI11)

#include <sched.h>  // sched_getaffinity: --num-threads' bound

namespace lightron {

struct Arguments {
  GPTConfig model;
  TrainConfig train;
  Layout layout;                      // layout.dp == 0: derived from the world size
  int64_t vocab_size = 0;             // before padding; 0: from the tokenizer's .vocab
  int64_t make_vocab_size_divisible_by = 128;
  std::string data_path, split = "969,30,1", tokenizer_model;
  bool mock_data = false;
  int64_t mock_samples = 1 << 16;
  std::string save, load, metrics_file, comm_file;
  int64_t save_interval = 0;
  bool exit_signal_handler = false;   // SIGTERM/SIGINT/SIGUSR1: finish the iteration, save, exit 0
  int64_t exit_interval = 0;          // > 0: save and exit at the first iteration divisible by it
  double exit_duration_in_mins = 0;   // > 0: save and exit after this many minutes
  bool finetune = false, no_load_optim = false, no_load_rng = false;  // what --load restores
  int num_threads = 1;
  double peak_tflops = 0;             // 0: CPU: measured at start (measured_gemm_tflops); GPU: datasheet
  double distributed_timeout_seconds = 60;
  std::string ddp_impl = "bucketed";  // naive | bucketed
  int64_t ddp_bucket_size = 40000000; // elements per gradient bucket
  std::string sharding = "no_shard";  // --data-parallel-sharding-strategy (zero.hpp)
  bool use_distributed_optimizer = false;  // = --data-parallel-sharding-strategy optim
  int64_t check_weight_hash_interval = 0;
  bool sequence_parallel = false;
  std::string pipeline_schedule = "1f1b";
  int64_t num_layers_per_virtual_pipeline_stage = 0;
  std::string timeline_file;
  std::string tensorboard_dir;        // rank 0's TensorBoard event file; empty: none
  bool dry_run = false;
  bool measure = false;               // with --dry-run: run one step per rank and measure activations
  RecomputeOptions recompute;
  std::string device;  // cpu | cuda; empty: cuda when available
  bool bf16 = false;
  bool through_host = false;          // collectives over Gloo through host copies (process_groups.hpp)
  int64_t sample_tokens = 0;          // after training, print samples of this many tokens
  int64_t num_samples_to_print = 3;
  double temperature = 0.8;
  int64_t top_k = 40;
};

inline void add_model_flags(CLI::App& app, GPTConfig& m) {
  app.add_option("--num-layers", m.num_layers, "transformer blocks (L)");
  app.add_option("--hidden-size", m.hidden_size, "channels (C)");
  app.add_option("--ffn-hidden-size", m.ffn_hidden_size, "MLP size (F); 0 means 4 x hidden-size");
  app.add_option("--num-attention-heads", m.num_attention_heads, "attention heads (H)");
  app.add_option("--num-query-groups", m.num_query_groups, "key/value groups (G); 0 means H");
  app.add_option("--seq-length", m.seq_length, "tokens per sample (T)");
  app.add_option("--max-position-embeddings", m.max_position_embeddings, "0 means seq-length");
  app.add_option("--normalization", m.normalization, "LayerNorm or RMSNorm");
  app.add_option("--position-embedding-type", m.position_embedding_type, "learned_absolute or rope");
  app.add_option("--rotary-base", m.rotary_base, "RoPE base");
  app.add_flag("--swiglu", m.swiglu, "SwiGLU MLP (Llama)");
  app.add_flag("--untie-embeddings-and-output-weights", m.untie_embeddings_and_output_weights);
  app.add_flag("--disable-bias-linear{false}", m.add_bias_linear, "no biases in linear layers");
  app.add_option("--init-method-std", m.init_method_std, "std of the normal initialisation");
  app.add_option("--norm-epsilon", m.norm_epsilon);
}

inline void add_training_flags(CLI::App& app, TrainConfig& t) {
  app.add_option("--micro-batch-size", t.micro_batch_size);
  app.add_option("--global-batch-size", t.global_batch_size, "micro x accumulation x data-parallel size");
  app.add_option("--train-iters", t.train_iters);
  app.add_option("--lr", t.lr);
  app.add_option("--min-lr", t.min_lr);
  app.add_option("--lr-decay-style", t.lr_decay_style, "cosine, linear or constant");
  app.add_option("--lr-warmup-iters", t.lr_warmup_iters);
  app.add_option("--lr-decay-iters", t.lr_decay_iters, "0 means train-iters");
  app.add_option("--weight-decay", t.weight_decay);
  app.add_option("--adam-beta1", t.adam_beta1);
  app.add_option("--adam-beta2", t.adam_beta2);
  app.add_option("--adam-eps", t.adam_eps);
  app.add_option("--clip-grad", t.clip_grad, "max global gradient norm; 0 disables");
  app.add_option("--eval-interval", t.eval_interval, "0 disables evaluation");
  app.add_option("--eval-iters", t.eval_iters);
  app.add_option("--log-interval", t.log_interval);
  app.add_option("--seed", t.seed);
  app.add_flag("--check-for-nan-in-loss-and-grad,!--no-check-for-nan-in-loss-and-grad",
               t.check_for_nan_in_loss_and_grad, "stop at a NaN/inf loss or gradient, naming it (default: on)");
  app.add_option("--skip-spike-factor", t.skip_spike_factor,
                 "> 1: skip an update whose loss or grad norm exceeds this x the running median; 0: off");
  app.add_option("--skip-spike-window", t.skip_spike_window, "iterations in the running median");
}

// Parses argv; a parse error becomes a UsageError (one line, exit 2), --help prints and exits 0.
inline Arguments parse_arguments(int argc, char** argv, const std::string& description) {
  Arguments a;
  CLI::App app{description};
  app.set_config("--config", "", "a TOML file with the same settings (num-layers = 4)");
  add_model_flags(app, a.model);
  add_training_flags(app, a.train);
  app.add_option("--tensor-model-parallel-size", a.layout.tp);
  app.add_option("--pipeline-model-parallel-size", a.layout.pp);
  app.add_option("--context-parallel-size", a.layout.cp);
  a.layout.dp = 0;
  app.add_option("--data-parallel-size", a.layout.dp, "0: world size / (tp x cp x pp)");
  app.add_flag("--sequence-parallel", a.sequence_parallel, "split norms/residuals along the sequence over tp");
  app.add_option("--pipeline-schedule", a.pipeline_schedule, "1f1b or afab");
  app.add_option("--num-layers-per-virtual-pipeline-stage", a.num_layers_per_virtual_pipeline_stage,
                 "> 0: interleaved 1f1b");
  app.add_option("--timeline-file", a.timeline_file, "JSON lines of the pipeline timeline, PATH.rankN per rank");
  app.add_option("--device", a.device, "cpu or cuda (default: cuda when available)");
  app.add_flag("--bf16", a.bf16, "bf16 compute with fp32 master weights (CUDA)");
  app.add_flag("--through-host", a.through_host, "collectives over Gloo via host copies (automatic: ranks > GPUs)");
  app.add_flag("--dry-run", a.dry_run, "print each rank's memory for this layout and exit (one process)");
  app.add_flag("--measure", a.measure, "with --dry-run: one step per rank (threads of this process), activations measured");
  app.add_option("--recompute-granularity", a.recompute.granularity, "full or selective activation recompute");
  app.add_option("--recompute-method", a.recompute.method, "uniform or block (full only; default uniform)");
  app.add_option("--recompute-num-layers", a.recompute.num_layers,
                 "blocks per group (uniform) or recomputed blocks per chunk (block); 0: 1 (uniform), all (block)");
  app.add_option("--vocab-size", a.vocab_size, "before padding; 0: the tokenizer's");
  app.add_option("--make-vocab-size-divisible-by", a.make_vocab_size_divisible_by);
  app.add_option("--data-path", a.data_path, "prefix of a .bin/.idx pair");
  app.add_option("--split", a.split, "train,valid,test weights");
  app.add_flag("--mock-data", a.mock_data, "synthetic learnable data instead of --data-path");
  app.add_option("--mock-samples", a.mock_samples);
  app.add_option("--tokenizer-model", a.tokenizer_model, "SentencePiece .model (its .vocab is next to it)");
  app.add_option("--save", a.save, "checkpoint directory to write");
  app.add_option("--save-interval", a.save_interval, "0: only at the end");
  app.add_flag("--exit-signal-handler", a.exit_signal_handler,
               "on SIGTERM, SIGINT or SIGUSR1 finish the iteration, save and exit 0 (a second signal: at once)");
  app.add_option("--exit-interval", a.exit_interval, "save and exit at an iteration divisible by this; 0: off");
  app.add_option("--exit-duration-in-mins", a.exit_duration_in_mins, "save and exit after this many minutes; 0: off");
  app.add_option("--load", a.load, "checkpoint directory to resume from (any layout)");
  app.add_flag("--finetune", a.finetune, "--load weights only; iteration and samples start from 0");
  app.add_flag("--no-load-optim", a.no_load_optim, "--load without the AdamW state");
  app.add_flag("--no-load-rng", a.no_load_rng, "--load without the RNG state");
  app.add_option("--metrics-file", a.metrics_file, "JSON lines of the logged metrics");
  app.add_option("--tensorboard-dir", a.tensorboard_dir, "TensorBoard scalars of the logged metrics and eval loss");
  app.add_option("--comm-file", a.comm_file, "JSON lines of bytes/calls per group and operation, PATH.rankN");
  app.add_option("--num-threads", a.num_threads, "threads per rank");
  app.add_option("--peak-tflops", a.peak_tflops, "per-rank peak for MFU");
  app.add_option("--distributed-timeout-seconds", a.distributed_timeout_seconds);
  app.add_option("--ddp-impl", a.ddp_impl, "naive or bucketed");
  app.add_option("--ddp-bucket-size", a.ddp_bucket_size, "elements per gradient bucket");
  app.add_option("--data-parallel-sharding-strategy", a.sharding,
                 "no_shard, optim (ZeRO-1), optim_grads (ZeRO-2), optim_grads_params (ZeRO-3)");
  app.add_flag("--use-distributed-optimizer", a.use_distributed_optimizer, "ZeRO-1: = --data-parallel-sharding-strategy optim");
  app.add_option("--check-weight-hash-interval", a.check_weight_hash_interval, "0 disables");
  app.add_option("--sample-tokens", a.sample_tokens, "print samples of this many tokens after training");
  app.add_option("--num-samples", a.num_samples_to_print);
  app.add_option("--temperature", a.temperature);
  app.add_option("--top-k", a.top_k);
  if (parse_command_line(app, argc, argv)) std::exit(0);  // after --help; a bad flag throws
  return a;
}

inline ParallelOptions parallel_options(const Arguments& a) {
  ParallelOptions o;
  o.ddp_impl = a.ddp_impl;
  o.ddp_bucket_size = a.ddp_bucket_size;
  o.sharding = a.sharding;
  o.sequence_parallel = a.sequence_parallel;
  o.pipeline_schedule = a.pipeline_schedule;
  o.layers_per_virtual_stage = a.num_layers_per_virtual_pipeline_stage;
  o.bf16 = a.bf16;
  o.recompute = a.recompute;
  return o;
}

// The CPUs this process may run on (its affinity mask, as `nproc`; at least 1).
inline int usable_cpus() {
  cpu_set_t set;
  return sched_getaffinity(0, sizeof(set), &set) == 0 ? std::max(1, CPU_COUNT(&set)) : 1;
}

// The range of every numeric flag that the model, training and layout checks do not cover
// (those are validate_model_config, validate_train_config, validate_layout). Non-finite
// floats never pass: each check is written so that NaN fails it.
inline void validate_flag_ranges(const Arguments& a) {
  constexpr int64_t kMaxParallelSize = int64_t(1) << 15;  // tp x cp x dp x pp stays far inside int64
  require(a.layout.tp <= kMaxParallelSize && a.layout.pp <= kMaxParallelSize && a.layout.cp <= kMaxParallelSize &&
          a.layout.dp <= kMaxParallelSize, "parallel sizes must be at most {}: --tensor-model-parallel-size {} "
          "--pipeline-model-parallel-size {} --context-parallel-size {} --data-parallel-size {}", kMaxParallelSize,
          a.layout.tp, a.layout.pp, a.layout.cp, a.layout.dp);
  require(a.layout.dp >= 0, "--data-parallel-size must not be negative (0: world size / (tp x cp x pp)), got {}",
          a.layout.dp);
  const int cpus = usable_cpus(), max_threads = 4 * cpus;
  require(a.num_threads >= 1 && a.num_threads <= max_threads,
          "--num-threads must be between 1 and {} (4 x the {} CPUs this process may use), got {}", max_threads, cpus,
          a.num_threads);
  require(a.peak_tflops >= 0 && a.peak_tflops <= 1e5,
          "--peak-tflops must be between 0 (0: the device's default) and 100000 TFLOP/s per rank, got {}", a.peak_tflops);
  require(a.distributed_timeout_seconds > 0, "--distributed-timeout-seconds must be positive, got {}",
          a.distributed_timeout_seconds);
  require(a.distributed_timeout_seconds <= 7 * 24 * 3600,
          "--distributed-timeout-seconds must be at most 604800 (a week), got {}", a.distributed_timeout_seconds);
  const std::pair<const char*, int64_t> not_negative[] = {
      {"save-interval (0: only at the end)", a.save_interval},
      {"check-weight-hash-interval (0 disables)", a.check_weight_hash_interval},
      {"num-layers-per-virtual-pipeline-stage (0: no interleaving)", a.num_layers_per_virtual_pipeline_stage},
      {"vocab-size (0: the tokenizer's)", a.vocab_size}, {"sample-tokens (0: no samples)", a.sample_tokens},
      {"top-k (0: every token)", a.top_k}};
  for (const auto& [flag, value] : not_negative) require(value >= 0, "--{} must not be negative, got {}", flag, value);
  require(a.vocab_size <= (int64_t(1) << 24), "--vocab-size must be at most 16777216 (2^24), got {}", a.vocab_size);
  require(a.make_vocab_size_divisible_by >= 1 && a.make_vocab_size_divisible_by <= 65536,
          "--make-vocab-size-divisible-by must be between 1 and 65536, got {}", a.make_vocab_size_divisible_by);
  require(a.mock_samples >= 1 && a.mock_samples <= (int64_t(1) << 28), "--mock-samples must be between 1 and 268435456 "
          "(2^28: the sampler shuffles 8 bytes per sample), got {}", a.mock_samples);
  require(a.ddp_bucket_size > 0, "--ddp-bucket-size must be positive, got {}", a.ddp_bucket_size);
  require(a.num_samples_to_print >= 0 && a.num_samples_to_print <= 5,
          "--num-samples must be between 0 and 5 (the built-in prompts), got {}", a.num_samples_to_print);
  require(a.temperature >= 0 && std::isfinite(a.temperature),
          "--temperature must be a finite number >= 0 (0: greedy), got {}", a.temperature);
  require(a.sample_tokens <= (int64_t(1) << 20), "--sample-tokens must be at most 1048576, got {}", a.sample_tokens);
}

// Every check that needs no communicator, in one place, before anything big exists.
// Reads the data's index (small) to check files and token ids against the vocabulary.
inline void validate_arguments(Arguments& a, int64_t world_size) {
  require(a.layout.tp >= 1 && a.layout.pp >= 1 && a.layout.cp >= 1,
          "parallel sizes must be at least 1: --tensor-model-parallel-size {} --pipeline-model-parallel-size {} "
          "--context-parallel-size {}", a.layout.tp, a.layout.pp, a.layout.cp);
  validate_flag_ranges(a);
  const int64_t model_parallel = a.layout.tp * a.layout.pp * a.layout.cp;
  if (a.layout.dp == 0) {
    require(world_size % model_parallel == 0,
            "the number of ranks ({}) must be divisible by --tensor-model-parallel-size ({}) x --context-parallel-size "
            "({}) x --pipeline-model-parallel-size ({}) = {}; launch with mpirun -np {} or change the sizes",
            world_size, a.layout.tp, a.layout.cp, a.layout.pp, model_parallel, model_parallel);
    a.layout.dp = world_size / model_parallel;
  }
  validate_layout(a.layout, world_size);
  if (a.device.empty()) a.device = torch::cuda::is_available() ? "cuda" : "cpu";
  require(a.device == "cpu" || a.device == "cuda", "--device must be cpu or cuda, got '{}'", a.device);
  require(a.device == "cpu" || torch::cuda::is_available(), "--device cuda: no CUDA device is visible (or this "
          "LibTorch is CPU-only); use --device cpu");
  require(!a.bf16 || a.device == "cuda", "--bf16 needs --device cuda (bf16 autocast is used on GPUs only)");
  require(a.exit_interval >= 0, "--exit-interval must not be negative (0: off), got {}", a.exit_interval);
  require(a.exit_duration_in_mins >= 0 && std::isfinite(a.exit_duration_in_mins),
          "--exit-duration-in-mins must be a finite number, 0 or more (0: off), got {}", a.exit_duration_in_mins);
  require(a.sample_tokens == 0 || !a.tokenizer_model.empty(),
          "--sample-tokens {} needs --tokenizer-model (to turn the sampled ids into text)", a.sample_tokens);
  require(!a.load.empty() || !(a.finetune || a.no_load_optim || a.no_load_rng),
          "--finetune, --no-load-optim and --no-load-rng need --load DIR");
  require(a.ddp_impl == "naive" || a.ddp_impl == "bucketed", "--ddp-impl must be naive or bucketed, got '{}'",
          a.ddp_impl);
  require(!a.use_distributed_optimizer || a.sharding == "no_shard" || a.sharding == "optim",
          "--use-distributed-optimizer means --data-parallel-sharding-strategy optim; it contradicts '{}'", a.sharding);
  if (a.use_distributed_optimizer) a.sharding = "optim";
  require(zero_stage(a.sharding) < 3 || a.layout.pp == 1, "--data-parallel-sharding-strategy optim_grads_params "
          "(ZeRO-3) gathers weights block by block, which a pipeline schedule would have to drive: it needs "
          "--pipeline-model-parallel-size 1, got {}", a.layout.pp);
  require(zero_stage(a.sharding) == 0 || a.ddp_impl == "bucketed",
          "--data-parallel-sharding-strategy {} shards the gradient buckets: it needs --ddp-impl bucketed, got '{}'",
          a.sharding, a.ddp_impl);
  require(a.mock_data != !a.data_path.empty(), "give exactly one of --data-path and --mock-data, got {}",
          a.mock_data ? fmt::format("both (--data-path {})", a.data_path) : std::string("neither"));
  split_documents(a.split, /*n=*/0);  // the syntax of --split, even where --mock-data ignores it
  if (a.vocab_size == 0 && !a.tokenizer_model.empty()) a.vocab_size = SpmVocab(spm_vocab_path(a.tokenizer_model)).size();
  require(a.vocab_size > 0, "--vocab-size must be positive (or give --tokenizer-model), got {}", a.vocab_size);
  if (!a.data_path.empty()) {
    auto data = [&] {  // checks both files, the header and the sizes
      try {
        return IndexedDataset(a.data_path);
      } catch (const UsageError& e) {
        throw UsageError(fmt::format("--data-path: {}", e.what()));
      }
    }();
    const int64_t max_id = data.max_token_id();
    require(max_id < a.vocab_size, "--vocab-size ({}) is too small for {}: it holds token id {}", a.vocab_size,
            a.data_path, max_id);
  }
  a.model.vocab_size = padded_vocab_size(a.vocab_size, a.make_vocab_size_divisible_by, a.layout.tp);
  validate_model_config(a.model);
  validate_train_config(a.train, a.layout.dp);
  validate_tensor_parallel(a.model, a.layout.tp, a.sequence_parallel);
  require(!a.sequence_parallel || a.layout.tp > 1, "--sequence-parallel needs --tensor-model-parallel-size > 1");
  validate_pipeline(a.model.num_layers, a.layout.pp, a.num_layers_per_virtual_pipeline_stage,
                    a.train.accumulation_steps(a.layout.dp), a.pipeline_schedule);
  const int64_t v = virtual_stages(a.model.num_layers, a.layout.pp, a.num_layers_per_virtual_pipeline_stage);
  validate_recompute(a.recompute, a.model.num_layers / (a.layout.pp * v));  // blocks per model chunk
  validate_context_parallel(a.model, a.layout.cp, a.layout.tp, a.sequence_parallel, a.recompute);
  require(!a.measure || a.dry_run, "--measure needs --dry-run (it measures each rank of the layout in one process)");
}

}  // namespace lightron
