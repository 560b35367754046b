// lightron/resilience.hpp — knowing who is stopped, lost or orphaned, so that every fault of a
// distributed run ends in one line per rank and a non-zero exit instead of a hang:
//   * heartbeats: every rank bumps its counter in the rendezvous store twice a second and reads
//     everybody's. A counter that stands still for 1.5 s belongs to a rank that is stopped
//     (SIGSTOP, a frozen machine) or lost. When a collective fails, describe_lost_ranks()
//     answers from what this watch has already seen: it never waits on the store itself, a
//     rank that was stopped and then resumed (mpirun sends SIGCONT before it kills a job) is
//     still named, and a stopped rank 0, which hosts the store, shows as a store that stopped
//     answering;
//   * the launcher: a rank whose parent process (mpirun, srun, torchrun, a shell) is gone stops
//     with one line instead of training on as an orphan, and writes no checkpoint after;
//   * this process's own pauses, which explain why its peers gave up on it;
//   * bad input that only some ranks meet: rank 0 tells the others through the store what it
//     reported (core.hpp, rank0_says_it).
// Leaves out: elastic restarts without the lost rank; more than a few hundred ranks (each rank
// reads every counter: N^2 small reads per half second).
// Introduced in chapter 1.
#pragma once

#include "collectives.hpp"

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <unistd.h>  // getppid

#include <atomic>
#include <fstream>
#include <mutex>
#include <thread>

