// Stage 5: checkpoints. Unit tests (one process): the safetensors format, refusing damaged
// files and other models, skipping interrupted saves, the HuggingFace rename tables.
// Multi-rank suites: resharding 2x2x2 -> 1x1x1 -> 2x2x2 (np 8), 1x2x2 -> 2x1x1 and bit-exact
// resume in one process (np 4). tests/checkpoint_test.sh resumes in new processes and kills
// a rank mid-save; tests/hf_check.py drives the reference_hf_* suites below.
#include "testing.hpp"

namespace test_ckpt_detail {
using namespace lightron;
using namespace lightron_testing;
namespace fs = std::filesystem;

// An empty directory, the same path on every rank of `world` (rank 0 clears it).
std::string fresh_dir(const std::string& name, const Group& world = Group{}) {
  const std::string dir = fmt::format("{}/checkpoint_tests/{}", LIGHTRON_BINARY_DIR, name);
  if (world.rank == 0) {
    lightron::remove_tree(dir);
    fs::create_directories(dir);
  }
  barrier(world);
  return dir;
}

std::unique_ptr<ProcessGroups> single_process() {
  return make_process_groups(c10::make_intrusive<c10d::HashStore>(), 0, Layout{});
}

// A Trainer with its mock data and sampler, as pretrain_gpt drives it.
struct Run {
  GPTConfig c;
  TrainConfig t;
  MockGPTDataset data;
  DataSampler sampler;
  Trainer trainer;
  int64_t iteration = 0;
  Run(const GPTConfig& config, const TrainConfig& train, ProcessGroups& g, const ParallelOptions& o = {})
      : c(config), t(train), data(c.vocab_size, c.seq_length, /*num_samples=*/4096, t.seed),
        sampler(data.size(), t.global_batch_size, t.micro_batch_size, int(g.coords.dp), int(g.layout.dp), t.seed),
        trainer(c, t, o, g) {}
  double step() {
    std::vector<Batch> batches;
    for (const auto& indices : sampler.next_global_batch()) batches.push_back(make_batch(data, indices));
    return trainer.step(batches, ++iteration);
  }
  CheckpointCounters counters() const { return {iteration, sampler.consumed_samples}; }
  void save(const std::string& dir) { save_checkpoint(dir, counters(), trainer); }
  void load(const std::string& dir, const LoadOptions& o = {}) {
    const auto k = load_checkpoint(dir, trainer, o);
    iteration = k.iteration, sampler.consumed_samples = k.consumed_samples;
  }
};

// The UsageError that loading `dir` into a fresh 1x1x1 run of `c` throws ("" if none).
std::string load_error(const std::string& dir, const GPTConfig& c) {
  auto g = single_process();
  Run run(c, tiny_train(8, 2), *g);
  try {
    run.load(dir);
  } catch (const UsageError& e) {
    return e.what();
  }
  return "";
}

void check_bitwise_equal(const std::map<std::string, torch::Tensor>& a, const std::map<std::string, torch::Tensor>& b) {
  REQUIRE(a.size() == b.size());
  for (const auto& [name, t] : a) {
    REQUIRE_MESSAGE(b.count(name) == 1, name);
    CHECK_MESSAGE(torch::equal(t, b.at(name)), name << " differs");
  }
}

bool close_loss(double a, double b) { return std::abs(a - b) <= kParityTolerance * std::abs(b); }

// Saves under `from` after 5 steps, loads under `to` on ranks [0, to.world()) in a world of
// their own; checks weights and the consolidated checkpoint bitwise, the next loss within the
// cross-layout tolerance; then back to `from`, where the next loss must be bit-exact.
void reshard(GPTConfig flavour, const std::string& name, Layout from, Layout to) {
  auto g = init_process_groups(from);
  const auto c = tiny_config(flavour, /*layers=*/4);
  const auto t = tiny_train(/*global_batch=*/8, /*micro_batch=*/1);
  const std::string dir = fresh_dir(name + "_from", g->world), back = fresh_dir(name + "_to", g->world);
  Run src(c, t, *g);
  for (int i = 0; i < 5; ++i) src.step();
  src.save(dir);
  const auto weights = full_parameters(src.trainer);
  const double next = src.step();
  static int generation = 0;
  if (g->rank < to.world()) {
    auto store = c10::make_intrusive<c10d::PrefixStore>(fmt::format("ckpt_reshard/{}", generation), g->store);
    auto dst_groups = to.world() == 1 ? single_process() : make_process_groups(store, g->rank, to);
    Run dst(c, t, *dst_groups);
    dst.load(dir);
    CHECK(dst.iteration == 5);
    CHECK(dst.sampler.consumed_samples == 40);
    CHECK(dst.trainer.optimizer->step_count == 5);
    check_bitwise_equal(full_parameters(dst.trainer), weights);
    dst.save(back);
    if (dst_groups->rank == 0) check_bitwise_equal(CheckpointReader(back).consolidate(), CheckpointReader(dir).consolidate());
    const double dst_next = dst.step();
    CHECK_MESSAGE(close_loss(dst_next, next), "next loss " << dst_next << " vs " << next << " under the saving layout");
  }
  ++generation;
  barrier(g->world);
  Run again(c, t, *g);  // and back to the saving layout, from the other layout's checkpoint
  again.load(back);
  check_bitwise_equal(full_parameters(again.trainer), weights);
  CHECK(again.step() == next);
}

// 8 steps straight vs 4 + save + load into a new Trainer + 4: the same bits.
void resume_bit_exact(GPTConfig flavour, const std::string& name, Layout layout, const ParallelOptions& o = {}) {
  auto g = init_process_groups(layout);
  const auto c = tiny_config(flavour, 4);
  const auto t = tiny_train(8, 1);
  const std::string dir = fresh_dir(name, g->world);
  std::vector<double> straight, resumed;
  Run first(c, t, *g, o);
  for (int i = 0; i < 8; ++i) {
    straight.push_back(first.step());
    if (i == 3) first.save(dir);
  }
  Run second(c, t, *g, o);
  second.load(dir);
  for (int i = 0; i < 4; ++i) resumed.push_back(second.step());
  for (int i = 0; i < 4; ++i) CHECK_MESSAGE(resumed[i] == straight[4 + i], "step " << 5 + i);
  check_bitwise_equal(full_parameters(second.trainer), full_parameters(first.trainer));
}

ParallelOptions zero(const std::string& strategy) {
  ParallelOptions o;
  o.sharding = strategy;
  o.ddp_bucket_size = 3000;
  return o;
}

// ZeRO-3 at dp 4 -> tp 2 x pp 2 without sharding -> ZeRO-1 at dp 2 (ranks 0-1): every checkpoint
// consolidates to the same tensors, bit for bit (the AdamW moments gathered from the slices
// included), and each layout's next loss agrees.
void reshard_zero_chain() {
  auto g = init_process_groups(Layout().with_dp(4));
  const auto c = tiny_config(GPTConfig::gpt2(), /*layers=*/4);
  const auto t = tiny_train(8, 1);
  const std::string dir = fresh_dir("zero3_dp4", g->world), mid = fresh_dir("zero_tp2pp2", g->world),
                    last = fresh_dir("zero1_dp2", g->world);
  Run src(c, t, *g, zero("optim_grads_params"));
  for (int i = 0; i < 5; ++i) src.step();
  src.save(dir);
  const double next = src.step();
  {
    auto store = c10::make_intrusive<c10d::PrefixStore>("zero_chain/mid", g->store);
    auto mid_groups = make_process_groups(store, g->rank, Layout().with_tp(2).with_pp(2));
    Run dst(c, t, *mid_groups);
    dst.load(dir);
    dst.save(mid);
    CHECK_MESSAGE(close_loss(dst.step(), next), "tp 2 x pp 2 after ZeRO-3 dp 4");
  }
  barrier(g->world);
  if (g->rank < 2) {
    auto store = c10::make_intrusive<c10d::PrefixStore>("zero_chain/last", g->store);
    auto last_groups = make_process_groups(store, g->rank, Layout().with_dp(2));
    Run dst(c, t, *last_groups, zero("optim"));
    dst.load(mid);
    CHECK(dst.trainer.distributed->step_count() == 5);
    dst.save(last);
    CHECK_MESSAGE(close_loss(dst.step(), next), "ZeRO-1 dp 2 after tp 2 x pp 2");
  }
  barrier(g->world);
  if (g->rank == 0) {
    const auto first = CheckpointReader(dir).consolidate();
    check_bitwise_equal(CheckpointReader(mid).consolidate(), first);
    check_bitwise_equal(CheckpointReader(last).consolidate(), first);
  }
}
}  // namespace test_ckpt_detail

