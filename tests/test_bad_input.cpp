// Bad input, end to end: each row of the table breaks one flag (or one data file) of an
// otherwise valid pretrain_gpt or preprocess_data command, runs the real program, and
// checks what the user sees: exit code 2, nothing on stdout (the program stopped before it
// built anything), and exactly one line on stderr that names the flag and its value, with
// no "terminate called", no LibTorch "Exception raised from" and no stack trace.
// The programs run through posix_spawn + wait4 (no shell: no quoting; the child's own exit
// code, wall time and peak memory), with stdout and stderr redirected to temporary files.
#include "testing.hpp"

#include <fcntl.h>         // open
#include <netinet/in.h>    // sockaddr_in, ntohs
#include <signal.h>        // kill
#include <spawn.h>         // posix_spawnp
#include <sys/socket.h>    // the busy port's listener
#include <sys/resource.h>  // rusage
#include <sys/wait.h>      // wait4

#include <algorithm>  // count, find_if
#include <cstring>    // strerror
#include <filesystem>
#include <fstream>
#include <iterator>   // size
#include <sstream>
#include <thread>

extern char** environ;

namespace test_bad_input_detail {
using namespace lightron;
namespace fs = std::filesystem;

// A run that takes longer than this is hung: it is killed and the case fails.
constexpr double kHangSeconds = 20;
// Bad input must be rejected before anything big exists; LibTorch alone maps ~170 MiB.
constexpr long kMaxRssKiB = 512 * 1024;
// The layout mpirun case's rendezvous port (it must fail before rendezvous; set anyway).
constexpr int kMpiPort = 29950;

// The valid command every row starts from: mock data and a model that trains in a blink.
constexpr const char* kBaseFlags =
    "--mock-data --vocab-size 64 --num-layers 1 --hidden-size 16 --num-attention-heads 2 --seq-length 8 "
    "--micro-batch-size 2 --global-batch-size 4 --train-iters 1 --lr 1e-3 --min-lr 1e-4 --num-threads 1";

struct Outcome {
  int exit_code = -1;  // -1 when killed by a signal
  int signal = 0;
  double seconds = 0;
  long max_rss_kib = 0;
  std::string out, err;
};

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// The environment without any launcher's rank variables (a CI job under Slurm or mpirun
// must not turn these single-process runs into ranks of a bigger world).
std::vector<std::string> clean_environment() {
  const char* launcher_vars[] = {"OMPI_COMM_WORLD_", "PMI_", "MPI_LOCALRANKID", "SLURM_", "RANK=", "WORLD_SIZE=",
                                 "LOCAL_RANK=", "TORCHELASTIC_"};
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string var = *e;
    bool drop = false;
    for (const char* prefix : launcher_vars) drop = drop || var.rfind(prefix, 0) == 0;
    if (!drop) env.push_back(var);
  }
  return env;
}

