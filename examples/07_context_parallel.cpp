// mpirun -np 2 --oversubscribe --allow-run-as-root --bind-to none -x OMP_NUM_THREADS=1 -x MASTER_PORT=29780 build/examples/07_context_parallel
//
// 07_context_parallel — chapter 8: context parallelism. Every rank of the cp group holds the
// same model and the same samples, but only 2 of each sequence's 2·cp chunks: it computes
// the activations of T/cp tokens. Attention, the one layer where tokens meet, becomes ring
// attention (ring_attention.hpp): the key/value blocks go round the ring.
//   1. Ring attention alone, on random q, k, v: its output and gradients against causal
//      attention over the whole sequence (which every rank also computes, to compare), and
//      the attention FLOPs each rank performed, counted, under --split head-tail (the default:
//      rank r holds chunks r and 2·cp-1-r) or contiguous (chunks 2r, 2r+1).
//   2. Training, the loop written out: apply_context_parallel, each rank's chunks of the batch,
//      gradients averaged over cp. Next to it, on every rank, the same model on whole
//      sequences (one device's run): both losses are printed every 5 iterations.
// Mock data unless --data-path and --tokenizer-model are given. About 15 s on 2 cores at
// -np 2. tutorials/08_context_parallel.md.
#include <lightron/context_parallel.hpp>
#include <lightron/data.hpp>
#include <lightron/data_parallel.hpp>  // all_reduce_gradients
#include <lightron/train.hpp>

#include <lightron/cli.hpp>

using namespace lightron;

// Part 1: ring attention on this rank's chunks vs causal attention on the whole sequence.
void compare_attention(const Group& cp, const SequenceSplit& split) {
  const int64_t B = 2, H = 4, D = 16, T = 64 * cp.size;
  torch::manual_seed(1);  // the same q, k, v, dout on every rank
  const auto q = torch::randn({B, H, T, D}), k = torch::randn({B, H, T, D}), v = torch::randn({B, H, T, D});
  const auto dout = torch::randn({B, H, T, D});
  auto mine = [&](const torch::Tensor& t) {  // this rank's chunks along T (dim 2)
    return sequence_chunks(t.transpose(1, 2), cp.rank, split).transpose(1, 2).contiguous();
  };
  auto qw = q.clone().requires_grad_(), kw = k.clone().requires_grad_(), vw = v.clone().requires_grad_();
  const auto whole = causal_attention(qw, kw, vw);
  whole.backward(dout);
  auto ql = mine(q).requires_grad_(), kl = mine(k).requires_grad_(), vl = mine(v).requires_grad_();
  ring_attention_flops() = 0;
  // [snippet: ring_call]
  const auto out = ring_attention(ql, kl, vl, cp, split);  // this rank's queries, every rank's keys
  out.backward(mine(dout));
  // [end snippet: ring_call]
  const auto worst = torch::stack({(out - mine(whole)).abs().max(), (ql.grad() - mine(qw.grad())).abs().max(),
                                   (kl.grad() - mine(kw.grad())).abs().max(), (vl.grad() - mine(vw.grad())).abs().max()});
  const auto all = all_gather(cp, worst.unsqueeze(0), 0).amax(0);  // worst over the ranks
  print0("ring attention vs whole-sequence attention, max |difference| over ranks: output {:.2e} dQ {:.2e} dK {:.2e} "
         "dV {:.2e}\n", all[0].item<double>(), all[1].item<double>(), all[2].item<double>(), all[3].item<double>());
  const auto flops = all_gather(cp, torch::tensor({ring_attention_flops()}), 0);
  print0("attention FLOPs per rank ({} split, T = {}): {} | max / min = {:.2f}\n", split.zigzag ? "head-tail" : "contiguous",
         T, fmt::join(std::vector<int64_t>(flops.data_ptr<int64_t>(), flops.data_ptr<int64_t>() + cp.size), " "),
         (flops.max().item<double>() / flops.min().item<double>()));
}

