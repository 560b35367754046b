// 06_your_own_model — lightron's guarantee for a model that is not lightron's GPT: build it
// from the library's layers, split it over tp with column_parallel_from / row_parallel_from,
// train it on tp x dp with ModelTrainer, and prove that the layout reproduces one rank.
//
//   mpirun -np 2 --oversubscribe --allow-run-as-root --bind-to none -x OMP_NUM_THREADS=1 \
//       -x MASTER_PORT=29730 build/examples/06_your_own_model --tensor-model-parallel-size 2
//
// The model: "parallel" blocks (GPT-J, PaLM) — y = x + attention(norm(x)) + mlp(norm(x)),
// one norm per block, rotary positions — with a gated GELU MLP (GeGLU) and a fused
// [Q | K | V] projection. Every rank first trains it alone (the reference, in this process),
// then on the layout (tp = --tensor-model-parallel-size, dp = ranks / tp), and prints the
// parity report: every step's loss and gradient norm, and the final weights. With --save DIR
// it also saves the layout's checkpoint and loads it back into one unsplit model. Exit code 1
// if anything differs. tutorials/06_your_own_model.md walks through it.
#include <lightron/model_trainer.hpp>
#include <lightron/parity.hpp>

#include <lightron/cli.hpp>

using namespace lightron;

struct ParallelLMConfig {
  int64_t vocab = 64, layers = 2, hidden = 32, heads = 4, ffn = 48, seq = 16;
  nlohmann::json json() const {
    return {{"model", "ParallelLM"}, {"vocab", vocab}, {"layers", layers}, {"hidden", hidden}, {"heads", heads},
            {"ffn", ffn}};
  }
};

// x + attention(norm(x)) + mlp(norm(x)). Under tp each rank holds heads/tp whole heads and
// ffn/tp of the MLP; it reads how many from its weights, so the same code runs split or whole.
struct ParallelBlock : torch::nn::Module {
  std::shared_ptr<Norm> norm;
  std::shared_ptr<LinearLayer> qkv, out, gate_up, down;  // swappable: Linear, or its tp parts
  int64_t head_dim;
  explicit ParallelBlock(const ParallelLMConfig& c) : head_dim(c.hidden / c.heads) {
    norm = register_module("norm", std::make_shared<Norm>(c.hidden, /*rms_norm=*/true, /*epsilon=*/1e-5));
    qkv = register_module("qkv", std::make_shared<Linear>(c.hidden, 3 * c.hidden, /*with_bias=*/false));
    out = register_module("out", std::make_shared<Linear>(c.hidden, c.hidden, /*with_bias=*/true));
    gate_up = register_module("gate_up", std::make_shared<Linear>(c.hidden, 2 * c.ffn, /*with_bias=*/false));
    down = register_module("down", std::make_shared<Linear>(c.ffn, c.hidden, /*with_bias=*/true));
  }
  torch::Tensor forward(const torch::Tensor& x) {  // (B, T, C) -> (B, T, C)
    auto h = norm->forward(x);
    auto qkv_parts = qkv->forward(h).chunk(3, -1);  // 3 x (B, T, C/tp)
    const int64_t B = x.size(0), T = x.size(1), local_heads = qkv_parts[0].size(-1) / head_dim;
    auto heads = [&](const torch::Tensor& t) { return t.reshape({B, T, local_heads, head_dim}).transpose(1, 2); };
    auto q = apply_rotary(heads(qkv_parts[0]), /*base=*/10000.0), k = apply_rotary(heads(qkv_parts[1]), 10000.0);
    auto attended = causal_attention(q, k, heads(qkv_parts[2]));                          // (B, H/tp, T, D)
    auto attention = out->forward(attended.transpose(1, 2).reshape({B, T, local_heads * head_dim}));
    auto gu = gate_up->forward(h).chunk(2, -1);                                          // 2 x (B, T, F/tp)
    auto mlp = down->forward(torch::gelu(gu[0], "tanh") * gu[1]);
    return x + attention + mlp;
  }
};

struct ParallelLM : torch::nn::Module {
  ParallelLMConfig config;
  std::shared_ptr<Embedding> embed;
  std::vector<std::shared_ptr<ParallelBlock>> blocks;
  std::shared_ptr<Norm> final_norm;
  std::shared_ptr<Linear> head;  // untied, replicated over tp
  explicit ParallelLM(const ParallelLMConfig& c) : config(c) {
    embed = register_module("embed", std::make_shared<Embedding>(c.vocab, c.hidden));
    for (int64_t i = 0; i < c.layers; ++i)
      blocks.push_back(register_module("block" + std::to_string(i), std::make_shared<ParallelBlock>(c)));
    final_norm = register_module("final_norm", std::make_shared<Norm>(c.hidden, true, 1e-5));
    head = register_module("head", std::make_shared<Linear>(c.hidden, c.vocab, false));
    torch::NoGradGuard no_grad;  // from the global generator: the seed fixes every weight
    for (auto& p : named_parameters())
      if (p.value().dim() == 2) p.value().normal_(0.0, 0.02);
      else if (p.key().find("norm") == std::string::npos) p.value().zero_();
  }
  // The interface lightron's step needs: the mean loss of a batch of ids and labels (B, T).
  torch::Tensor loss(const torch::Tensor& ids, const torch::Tensor& labels) {
    auto x = embed->forward(ids);
    for (auto& block : blocks) x = block->forward(x);
    return lightron::cross_entropy_loss(head->forward(final_norm->forward(x)), labels);  // (not torch::nn::functional)
  }
};

