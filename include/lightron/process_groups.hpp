// lightron/process_groups.hpp — from "N processes that have met" (rendezvous.hpp) to "a
// rank grid with its communicators":
//   1. the grid world = tp × cp × dp × pp, tensor-parallel ranks innermost (neighbours share a
//      node's fast links) and pipeline outermost, as Megatron-LM:
//          rank = tp_rank + tp·(cp_rank + cp·(dp_rank + dp·pp_rank));
//   2. one Gloo (CPU) or NCCL (CUDA) communicator per group this rank belongs to, each under
//      its own store prefix, created in the same order on every rank; Gloo listens on this
//      host's own interface (network.hpp finds it), so ranks may span hosts.
// Leaves out: elastic membership changes. Introduced in chapter 1.
#pragma once

#include "rendezvous.hpp"  // launcher environment, master endpoint, the store

#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#if defined(USE_C10D_GLOO) && __has_include(<gloo/algorithm.h>)  // Debian: libgloo-dev
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#define LIGHTRON_HAVE_GLOO 1
#endif
#if defined(USE_C10D_NCCL) && __has_include(<nccl.h>)
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#define LIGHTRON_HAVE_NCCL 1
#endif

namespace lightron {

#ifdef LIGHTRON_HAVE_GLOO
constexpr bool kHaveGloo = true;   // several CPU ranks can talk
#else
constexpr bool kHaveGloo = false;  // e.g. a pip LibTorch without Gloo's headers
#endif

// The grid's sizes, built by name: Layout().with_tp(2).with_dp(2). There is no positional
// constructor, so Layout{1, 2} (which would have meant tp 1, cp 2) does not compile.
struct Layout {
  int64_t tp = 1, cp = 1, dp = 1, pp = 1;
  Layout() {}  // user-provided: Layout is not an aggregate
  Layout& with_tp(int64_t n) { return tp = n, *this; }
  Layout& with_cp(int64_t n) { return cp = n, *this; }
  Layout& with_dp(int64_t n) { return dp = n, *this; }
  Layout& with_pp(int64_t n) { return pp = n, *this; }
  int64_t world() const { return tp * cp * dp * pp; }
};

// A pure check, run before anything is allocated. Later chapters add model-shape checks.
inline void validate_layout(const Layout& l, int64_t world_size) {
  require(l.tp >= 1, "--tensor-model-parallel-size must be at least 1, got {}", l.tp);
  require(l.cp >= 1, "--context-parallel-size must be at least 1, got {}", l.cp);
  require(l.dp >= 1, "--data-parallel-size must be at least 1, got {}", l.dp);
  require(l.pp >= 1, "--pipeline-model-parallel-size must be at least 1, got {}", l.pp);
  require(l.world() == world_size,
          "tensor ({}) x context ({}) x data ({}) x pipeline ({}) parallel sizes = {} must equal the number of "
          "ranks ({}); launch with mpirun -np {} or change the sizes",
          l.tp, l.cp, l.dp, l.pp, l.world(), world_size, l.world());
}

struct Coords {
  int64_t tp = 0, cp = 0, dp = 0, pp = 0;
};
inline Coords coords_of(int64_t rank, const Layout& l) {
  return {rank % l.tp, rank / l.tp % l.cp, rank / (l.tp * l.cp) % l.dp, rank / (l.tp * l.cp * l.dp)};
}
inline int64_t rank_of(const Coords& c, const Layout& l) { return c.tp + l.tp * (c.cp + l.cp * (c.dp + l.dp * c.pp)); }

#ifdef LIGHTRON_HAVE_GLOO
using GlooDevice = std::shared_ptr<::gloo::transport::Device>;
// Each rank's Gloo device listens on an address of its own host: the interface named by
// GLOO_SOCKET_IFNAME (the first of a comma-separated list, as PyTorch), else the one that the
// route to MASTER_ADDR leaves by. MASTER_ADDR itself is a local address on rank 0's host only.
inline std::shared_ptr<::gloo::transport::Device> gloo_device() {
  const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
  const std::string interface = ifname ? std::string(ifname).substr(0, std::string(ifname).find(',')) : "";
  try {
    if (!interface.empty()) return c10d::ProcessGroupGloo::createDeviceForInterface(interface);
    const Master master = master_endpoint();
    return c10d::ProcessGroupGloo::createDeviceForHostname(local_address_towards(master.addr, master.port));
  } catch (const UsageError&) {
    throw;
  } catch (const std::exception& e) {  // about this host: this rank says it
    throw RuntimeFailure(fmt::format("rank {}: no network device for Gloo{}: {}", global_rank(),
                                     interface.empty() ? "" : fmt::format(" (GLOO_SOCKET_IFNAME={})", ifname),
                                     first_line(e.what())));
  }
}
#else
struct GlooDevice {};  // nothing to share without Gloo
#endif

// A group's communicator. Gloo's: on `shared` (created on first use) when given, so that all of
// a rank's groups share one device, and with it one network thread instead of one per group
// (each wakes every 10 ms, and a rank of the 2x2x2 layout has five groups: on a busy machine
// the wakeups preempt the computation). NCCL: one communicator per group, as always.
inline BackendPtr make_backend(const c10::intrusive_ptr<c10d::Store>& store, const std::string& prefix, int rank,
                               int size, const GroupOptions& opt, GlooDevice* shared = nullptr) {
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>(prefix, store);
#ifdef LIGHTRON_HAVE_NCCL
  if (opt.cuda && !opt.through_host) {
    auto nccl = c10d::ProcessGroupNCCL::Options::create();
    nccl->timeout = opt.timeout;
    return c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, size, nccl);
  }
#endif
  require(!opt.cuda || opt.through_host, "--device cuda with several ranks needs NCCL (nccl.h and a LibTorch built "
          "with it), or --through-host");
#ifdef LIGHTRON_HAVE_GLOO
  GlooDevice own;
  GlooDevice& device = shared ? *shared : own;
  if (!device) device = gloo_device();
  auto gloo = c10d::ProcessGroupGloo::Options::create(opt.timeout);
  gloo->devices.push_back(device);
  return c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, gloo);
