// Stage 1 foundations: the launcher's environment, the rank grid, and the counted,
// portable collectives. Multi-rank checks here use threads sharing a HashStore (real Gloo
// groups, no ports); the mpirun tests are in test_data_parallel.cpp and later files.
#include "testing.hpp"

#include <netinet/in.h>  // sockaddr_in, ntohs
#include <sys/socket.h>

#include <thread>

namespace test_pg_detail {
using namespace lightron;

// A getenv that reads `vars` (and owns them).
Getenv table_env(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const char* key) -> const char* {
    auto it = vars.find(key);
    return it == vars.end() ? nullptr : it->second.c_str();
  };
}
LaunchEnv env_from(std::map<std::string, std::string> vars) { return launch_env(table_env(std::move(vars))); }
Master master_from(std::map<std::string, std::string> vars) { return master_endpoint(table_env(std::move(vars))); }

// Runs body(rank, groups) on `world` threads, each a rank of `layout`.
void on_threads(const Layout& layout, const std::function<void(int, ProcessGroups&)>& body, const GroupOptions& opt = {}) {
  if (!kHaveGloo) {
    MESSAGE("skipped: this LibTorch build has no Gloo (several CPU ranks need it)");
    return;
  }
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::thread> threads;
  std::vector<std::string> errors(layout.world());
  for (int r = 0; r < layout.world(); ++r)
    threads.emplace_back([&, r] {
      try {
        auto g = make_process_groups(store, r, layout, opt);
        body(r, *g);
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < layout.world(); ++r) CHECK_MESSAGE(errors[r].empty(), "rank " << r << ": " << errors[r]);
}
}  // namespace test_pg_detail

using namespace test_pg_detail;

TEST_CASE("launch env: Open MPI, MPICH, Slurm, torchrun, and a plain process") {
  auto ompi = env_from({{"OMPI_COMM_WORLD_RANK", "3"}, {"OMPI_COMM_WORLD_SIZE", "8"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}});
  CHECK(ompi.rank == 3);
  CHECK(ompi.world_size == 8);
  CHECK(ompi.local_rank == 1);
  CHECK(ompi.launcher == "Open MPI");
  auto mpich = env_from({{"PMI_RANK", "2"}, {"PMI_SIZE", "4"}, {"MPI_LOCALRANKID", "2"}});
  CHECK((mpich.rank == 2 && mpich.world_size == 4 && mpich.local_rank == 2 && mpich.launcher == "MPICH/Hydra"));
  auto slurm = env_from({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "6"}, {"SLURM_LOCALID", "0"}});
  CHECK((slurm.rank == 5 && slurm.world_size == 6 && slurm.local_rank == 0 && slurm.launcher == "Slurm"));
  auto torchrun = env_from({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"}});
  CHECK((torchrun.rank == 1 && torchrun.world_size == 2 && torchrun.local_rank == 1 && torchrun.launcher == "torchrun"));
  CHECK(ompi.local_world_size == 0);  // not given: unknown
  CHECK(env_from({{"OMPI_COMM_WORLD_RANK", "3"}, {"OMPI_COMM_WORLD_SIZE", "8"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}})
            .local_world_size == 4);
  CHECK(env_from({{"PMI_RANK", "0"}, {"PMI_SIZE", "4"}, {"MPI_LOCALNRANKS", "2"}}).local_world_size == 2);
  CHECK(env_from({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "6"}, {"SLURM_NTASKS_PER_NODE", "3"}}).local_world_size == 3);
  CHECK(env_from({{"RANK", "0"}, {"WORLD_SIZE", "8"}, {"LOCAL_WORLD_SIZE", "8"}}).local_world_size == 8);
  auto plain = env_from({});
  CHECK((plain.rank == 0 && plain.world_size == 1 && plain.launcher == "single process"));
  CHECK_THROWS_AS(env_from({{"RANK", "x"}, {"WORLD_SIZE", "2"}}), UsageError);
  CHECK_THROWS_WITH(env_from({{"RANK", "4"}, {"WORLD_SIZE", "2"}}), doctest::Contains("outside world size 2"));
}

TEST_CASE("devices: a GPU per rank uses NCCL; ranks that outnumber the GPUs share them through host memory") {
  LaunchEnv env;
  env.rank = env.local_rank = 5;
  env.world_size = env.local_world_size = 8;
  const DevicePlan own = plan_device(/*cuda=*/true, env, /*gpus=*/8);
  CHECK((own.device == torch::Device(torch::kCUDA, 5) && !own.through_host && !own.shared));
  const DevicePlan one = plan_device(true, env, 1);  // the classroom's one GPU, eight ranks
  CHECK((one.device == torch::Device(torch::kCUDA, 0) && one.through_host && one.shared));
  const DevicePlan two = plan_device(true, env, 2);
  CHECK((two.device == torch::Device(torch::kCUDA, 1) && two.through_host));
  CHECK(plan_device(true, env, 8, /*through_host=*/true).through_host);  // asked for
  env.local_world_size = 0;  // the launcher does not say: every rank counted as local
  CHECK(plan_device(true, env, 4).through_host);
  env.world_size = 1, env.rank = env.local_rank = 0;
  CHECK(!plan_device(true, env, 1).through_host);
  const DevicePlan cpu = plan_device(false, env, 0);
  CHECK((cpu.device == torch::Device(torch::kCPU) && !cpu.through_host));
  CHECK(plan_device(false, env, 0, true).through_host);
  CHECK_THROWS_WITH(plan_device(true, env, 0), doctest::Contains("no CUDA device is visible"));
}

TEST_CASE("network: Slurm nodelists (compressed host lists) expand in order, keeping zero padding") {
  using V = std::vector<std::string>;
  CHECK(slurm_hosts("gpu3") == V{"gpu3"});
  CHECK(slurm_hosts("a,b,c") == V{"a", "b", "c"});
  CHECK(slurm_hosts("node[01-04,07],gpu3") == V{"node01", "node02", "node03", "node04", "node07", "gpu3"});
  CHECK(slurm_hosts("node[8-11]") == V{"node8", "node9", "node10", "node11"});
  CHECK(slurm_hosts("n[098-101]") == V{"n098", "n099", "n100", "n101"});
  CHECK(slurm_hosts("a-[1-2]b") == V{"a-1b", "a-2b"});
  CHECK(slurm_hosts("rack[1-2]-n[1,3]") == V{"rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"});
  CHECK(slurm_hosts("x[5],y[1-2]") == V{"x5", "y1", "y2"});
  for (const char* bad : {"", "node[01-", "node01-02]", "node[]", "node[3-1]", "node[a-b]", "node[1,]", "a,,b", "[1-2]",
                          "n[[1]]", "n[1-9999999]"})
    CHECK_MESSAGE(slurm_hosts(bad).empty(), "'" << bad << "' should not parse");
}

TEST_CASE("network: master address and port from MASTER_ADDR, the Slurm nodelist's first host, or this host") {
  CHECK(master_from({}).addr == "127.0.0.1");
  CHECK(master_from({}).port == 29500);
  auto torchrun = master_from({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "10.0.0.7"}, {"MASTER_PORT", "1234"}});
  CHECK((torchrun.addr == "10.0.0.7" && torchrun.port == 1234));
  const std::map<std::string, std::string> slurm{{"SLURM_PROCID", "3"}, {"SLURM_NTASKS", "8"},
                                                 {"SLURM_JOB_NODELIST", "node[07-08],gpu1"}};
  CHECK(master_from(slurm).addr == "node07");
  CHECK(master_from(slurm).port == 29500);
  auto given = slurm;
  given["MASTER_ADDR"] = "head";  // the user's choice wins
  CHECK(master_from(given).addr == "head");
  auto step = slurm;
  step["SLURM_STEP_NODELIST"] = "node08";  // srun -r 1: the step starts on the second node
  CHECK(master_from(step).addr == "node08");
  auto old = slurm;
  old.erase("SLURM_JOB_NODELIST");
  old["SLURM_NODELIST"] = "c[3-4]";  // older Slurm
  CHECK(master_from(old).addr == "c3");
  // Open MPI and MPICH say nothing about hosts: a node list from an enclosing allocation is
  // not theirs to use, so it stays this host unless MASTER_ADDR says otherwise.
  CHECK(master_from({{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "2"}, {"SLURM_PROCID", "0"},
                     {"SLURM_NTASKS", "1"}, {"SLURM_JOB_NODELIST", "node07"}})
            .addr == "127.0.0.1");
  auto broken = slurm;
  broken["SLURM_JOB_NODELIST"] = "node[07-";
  CHECK_THROWS_WITH_AS(master_from(broken),
                       "environment variable SLURM_JOB_NODELIST='node[07-' is not a Slurm node list: set MASTER_ADDR "
                       "to rank 0's host",
                       UsageError);
  CHECK_THROWS_WITH_AS(master_from({{"MASTER_PORT", "70000"}}),
                       "environment variable MASTER_PORT='70000' is not a port number (1-65535)", UsageError);
  CHECK_THROWS_AS(master_from({{"MASTER_PORT", "http"}}), UsageError);
}