using namespace test_ckpt_detail;

TEST_CASE("safetensors: CRC-32, and a round trip of every dtype with metadata") {
  CHECK(crc32("123456789", 9) == 0xCBF43926u);
  const NamedTensors tensors = {{"f32", torch::randn({3, 4})}, {"f64", torch::randn({2}, torch::kDouble)},
                                {"i64", torch::arange(5)}, {"bf16", torch::randn({2, 2}).to(torch::kBFloat16)},
                                {"u8", torch::arange(3).to(torch::kByte)}, {"empty", torch::zeros({0, 3})}};
  const std::string path = fresh_dir("safetensors") + "/t.safetensors";
  write_safetensors(path, tensors, {{"note", "hello"}});
  CHECK_FALSE(fs::exists(path + ".tmp"));
  const std::string bytes = read_file(path);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  CHECK(n % 8 == 0);  // the data starts 8-byte aligned
  const auto file = read_safetensors(path);
  CHECK(file.metadata.at("note") == "hello");
  for (const auto& [name, t] : tensors) CHECK_MESSAGE(torch::equal(file.tensors.at(name), t), name);
}

TEST_CASE("checkpoint: save and load at 1x1x1 restore weights, AdamW state, counters and RNG bit for bit") {
  auto g = single_process();
  const auto c = tiny_config(GPTConfig::gpt2());
  const std::string dir = fresh_dir("same_layout");
  Run a(c, tiny_train(8, 2), *g);
  for (int i = 0; i < 3; ++i) a.step();
  a.save(dir);
  CHECK(fs::exists(dir + "/latest.json"));
  CHECK(fs::exists(dir + "/iter_0000003/manifest.json"));
  CHECK(fs::exists(dir + "/iter_0000003/rank_00000.safetensors"));
  const auto draw = torch::randn({4});  // from the RNG state the checkpoint holds
  Run b(c, tiny_train(8, 2), *g);
  b.load(dir);
  CHECK(torch::equal(torch::randn({4}), draw));
  CHECK(b.iteration == 3);
  CHECK(b.sampler.consumed_samples == 24);
  CHECK(b.trainer.optimizer->step_count == 3);
  for (size_t i = 0; i < a.trainer.optimizer->slots.size(); ++i) {
    const auto &x = a.trainer.optimizer->slots[i], &y = b.trainer.optimizer->slots[i];
    CHECK_MESSAGE((torch::equal(x.param, y.param) && torch::equal(x.exp_avg, y.exp_avg) &&
                   torch::equal(x.exp_avg_sq, y.exp_avg_sq)), x.name);
  }
  CHECK(a.step() == b.step());
}

