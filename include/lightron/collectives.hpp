// lightron/collectives.hpp — the one thin wrapper through which every collective and
// point-to-point call goes. It
//   * counts calls, bytes and seconds per (group, operation): the numbers the notebooks
//     plot against the analytical formulas;
//   * gives portable versions of what Gloo in LibTorch 1.13 lacks (AVG = SUM then divide;
//     reduce-scatter from all-to-all; all-gather into one tensor from the list form);
//   * lets ranks that share one GPU talk: NCCL wants a GPU per rank, so their groups are Gloo
//     and every CUDA tensor goes through a host copy (Group::through_host);
//   * turns a failed or timed-out call into one line naming the group, the operation and its
//     number ("all_reduce #37 on the dp group"), and the ranks that are stopped or lost
//     (resilience.hpp), and ends the process (exit 1) instead of hanging.
// The LibTorch 1.13 / 2.x differences live in compat.hpp.
// Introduced in chapter 1 (with process_groups.hpp, which builds the groups).
#pragma once

#include "compat.hpp"
#include "core.hpp"

#include <torch/csrc/distributed/c10d/Store.hpp>
#include <fmt/ranges.h>  // fmt::join

#include <chrono>
#include <map>
#include <mutex>
#include <vector>

namespace lightron {

// One communicator: a c10d backend plus who is in it.
struct Group {
  std::string name;       // "world", "tp", "dp", "pp", "cp", "embedding"
  BackendPtr pg;          // null when this rank is alone (size 1): calls are no-ops
  int rank = 0, size = 1; // this rank's index in the group, and the group's size
  std::vector<int> ranks; // global ranks of the members, by group rank
  bool through_host = false;  // Gloo for CUDA tensors: each goes out through a host copy and back
};

// What a call hands to the backend: `t` itself, or for a through-host group a host copy of it
// (a real copy on the CPU too, so that the CPU tests prove every result is copied back).
inline torch::Tensor on_wire(const Group& g, const torch::Tensor& t) {
  return g.through_host ? t.to(torch::kCPU, /*non_blocking=*/false, /*copy=*/true) : t;
}
// The result back where the caller holds it: copied into `t` (in-place operations; nothing to
// do when `wire` is `t`), or returned on `like`'s device.
inline void copy_from_wire(const torch::Tensor& wire, torch::Tensor t) {
  if (!wire.is_same(t)) t.copy_(wire);
}
[[nodiscard]] inline torch::Tensor from_wire(const torch::Tensor& wire, const torch::Tensor& like) {
  return wire.to(like.device());
}

// Calls, bytes and seconds of one (group, operation). Bytes are what this rank hands in:
// the whole tensor for all-reduce and reduce-scatter, its own piece for all-gather.
struct CommCounter {
  int64_t calls = 0, bytes = 0;
  double seconds = 0;
};

struct CommStats {
  std::map<std::pair<std::string, std::string>, CommCounter> counters;
  std::mutex mutex;  // async completions may be recorded from other threads
  void add(const std::string& group, const std::string& op, int64_t bytes, double seconds) {
    std::lock_guard<std::mutex> lock(mutex);
    auto& c = counters[{group, op}];
    c.calls += 1;
    c.bytes += bytes;
    c.seconds += seconds;
  }
  CommCounter get(const std::string& group, const std::string& op) {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = counters.find({group, op});
    return it == counters.end() ? CommCounter{} : it->second;
  }
  void reset() {
    std::lock_guard<std::mutex> lock(mutex);
    counters.clear();
  }
  // One JSON line: {"iteration": i, "comm": [{"group": "dp", "op": "all_reduce", ...}, ...]}
  std::string json(int64_t iteration) {
    std::lock_guard<std::mutex> lock(mutex);
    std::string items;
    for (const auto& [key, c] : counters)
      items += fmt::format("{}{{\"group\": \"{}\", \"op\": \"{}\", \"calls\": {}, \"bytes\": {}, \"seconds\": {:.6f}}}",
                           items.empty() ? "" : ", ", key.first, key.second, c.calls, c.bytes, c.seconds);
    return fmt::format("{{\"iteration\": {}, \"rank\": {}, \"comm\": [{}]}}", iteration, global_rank(), items);
  }
};

inline CommStats& comm_stats() {
  static CommStats stats;
  return stats;
}

// Who is at fault when a call fails: one clause ("no heartbeat from rank(s) 3 for 7.2 s:
// stopped or lost"; "" when nobody watches), or word that another rank failed with an error of
// its own and reports it, so that this rank need not echo it.
struct LostRanks {
  std::string text;
  bool reported_elsewhere = false;
};
// Given how long the failed call waited; set by rendezvous.hpp (resilience.hpp reads heartbeats).
inline std::function<LostRanks(double waited)>& describe_lost_ranks() {
  static std::function<LostRanks(double)> describe = [](double) { return LostRanks{}; };
  return describe;
}

// This rank's calls per (group, operation), counted when launched: the "#37" of a failure
// message, the same number on every member of a group for its collectives.
inline int64_t next_call_number(const std::string& group, const std::string& op) {
  static std::map<std::pair<std::string, std::string>, int64_t> calls;
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  return ++calls[{group, op}];
}

// A library's error without its source location, e.g. Gloo's "[../gloo/transport/tcp/pair.cc:
// 598] Connection closed by peer" -> "Connection closed by peer".
inline std::string library_reason(const std::string& what) {
  std::string line = first_line(what);
  const size_t end = line.find("] ");
  if (!line.empty() && line[0] == '[' && end != std::string::npos) line = line.substr(end + 2);
  return line;
}

// A collective failed or timed out: say which (its number among this rank's calls of that
// operation on that group), how long it waited, and who is stopped or lost, on one line (none
// when the rank at fault reports its own error); then leave. We _Exit because destroying a
// process group whose peers are dead can itself hang.
[[noreturn]] inline void fail_collective(const Group& g, const std::string& op, int64_t call, double waited,
                                         const std::string& why) {
  fault_reporting() = true;
  const LostRanks lost = describe_lost_ranks()(waited);
  if (lost.reported_elsewhere) {  // give that rank time to speak: under mpirun our exit ends it
    std::this_thread::sleep_for(std::chrono::seconds(2));
    std::_Exit(1);
  }
  print_error_line(with_prefix(fmt::format("error: {} #{} on the {} group (ranks {}) failed after {:.1f} s ({}){}", op,
                                           call, g.name, fmt::join(g.ranks, ","), waited, library_reason(why),
                                           lost.text.empty() ? "" : ": " + lost.text)));
  std::_Exit(1);
}

// A pending operation: wait() finishes it, checks for failure and records its time.
struct Pending {
  Group group;  // a copy (a name, the members and a shared backend): nothing to dangle
  std::string op;
  int64_t call = 0;  // next_call_number
  c10::intrusive_ptr<c10d::Work> work;
  int64_t bytes = 0;
  Timer timer;
  std::function<void()> then;  // e.g. divide by the group size, or copy a result out
  void wait() {
    if (!work) return;
    try {
      work->wait();
    } catch (const std::exception& e) {
      fail_collective(group, op, call, timer.seconds(), e.what());
    }
    work.reset();
    comm_stats().add(group.name, op, bytes, timer.seconds());
    if (then) std::exchange(then, nullptr)();  // and drop what it holds (buffers)
  }
};

template <typename Launch>
inline Pending launch(const Group& g, const std::string& op, int64_t bytes, Launch&& start) {
  Pending p;
  p.group = g;
  p.op = op;
  p.call = next_call_number(g.name, op);
  p.bytes = bytes;
  try {
    p.work = start();
  } catch (const std::exception& e) {
    fail_collective(g, op, p.call, p.timer.seconds(), e.what());
  }
  return p;
}

// Sum (or average) `t` in place across the group. Returns a Pending to overlap with work.
// [snippet: all_reduce_async]
inline Pending all_reduce_async(const Group& g, torch::Tensor t, bool average = false) {
  if (g.size == 1) return Pending{};
  std::vector<torch::Tensor> tensors{on_wire(g, t)};
  auto p = launch(g, "all_reduce", nbytes(t), [&] { return g.pg->allreduce(tensors); });
  p.then = [t, wire = tensors[0], n = average ? g.size : 1]() mutable {
    copy_from_wire(wire, t);
    if (n > 1) t.div_(n);  // Gloo 1.13 has no AVG
  };
  return p;
// [end snippet: all_reduce_async]
}
inline void all_reduce(const Group& g, torch::Tensor t, bool average = false) { all_reduce_async(g, t, average).wait(); }

inline void all_reduce_max(const Group& g, torch::Tensor t) {
  if (g.size == 1) return;
  std::vector<torch::Tensor> tensors{on_wire(g, t)};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::MAX;
  launch(g, "all_reduce", nbytes(t), [&] { return g.pg->allreduce(tensors, opts); }).wait();
  copy_from_wire(tensors[0], t);
}

inline void broadcast(const Group& g, torch::Tensor t, int root) {
  if (g.size == 1) return;
  std::vector<torch::Tensor> tensors{on_wire(g, t)};
  c10d::BroadcastOptions opts;
  opts.rootRank = root;
  launch(g, "broadcast", nbytes(t), [&] { return g.pg->broadcast(tensors, opts); }).wait();
  copy_from_wire(tensors[0], t);
}

// Concatenate every rank's `t` along `dim`: (…, n, …) -> (…, size·n, …).
inline torch::Tensor all_gather(const Group& g, const torch::Tensor& t, int64_t dim) {
  if (g.size == 1) return t;
  std::vector<torch::Tensor> input{on_wire(g, t.contiguous())};
  std::vector<std::vector<torch::Tensor>> output(1);
  for (int i = 0; i < g.size; ++i) output[0].push_back(torch::empty_like(input[0]));
  launch(g, "all_gather", nbytes(t), [&] { return g.pg->allgather(output, input); }).wait();
  return from_wire(torch::cat(output[0], dim), t);
}

// The same into one flat buffer, asynchronously (ZeRO-3): `out` (size·n elements) gets rank
// r's `slice` (n elements) at r·n when the Pending is waited.
inline Pending all_gather_into_async(const Group& g, const torch::Tensor& slice, torch::Tensor out) {
  if (g.size == 1) {
    out.copy_(slice);
    return Pending{};
  }
  const auto wire = g.through_host ? torch::empty(out.sizes(), out.options().device(torch::kCPU)) : out;
  std::vector<std::vector<torch::Tensor>> pieces(1);
  for (int r = 0; r < g.size; ++r) pieces[0].push_back(wire.narrow(0, r * slice.numel(), slice.numel()));
  std::vector<torch::Tensor> input{on_wire(g, slice)};
  auto p = launch(g, "all_gather", nbytes(slice), [&] { return g.pg->allgather(pieces, input); });
  p.then = [wire, out, input]() { copy_from_wire(wire, out); };
  return p;
}

// Sum across the group, each rank keeping its 1/size slice along `dim`. Built from
// all-to-all (rank j receives everybody's j-th slice, then adds them up): the same bytes on
// the wire as a ring reduce-scatter, and available in Gloo 1.13, which has no reduce_scatter.
inline torch::Tensor reduce_scatter(const Group& g, const torch::Tensor& t, int64_t dim) {
  if (g.size == 1) return t;
  auto send = on_wire(g, torch::stack(t.chunk(g.size, dim), 0).contiguous());  // (size, ...slice)
  auto recv = torch::empty_like(send);
  std::vector<int64_t> splits;  // empty: equal splits
  launch(g, "reduce_scatter", nbytes(t), [&] { return g.pg->alltoall_base(recv, send, splits, splits); }).wait();
  return from_wire(recv.sum(0), t);
}

// The same for a flat buffer, asynchronously (ZeRO): `t` holds size·n elements, rank j's
// slice being the j-th n; when the Pending is waited, `done` gets this rank's slice summed
// over the group. `t` is read until then.
inline Pending reduce_scatter_async(const Group& g, const torch::Tensor& t, std::function<void(torch::Tensor)> done) {
  if (g.size == 1) {
    done(t.clone());
    return Pending{};
  }
  auto send = on_wire(g, t).view({g.size, -1});
  auto recv = torch::empty_like(send);
  std::vector<int64_t> splits;  // empty: equal splits
  auto p = launch(g, "reduce_scatter", nbytes(t), [&] { return g.pg->alltoall_base(recv, send, splits, splits); });
  p.then = [send, recv, t, done = std::move(done)] { done(from_wire(recv.sum(0), t)); };
  return p;
}

// Point-to-point; post both sides before waiting on either (a ring can deadlock otherwise).
inline Pending send_async(const Group& g, torch::Tensor t, int dst_group_rank, int tag) {
  std::vector<torch::Tensor> tensors{on_wire(g, t)};
  auto p = launch(g, "send", nbytes(t), [&] { return g.pg->send(tensors, dst_group_rank, tag); });
  p.then = [wire = tensors[0]] {};  // a host copy lives until the send is done
  return p;
}
inline Pending recv_async(const Group& g, torch::Tensor t, int src_group_rank, int tag) {
  std::vector<torch::Tensor> tensors{g.through_host ? torch::empty(t.sizes(), t.options().device(torch::kCPU)) : t};
  auto p = launch(g, "recv", nbytes(t), [&] { return g.pg->recv(tensors, src_group_rank, tag); });
  p.then = [t, wire = tensors[0]]() { copy_from_wire(wire, t); };
  return p;
}

inline void barrier(const Group& g) {
  if (g.size == 1) return;
  launch(g, "barrier", 0, [&] { return g.pg->barrier(); }).wait();
}

}  // namespace lightron