// Runs argv[0] (looked up in PATH if it has no slash) with stdout/stderr in files of `dir`.
Outcome run(const std::vector<std::string>& args, const fs::path& dir) {
  const fs::path out_path = dir / "stdout.txt", err_path = dir / "stderr.txt";
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<char*> argv, envp;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  const auto env = clean_environment();
  for (const auto& e : env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);

  Outcome o;
  const Timer timer;
  pid_t pid = 0;
  const int spawned = posix_spawnp(&pid, argv[0], &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  REQUIRE_MESSAGE(spawned == 0, "cannot start " << args[0] << ": " << std::strerror(spawned));
  int status = 0;
  rusage usage{};
  bool killed = false;
  while (wait4(pid, &status, WNOHANG, &usage) == 0) {
    if (!killed && timer.seconds() > kHangSeconds) {  // SIGTERM lets mpirun take its ranks down
      ::kill(pid, SIGTERM);
      std::this_thread::sleep_for(std::chrono::seconds(2));
      ::kill(pid, SIGKILL);
      killed = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  o.seconds = timer.seconds();
  o.max_rss_kib = usage.ru_maxrss;
  if (WIFEXITED(status)) o.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) o.signal = WTERMSIG(status);
  o.out = read_file(out_path);
  o.err = read_file(err_path);
  return o;
}

std::vector<std::string> words(const std::string& text) {
  std::istringstream in(text);
  std::vector<std::string> out;
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

std::string replace_all(std::string text, const std::string& from, const std::string& to) {
  for (size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size()))
    text.replace(at, from.size(), to);
  return text;
}

// Base flags with a row's changes applied: "--flag value..." replaces (or adds) that flag,
// "!--flag" removes it. CLI11 rejects a flag given twice, so a row cannot just append.
std::vector<std::string> apply_changes(const std::string& base, const std::string& changes) {
  std::vector<std::pair<std::string, std::vector<std::string>>> flags;  // in order
  auto parse = [](const std::string& text, const std::function<void(std::string, std::vector<std::string>)>& each) {
    auto w = words(text);
    for (size_t i = 0; i < w.size();) {
      std::vector<std::string> values;
      size_t j = i + 1;
      for (; j < w.size() && w[j].rfind("--", 0) != 0 && w[j].rfind("!--", 0) != 0; ++j) values.push_back(w[j]);
      each(w[i], values);
      i = j;
    }
  };
  parse(base, [&](std::string flag, std::vector<std::string> values) { flags.emplace_back(flag, values); });
  parse(changes, [&](std::string flag, std::vector<std::string> values) {
    const bool drop = flag[0] == '!';
    if (drop) flag = flag.substr(1);
    auto it = std::find_if(flags.begin(), flags.end(), [&](const auto& f) { return f.first == flag; });
    if (drop) {
      REQUIRE_MESSAGE(it != flags.end(), "the row drops " << flag << ", which the base does not have");
      flags.erase(it);
    } else if (it != flags.end()) {
      it->second = values;
    } else {
      flags.emplace_back(flag, values);
    }
  });
  std::vector<std::string> args;
  for (const auto& [flag, values] : flags) {
    args.push_back(flag);
    args.insert(args.end(), values.begin(), values.end());
  }
  return args;
}

// Nothing of an uncaught exception, an abort or a LibTorch backtrace.
void check_no_crash_output(const std::string& text) {
  for (const char* marker : {"terminate called", "Exception raised from", "frame #", "Backtrace", "Aborted",
                             "Segmentation fault", "what():"})
    CHECK_MESSAGE(text.find(marker) == std::string::npos, "output contains '" << marker << "':\n" << text);
}

// Small data files, one per kind of damage, in a fresh temporary directory.
struct DataFiles {
  fs::path dir;
  DataFiles() {
    dir = fs::temp_directory_path() / fmt::format("lightron_bad_input_{}", ::getpid());
    lightron::remove_tree(dir);
    fs::create_directories(dir);
    write(dir / "good", /*max_id=*/50);
    write(dir / "big_ids", /*max_id=*/199);  // needs --vocab-size 200
    fs::copy_file(dir / "good.idx", dir / "bad_magic.idx");
    fs::copy_file(dir / "good.bin", dir / "bad_magic.bin");
    std::fstream(dir / "bad_magic.idx", std::ios::in | std::ios::out | std::ios::binary).write("NOTANIDX", 8);
    fs::copy_file(dir / "good.idx", dir / "truncated.idx");
    fs::copy_file(dir / "good.bin", dir / "truncated.bin");
    fs::resize_file(dir / "truncated.bin", fs::file_size(dir / "good.bin") / 2);
    const std::pair<const char*, const char*> configs[] = {  // --config files, one mistake each
        {"good.toml", "# a valid file\nlr = 2e-3  # a comment\nnormalization = \"RMSNorm\"\nswiglu = true\nseed = 7\n"},
        {"malformed.toml", "lr = 2e-3\nthis is not toml\n"},
        {"unknown_key.toml", "num-layer = 2\n"},
        {"underscore.toml", "num_layers = 2\n"},
        {"wrong_type.toml", "# layers\nnum-layers = \"two\"\n"},
        {"float_for_int.toml", "num-layers = 2.5\n"},
        {"switch_value.toml", "swiglu = 3\n"},
        {"unquoted.toml", "normalization = RMSNorm\n"},
        {"table.toml", "[model]\nnum-layers = 2\n"},
        {"twice.toml", "lr = 1e-3\nlr = 2e-3\n"},
        {"negative_seed.toml", "seed = -3\n"},
        {"huge_lr.toml", "lr = 1e30\n"}};
    for (const auto& [name, text] : configs) std::ofstream(dir / name) << text;
  }
  ~DataFiles() { lightron::remove_tree(dir); }
  static void write(const fs::path& prefix, int64_t max_id) {
    IndexedDatasetWriter writer(prefix.string(), TokenDtype::kUInt16);
    for (int64_t d = 0; d < 16; ++d) {
      std::vector<int64_t> doc;
      for (int64_t k = 0; k < 24; ++k) doc.push_back((d * 7 + k * 3) % max_id);
      doc.back() = max_id;
      writer.add_document(doc);
    }
    writer.finalize();
  }
};

struct Case {
  const char* name;
  const char* program;  // in LIGHTRON_BINARY_DIR/examples
  const char* changes;  // to kBaseFlags for pretrain_gpt; the whole command line otherwise
  const char* expect;   // a substring of the one line on stderr: the flag and its value(s)
};

// {dir} is the temporary directory of DataFiles.
const Case kCases[] = {
    {"non-positive --num-layers", "pretrain_gpt", "--num-layers 0", "--num-layers must be positive, got 0"},
    {"non-positive --hidden-size", "pretrain_gpt", "--hidden-size -16", "--hidden-size must be positive, got -16"},
    {"non-positive --num-attention-heads", "pretrain_gpt", "--num-attention-heads 0",
     "--num-attention-heads must be positive, got 0"},
    {"non-positive --seq-length", "pretrain_gpt", "--seq-length 0", "--seq-length must be positive, got 0"},
    {"heads do not divide hidden size", "pretrain_gpt", "--hidden-size 18 --num-attention-heads 4",
     "--hidden-size (18) must be divisible by --num-attention-heads (4)"},
    {"query groups do not divide heads", "pretrain_gpt", "--num-attention-heads 4 --num-query-groups 3",
     "--num-attention-heads (4) must be divisible by --num-query-groups (3)"},
    {"seq-length above max-position-embeddings", "pretrain_gpt", "--seq-length 32 --max-position-embeddings 16",
     "--seq-length (32) must not exceed --max-position-embeddings (16)"},
    {"global batch not divisible by micro x dp", "pretrain_gpt", "--global-batch-size 5",
     "--global-batch-size (5) must be divisible by --micro-batch-size (2) x data-parallel size (1)"},
    {"unknown --lr-decay-style", "pretrain_gpt", "--lr-decay-style exponential",
     "--lr-decay-style must be cosine, linear or constant, got 'exponential'"},
    {"--min-lr above --lr", "pretrain_gpt", "--lr 0.001 --min-lr 0.01", "--min-lr (0.01) must be between 0 and --lr (0.001)"},
    {"unknown --normalization", "pretrain_gpt", "--normalization BatchNorm",
     "--normalization must be LayerNorm or RMSNorm, got 'BatchNorm'"},
    {"unknown --position-embedding-type", "pretrain_gpt", "--position-embedding-type alibi",
     "--position-embedding-type must be learned_absolute or rope, got 'alibi'"},
    {"missing --data-path files", "pretrain_gpt", "!--mock-data --data-path {dir}/missing",
     "--data-path: {dir}/missing.idx: file not found"},
    {"corrupt .idx (bad magic)", "pretrain_gpt", "!--mock-data --data-path {dir}/bad_magic",
     "--data-path: {dir}/bad_magic.idx: bad magic"},
    {"truncated .bin", "pretrain_gpt", "!--mock-data --data-path {dir}/truncated",
     "--data-path: {dir}/truncated.bin: 384 bytes, but {dir}/truncated.idx says 384 tokens of 2 bytes = 768"},
    {"vocab smaller than the data's largest id", "pretrain_gpt", "!--mock-data --data-path {dir}/big_ids",
     "--vocab-size (64) is too small for {dir}/big_ids: it holds token id 199"},
    {"both --data-path and --mock-data", "pretrain_gpt", "--data-path {dir}/good",
     "give exactly one of --data-path and --mock-data, got both (--data-path {dir}/good)"},
    {"neither --data-path nor --mock-data", "pretrain_gpt", "!--mock-data",
     "give exactly one of --data-path and --mock-data, got neither"},
    {"unknown flag (a typo)", "pretrain_gpt", "--num-layer 2", "were not expected: 2 --num-layer "},
    {"non-numeric --lr", "pretrain_gpt", "--lr abc", "--lr = abc"},
    {"non-numeric --num-layers", "pretrain_gpt", "--num-layers two", "--num-layers = two"},
    {"bad --split with --data-path", "pretrain_gpt", "!--mock-data --data-path {dir}/good --split 90,x,1",
     "--split '90,x,1': 'x' is not a number"},
    {"bad --split with --mock-data", "pretrain_gpt", "--split 0,0,0", "--split '0,0,0': the weights sum to 0"},
    {"tensor-parallel size does not divide the world", "pretrain_gpt", "--tensor-model-parallel-size 3",
     "the number of ranks (1) must be divisible by --tensor-model-parallel-size (3)"},
    {"data-parallel size does not match the world", "pretrain_gpt", "--data-parallel-size 2",
     "data (2) x pipeline (1) parallel sizes = 2 must equal the number of ranks (1)"},
    {"context parallelism over a sequence it cannot split in 2 x cp chunks", "pretrain_gpt",
     "--context-parallel-size 3 --dry-run", "--seq-length (8) must be divisible by 2 x --context-parallel-size (3): "
     "each cp rank holds 2 of the sequence's 6 equal chunks"},
    {"context parallelism with sequence parallel over too few tokens", "pretrain_gpt",
     "--context-parallel-size 2 --tensor-model-parallel-size 8 --num-attention-heads 8 --sequence-parallel --dry-run",
     "--seq-length / --context-parallel-size (8 / 2 = 4) must be divisible by --tensor-model-parallel-size (8) with "
     "--sequence-parallel"},
    {"context parallelism with selective recompute", "pretrain_gpt",
     "--context-parallel-size 2 --recompute-granularity selective --dry-run",
     "--recompute-granularity selective cannot be combined with --context-parallel-size 2"},
    {"context parallelism without the ranks", "pretrain_gpt", "--context-parallel-size 2",
     "the number of ranks (1) must be divisible by --tensor-model-parallel-size (1) x --context-parallel-size (2)"},
    {"a layout with a negative size", "pretrain_gpt", "--pipeline-model-parallel-size -1",
     "parallel sizes must be at least 1: --tensor-model-parallel-size 1 --pipeline-model-parallel-size -1"},
    {"unknown --ddp-impl", "pretrain_gpt", "--ddp-impl foo", "--ddp-impl must be naive or bucketed, got 'foo'"},
    {"unknown --data-parallel-sharding-strategy", "pretrain_gpt", "--data-parallel-sharding-strategy zero2",
     "--data-parallel-sharding-strategy must be no_shard, optim, optim_grads or optim_grads_params, got 'zero2'"},
    {"ZeRO-3 (optim_grads_params) with a pipeline", "pretrain_gpt",
     "--data-parallel-sharding-strategy optim_grads_params --pipeline-model-parallel-size 2 --num-layers 2 --dry-run",
     "--data-parallel-sharding-strategy optim_grads_params (ZeRO-3) gathers weights block by block, which a pipeline "
     "schedule would have to drive: it needs --pipeline-model-parallel-size 1, got 2"},
    {"--use-distributed-optimizer contradicts a strategy", "pretrain_gpt",
     "--use-distributed-optimizer --data-parallel-sharding-strategy optim_grads",
     "--use-distributed-optimizer means --data-parallel-sharding-strategy optim; it contradicts 'optim_grads'"},
    {"a sharding strategy with --ddp-impl naive", "pretrain_gpt", "--data-parallel-sharding-strategy optim --ddp-impl naive",
     "--data-parallel-sharding-strategy optim shards the gradient buckets: it needs --ddp-impl bucketed, got 'naive'"},
    {"non-positive --distributed-timeout-seconds", "pretrain_gpt", "--distributed-timeout-seconds 0",
     "--distributed-timeout-seconds must be positive, got 0"},
    {"missing --config file", "pretrain_gpt", "--config {dir}/missing.toml", "{dir}/missing.toml"},
    {"--config: a line that is not TOML", "pretrain_gpt", "--config {dir}/malformed.toml",
     "--config {dir}/malformed.toml:2: expected 'key = value', got 'this is not toml'"},
    {"--config: an unknown key", "pretrain_gpt", "--config {dir}/unknown_key.toml",
     "--config {dir}/unknown_key.toml:1: unknown key 'num-layer': not a flag of this program"},
    {"--config: a key with underscores", "pretrain_gpt", "--config {dir}/underscore.toml",
     "--config {dir}/underscore.toml:1: unknown key 'num_layers': did you mean num-layers?"},
    {"--config: a string for an integer", "pretrain_gpt", "--config {dir}/wrong_type.toml",
     "--config {dir}/wrong_type.toml:2: num-layers must be an integer, got \"two\""},
    {"--config: a float for an integer", "pretrain_gpt", "--config {dir}/float_for_int.toml",
     "--config {dir}/float_for_int.toml:1: num-layers must be an integer, got 2.5"},
    {"--config: a number for a switch", "pretrain_gpt", "--config {dir}/switch_value.toml",
     "--config {dir}/switch_value.toml:1: swiglu is a switch: write swiglu = true or swiglu = false, got 3"},
    {"--config: an unquoted string", "pretrain_gpt", "--config {dir}/unquoted.toml",
     "--config {dir}/unquoted.toml:1: normalization = RMSNorm: not a TOML value (text needs quotes"},
    {"--config: a [table]", "pretrain_gpt", "--config {dir}/table.toml",
     "--config {dir}/table.toml:1: '[model]': tables are not supported"},
    {"--config: a key twice", "pretrain_gpt", "--config {dir}/twice.toml",
     "--config {dir}/twice.toml:2: lr is set twice (first on line 1)"},
    {"--config: a negative seed", "pretrain_gpt", "--config {dir}/negative_seed.toml",
     "--config {dir}/negative_seed.toml:1: seed must not be negative, got -3"},
    {"--config: a value out of range", "pretrain_gpt", "--config {dir}/huge_lr.toml !--lr", "--lr must be at most 1"},
    {"negative --seed (unsigned)", "pretrain_gpt", "--seed -1", "--seed: must not be negative, got -1"},
    {"negative --num-layers-per-virtual-pipeline-stage", "pretrain_gpt", "--num-layers-per-virtual-pipeline-stage -1",
     "--num-layers-per-virtual-pipeline-stage (0: no interleaving) must not be negative, got -1"},
    {"--recompute-method without full recompute", "pretrain_gpt", "--recompute-method block",
     "--recompute-method block needs --recompute-granularity full, got none"},
    {"--recompute-method with selective recompute", "pretrain_gpt",
     "--recompute-granularity selective --recompute-method uniform",
     "--recompute-method uniform needs --recompute-granularity full, got 'selective'"},
    {"--recompute-num-layers beyond a chunk", "pretrain_gpt", "--recompute-granularity full --recompute-num-layers 2",
     "--recompute-num-layers (2) must be between 1 and the blocks of a model chunk (1 = --num-layers / (pipeline size "
     "x virtual stages))"},
    {"negative --recompute-num-layers", "pretrain_gpt", "--recompute-granularity full --recompute-num-layers -1",
     "--recompute-num-layers (-1) must be between 1 and the blocks of a model chunk"},
    {"unknown --recompute-granularity", "pretrain_gpt", "--recompute-granularity partial",
     "--recompute-granularity must be full or selective, got 'partial'"},
    {"--measure without --dry-run", "pretrain_gpt", "--measure", "--measure needs --dry-run"},
    {"negative --peak-tflops", "pretrain_gpt", "--peak-tflops -1",
     "--peak-tflops must be between 0 (0: the device's default) and 100000 TFLOP/s per rank, got -1"},
    {"negative --check-weight-hash-interval", "pretrain_gpt", "--check-weight-hash-interval -1",
     "--check-weight-hash-interval (0 disables) must not be negative, got -1"},
    {"negative --norm-epsilon", "pretrain_gpt", "--norm-epsilon -1e-5", "--norm-epsilon must be in (0, 1]"},
    {"--rotary-base 0", "pretrain_gpt", "--position-embedding-type rope --rotary-base 0",
     "--rotary-base must be a finite number above 1"},
    {"--num-threads 1000", "pretrain_gpt", "--num-threads 1000", "CPUs this process may use), got 1000"},
    {"--train-iters near the int64 limit", "pretrain_gpt", "--train-iters 9223372036854775807",
     "--train-iters (9223372036854775807) x --global-batch-size (4) must fit in the 64-bit count of consumed samples"},
    {"--lr 1e30", "pretrain_gpt", "--lr 1e30", "--lr must be at most 1 (AdamW moves each weight by about lr per step), "
     "got 1e+30"},
    {"--lr nan", "pretrain_gpt", "--lr nan", "--lr must be a finite number, got nan"},
    {"--weight-decay inf", "pretrain_gpt", "--weight-decay inf", "--weight-decay must be a finite number, got inf"},
    {"--lr x --weight-decay above 1", "pretrain_gpt", "--lr 0.5 --min-lr 0 --weight-decay 4",
     "--lr (0.5) x --weight-decay (4) must be at most 1"},
    {"--init-method-std 1e30", "pretrain_gpt", "--init-method-std 1e30", "--init-method-std must be in (0, 1]"},
    {"--adam-eps inf", "pretrain_gpt", "--adam-eps inf", "--adam-eps must be a finite number, got inf"},
    {"--micro-batch-size above --global-batch-size", "pretrain_gpt", "--micro-batch-size 8",
     "--micro-batch-size (8) must not exceed --global-batch-size (4)"},
    {"--num-layers above its bound", "pretrain_gpt", "--num-layers 5000", "--num-layers must be at most 4096, got 5000"},
    {"--hidden-size above its bound", "pretrain_gpt", "--hidden-size 33554432",
     "--hidden-size must be at most 16777216 (2^24), got 33554432"},
    {"a parallel size above its bound", "pretrain_gpt", "--tensor-model-parallel-size 100000",
     "parallel sizes must be at most 32768"},
    {"--distributed-timeout-seconds inf", "pretrain_gpt", "--distributed-timeout-seconds inf",
     "--distributed-timeout-seconds must be at most 604800 (a week), got inf"},
    {"--mock-samples 0", "pretrain_gpt", "--mock-samples 0", "--mock-samples must be between 1 and"},
    {"negative --temperature", "pretrain_gpt", "--temperature -1", "--temperature must be a finite number >= 0"},
    {"negative --top-k", "pretrain_gpt", "--top-k -1", "--top-k (0: every token) must not be negative, got -1"},
    {"--skip-spike-factor below 1", "pretrain_gpt", "--skip-spike-factor 0.5",
     "--skip-spike-factor must be 0 (off) or a finite number above 1, got 0.5"},
    {"--skip-spike-window 0", "pretrain_gpt", "--skip-spike-factor 3 --skip-spike-window 0",
     "--skip-spike-window must be in [1, 100000], got 0"},
    {"negative --exit-interval", "pretrain_gpt", "--exit-interval -1", "--exit-interval must not be negative (0: off), got -1"},
    {"--exit-duration-in-mins nan", "pretrain_gpt", "--exit-duration-in-mins nan",
     "--exit-duration-in-mins must be a finite number, 0 or more (0: off), got nan"},
    {"--sample-tokens without a tokenizer", "pretrain_gpt", "--sample-tokens 5",
     "--sample-tokens 5 needs --tokenizer-model (to turn the sampled ids into text)"},
    {"preprocess_data: missing --input", "preprocess_data",
     "--input {dir}/missing.txt --output-prefix {dir}/out --vocab-size 64", "--input {dir}/missing.txt: file not found"},
    {"preprocess_data: --vocab-size not given", "preprocess_data", "--input {dir}/missing.txt --output-prefix {dir}/out",
     "--vocab-size is required"},
};

std::vector<std::string> command_of(const Case& c, const std::string& dir) {
  const std::string program = std::string(LIGHTRON_BINARY_DIR "/examples/") + c.program;
  const std::string changes = replace_all(c.changes, "{dir}", dir);
  auto args = std::string(c.program) == "pretrain_gpt" ? apply_changes(kBaseFlags, changes) : words(changes);
  args.insert(args.begin(), program);
  return args;
}

// mpirun -np 2 pretrain_gpt <kBaseFlags with `changes`>, meeting at 127.0.0.1:port.
std::vector<std::string> mpirun_command(int port, const std::string& changes) {
  std::vector<std::string> command{"mpirun", "-np", "2", "--oversubscribe", "--allow-run-as-root", "--bind-to", "none",
                                   "-x", "MASTER_ADDR=127.0.0.1", "-x", fmt::format("MASTER_PORT={}", port), "-x",
                                   "OMP_NUM_THREADS=1", LIGHTRON_BINARY_DIR "/examples/pretrain_gpt"};
  const auto args = apply_changes(kBaseFlags, changes);
  command.insert(command.end(), args.begin(), args.end());
  return command;
}

size_t occurrences(const std::string& text, const std::string& line) {
  size_t count = 0;
  for (size_t at = text.find(line); at != std::string::npos; at = text.find(line, at + 1)) ++count;
  return count;
}

std::string show(const std::vector<std::string>& args) {
  std::string line;
  for (const auto& a : args) line += (line.empty() ? "" : " ") + a;
  return line;
}

// The test cases stay inside the namespace: in the unity build, a `using namespace` here
// would put `run`, `show`, `Case` ... in front of every later test file.
TEST_CASE("bad input: the base commands are valid, so each row fails only on what it breaks") {
  DataFiles files;
  for (const char* changes : {"", "!--mock-data --data-path {dir}/good", "--config {dir}/good.toml !--lr"}) {
    const auto args = apply_changes(kBaseFlags, replace_all(changes, "{dir}", files.dir.string()));
    std::vector<std::string> command{LIGHTRON_BINARY_DIR "/examples/pretrain_gpt"};
    command.insert(command.end(), args.begin(), args.end());
    const Outcome o = run(command, files.dir);
    INFO(show(command), "\nstdout:\n", o.out, "stderr:\n", o.err);
    CHECK(o.exit_code == 0);
    CHECK(o.out.find("iteration      1/     1") != std::string::npos);
  }
}

TEST_CASE("bad input: every row exits 2 with one line naming the flag and its value") {
  DataFiles files;
  const std::string dir = files.dir.string();
  REQUIRE(std::size(kCases) >= 20);
  for (const Case& c : kCases) {
    const auto command = command_of(c, dir);
    const std::string expect = replace_all(c.expect, "{dir}", dir);
    const Outcome o = run(command, files.dir);
    INFO("case: ", c.name, "\ncommand: ", show(command), "\nstdout:\n", o.out, "stderr:\n", o.err);
    CHECK(o.signal == 0);
    CHECK(o.exit_code == kUsageExitCode);
    CHECK(o.out.empty());  // the banner comes after validation: nothing was built
    CHECK(std::count(o.err.begin(), o.err.end(), '\n') == 1);
    CHECK((!o.err.empty() && o.err.back() == '\n'));
    CHECK(o.err.rfind("error: ", 0) == 0);
    CHECK_MESSAGE(o.err.find(expect) != std::string::npos, "expected: " << expect);
    check_no_crash_output(o.out + o.err);
    CHECK(o.seconds < kHangSeconds);
    CHECK(o.max_rss_kib < kMaxRssKiB);
  }
}

// --load of a checkpoint that passes its checksums but must not be trained from: the model of
// kBaseFlags saved whole, then damaged. The banner is printed before loading, so stdout is
// not empty here; no step may run, and stderr is one line naming the file and the field or tensor.
TEST_CASE("bad input: a checkpoint holding NaN, or a manifest field of the wrong type, is refused in one line") {
  DataFiles files;
  GPTConfig c = GPTConfig::gpt2();
  c.vocab_size = 128, c.num_layers = 1, c.hidden_size = 16, c.num_attention_heads = 2, c.seq_length = 8;  // kBaseFlags
  std::map<std::string, torch::Tensor> weights;
  for (const auto& p : GPT(c).named_parameters()) weights[p.key()] = p.value().detach().clone();
  const std::string nan_dir = (files.dir / "nan_ckpt").string(), string_dir = (files.dir / "string_ckpt").string();
  weights.at("h.0.mlp.c_fc.weight")[1][2] = NAN;
  save_weights(nan_dir, c, weights);
  weights.at("h.0.mlp.c_fc.weight")[1][2] = 0.0;
  save_weights(string_dir, c, weights);
  const std::string manifest = string_dir + "/iter_0000000/manifest.json";
  auto m = nlohmann::json::parse(read_file(manifest));
  m["data"]["consumed_samples"] = "0";
  std::ofstream(manifest) << m.dump(2);
  const std::pair<std::string, std::string> cases[] = {
      {nan_dir, nan_dir + "/iter_0000000/rank_00000.safetensors: 'h.0.mlp.c_fc.weight' holds 1 non-finite value(s)"},
      {string_dir, manifest + ": field data.consumed_samples must be an integer >= 0, got \"0\""}};
  for (const auto& [dir, expect] : cases) {
    auto command = apply_changes(kBaseFlags, "--load " + dir);
    command.insert(command.begin(), LIGHTRON_BINARY_DIR "/examples/pretrain_gpt");
    const Outcome o = run(command, files.dir);
    INFO(show(command), "\nstdout:\n", o.out, "stderr:\n", o.err);
    CHECK(o.exit_code == kUsageExitCode);
    CHECK(std::count(o.err.begin(), o.err.end(), '\n') == 1);
    CHECK_MESSAGE(o.err.find("error: " + expect) != std::string::npos, "expected: " << expect);
    CHECK(o.out.find("iteration ") == std::string::npos);  // refused before step 1
    check_no_crash_output(o.out + o.err);
    CHECK(o.err.find("json.exception") == std::string::npos);
  }
}

TEST_CASE("bad input: under mpirun -np 2 a layout mismatch is reported once, by rank 0") {
  DataFiles files;
  const auto command = mpirun_command(kMpiPort, "--tensor-model-parallel-size 4");
  const Outcome o = run(command, files.dir);
  INFO(show(command), "\nstdout:\n", o.out, "stderr:\n", o.err);
  const std::string all = o.out + o.err;
  CHECK(occurrences(all, "must be divisible by --tensor-model-parallel-size (4)") == 1);
  CHECK(all.find("the number of ranks (2)") != std::string::npos);
  CHECK(o.signal == 0);
  CHECK(o.exit_code != 0);
  check_no_crash_output(all);
  CHECK(o.seconds < kHangSeconds);
}

// Another program (here: this test) listens on MASTER_PORT. Rank 0 must say so at once and
// exit 2, rather than report an unreachable store; rank 1, connected to a listener that never
// answers, is ended by mpirun when rank 0 exits.
TEST_CASE("bad input: under mpirun -np 2 a MASTER_PORT already in use is reported once, at once") {
  DataFiles files;
  const int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);  // not inherited by mpirun
  sockaddr_in address{};
  address.sin_family = AF_INET;  // 0.0.0.0, port 0: the kernel picks a free port
  socklen_t size = sizeof(address);
  REQUIRE(::bind(listener, reinterpret_cast<sockaddr*>(&address), size) == 0);
  REQUIRE(::listen(listener, 16) == 0);
  REQUIRE(::getsockname(listener, reinterpret_cast<sockaddr*>(&address), &size) == 0);
  const int port = ntohs(address.sin_port);
  const auto command = mpirun_command(port, "");
  const Outcome o = run(command, files.dir);
  ::close(listener);
  INFO(show(command), "\nstdout:\n", o.out, "stderr:\n", o.err);
  const std::string all = o.out + o.err;
  CHECK(occurrences(all, fmt::format("error: MASTER_PORT {} is already in use on 127.0.0.1 (another job?): set "
                                     "MASTER_PORT to a free port\n",
                                     port)) == 1);
  CHECK(occurrences(all, std::to_string(port)) == 1);  // nothing else (c10d's socket log, rank 1) about it
  CHECK(o.signal == 0);
  CHECK(o.exit_code == kUsageExitCode);  // Open MPI's mpirun exits with the first failing rank's code
  check_no_crash_output(all);
  CHECK(o.seconds < kHangSeconds);
}

}  // namespace test_bad_input_detail