TEST_CASE("checkpoint: a truncated shard and a flipped byte are refused with one line naming the file") {
  auto g = single_process();
  const auto c = tiny_config(GPTConfig::gpt2());
  const std::string dir = fresh_dir("damaged");
  Run a(c, tiny_train(8, 2), *g);
  a.step();
  a.save(dir + "/good");
  auto damaged = [&](const std::string& name, const std::function<void(const std::string&)>& damage) {
    fs::copy(dir + "/good", dir + "/" + name, fs::copy_options::recursive);
    const std::string file = dir + "/" + name + "/iter_0000001/rank_00000.safetensors";
    damage(file);
    const std::string error = load_error(dir + "/" + name, c);
    CHECK_MESSAGE(error.find(file + ": ") == 0, error);
    CHECK_MESSAGE(error.find('\n') == std::string::npos, error);
    return error;
  };
  CHECK(damaged("truncated", [](const std::string& f) { fs::resize_file(f, fs::file_size(f) / 2); }).find("truncated") !=
        std::string::npos);
  auto flip = [](int64_t at) {
    return [at](const std::string& f) {
      std::fstream io(f, std::ios::in | std::ios::out | std::ios::binary);
      const int64_t pos = at >= 0 ? at : int64_t(fs::file_size(f)) + at;
      io.seekg(pos);
      const char byte = char(io.get() ^ 0x01);
      io.seekp(pos);
      io.put(byte);
    };
  };
  CHECK(damaged("flipped_data", flip(-100)).find("checksum mismatch") != std::string::npos);
  CHECK(damaged("flipped_header", flip(20)).find("checksum mismatch") != std::string::npos);
  CHECK(load_error(dir + "/good", c).empty());
}