int main(int argc, char** argv) {
  return run_main([&] {
    std::string split_name = "head-tail", data_path, tokenizer_model;
    int64_t train_iters = 20, micro_batch_size = 4, seq_length = 128, vocab_size = 2048;
    CLI::App app{"lightron chapter 8: context parallelism, ring attention over the cp group"};
    app.add_option("--split", split_name, "which chunks each rank holds")->check(CLI::IsMember({"head-tail", "contiguous"}));
    app.add_option("--train-iters", train_iters, "optimizer steps");
    app.add_option("--micro-batch-size", micro_batch_size, "samples per step (every cp rank the same ones)");
    app.add_option("--seq-length", seq_length, "tokens per sample, split over the cp ranks");
    app.add_option("--vocab-size", vocab_size, "for mock data");
    app.add_option("--data-path", data_path, "prefix of a .bin/.idx pair (default: mock data)");
    app.add_option("--tokenizer-model", tokenizer_model, "SentencePiece .model, with --data-path");
    if (auto exit_code = parse_command_line(app, argc, argv)) return *exit_code;  // --help: 0, a bad flag: 2
    require(data_path.empty() == tokenizer_model.empty(), "give both --data-path and --tokenizer-model, or neither "
            "(mock data)");
    const LaunchEnv env = start_rank_process(/*num_threads=*/1);
    if (!tokenizer_model.empty()) vocab_size = SpmVocab(spm_vocab_path(tokenizer_model)).size();
    GPTConfig model_config = course_gpt_config(vocab_size);  // as in 00_single_device, longer sequences
    model_config.seq_length = seq_length;
    model_config.max_position_embeddings = seq_length;
    TrainConfig train;
    train.micro_batch_size = train.global_batch_size = micro_batch_size;
    train.train_iters = train_iters;
    train.lr = 1e-3;
    train.min_lr = 1e-4;
    train.lr_warmup_iters = 5;
    // As the parity tests: Adam with eps 1e-8 magnifies the rounding noise of gradients near 0,
    // and at lr 3e-3 this model's loss spikes, which magnifies any difference: both runs stay
    // equal to ~1e-6 here, not because the noise is absent but because nothing amplifies it.
    train.adam_eps = 1e-6;
    validate_model_config(model_config);
    validate_train_config(train, /*dp_size=*/1);
    validate_context_parallel(model_config, env.world_size, /*tp=*/1, /*sequence_parallel=*/false, {});

    auto groups = init_process_groups(Layout().with_cp(env.world_size));
    const Group& cp = groups->cp;
    const SequenceSplit split{cp.size, split_name == "head-tail"};
    print0("{} rank(s) | cp {} | {} split: rank r holds chunks {} of {} | T = {}, {} tokens per rank\n", env.world_size,
           cp.size, split_name, split.zigzag ? "r and 2cp-1-r" : "2r and 2r+1", 2 * cp.size, seq_length,
           seq_length / cp.size);
    compare_attention(cp, split);

    std::unique_ptr<GPTSampleSource> data;
    std::unique_ptr<IndexedDataset> indexed;
    if (data_path.empty()) {
      data = std::make_unique<MockGPTDataset>(model_config.vocab_size, seq_length, /*num_samples=*/4096, train.seed);
    } else {
      indexed = std::make_unique<IndexedDataset>(data_path);
      data = std::make_unique<GPTDataset>(*indexed, split_documents("969,30,1", indexed->num_sequences()).train,
                                          seq_length, train.seed);
    }
    DataSampler sampler(data->size(), train.global_batch_size, train.micro_batch_size, /*dp_rank=*/0, /*dp_size=*/1,
                        train.seed);

    torch::manual_seed(train.seed);
    auto model = std::make_shared<GPT>(model_config);  // whole, as every layout starts
    torch::manual_seed(train.seed);
    auto one_device = std::make_shared<GPT>(model_config);  // the same weights, left alone
    // [snippet: cp_compose]
    apply_context_parallel(*model, cp, split);  // ring attention, this rank's positions
    // [end snippet: cp_compose]
    const auto params = parameters_of(named_parameters_of(*model));
    AdamW optimizer(named_parameters_of(*model), train), reference(named_parameters_of(*one_device), train);

    for (int64_t it = 1; it <= train.train_iters; ++it) {
      const Batch batch = make_batch(*data, sampler.next_global_batch()[0]);
      comm_stats().reset();
      // [snippet: cp_loop]
      optimizer.zero_grad();
      const Batch mine = context_chunks(batch, cp.rank, split);  // (B, T/cp): its two chunks
      auto loss = model->loss(mine.tokens, mine.labels);         // the mean over its own tokens
      loss.backward();                                           // ring attention's backward: dK, dV go home
      all_reduce_gradients(params, cp);                          // cp: averaged, as over dp
      all_reduce(cp, loss, /*average=*/true);                    // the mean over the whole sequence
      const auto norm = grad_sq_norm(params).sqrt();
      clip_grads(params, norm, train.clip_grad);
      optimizer.step(lr_at(train, it));
      // [end snippet: cp_loop]
      reference.zero_grad();
      auto whole = one_device->loss(batch.tokens, batch.labels);
      whole.backward();
      const auto whole_norm = grad_sq_norm(parameters_of(named_parameters_of(*one_device))).sqrt();
      clip_grads(parameters_of(named_parameters_of(*one_device)), whole_norm, train.clip_grad);
      reference.step(lr_at(train, it));
      if (it == 1) {
        const auto per_layer = ring_attention_bytes(micro_batch_size, model_config.query_groups(), seq_length / cp.size,
                                                    model_config.head_dim(), cp.size);
        print0("sent over cp in step 1, per rank: {} bytes | formula L x (forward + backward) = {} x ({} + {}) = {}\n",
               comm_stats().get("cp", "send").bytes, model_config.num_layers, per_layer.forward, per_layer.backward,
               model_config.num_layers * (per_layer.forward + per_layer.backward));
      }
      if (it == 1 || it % 5 == 0)
        print0("iteration {:>3}/{} | loss {:.6f} (one device: {:.6f}) | grad norm {:.6f} (one device: {:.6f})\n", it,
               train.train_iters, loss.item<double>(), whole.item<double>(), norm.item<double>(),
               whole_norm.item<double>());
    }
    barrier(groups->world);  // nobody leaves (rank 0 hosts the store) while others still talk
    return 0;
  });
}