// Tensor parallelism applied to the finished model: every block's full layers are cut into
// this rank's parts. qkv and gate_up are fused, so they split block by block ([Q | K | V]
// into three, [gate | up] into two); out and down split by rows of their input.
void apply_tensor_parallel(ParallelLM& model, const Group& tp) {
  const auto& c = model.config;
  auto full = [](const std::shared_ptr<LinearLayer>& layer) { return *std::dynamic_pointer_cast<Linear>(layer); };
  // [snippet: apply_tensor_parallel]
  for (auto& b : model.blocks) {
    b->qkv = b->replace_module("qkv", column_parallel_from(full(b->qkv), tp, {c.hidden, c.hidden, c.hidden}));
    b->out = b->replace_module("out", row_parallel_from(full(b->out), tp));
    b->gate_up = b->replace_module("gate_up", column_parallel_from(full(b->gate_up), tp, {c.ffn, c.ffn}));
    b->down = b->replace_module("down", row_parallel_from(full(b->down), tp));
  // [end snippet: apply_tensor_parallel]
  }
}

int main(int argc, char** argv) {
  return run_main([&] {
    int64_t tp = 1, train_iters = 10;
    std::string save;
    CLI::App app{"lightron: your own model on tp x dp, proven equal to one rank"};
    app.add_option("--tensor-model-parallel-size", tp, "tp; dp = ranks / tp");
    app.add_option("--train-iters", train_iters, "optimizer steps");
    app.add_option("--save", save, "also save the layout's checkpoint here and load it back on one rank");
    if (auto exit_code = parse_command_line(app, argc, argv)) return *exit_code;  // --help: 0, a bad flag: 2
    const LaunchEnv env = start_rank_process(/*num_threads=*/1);  // rank and world size from mpirun's environment
    const ParallelLMConfig config;
    require(tp >= 1 && env.world_size % tp == 0, "--tensor-model-parallel-size ({}) must divide the number of ranks ({})",
            tp, env.world_size);
    require(config.heads % tp == 0 && config.ffn % tp == 0, "--tensor-model-parallel-size ({}) must divide the heads "
            "({}) and the MLP size ({})", tp, config.heads, config.ffn);
    require(train_iters > 0, "--train-iters must be positive, got {}", train_iters);
    TrainConfig train;
    train.global_batch_size = 8, train.micro_batch_size = 2, train.train_iters = train_iters;
    train.lr = 3e-3, train.min_lr = 3e-4, train.lr_warmup_iters = 2, train.adam_eps = 1e-6;
    const auto layout = Layout().with_tp(tp).with_dp(env.world_size / tp);
    validate_train_config(train, layout.dp);
    auto groups = init_process_groups(layout);

    // The same training, on any groups: a whole model from the seed, split for this rank.
    auto train_on = [&](const ProcessGroups& g, bool save_checkpoint) {
      torch::manual_seed(train.seed);
      auto model = std::make_shared<ParallelLM>(config);
      apply_tensor_parallel(*model, g.tp);
      ModelTrainer<ParallelLM> trainer(model, train, g, config.json(), /*bucket_elements=*/4000);
      MockGPTDataset data(config.vocab, config.seq, /*num_samples=*/1024, train.seed);
      DataSampler sampler(data.size(), train.global_batch_size, train.micro_batch_size, int(g.coords.dp),
                          int(g.layout.dp), train.seed);
      ParityRun run = record_run(trainer, data, sampler, train.train_iters);
      if (save_checkpoint) trainer.save(save, {train.train_iters, sampler.consumed_samples});
      return run;
    };
    // [snippet: parity]
    const ParityRun reference = train_on(*single_rank_groups(), /*save_checkpoint=*/false);  // this rank alone
    const ParityRun layout_run = train_on(*groups, /*save_checkpoint=*/!save.empty());
    const ParityReport report = compare_runs(reference, layout_run);
    // [end snippet: parity]
    print0("{} steps, one rank vs tp {} x dp {}: last loss {:.6f} vs {:.6f}\nparity: {}\n", train.train_iters, layout.tp,
           layout.dp, reference.losses.back(), layout_run.losses.back(), report.summary());
    bool ok = report.equal;
    if (!save.empty()) {  // the layout's checkpoint, loaded by one unsplit model on each rank
      torch::manual_seed(train.seed + 1);  // other weights: the load must overwrite all of them
      auto whole = std::make_shared<ParallelLM>(config);
      auto single = single_rank_groups();
      ModelTrainer<ParallelLM> loaded(whole, train, *single, config.json());
      loaded.load(save);
      const ParityRun from_checkpoint{{}, {}, loaded.full_parameters()};
      const ParityReport same = compare_runs({{}, {}, layout_run.params}, from_checkpoint, ParityTolerance{0.0, 0.0});
      print0("checkpoint (tp {} -> tp 1): {}\n", layout.tp, same.equal ? "bitwise equal" : same.summary());
      ok = ok && same.equal;
    }
    barrier(groups->world);  // nobody leaves (rank 0 hosts the store) while others still talk
    return ok ? 0 : 1;
  });
}