// A copy of the 1x1x1 checkpoint `good` (iteration 1), edited as someone who knows the format
// would: the shard's header and data through `shard`, the size and CRC-32 that the manifest
// lists for it recomputed, then the manifest through `manifest`. Damage the checksums do not
// catch; returns the load error of `c` ("" if none).
std::string tampered(const std::string& good, const std::string& name, const GPTConfig& c,
                     const std::function<void(nlohmann::json& header, std::string& data)>& shard,
                     const std::function<void(nlohmann::json& manifest)>& manifest = [](nlohmann::json&) {}) {
  const std::string dir = (fs::path(good).parent_path() / name).string(), iter = dir + "/iter_0000001";
  fs::copy(good, dir, fs::copy_options::recursive);
  const std::string file = iter + "/rank_00000.safetensors", bytes = read_file(file);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  auto header = nlohmann::json::parse(bytes.substr(8, n));
  std::string data = bytes.substr(8 + n);
  shard(header, data);
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  n = text.size();
  std::memcpy(out.data(), &n, 8);
  out += text + data;
  write_file_atomically(file, out);
  auto m = nlohmann::json::parse(read_file(iter + "/manifest.json"));
  m["files"]["rank_00000.safetensors"] = {{"bytes", out.size()}, {"crc32", crc32(out.data(), out.size())}};
  manifest(m);
  write_file_atomically(iter + "/manifest.json", m.dump(2));
  return load_error(dir, c);
}

// One line, naming `file`, containing `expect`, and nothing of nlohmann's or LibTorch's own messages.
void check_refused(const std::string& error, const std::string& file, const std::string& expect) {
  CHECK_MESSAGE(error.rfind(file + ": ", 0) == 0, error);
  CHECK_MESSAGE(error.find(expect) != std::string::npos, error << "\nexpected: " << expect);
  CHECK_MESSAGE(error.find('\n') == std::string::npos, error);
  for (const char* raw : {"json.exception", "Dimension out of range", "Exception raised from"})
    CHECK_MESSAGE(error.find(raw) == std::string::npos, error);
}

// The element `index` of tensor `name` in a shard's data, set to `value` (F32).
void poke(const nlohmann::json& header, std::string& data, const std::string& name, int64_t index, float value) {
  const int64_t at = header.at(name).at("data_offsets")[0].get<int64_t>() + index * 4;
  std::memcpy(data.data() + at, &value, 4);
}