namespace lightron {

constexpr double kBeatSeconds = 0.5;               // one heartbeat
constexpr double kStallSeconds = 1.5;              // three missed beats: stopped or lost
constexpr int64_t kFailedMark = int64_t(1) << 40;  // added to a counter once: the rank reports a failure
constexpr int kFailedCall = 1, kFailedOwnError = 2;  // of a collective call (maybe a peer's fault); its own

// Ends the process with one line unless disarmed within `limit`: for waits that c10d does not
// bound itself (a store that accepted the connection and never answers).
struct Watchdog {
  std::atomic<bool> disarmed{false};
  std::thread thread;
  Watchdog(std::chrono::milliseconds limit, std::string message) {
    thread = std::thread([this, limit, message] {
      const Timer timer;
      while (!disarmed && timer.seconds() * 1000 < double(limit.count()))
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      if (disarmed) return;
      print_error_line("error: " + message);
      std::_Exit(1);
    });
  }
  ~Watchdog() { disarmed = true, thread.join(); }
};

// What this rank's watch threads have seen. Times are seconds on `clock`. Never destroyed:
// detached threads use it until the process ends.
struct PeerWatch {
  std::mutex mutex;
  Timer clock;
  std::vector<int64_t> beats;                    // every rank's counter at the last read
  std::vector<double> moved_at;                  // when each counter was first seen at that value
  std::vector<double> stall_from, stall_to;      // each rank's latest stall of kStallSeconds or more
  std::vector<int64_t> failed;                   // per rank: 0, kFailedCall or kFailedOwnError
  double read_at = 0, ticked_at = 0;             // the last round of reads (0: none); the launcher watch's tick
  std::string store_lost;                        // why the store connection broke, once it did
  double paused_from = 0, paused_to = 0;         // this process's latest pause (SIGSTOP)
  std::atomic<int> failing{0};                   // this rank reports a failure of this kind
  std::atomic<bool> marked{false};               // and the store knows
};
inline PeerWatch& peer_watch() {
  static auto* watch = new PeerWatch;
  return *watch;
}

// One round of reads. Counters only grow, so one that reads the same as before stood still
// the whole time; one that moved stood still at least until the previous read.
inline void record_beats(PeerWatch& w, const std::vector<int64_t>& beats) {
  std::lock_guard<std::mutex> lock(w.mutex);
  const double now = w.clock.seconds(), previous = w.read_at;
  for (size_t r = 0; r < beats.size(); ++r) {
    w.failed[r] = beats[r] / kFailedMark;
    if (beats[r] == w.beats[r]) continue;
    if (previous - w.moved_at[r] >= kStallSeconds) w.stall_from[r] = w.moved_at[r], w.stall_to[r] = previous;
    w.beats[r] = beats[r];
    w.moved_at[r] = now;
  }
  w.read_at = now;
}

// The heartbeat thread: beat, read every counter, sleep. When rank 0 is stopped its store does
// not answer and this thread waits with it (the reads stop: describe_lost_ranks sees that).
inline void start_heartbeat(int rank, int world_size, const std::string& host, uint16_t port) {
  PeerWatch& w = peer_watch();
  {
    std::lock_guard<std::mutex> lock(w.mutex);
    w.beats.assign(world_size, -1);
    w.moved_at.assign(world_size, w.clock.seconds());
    w.stall_from.assign(world_size, 0), w.stall_to.assign(world_size, 0);
    w.failed.assign(world_size, 0);
    w.read_at = w.clock.seconds();
  }
  std::thread([&w, rank, world_size, host, port] {
    try {
      c10d::TCPStoreOptions o;
      o.port = port;
      o.timeout = std::chrono::seconds(10);
      auto store = c10::make_intrusive<c10d::TCPStore>(host, o);
      auto key = [](int r) { return fmt::format("lightron/alive/{}", r); };
      for (;;) {
        if (w.failing && !w.marked) store->add(key(rank), kFailedMark * w.failing), w.marked = true;
        store->add(key(rank), 1);
        std::vector<int64_t> beats;
        for (int r = 0; r < world_size; ++r) beats.push_back(store->add(key(r), 0));
        record_beats(w, beats);
        std::this_thread::sleep_for(std::chrono::duration<double>(kBeatSeconds));
      }
    } catch (const std::exception& e) {  // the store is gone: rank 0 exited or died
      std::lock_guard<std::mutex> lock(w.mutex);
      w.store_lost = first_line(e.what());
    } catch (...) {
      std::lock_guard<std::mutex> lock(w.mutex);
      w.store_lost = "an unknown error";
    }
  }).detach();
}

// ---- the launcher, and this process's own pauses ---------------------------------------

// The parent process when the watch started, and its name; 0: not watched.
struct Launcher {
  pid_t pid = 0;
  std::string name;
};
inline Launcher& launcher() {
  static Launcher l;
  return l;
}

// Ends this rank with one line when its launcher is gone: it was adopted by init (or a
// subreaper), and nobody would stop it. Called by the watch thread and before a checkpoint
// is committed, so that an orphan writes none.
inline void stop_if_launcher_gone() {
  const Launcher& l = launcher();
  if (l.pid <= 1 || getppid() == l.pid) return;
  print_error_line(rank_error(fmt::format("its launcher {}(pid {}) is gone; stopping", l.name.empty() ? "" : l.name + " ",
                                          l.pid)));
  std::_Exit(1);
}

// Starts (once) the thread that watches the launcher and notices this process's own pauses: a
// loop that never blocks on anything but its clock. Nothing to watch when the parent is
// init (pid 1) from the start, or with LIGHTRON_NO_LAUNCHER_WATCH=1 (ranks whose starter exits
// on purpose, leaving them running).
inline void watch_launcher() {
  static std::once_flag once;
  std::call_once(once, [] {
    const char* off = std::getenv("LIGHTRON_NO_LAUNCHER_WATCH");
    if (off == nullptr || std::string(off).empty() || std::string(off) == "0") {
      launcher().pid = getppid();
      std::ifstream(fmt::format("/proc/{}/comm", launcher().pid)) >> launcher().name;
    }
    PeerWatch& w = peer_watch();
    std::thread([&w] {
      double last = w.clock.seconds();
      for (;;) {
        std::this_thread::sleep_for(std::chrono::milliseconds(250));
        stop_if_launcher_gone();
        const double now = w.clock.seconds();
        std::lock_guard<std::mutex> lock(w.mutex);
        if (now - last >= kStallSeconds) w.paused_from = last, w.paused_to = now;  // the whole process stood still
        w.ticked_at = last = now;
      }
    }).detach();
  });
}

// ---- after a failure: who is at fault --------------------------------------------------

struct Verdict {
  bool sure = false;  // false: nobody looks stopped yet; watch a little longer
  std::string text;
  bool reported_elsewhere = false;  // a rank that met an error of its own says it
};

// Ranks that are stopped: their counters stand still now (for how long), or stood still for
// kStallSeconds or more at some time after `since` (then resumed). Ranks that reported a
// failure are not suspects.
inline std::vector<int> stopped_ranks(const PeerWatch& w, int rank, double since, double& longest, bool& resumed) {
  std::vector<int> stopped;
  for (int r = 0; r < int(w.beats.size()); ++r) {
    if (r == rank || w.failed[r]) continue;
    if (w.read_at - w.moved_at[r] >= kStallSeconds) {
      stopped.push_back(r), longest = std::max(longest, w.read_at - w.moved_at[r]);
    } else if (w.stall_to[r] >= since && w.stall_to[r] > w.stall_from[r]) {
      stopped.push_back(r), longest = std::max(longest, w.stall_to[r] - w.stall_from[r]), resumed = true;
    }
  }
  return stopped;
}

// What the watch says about a call that waited since `since`: this rank's own pause, a rank
// that is stopped (rank 0's shows as a store that does not answer), one that failed with an
// error of its own, or, when none of these shows within a few seconds, the ranks whose
// collective calls failed too.
inline Verdict judge(PeerWatch& w, int rank, double since) {
  std::lock_guard<std::mutex> lock(w.mutex);
  const double now = w.clock.seconds();
  if (now - w.ticked_at > 0.75)  // this process was paused just now, and the watch has yet to see it
    return {false, "this rank's own watch lags behind (is the machine overloaded?)"};
  if (w.paused_to > w.paused_from && w.paused_to >= since - 1)
    return {true, fmt::format("this rank itself was stopped for {:.1f} s (SIGSTOP, or a paused machine), and its peers "
                              "gave up waiting for it", w.paused_to - w.paused_from)};
  double longest = 0;
  bool resumed = false;
  const std::vector<int> stopped = stopped_ranks(w, rank, since, longest, resumed);
  std::vector<int> own_error, failed_call;
  for (int r = 0; r < int(w.beats.size()); ++r)
    if (r != rank && w.failed[r]) (w.failed[r] == kFailedOwnError ? own_error : failed_call).push_back(r);
  const std::string left = w.store_lost.empty() ? "" : "; rank 0 (the store host) has left since";
  if (!stopped.empty())
    return {true, fmt::format("no heartbeat from rank(s) {} for {:.1f} s{}: stopped or lost{}", fmt::join(stopped, ","),
                              longest, resumed ? " (then resumed)" : "", left)};
  if (!own_error.empty())
    return {true, fmt::format("rank(s) {} failed with an error of their own", fmt::join(own_error, ",")), true};
  if (!w.store_lost.empty())
    return {true, fmt::format("rank 0 (the store host) {}: its store closed the connection ({})",
                              w.failed.at(0) ? "left after its own failure" : "is lost", w.store_lost)};
  if (now - w.read_at >= kStallSeconds)
    return {true, fmt::format("rank 0 (the store host) does not answer for {:.1f} s: it is stopped or lost",
                              now - w.read_at)};
  if (!failed_call.empty())
    return {false, fmt::format("rank(s) {} failed a call too (see their messages)", fmt::join(failed_call, ","))};
  return {false, "every rank's heartbeat goes on: none is stopped or lost (is one stuck, or did it skip this call?)"};
}

// Marks this rank as failed (`kind`) in the store (the heartbeat thread does, within a beat) and
// waits for it, up to 1.5 s and only while the store answers: ranks that judge later then know
// that this one reported its own failure, and do not call it stopped or lost.
inline void announce_failure_and_wait(int kind) {
  PeerWatch& w = peer_watch();
  w.failing = kind;
  const auto store_answers = [&w] {
    std::lock_guard<std::mutex> lock(w.mutex);
    return w.store_lost.empty() && w.clock.seconds() - w.read_at < 1.0;
  };
  for (const Timer t; !w.marked && t.seconds() < 1.5 && store_answers();)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
}

// describe_lost_ranks for a rank with a heartbeat (or: its launcher is gone): watches up to 3 s
// until someone looks stopped (a rank dead just now needs kStallSeconds) or reports an error.
inline LostRanks describe_from_heartbeats(int rank, double waited) {
  stop_if_launcher_gone();  // the root cause, when the launcher took the others with it
  PeerWatch& w = peer_watch();
  w.failing = kFailedCall;  // the mark goes out while we watch
  const Timer timer;
  const double since = w.clock.seconds() - waited;
  Verdict v = judge(w, rank, since);
  while (!v.sure && timer.seconds() < 3.0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    stop_if_launcher_gone();
    v = judge(w, rank, since);
  }
  announce_failure_and_wait(kFailedCall);
  return {v.text, v.reported_elsewhere};
}

// rank0_says_it through the store: rank 0 publishes the bad input it reported; another rank
// waits up to 2 s for it (less when rank 0 fails a collective call meanwhile: under mpirun its
// exit would end this rank before it speaks) and keeps quiet only when it is the same text.
// Store calls run on a helper thread, so that a stopped rank 0 cannot hold this rank.
inline void share_bad_input_through(const c10::intrusive_ptr<c10d::Store>& store) {
  rank0_says_it() = [store](const std::string& what) {
    const std::string key = "lightron/bad_input/0";
    auto same = std::make_shared<std::atomic<int>>(-1);  // -1: no answer yet, 0: no, 1: yes
    std::thread([store, key, what, same, rank = global_rank()] {
      int answer = 0;
      try {
        if (rank == 0) store->set(key, std::vector<uint8_t>(what.begin(), what.end()));
        for (const Timer t; rank != 0 && t.seconds() < 2.0; std::this_thread::sleep_for(std::chrono::milliseconds(50))) {
          if (store->check({key})) {
            const auto said = store->get(key);
            answer = std::string(said.begin(), said.end()) == what;
            break;
          }
          if (store->add("lightron/alive/0", 0) / kFailedMark == kFailedCall) break;  // rank 0 fails another way
        }
      } catch (...) {  // the store is gone: this rank speaks for itself
      }
      *same = answer;
    }).detach();
    for (const Timer t; *same < 0 && t.seconds() < 3.0;) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    return *same == 1;
  };
}

}  // namespace lightron