TEST_CASE("network: this host's address towards the master, and a busy port") {
  CHECK(local_address_towards("127.0.0.1", 29500) == "127.0.0.1");
  // A port someone listens on is busy; once they close it, it is free again.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in any{};
  any.sin_family = AF_INET;  // port 0: the kernel picks a free one
  socklen_t size = sizeof(any);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&any), size) == 0);
  REQUIRE(::listen(fd, 1) == 0);
  REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&any), &size) == 0);
  const uint16_t port = ntohs(any.sin_port);
  CHECK_FALSE(port_is_free(port));
  ::close(fd);
  CHECK(port_is_free(port));
}

TEST_CASE("layout: validation is a pure function with one-line errors") {
  CHECK_NOTHROW(validate_layout(Layout().with_tp(2).with_dp(2).with_pp(2), 8));
  CHECK_THROWS_WITH_AS(validate_layout(Layout().with_tp(2).with_dp(2).with_pp(2), 4),
                       doctest::Contains("tensor (2) x context (1) x data (2) x pipeline (2) parallel sizes = 8 must "
                                         "equal the number of ranks (4)"),
                       UsageError);
  CHECK_THROWS_WITH_AS(validate_layout(Layout().with_tp(0), 0), "--tensor-model-parallel-size must be at least 1, got 0",
                       UsageError);
}