TEST_CASE("checkpoint: a manifest with wrong types, or claims the files contradict, is refused naming the field") {
  auto g = single_process();
  const auto c = tiny_config(GPTConfig::gpt2());
  const std::string dir = fresh_dir("tampered_manifest"), good = dir + "/good";
  Run a(c, tiny_train(8, 2), *g);
  a.step();
  a.save(good);
  const std::string manifest = "/iter_0000001/manifest.json";
  auto edit = [&](const std::string& name, const std::function<void(nlohmann::json&)>& change) {
    return tampered(good, name, c, [](nlohmann::json&, std::string&) {}, change);
  };
  check_refused(edit("string_iteration", [](auto& m) { m["iteration"] = "1"; }), dir + "/string_iteration" + manifest,
                "field iteration must be an integer >= 0, got \"1\"");
  check_refused(edit("string_bytes", [](auto& m) { m["files"]["rank_00000.safetensors"]["bytes"] = "abc"; }),
                dir + "/string_bytes" + manifest, "field files.rank_00000.safetensors.bytes must be an integer >= 0, got \"abc\"");
  check_refused(edit("negative_step", [](auto& m) { m["optimizer"]["step"] = -1; }), dir + "/negative_step" + manifest,
                "field optimizer.step must be an integer >= 0, got -1");
  check_refused(edit("string_layers", [](auto& m) { m["config"]["num_layers"] = "2"; }), dir + "/string_layers" + manifest,
                "field config.num_layers must be an integer, got \"2\"");
  check_refused(edit("bad_rng", [](auto& m) { m["rng"]["torch_cpu"] = "xyz"; }), dir + "/bad_rng" + manifest,
                "field rng.torch_cpu must be");
  check_refused(edit("no_consumed", [](auto& m) { m["data"].erase("consumed_samples"); }), dir + "/no_consumed" + manifest,
                "field data.consumed_samples is missing");
  check_refused(edit("other_layout_tp", [](auto& m) { m["layout"]["tp"] = 2; }), dir + "/other_layout_tp" + manifest,
                "lists 1 file(s), but the layout tp 2 cp 1 dp 1 pp 1 saves tp x pp = 2");
  check_refused(edit("other_layout_pp", [](auto& m) { m["layout"]["pp"] = 2; }), dir + "/other_layout_pp" + manifest,
                "but the layout tp 1 cp 1 dp 1 pp 2 saves tp x pp = 2");
  auto rename = [](nlohmann::json& m) {  // a path outside the checkpoint instead of the rank's file
    m["files"] = nlohmann::json{{"../../x.safetensors", m["files"]["rank_00000.safetensors"]}};
  };
  check_refused(edit("outside_file", rename),
                dir + "/outside_file" + manifest, "lists '../../x.safetensors', which the layout tp 1 cp 1 dp 1 pp 1 does not save");
  CHECK(edit("untouched", [](auto&) {}).empty());  // the recomputed checksums alone are fine
}

TEST_CASE("checkpoint: an edited shard header (dtype, pieces, duplicate rows) and NaN weights are refused") {
  auto g = single_process();
  const auto c = tiny_config(GPTConfig::gpt2());
  const std::string dir = fresh_dir("tampered_shard"), good = dir + "/good";
  Run a(c, tiny_train(8, 2), *g);
  a.step();
  a.save(good);
  const int64_t V = c.vocab_size, C = c.hidden_size;
  auto file = [&](const std::string& name) { return dir + "/" + name + "/iter_0000001/rank_00000.safetensors"; };
  auto split = [](nlohmann::json pieces, int64_t dim, std::vector<int64_t> global) {
    return [=](nlohmann::json& h, std::string&) {
      h["__metadata__"]["wte.weight"] = nlohmann::json{{"dim", dim}, {"global_shape", global}, {"pieces", pieces}}.dump();
    };
  };
  check_refused(tampered(good, "dtype", c, [](auto& h, auto&) { h["wte.weight"]["dtype"] = "I32"; }), file("dtype"),
                "'wte.weight' is stored as \"I32\"; lightron checkpoints hold F32 tensors only");
  check_refused(tampered(good, "twice", c, split({{0, 0, V / 2}, {0, V / 2, V / 2}}, 0, {V, C})), dir + "/twice/iter_0000001",
                fmt::format("rows 0..{} of 'wte.weight' are stored twice", V / 2 - 1));
  check_refused(tampered(good, "outside", c, split({{0, 0, V + 8}}, 0, {V, C})), file("outside"),
                fmt::format("the piece [0, 0, {}] of 'wte.weight' lies outside the tensor", V + 8));
  check_refused(tampered(good, "bad_dim", c, split({{0, 0, V}}, 5, {V, C})), file("bad_dim"),
                "'wte.weight' is split along dim 5, but it has 2 dimension(s)");
  check_refused(tampered(good, "string_piece", c, split({{0, "0", V}}, 0, {V, C})), file("string_piece"),
                "each piece [global start, local start, length] of 'wte.weight' must be 3 non-negative integers");
  check_refused(tampered(good, "half", c, split({{0, 0, V / 2}}, 0, {V, C})), file("half"),
                fmt::format("holds {} of the {} rows of 'wte.weight', but the manifest's layout (tp 1)", V / 2, V));
  check_refused(tampered(good, "nan", c, [](auto& h, auto& d) { poke(h, d, "h.0.attn.c_attn.weight", 3, NAN); }),
                file("nan"), "'h.0.attn.c_attn.weight' holds 1 non-finite value(s) (NaN or inf)");
  check_refused(tampered(good, "inf_adam", c, [](auto& h, auto& d) { poke(h, d, "exp_avg_sq.wte.weight", 0, INFINITY); }),
                file("inf_adam"), "'exp_avg_sq.wte.weight' holds 1 non-finite value(s)");
}

