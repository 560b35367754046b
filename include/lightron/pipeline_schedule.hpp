// lightron/pipeline_schedule.hpp — pipeline parallelism, part 2: running m micro-batches
// through the stages. Each rank executes a list of actions, F(micro-batch, chunk) and
// B(micro-batch, chunk), in three phases — warm-up: forwards only; steady: one forward,
// one backward; cool-down: backwards only — whose lengths make the schedule:
//   afab        all forwards, then all backwards (GPipe): m activations in flight;
//   1f1b        p - s - 1 warm-up forwards on stage s, then one forward / one backward,
//               then the remaining backwards (PipeDream-flush): at most p in flight;
//   interleaved 1f1b over v chunks per rank (Megatron-LM, arXiv:2104.04473): the bubble
//               shrinks from (p-1)/(m+p-1) to (p-1)/(v·m+p-1) of the step.
// Activations go forward and gradients backward through point-to-point calls of the
// collectives wrapper. Sends are posted and waited for at the end of the step, receives
// are waited for when their data is needed, and every message has its own tag, so no
// order of posting can deadlock a ring (pipeline_engine.hpp runs the lists). Chapter 3.
#pragma once

#include "pipeline_parallel.hpp"

#include <algorithm>
#include <map>
#include <tuple>

namespace lightron {

struct PipelineAction {
  bool forward;
  int64_t micro_batch, chunk;
};

// How many forwards stage s runs in its warm-up, before the steady phase's first forward
// and first backward (m micro-batches, p ranks, v chunks each): AFAB runs all of them;
// 1F1B fills the pipeline behind it (p - s - 1); interleaved 1F1B fills it per chunk too.
// [snippet: warmup_forwards]
inline int64_t warmup_forwards(const std::string& schedule, int64_t m, int64_t p, int64_t v, int64_t s) {
  const int64_t total = m * v;
  if (schedule == "afab") return total;
  if (v == 1) return std::min(p - s - 1, total);
  return std::min((p - s - 1) * 2 + (v - 1) * p, total);
}
// [end snippet: warmup_forwards]

// Activations of (micro-batch, chunk) pairs that stage s holds at once, its forwards before
// the first backward: the warm-up and the steady phase's first (all when there is none).
inline int64_t chunks_in_flight(const std::string& schedule, int64_t m, int64_t p, int64_t v, int64_t s) {
  return std::min(m * v, warmup_forwards(schedule, m, p, v, s) + 1);
}

// The k-th forward (or backward) of a rank with v chunks, in Megatron's order: micro-batches
// go in groups of p through chunk 0, then chunk 1, …; backwards visit the chunks in reverse.
// With v = 1 it is micro-batch k.
inline PipelineAction chunk_unit(int64_t k, bool forward, int64_t p, int64_t v) {
  const int64_t chunk = (k / p) % v;
  return {forward, (k / (p * v)) * p + k % p, forward ? chunk : v - 1 - chunk};
}

// AFAB (GPipe): the warm-up is every forward, there is no steady phase, the cool-down is
// every backward.
inline std::vector<PipelineAction> afab_actions(int64_t m, int64_t p, int64_t v) {
  std::vector<PipelineAction> actions;
  for (int64_t k = 0; k < m * v; ++k) actions.push_back(chunk_unit(k, /*forward=*/true, p, v));
  for (int64_t k = 0; k < m * v; ++k) actions.push_back(chunk_unit(k, /*forward=*/false, p, v));
  return actions;
}

// 1F1B (PipeDream-flush), stage s: p - s - 1 forwards fill the pipeline; then each forward
// is followed by the backward of the micro-batch that entered warmup forwards earlier; the
// cool-down drains the last warm-up's worth of backwards.
// [snippet: one_f_one_b_actions]
inline std::vector<PipelineAction> one_f_one_b_actions(int64_t m, int64_t p, int64_t s) {
  const int64_t warmup = warmup_forwards("1f1b", m, p, /*v=*/1, s);
  std::vector<PipelineAction> actions;
  auto F = [&](int64_t b) { actions.push_back({true, b, 0}); };
  auto B = [&](int64_t b) { actions.push_back({false, b, 0}); };
  for (int64_t b = 0; b < warmup; ++b) F(b);  // warm-up
  for (int64_t b = warmup; b < m; ++b) {      // steady
    F(b);
    B(b - warmup);
  }
  for (int64_t b = m - warmup; b < m; ++b) B(b);  // cool-down
  return actions;
}
// [end snippet: one_f_one_b_actions]

// Interleaved 1F1B (Megatron-LM): the same three phases over the m·v (micro-batch, chunk)
// units of chunk_unit, with a longer warm-up (warmup_forwards).
inline std::vector<PipelineAction> interleaved_1f1b_actions(int64_t m, int64_t p, int64_t v, int64_t s) {
  const int64_t total = m * v, warmup = warmup_forwards("1f1b", m, p, v, s);
  std::vector<PipelineAction> actions;
  auto F = [&](int64_t k) { actions.push_back(chunk_unit(k, true, p, v)); };
  auto B = [&](int64_t k) { actions.push_back(chunk_unit(k, false, p, v)); };
  for (int64_t k = 0; k < warmup; ++k) F(k);  // warm-up
  for (int64_t k = warmup; k < total; ++k) {  // steady
    F(k);
    B(k - warmup);
  }
  for (int64_t k = total - warmup; k < total; ++k) B(k);  // cool-down
  return actions;
}

// Stage s's actions for m micro-batches on p ranks with v chunks each.
// [snippet: pipeline_actions]
inline std::vector<PipelineAction> pipeline_actions(const std::string& schedule, int64_t m, int64_t p, int64_t v,
                                                    int64_t s) {
  if (schedule == "afab") return afab_actions(m, p, v);
  if (v == 1) return one_f_one_b_actions(m, p, s);
  return interleaved_1f1b_actions(m, p, v, s);
}
// [end snippet: pipeline_actions]

inline double theoretical_bubble(int64_t m, int64_t p, int64_t v) { return double(p - 1) / double(v * m + p - 1); }

// Replays the schedule with each action's measured cost, as if every stage had a device of
// its own and messages were free: F(b, chunk k) waits for F(b, k-1), B(b, k) for B(b, k+1).
// Returns the bubble, 1 - Σ costs / (p · makespan), or -1 if the schedule deadlocks.
// (On a 2-core machine running 4 ranks, wall-clock idle time mixes the bubble with CPU
// time-sharing between ranks; the replay takes the time-sharing out.)
inline double replay_bubble(const std::string& schedule, int64_t m, int64_t p, int64_t v,
                            const std::vector<std::vector<double>>& costs) {
  std::map<std::tuple<bool, int64_t, int64_t>, double> done;  // (forward, micro-batch, global chunk) -> end
  std::vector<std::vector<PipelineAction>> actions;
  for (int64_t s = 0; s < p; ++s) actions.push_back(pipeline_actions(schedule, m, p, v, s));
  std::vector<size_t> next(p, 0);
  std::vector<double> clock(p, 0.0);
  double busy = 0;
  for (bool progress = true; progress;) {
    progress = false;
    for (int64_t s = 0; s < p; ++s) {
      if (next[s] == actions[s].size()) continue;
      const auto& a = actions[s][next[s]];
      const int64_t gc = a.chunk * p + s, dep = a.forward ? gc - 1 : gc + 1;
      double ready = 0;
      if (dep >= 0 && dep < p * v) {
        auto it = done.find({a.forward, a.micro_batch, dep});
        if (it == done.end()) continue;  // its message has not been sent yet
        ready = it->second;
      }
      const double cost = costs[s][next[s]];
      clock[s] = std::max(clock[s], ready) + cost;
      busy += cost;
      done[{a.forward, a.micro_batch, gc}] = clock[s];
      ++next[s];
      progress = true;
    }
  }
  for (int64_t s = 0; s < p; ++s)
    if (next[s] != actions[s].size()) return -1.0;
  return 1.0 - busy / (double(p) * *std::max_element(clock.begin(), clock.end()));
}

}  // namespace lightron
