// lightron/rendezvous.hpp — from "N processes started by a launcher" to "N processes that
// have met": rank, world size and local rank from the launcher's environment (Open MPI,
// MPICH/Hydra, Slurm, torchrun; a plain process is a world of 1 — lightron never links MPI,
// mpirun only starts the processes), where the master is (MASTER_ADDR:MASTER_PORT; under
// Slurm the allocation's first host by default), and a c10d TCPStore rendezvous there that
// names the ranks that never arrived and bounds every wait; then each rank's watch threads
// (heartbeats, its launcher: resilience.hpp).
// process_groups.hpp builds the rank grid and its communicators on the store.
// Leaves out: elastic membership changes. Introduced in tutorial chapter 1.
#pragma once

#include "collectives.hpp"
#include "network.hpp"     // this host's address towards the master; Slurm node lists
#include "resilience.hpp"  // Watchdog; heartbeats and the launcher watch

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <csignal>  // SIGPIPE
#include <thread>

namespace lightron {

struct LaunchEnv {
  int rank = 0, world_size = 1, local_rank = 0;
  int local_world_size = 0;  // ranks on this host; 0: the launcher does not say
  std::string launcher = "single process";
};

// Reads an environment variable: std::getenv, or a table in the unit tests.
using Getenv = std::function<const char*(const char*)>;
inline const char* process_env(const char* key) { return std::getenv(key); }

// Reads the launcher's variables.
inline LaunchEnv launch_env(const Getenv& get = process_env) {
  struct Names { const char *launcher, *rank, *size, *local, *local_size; };
  const Names launchers[] = {
      {"Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"},
      {"MPICH/Hydra", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"},
      {"Slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"},
      {"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}};
  auto number = [&](const char* key, int fallback) {
    const char* text = get(key);
    if (text == nullptr) return fallback;
    char* end = nullptr;
    long value = std::strtol(text, &end, 10);
    require(*text != '\0' && *end == '\0' && value >= 0, "environment variable {}='{}' is not a rank number", key, text);
    return static_cast<int>(value);
  };
  for (const auto& n : launchers) {
    if (get(n.rank) == nullptr) continue;
    LaunchEnv env{number(n.rank, 0), number(n.size, 1), number(n.local, 0), number(n.local_size, 0), n.launcher};
    require(env.world_size >= 1 && env.rank < env.world_size, "{}: rank {} is outside world size {} ({} / {})",
            n.launcher, env.rank, env.world_size, n.rank, n.size);
    return env;
  }
  return LaunchEnv{};
}

// The first lines of every program that runs as one of several ranks: threads and malloc
// (setup_process), this rank's place from the launcher's environment, and the rank that
// messages are printed by (rank 0), even before any group exists.
inline LaunchEnv start_rank_process(int num_threads) {
  setup_process(num_threads);
  const LaunchEnv env = launch_env();
  global_rank() = env.rank;
  return env;
}

// Where rank 0 hosts the rendezvous store.
struct Master {
  std::string addr;
  uint16_t port = 29500;
};

// MASTER_ADDR and MASTER_PORT, as torchrun sets them. Without MASTER_ADDR: under Slurm the
// first host of the step (srun starts task 0 there), otherwise this host. Open MPI and MPICH
// tell their ranks nothing of the kind: across hosts they need MASTER_ADDR.
inline Master master_endpoint(const Getenv& get = process_env) {
  Master m{"127.0.0.1"};
  if (const char* port = get("MASTER_PORT")) {
    char* end = nullptr;
    const long value = std::strtol(port, &end, 10);
    require(*port != '\0' && *end == '\0' && value >= 1 && value <= 65535,
            "environment variable MASTER_PORT='{}' is not a port number (1-65535)", port);
    m.port = static_cast<uint16_t>(value);
  }
  if (const char* addr = get("MASTER_ADDR"); addr != nullptr && *addr != '\0') {
    m.addr = addr;
  } else if (launch_env(get).launcher == "Slurm") {
    for (const char* key : {"SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"}) {
      const char* list = get(key);
      if (list == nullptr) continue;
      const auto hosts = slurm_hosts(list);
      require(!hosts.empty(), "environment variable {}='{}' is not a Slurm node list: set MASTER_ADDR to rank 0's host",
              key, list);
      m.addr = hosts.front();
      break;
    }
  }
  return m;
}

struct GroupOptions {
  std::chrono::milliseconds timeout{60000};  // collectives and rendezvous; c10d's default is 30 min
  bool cuda = false;                         // NCCL for CUDA tensors, Gloo otherwise
  bool through_host = false;                 // Gloo even for CUDA tensors, through host copies
};

// The launcher's ranks meet at MASTER_ADDR:MASTER_PORT; rank 0 hosts the TCPStore (unless
// torchrun's agent already does). Waits for everybody and names whoever never arrived.
// Done once per process; later calls return the same store.
inline c10::intrusive_ptr<c10d::Store> rendezvous(const LaunchEnv& env, const GroupOptions& opt) {
  static c10::intrusive_ptr<c10d::Store> store;
  if (store) return store;
  watch_launcher();  // from now on, an orphaned rank stops (resilience.hpp)
  // A write to a socket whose peer is gone (Gloo's, the store's) or to the output pipe of a dead
  // launcher fails with EPIPE, which is reported, instead of killing the rank without a word.
  std::signal(SIGPIPE, SIG_IGN);
  const Master master = master_endpoint();
  const std::string& host = master.addr;
  const uint16_t port = master.port;
  const char* agent = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
  c10d::TCPStoreOptions o;
  o.port = port;
  o.isServer = env.rank == 0 && !(agent && std::string(agent) == "True");
  o.numWorkers = env.world_size;
  o.waitWorkers = false;
  o.timeout = opt.timeout;
  // 1.13's store fails at once on a busy port, but says so in three log lines about sockets
  // and an exception that reads like an unreachable rank 0. Say what it is, before trying.
  const auto port_taken = [&] {
    return UsageError(fmt::format("MASTER_PORT {} is already in use on {} (another job?): set MASTER_PORT to a free "
                                  "port",
                                  port, host));
  };
  if (o.isServer && !port_is_free(port)) throw port_taken();
  // A client whose MASTER_PORT belongs to another program (another job), or whose rank 0 is
  // stopped, is accepted by the kernel and then waits for an answer with no time limit. The
  // arrival loop's deadline counts from here too, so that it gives up (naming who is missing)
  // before the watchdog.
  const Timer waited;
  const Watchdog watchdog(opt.timeout + std::chrono::seconds(1),
                          fmt::format("rank {}: no answer from the rendezvous store at {}:{} within {} s: is rank 0 "
                                      "running, and is MASTER_PORT {} its store's (not another program's)?",
                                      env.rank, host, port, opt.timeout.count() / 1000 + 1, port));
  try {
    store = c10::make_intrusive<c10d::TCPStore>(host, o);
  } catch (const std::exception& e) {
    if (o.isServer && !port_is_free(port)) throw port_taken();  // taken since the check
    if (o.isServer)
      throw RuntimeFailure(fmt::format("rank 0: cannot host the rendezvous store on port {} ({})", port,
                                       first_line(e.what())));
    throw RuntimeFailure(fmt::format("rank {}: cannot reach the rendezvous store at {}:{} within {} s ({}); is rank 0 "
                                     "running, is MASTER_ADDR its host (not 127.0.0.1 across hosts), and are "
                                     "MASTER_ADDR/MASTER_PORT the same on every rank?",
                                     env.rank, host, port, opt.timeout.count() / 1000, first_line(e.what())));
  }
  store->set(fmt::format("lightron/arrived/{}", env.rank), std::vector<uint8_t>{1});
  for (;;) {
    std::vector<int> missing;
    for (int r = 0; r < env.world_size; ++r)
      if (!store->check({fmt::format("lightron/arrived/{}", r)})) missing.push_back(r);
    if (missing.empty()) break;
    if (waited.seconds() * 1000 > double(opt.timeout.count()))
      throw RuntimeFailure(fmt::format("rank {}: rendezvous at {}:{} timed out after {} s: rank(s) {} of {} never arrived",
                                       env.rank, host, port, opt.timeout.count() / 1000, fmt::join(missing, ","),
                                       env.world_size));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  start_heartbeat(env.rank, env.world_size, host, port);
  describe_lost_ranks() = [rank = env.rank](double waited) { return describe_from_heartbeats(rank, waited); };
  announce_failure() = [] { announce_failure_and_wait(kFailedOwnError); };
  share_bad_input_through(store);
  return store;
}

}  // namespace lightron