#else
  (void)prefixed, (void)shared;
  throw UsageError(fmt::format("several CPU ranks (or ranks sharing a GPU) need Gloo, and this build has none: {}",
                               kNoGlooReason));
#endif
}

struct ProcessGroups {
  Layout layout;
  int rank = 0, world_size = 1, local_rank = 0;
  Coords coords;
  Group world, tp, cp, dp, pp;
  Group dp_cp;      // dp x cp: the replicas of every parameter (chapter 8); dp itself when cp is 1
  Group embedding;  // first and last pipeline stage: their tied embedding gradients are summed
  c10::intrusive_ptr<c10d::Store> store;

  bool pp_is_first_stage() const { return coords.pp == 0; }
  bool pp_is_last_stage() const { return coords.pp == layout.pp - 1; }
  int pp_prev_rank() const { return pp.ranks[(pp.rank + pp.size - 1) % pp.size]; }  // global ranks
  int pp_next_rank() const { return pp.ranks[(pp.rank + 1) % pp.size]; }
};

// Members of the group through `c` that varies one coordinate (`vary` picks it).
inline std::vector<int> group_members(Coords c, const Layout& l, int64_t Coords::*vary, int64_t extent) {
  std::vector<int> ranks;
  for (int64_t i = 0; i < extent; ++i) {
    c.*vary = i;
    ranks.push_back(static_cast<int>(rank_of(c, l)));
  }
  return ranks;
}

// Builds the grid's groups from an existing store (a TCPStore, or a HashStore shared by
// threads in a unit test). Every rank creates its groups in the same order.
inline std::unique_ptr<ProcessGroups> make_process_groups(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                                          const Layout& layout, const GroupOptions& opt = {}) {
  validate_layout(layout, layout.world());
  auto g = std::make_unique<ProcessGroups>();
  g->layout = layout;
  g->rank = rank;
  g->world_size = static_cast<int>(layout.world());
  g->coords = coords_of(rank, layout);
  g->store = store;
  GlooDevice device;  // one for all of this rank's groups (make_backend)
  auto build = [&](const std::string& name, std::vector<int> members) {
    Group group{name, BackendPtr(), 0, static_cast<int>(members.size()), members, opt.through_host};
    group.rank = static_cast<int>(std::find(members.begin(), members.end(), rank) - members.begin());
    if (group.size > 1)
      group.pg = make_backend(store, fmt::format("{}/{}", name, members[0]), group.rank, group.size, opt, &device);
    return group;
  };
  std::vector<int> everyone(g->world_size);
  std::iota(everyone.begin(), everyone.end(), 0);
  g->world = build("world", everyone);
  g->tp = build("tp", group_members(g->coords, layout, &Coords::tp, layout.tp));
  g->cp = build("cp", group_members(g->coords, layout, &Coords::cp, layout.cp));
  g->dp = build("dp", group_members(g->coords, layout, &Coords::dp, layout.dp));
  g->pp = build("pp", group_members(g->coords, layout, &Coords::pp, layout.pp));
  g->dp_cp = g->dp;
  if (layout.cp > 1) {
    std::vector<int> members;  // ascending: cp varies faster than dp in the rank
    for (int64_t dp = 0; dp < layout.dp; ++dp)
      for (const int r : group_members(Coords{g->coords.tp, 0, dp, g->coords.pp}, layout, &Coords::cp, layout.cp))
        members.push_back(r);
    g->dp_cp = build("dp_cp", members);
  }
  if (layout.pp > 1 && (g->pp_is_first_stage() || g->pp_is_last_stage()))
    g->embedding = build("embedding", {g->pp.ranks.front(), g->pp.ranks.back()});
  return g;
}