TEST_CASE("layout: tensor-parallel ranks innermost, pipeline outermost") {
  Layout l = Layout().with_tp(2).with_dp(2).with_pp(2);
  for (int64_t r = 0; r < 8; ++r) CHECK(rank_of(coords_of(r, l), l) == r);
  auto c = coords_of(5, l);  // 5 = 1 + 2·(0 + 1·(0 + 2·1))
  CHECK((c.tp == 1 && c.dp == 0 && c.pp == 1));
  CHECK(group_members(coords_of(5, l), l, &Coords::tp, 2) == std::vector<int>{4, 5});
  CHECK(group_members(coords_of(5, l), l, &Coords::dp, 2) == std::vector<int>{5, 7});
  CHECK(group_members(coords_of(5, l), l, &Coords::pp, 2) == std::vector<int>{1, 5});
}

TEST_CASE("groups: 8 ranks as 2x2x2 build the right sub-groups and neighbours") {
  on_threads(Layout().with_tp(2).with_dp(2).with_pp(2), [](int rank, ProcessGroups& g) {
    CHECK(g.tp.ranks == group_members(g.coords, g.layout, &Coords::tp, 2));
    CHECK(g.tp.rank == g.coords.tp);
    CHECK(g.pp.rank == g.coords.pp);
    CHECK(g.pp_next_rank() == (rank + 4) % 8);
    CHECK(g.pp_is_first_stage() == (rank < 4));
    CHECK(g.embedding.size == 2);  // first and last stage share the tied embedding
    // Each group's sum is the sum of its members' global ranks.
    auto t = torch::full({3}, double(rank), torch::kDouble);
    all_reduce(g.dp, t);
    CHECK(t[0].item<double>() == double(g.dp.ranks[0] + g.dp.ranks[1]));
  });
}