TEST_CASE("checkpoint: a different model shape is refused before step 1, naming both values") {
  const auto c = tiny_config(GPTConfig::gpt2());
  const std::string dir = fresh_dir("shape");
  {
    auto g = single_process();
    Run a(c, tiny_train(8, 2), *g);
    a.save(dir);
  }
  auto deeper = c;
  deeper.num_layers = 3;
  CHECK(load_error(dir, deeper).find("the checkpoint's model has num-layers 2, this run has num-layers 3") != std::string::npos);
  auto wider = c;
  wider.hidden_size = 64;
  CHECK(load_error(dir, wider).find("hidden-size 32, this run has hidden-size 64") != std::string::npos);
  CHECK(load_error(dir, tiny_config(GPTConfig::llama())).find("ffn-hidden-size 128, this run has ffn-hidden-size 48") !=
        std::string::npos);
  auto longer = c;  // seq_length does not shape the weights once max positions are the same
  longer.seq_length = 8, longer.max_position_embeddings = 16;
  CHECK(load_error(dir, longer).empty());
}

TEST_CASE("checkpoint: interrupted saves are skipped, and the previous checkpoint loads") {
  const auto c = tiny_config(GPTConfig::gpt2());
  const std::string dir = fresh_dir("interrupted");
  auto g = single_process();
  Run a(c, tiny_train(8, 2), *g);
  a.step();
  a.save(dir);
  fs::create_directories(dir + "/iter_0000002.tmp");  // a save that died while ranks wrote
  std::ofstream(dir + "/iter_0000002.tmp/rank_00000.safetensors.tmp") << "half a file";
  fs::create_directories(dir + "/iter_0000003");  // no manifest.json
  const auto found = find_checkpoint(dir);
  CHECK(found.path == dir + "/iter_0000001");
  CHECK(found.skipped == std::vector<std::string>{dir + "/iter_0000002.tmp", dir + "/iter_0000003"});
  fs::remove(dir + "/latest.json");  // the newest complete one, without the pointer
  CHECK(find_checkpoint(dir).path == dir + "/iter_0000001");
  lightron::remove_tree(dir + "/iter_0000001");
  CHECK_THROWS_WITH_AS(find_checkpoint(dir), doctest::Contains("no complete checkpoint here"), UsageError);
}

TEST_CASE("checkpoint: --finetune loads weights only, --no-load-optim keeps the counters") {
  const auto c = tiny_config(GPTConfig::llama());
  const std::string dir = fresh_dir("finetune");
  auto g = single_process();
  Run a(c, tiny_train(8, 2), *g);
  a.step(), a.step();
  a.save(dir);
  Run b(c, tiny_train(8, 2), *g);
  b.load(dir, LoadOptions{/*finetune=*/true});
  CHECK(b.iteration == 0);
  CHECK(b.sampler.consumed_samples == 0);
  CHECK(b.trainer.optimizer->step_count == 0);
  CHECK(torch::equal(b.trainer.params[0], a.trainer.params[0]));
  CHECK(b.trainer.optimizer->slots[0].exp_avg.abs().sum().item<double>() == 0);
  Run d(c, tiny_train(8, 2), *g);
  d.load(dir, LoadOptions{false, /*no_load_optim=*/true});
  CHECK(d.iteration == 2);
  CHECK(d.trainer.optimizer->step_count == 0);
}

