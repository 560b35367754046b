// lightron/resilience.hpp — knowing who is gone. Every rank bumps a heartbeat counter in
// the rendezvous store; when a collective fails or times out, collectives.hpp asks
// describe_lost_ranks(), which reads the counters for a few seconds and names the ranks
// whose counters stood still, so every survivor exits with one line naming the lost rank
// instead of hanging. Leaves out: restarting without the lost rank (elastic training).
// Introduced in chapter 1.
#pragma once

#include "collectives.hpp"

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <atomic>
#include <thread>

namespace lightron {

// Every rank bumps a counter in the store twice a second; after a failed collective, the
// survivors read the counters twice and name the ranks whose counters stood still.
struct Heartbeat {
  std::atomic<bool> stop{false};
  std::thread thread;
  ~Heartbeat() {
    stop = true;
    if (thread.joinable()) thread.join();
  }
};

inline void start_heartbeat(int rank, int world_size, const std::string& host, uint16_t port) {
  static Heartbeat heartbeat;
  auto connect = [host, port](std::chrono::milliseconds timeout) {
    c10d::TCPStoreOptions o;
    o.port = port;
    o.timeout = timeout;
    return c10::make_intrusive<c10d::TCPStore>(host, o);
  };
  heartbeat.thread = std::thread([connect, rank] {
    try {
      auto store = connect(std::chrono::seconds(10));
      while (!heartbeat.stop) {
        store->add(fmt::format("lightron/alive/{}", rank), 1);
        std::this_thread::sleep_for(std::chrono::milliseconds(500));
      }
    } catch (...) {  // the store is gone: the job is ending one way or another
    }
  });
  // Reads the counters every 0.5 s for 2.5 s. A rank that meets a failure marks itself
  // "failed" (it exits after its own message), so that ranks noticing later do not call it
  // lost. Rank 0 hosts the store and may exit meanwhile: then the reads that arrived decide if
  // they span 1.5 s (three beats). Without the store we cannot tell a lost rank 0 from one
  // that exited after its own message (which names the lost rank), and say so.
  describe_lost_ranks() = [connect, rank, world_size]() -> std::string {
    const std::string no_store =
        "the rendezvous store on rank 0 no longer answers (rank 0 is lost, or exited after its own error)";
    c10::intrusive_ptr<c10d::TCPStore> store;
    auto key = [](const char* what, int r) { return fmt::format("lightron/{}/{}", what, r); };
    auto read = [&] {  // heartbeat counters; -1 for a rank marked failed
      std::vector<int64_t> beats;
      for (int r = 0; r < world_size; ++r)
        beats.push_back(store->check({key("failed", r)}) ? -1 : store->add(key("alive", r), 0));
      return beats;
    };
    std::vector<int64_t> before, after;
    try {
      store = connect(std::chrono::seconds(3));
      store->set(key("failed", rank), std::vector<uint8_t>{1});
      before = after = read();
    } catch (const std::exception&) {
      return no_store;
    }
    const Timer window;
    double span = 0;
    try {
      while (span < 2.5) {
        std::this_thread::sleep_for(std::chrono::milliseconds(500));
        after = read();
        span = window.seconds();
      }
    } catch (const std::exception&) {  // rank 0 exited: judge from the reads so far
    }
    if (span < 1.5) return no_store;
    std::vector<int> lost;
    for (int r = 0; r < world_size; ++r)
      if (after[r] >= 0 && after[r] == before[r]) lost.push_back(r);
    return lost.empty() ? "every rank is still alive (a timeout: is one stuck?)"
                        : fmt::format("lost rank(s) {} (no heartbeat for {:.1f} s)", fmt::join(lost, ","), span);
  };
}

}  // namespace lightron