TEST_CASE("collectives: portable average, all-gather and reduce-scatter give exact numbers") {
  on_threads(Layout().with_tp(4), [](int rank, ProcessGroups& g) {
    auto x = torch::full({2}, float(rank + 1));
    all_reduce(g.tp, x, /*average=*/true);  // (1 + 2 + 3 + 4) / 4
    CHECK(x[0].item<float>() == 2.5f);
    auto mine = torch::full({1, 2}, float(rank));
    auto gathered = all_gather(g.tp, mine, /*dim=*/1);  // (1, 8): 0 0 1 1 2 2 3 3
    CHECK(sizes_are(gathered, {1, 8}));
    CHECK(gathered[0][5].item<float>() == 2.0f);
    auto full = torch::arange(8, torch::kFloat).view({1, 8}) * float(rank + 1);  // Σ factors = 10
    auto slice = reduce_scatter(g.tp, full, /*dim=*/1);
    CHECK(sizes_are(slice, {1, 2}));
    CHECK(slice[0][0].item<float>() == 10.0f * float(2 * rank));
    CHECK(slice[0][1].item<float>() == 10.0f * float(2 * rank + 1));
  });
}

// Through host copies (ranks sharing a GPU): on the CPU the copies are real, so a result that
// is not copied back into the caller's tensor fails here.
TEST_CASE("collectives: through host copies, every operation gives the caller the same numbers") {
  GroupOptions through_host;
  through_host.through_host = true;
  on_threads(Layout().with_tp(2), [](int rank, ProcessGroups& g) {
    REQUIRE(g.tp.through_host);
    auto x = torch::full({2}, float(rank + 1));
    all_reduce(g.tp, x, /*average=*/true);
    CHECK(x[0].item<float>() == 1.5f);
    auto m = torch::full({1}, float(rank));
    all_reduce_max(g.tp, m);
    CHECK(m.item<float>() == 1.0f);
    auto b = torch::full({3}, float(rank + 7));
    broadcast(g.tp, b, /*root=*/1);
    CHECK(b[2].item<float>() == 8.0f);
    CHECK(all_gather(g.tp, torch::full({1}, float(rank)), 0).sum().item<float>() == 1.0f);
    auto slice = reduce_scatter(g.tp, torch::arange(4, torch::kFloat), 0);  // (0 1 | 2 3) x 2
    CHECK(slice[1].item<float>() == 2.0f * float(2 * rank + 1));
    torch::Tensor got;
    reduce_scatter_async(g.tp, torch::ones({4}), [&](torch::Tensor t) { got = t; }).wait();
    CHECK(got.sum().item<float>() == 4.0f);
    auto flat = torch::zeros({4});
    all_gather_into_async(g.tp, torch::full({2}, float(rank + 1)), flat).wait();
    CHECK(flat[3].item<float>() == 2.0f);
    auto out = torch::full({2}, float(rank + 10)), in = torch::zeros({2});
    auto sent = send_async(g.tp, out, 1 - rank, /*tag=*/3);
    auto received = recv_async(g.tp, in, 1 - rank, /*tag=*/3);
    sent.wait(), received.wait();
    CHECK(in[0].item<float>() == float(1 - rank + 10));
  }, through_host);
}

TEST_CASE("collectives: calls and bytes are counted per group and operation") {
  if (!kHaveGloo) return;  // on_threads says why
  comm_stats().reset();
  on_threads(Layout().with_dp(2), [](int, ProcessGroups& g) {
    auto x = torch::ones({10});
    all_reduce(g.dp, x);
    all_reduce(g.dp, x);
    all_reduce(g.tp, x);  // a group of one: nothing sent, nothing counted
  });
  auto c = comm_stats().get("dp", "all_reduce");
  CHECK(c.calls == 2 * 2);  // two calls on each of the two threads
  CHECK(c.bytes == 2 * 2 * 40);
  CHECK(comm_stats().get("tp", "all_reduce").calls == 0);
  CHECK(comm_stats().json(1).find("\"group\": \"dp\"") != std::string::npos);
}