TEST_CASE("hf: the GPT-2 and Llama rename tables, both directions, and config.json") {
  for (const auto& flavour : {GPTConfig::gpt2(), GPTConfig::llama()}) {
    const auto c = tiny_config(flavour);
    torch::manual_seed(1);
    GPT model(c);
    std::map<std::string, torch::Tensor> weights;
    for (const auto& p : model.named_parameters()) weights[p.key()] = p.value().detach();
    std::map<std::string, torch::Tensor> hf;
    for (const auto& [name, t] : to_hf(weights, c)) hf[name] = t;
    const int64_t C = c.hidden_size;
    if (hf_flavour(c) == "gpt2") {
      CHECK(sizes_are(hf.at("transformer.h.0.attn.c_attn.weight"), {C, 3 * C}));  // Conv1D: (in, out)
      CHECK(torch::equal(hf.at("transformer.h.1.mlp.c_proj.weight"), weights.at("h.1.mlp.c_proj.weight").t()));
      CHECK(hf.count("transformer.wpe.weight") == 1);
      CHECK(hf.count("lm_head.weight") == 0);  // tied to wte
    } else {
      CHECK(sizes_are(hf.at("model.layers.1.self_attn.q_proj.weight"), {C, C}));
      CHECK(sizes_are(hf.at("model.layers.1.self_attn.k_proj.weight"), {2 * c.head_dim(), C}));  // G = 2 groups
      CHECK(torch::equal(hf.at("model.layers.0.mlp.up_proj.weight"), weights.at("h.0.mlp.c_fc.weight").narrow(0, 48, 48)));
      CHECK(hf.count("lm_head.weight") == 1);
    }
    check_bitwise_equal(from_hf(hf, c, "test"), weights);
    const auto back = config_from_hf(hf_config(c), "config.json");
    CHECK_NOTHROW(check_same_model(back, c, "test"));
    const std::string dir = fresh_dir("hf_" + hf_flavour(c));
    export_hf(dir, c, weights);
    check_bitwise_equal(read_model_weights(dir).weights, weights);
  }
}

TEST_SUITE("mpi_ckpt_np8") {
  TEST_CASE("ckpt reshard: 2x2x2 -> 1x1x1 -> 2x2x2, GPT-2") {
    reshard(GPTConfig::gpt2(), "np8_gpt2", Layout().with_tp(2).with_dp(2).with_pp(2), Layout{});
  }
  TEST_CASE("ckpt reshard: 2x2x2 -> 1x1x1 -> 2x2x2, Llama") {
    reshard(GPTConfig::llama(), "np8_llama", Layout().with_tp(2).with_dp(2).with_pp(2), Layout{});
  }
  TEST_CASE("ckpt resume in one process is bit-exact: 2x2x2, GPT-2") {
    resume_bit_exact(GPTConfig::gpt2(), "np8_resume", Layout().with_tp(2).with_dp(2).with_pp(2));
  }
}