// Which device this rank computes on, and whether its groups go through host memory. NCCL
// wants a GPU per rank. With more ranks on a host than GPUs (one classroom GPU hosting the
// 2x2x2 course layout's eight ranks) the ranks share the GPUs round-robin and their
// collectives go over Gloo through host copies; `through_host` asks for that anyway (on
// the CPU it makes every collective copy, which is how the CPU tests cover this path).
// init_process_groups makes the choice every rank's (agree_through_host).
struct DevicePlan {
  torch::Device device = torch::kCPU;
  bool through_host = false;
  bool shared = false;  // several ranks compute on this rank's GPU
};
inline DevicePlan plan_device(bool cuda, const LaunchEnv& env, int64_t gpus, bool through_host = false) {
  if (!cuda) return {torch::kCPU, through_host, false};
  require(gpus >= 1, "--device cuda: no CUDA device is visible; use --device cpu");
  const int64_t local_ranks = env.local_world_size > 0 ? env.local_world_size : env.world_size;
  const bool shared = local_ranks > gpus;
  return {torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(env.local_rank % gpus)), through_host || shared,
          shared};
}

// "[rank 5 | tp 1 dp 0 pp 1]": every message of this process from now on starts with it.
inline void set_rank_prefix(const ProcessGroups& g) {
  global_rank() = g.rank;
  rank_prefix() = g.layout.cp > 1 ? fmt::format("[rank {} | tp {} cp {} dp {} pp {}]", g.rank, g.coords.tp, g.coords.cp,
                                                g.coords.dp, g.coords.pp)
                                  : fmt::format("[rank {} | tp {} dp {} pp {}]", g.rank, g.coords.tp, g.coords.dp,
                                                g.coords.pp);
}

// Every rank must use the same transport, so the choice is agreed: if any rank goes through
// host memory (its host has more ranks than GPUs, or --through-host), all do. The last rank
// to arrive writes the decision; its count of wishes includes everyone's.
inline bool agree_through_host(c10d::Store& store, bool mine, int world_size) {
  store.add("through_host/wishes", mine ? 1 : 0);
  if (store.add("through_host/arrived", 1) == world_size) store.set("through_host/decided", std::vector<uint8_t>{1});
  store.wait({"through_host/decided"});
  return store.add("through_host/wishes", 0) > 0;
}

// The groups of `layout` for this process. May be called again (a test trying several
// layouts): each call's groups live under their own store prefix.
inline std::unique_ptr<ProcessGroups> init_process_groups(const Layout& layout, const GroupOptions& opt = {}) {
  static int generation = 0;
  const LaunchEnv env = launch_env();
  global_rank() = env.rank;
  validate_layout(layout, env.world_size);
  c10::intrusive_ptr<c10d::Store> store = env.world_size == 1 ? c10::intrusive_ptr<c10d::Store>(c10::make_intrusive<c10d::HashStore>())
                                                              : rendezvous(env, opt);
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>(fmt::format("lightron/{}", generation++), store);
  GroupOptions agreed = opt;
  agreed.through_host = agree_through_host(*prefixed, opt.through_host, env.world_size);
  auto g = make_process_groups(prefixed, env.rank, layout, agreed);
  g->local_rank = env.local_rank;
  set_rank_prefix(*g);
  return g;
}

}  // namespace lightron