TEST_SUITE("mpi_ckpt_np4") {
  TEST_CASE("ckpt resume in one process is bit-exact under ZeRO-3, ZeRO-2 and ZeRO-1, dp 4") {
    resume_bit_exact(GPTConfig::gpt2(), "resume_zero3_dp4", Layout().with_dp(4), zero("optim_grads_params"));
    resume_bit_exact(GPTConfig::llama(), "resume_zero2_dp4", Layout().with_dp(4), zero("optim_grads"));
    resume_bit_exact(GPTConfig::gpt2(), "resume_zero1_dp4", Layout().with_dp(4), zero("optim"));
  }
  TEST_CASE("ckpt reshard: ZeRO-3 dp 4 -> tp 2 x pp 2 -> ZeRO-1 dp 2, consolidated tensors bitwise equal") {
    reshard_zero_chain();
  }
  TEST_CASE("ckpt reshard: 1x2x2 -> 2x1x1 -> 1x2x2, GPT-2") {
    reshard(GPTConfig::gpt2(), "np4_gpt2", Layout().with_dp(2).with_pp(2), Layout().with_tp(2));
  }
  TEST_CASE("ckpt reshard: 1x2x2 -> 2x1x1 -> 1x2x2, Llama") {
    reshard(GPTConfig::llama(), "np4_llama", Layout().with_dp(2).with_pp(2), Layout().with_tp(2));
  }
  TEST_CASE("ckpt reshard: cp 2 x dp 2 -> 1x1x1 -> cp 2 x dp 2, Llama (context parallelism shards no weight)") {
    reshard(GPTConfig::llama(), "np4_cp2_dp2", Layout().with_cp(2).with_dp(2), Layout());
  }
  TEST_CASE("ckpt reshard: cp 4 -> cp 2 x tp 2 -> cp 4, GPT-2") {
    reshard(GPTConfig::gpt2(), "np4_cp4", Layout().with_cp(4), Layout().with_tp(2).with_cp(2));
  }
  TEST_CASE("ckpt resume in one process is bit-exact: tp 2 x pp 2, Llama") {
    resume_bit_exact(GPTConfig::llama(), "np4_resume", Layout().with_tp(2).with_pp(2));
  }
}

// Driven by tests/hf_check.py: LIGHTRON_DUMP_DIR=DIR mpirun -np 4 lightron_tests -ts=reference_hf_dump
// writes a tp 2 x pp 2 checkpoint of each flavour (3 steps trained) and its logits on a batch.
TEST_SUITE("reference_hf_dump") {
  TEST_CASE("hf dump: tp 2 x pp 2 checkpoints and their logits") {
    const char* out = std::getenv("LIGHTRON_DUMP_DIR");
    REQUIRE_MESSAGE(out != nullptr, "set LIGHTRON_DUMP_DIR");
    auto g = init_process_groups(Layout().with_tp(2).with_pp(2));
    for (const auto& flavour : {GPTConfig::gpt2(), GPTConfig::llama()}) {
      const auto c = tiny_config(flavour, /*layers=*/4);
      const std::string name = hf_flavour(c);
      Run run(c, tiny_train(8, 1), *g);
      for (int i = 0; i < 3; ++i) run.step();
      run.save(fmt::format("{}/ckpt_{}", out, name));
      torch::manual_seed(7);
      const auto tokens = torch::randint(c.vocab_size, {1, c.seq_length});  // the same on every rank
      const auto logits = full_logits(run.trainer, tokens);               // (1, T, V)
      if (g->rank == 0) write_safetensors(fmt::format("{}/logits_{}.safetensors", out, name), {{"tokens", tokens}, {"logits", logits}});
    }
    barrier(g->world);
  }
}

// Then, after convert_checkpoint --export-hf and --import-hf: both reproduce those logits.
TEST_SUITE("reference_hf_import") {
  TEST_CASE("hf import: the HF directory and the imported checkpoint reproduce the tp 2 x pp 2 logits") {
    const char* out = std::getenv("LIGHTRON_DUMP_DIR");
    REQUIRE_MESSAGE(out != nullptr, "set LIGHTRON_DUMP_DIR");
    for (const std::string name : {"gpt2", "llama"}) {
      const auto dumped = read_safetensors(fmt::format("{}/logits_{}.safetensors", out, name)).tensors;
      const auto& tokens = dumped.at("tokens");
      const auto hf = read_model_weights(fmt::format("{}/hf_{}", out, name));
      torch::NoGradGuard no_grad;
      const double from_hf = (hf.model()->forward(tokens) - dumped.at("logits")).abs().max().item<double>();
      auto g = single_process();
      Run imported(hf.config, tiny_train(8, 1), *g);
      imported.load(fmt::format("{}/imported_{}", out, name));
      const double from_import = (full_logits(imported.trainer, tokens) - dumped.at("logits")).abs().max().item<double>();
      MESSAGE(name << ": max |logits - lightron tp2 x pp2 logits|: HF directory " << from_hf << ", imported checkpoint "
                   << from_import);
      CHECK(from_hf <= 1e-4);
      CHECK(from_import <= 1e-4);
    }
  }
}
