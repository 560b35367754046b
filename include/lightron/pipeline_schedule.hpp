// lightron/pipeline_schedule.hpp — pipeline parallelism, part 2: running m micro-batches
// through the stages. Each rank executes a list of actions, F(micro-batch, chunk) and
// B(micro-batch, chunk), in one of three orders:
//   afab        all forwards, then all backwards (GPipe): m activations in flight;
//   1f1b        p - s - 1 warm-up forwards on stage s, then one forward / one backward,
//               then the remaining backwards (PipeDream-flush): at most p in flight;
//   interleaved 1f1b over v chunks per rank (Megatron-LM, arXiv:2104.04473): the bubble
//               shrinks from (p-1)/(m+p-1) to (p-1)/(v·m+p-1) of the step.
// Activations go forward and gradients backward through point-to-point calls of the
// collectives wrapper. Sends are posted and waited for at the end of the step, receives
// are waited for when their data is needed, and every message has its own tag, so no
// order of posting can deadlock a ring. Each action's start and end, and each wait for a
// message, are recorded on a timeline. Tutorial stage 3.
#pragma once

#include "data.hpp"  // Batch: a micro-batch of token ids and labels
#include "pipeline_parallel.hpp"

#include <time.h>  // clock_gettime: CPU time of this thread

#include <algorithm>
#include <optional>

namespace lightron {

struct PipelineAction {
  bool forward;
  int64_t micro_batch, chunk;
};

// Stage s's actions for m micro-batches on p ranks with v chunks each.
inline std::vector<PipelineAction> pipeline_actions(const std::string& schedule, int64_t m, int64_t p, int64_t v,
                                                    int64_t s) {
  const int64_t total = m * v;
  // Unit k: micro-batches go in groups of p through chunk 0, then chunk 1, … (Megatron).
  auto unit = [&](int64_t k, bool forward) {
    const int64_t chunk = (k / p) % v;
    return PipelineAction{forward, (k / (p * v)) * p + k % p, forward ? chunk : v - 1 - chunk};
  };
  int64_t warmup = schedule == "afab" ? total : v == 1 ? p - s - 1 : (p - s - 1) * 2 + (v - 1) * p;
  warmup = std::min(warmup, total);
  std::vector<PipelineAction> actions;
  for (int64_t k = 0; k < warmup; ++k) actions.push_back(unit(k, true));
  for (int64_t k = warmup; k < total; ++k) {
    actions.push_back(unit(k, true));
    actions.push_back(unit(k - warmup, false));
  }
  for (int64_t k = total - warmup; k < total; ++k) actions.push_back(unit(k, false));
  return actions;
}

inline double theoretical_bubble(int64_t m, int64_t p, int64_t v) { return double(p - 1) / double(v * m + p - 1); }

inline double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

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

struct PipelineEvent {
  std::string kind;  // "F", "B" or "wait" (for a message)
  int64_t micro_batch, chunk;
  double start, end;  // seconds since the step began (after a barrier of the pp group)
  double cpu = 0;     // CPU seconds of this thread during the action (F and B)
};

class PipelineEngine {
 public:
  // Keeps copies of the stage (it shares the model) and of the groups: nothing to dangle.
  PipelineEngine(const PipelineStage& stage, const ProcessGroups& g, int64_t hidden, int64_t seq_divisor)
      : stage_(stage), g_(g), hidden_(hidden), seq_divisor_(seq_divisor) {}

  // Forward (and backward, if `train`) of every micro-batch; returns the mean loss over
  // the micro-batches on every pipeline rank (computed on the last stage, then broadcast).
  torch::Tensor run(const std::vector<Batch>& micro, const std::string& schedule, bool train) {
    const int64_t m = int64_t(micro.size()), p = stage_.pp_size, v = stage_.num_virtual;
    auto actions = pipeline_actions(schedule, m, p, v, stage_.pp_rank);
    if (!train) {  // evaluation: forwards only, in order
      actions.erase(std::remove_if(actions.begin(), actions.end(), [](auto& a) { return !a.forward; }), actions.end());
      std::sort(actions.begin(), actions.end(), [&](auto& a, auto& b) { return global(a) < global(b); });
    }
    std::optional<torch::NoGradGuard> no_grad;
    if (!train) no_grad.emplace();
    inputs_.assign(v, std::vector<torch::Tensor>(m));
    outputs_ = inputs_;
    total_ = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(micro.at(0).tokens.device()));
    timeline.clear();
    in_flight_ = peak_in_flight = 0;
    barrier(g_.pp);
    clock_.reset();
    schedule_ = schedule;
    micro_batches_ = m;
    for (const auto& a : actions) {
      const double start = clock_.seconds(), cpu = thread_cpu_seconds();
      a.forward ? forward(a, micro, m, train) : backward(a);
      timeline.push_back({a.forward ? "F" : "B", a.micro_batch, a.chunk, start, clock_.seconds(),
                          thread_cpu_seconds() - cpu});
    }
    for (auto& s : sends_) s.wait();
    sends_.clear();
    step_seconds = clock_.seconds();
    broadcast(g_.pp, total_, int(p - 1));
    return total_;
  }

  // 1 - (time computing) / (step time): the measured bubble of the last run on this rank.
  double measured_bubble() const {
    double busy = 0;
    for (const auto& e : timeline)
      if (e.kind != "wait") busy += e.end - e.start - waited_inside(e);
    return 1.0 - busy / step_seconds;
  }

  // The last run's schedule replayed with every stage's measured CPU cost per action
  // (a collective over the pp group); see replay_bubble.
  double replayed_bubble() const {
    std::vector<double> mine;
    for (const auto& e : timeline)
      if (e.kind != "wait") mine.push_back(e.cpu);
    auto all = all_gather(g_.pp, torch::tensor(mine, torch::kDouble).unsqueeze(0), 0);  // (p, actions)
    std::vector<std::vector<double>> costs(all.size(0));
    for (int64_t s = 0; s < all.size(0); ++s) {
      auto row = all[s].contiguous();
      costs[s].assign(row.data_ptr<double>(), row.data_ptr<double>() + row.numel());
    }
    return replay_bubble(schedule_, micro_batches_, stage_.pp_size, stage_.num_virtual, costs);
  }

  std::string timeline_json(int64_t iteration) const {
    std::string out;
    for (const auto& e : timeline)
      out += fmt::format("{{\"iteration\": {}, \"rank\": {}, \"pp_rank\": {}, \"kind\": \"{}\", \"micro_batch\": {}, "
                         "\"chunk\": {}, \"start\": {:.6f}, \"end\": {:.6f}, \"cpu\": {:.6f}}}\n",
                         iteration, g_.rank, stage_.pp_rank, e.kind, e.micro_batch, e.chunk, e.start, e.end, e.cpu);
    return out;
  }

  std::vector<PipelineEvent> timeline;
  int64_t peak_in_flight = 0;  // micro-batches whose activations were held at once
  double step_seconds = 0;

 private:
  int64_t global(const PipelineAction& a) const { return a.micro_batch * stage_.pp_size * stage_.num_virtual + stage_.global_chunk(a.chunk); }
  // Every message has a tag of its own: (micro-batch, receiving chunk, direction).
  int tag(int64_t micro_batch, int64_t global_chunk, bool gradient) const {
    return int((micro_batch * stage_.pp_size * stage_.num_virtual + global_chunk) * 2 + (gradient ? 1 : 0));
  }
  int prev() const { return int((stage_.pp_rank + stage_.pp_size - 1) % stage_.pp_size); }
  int next() const { return int((stage_.pp_rank + 1) % stage_.pp_size); }

  torch::Tensor receive(const torch::Tensor& like, int from, int message_tag, const PipelineAction& a) {
    auto t = torch::empty_like(like);
    const double start = clock_.seconds();
    recv_async(g_.pp, t, from, message_tag).wait();
    timeline.push_back({"wait", a.micro_batch, a.chunk, start, clock_.seconds()});
    return t;
  }

  void forward(const PipelineAction& a, const std::vector<Batch>& micro, int64_t m, bool train) {
    const auto& batch = micro[a.micro_batch];
    const int64_t gc = stage_.global_chunk(a.chunk);
    torch::Tensor x = batch.tokens;
    if (!stage_.is_first_chunk(a.chunk)) {
      auto shape = torch::empty({batch.tokens.size(0), batch.tokens.size(1) / seq_divisor_, hidden_},
                                torch::TensorOptions().device(batch.tokens.device()));
      x = receive(shape, prev(), tag(a.micro_batch, gc, false), a).requires_grad_(train);
    }
    auto y = stage_.forward_chunk(a.chunk, x);
    if (stage_.is_last_chunk(a.chunk)) {
      y = stage_.loss(y, batch.labels) / double(m);
      total_ += y.detach().to(torch::kDouble);
    } else {
      sends_.push_back(send_async(g_.pp, y.detach().contiguous(), next(), tag(a.micro_batch, gc + 1, false)));
    }
    if (!train) return;
    inputs_[a.chunk][a.micro_batch] = x;
    outputs_[a.chunk][a.micro_batch] = y;
    peak_in_flight = std::max(peak_in_flight, ++in_flight_);
  }

  void backward(const PipelineAction& a) {
    auto& x = inputs_[a.chunk][a.micro_batch];
    auto& y = outputs_[a.chunk][a.micro_batch];
    const int64_t gc = stage_.global_chunk(a.chunk);
    if (stage_.is_last_chunk(a.chunk)) y.backward();
    else y.backward(receive(y, next(), tag(a.micro_batch, gc, true), a));
    if (!stage_.is_first_chunk(a.chunk))
      sends_.push_back(send_async(g_.pp, x.grad().contiguous(), prev(), tag(a.micro_batch, gc - 1, true)));
    x = y = torch::Tensor();  // this micro-batch's activations are freed
    --in_flight_;
  }

  // Time a recorded action spent waiting for a message (recorded separately).
  double waited_inside(const PipelineEvent& e) const {
    double w = 0;
    for (const auto& x : timeline)
      if (x.kind == "wait" && x.start >= e.start && x.end <= e.end) w += x.end - x.start;
    return w;
  }

  PipelineStage stage_;
  ProcessGroups g_;
  int64_t hidden_, seq_divisor_;
  std::vector<std::vector<torch::Tensor>> inputs_, outputs_;
  std::vector<Pending> sends_;
  torch::Tensor total_;
  int64_t in_flight_ = 0;
  Timer clock_;
  std::string schedule_;
  int64_t micro_batches_ = 0;
};

}  // namespace lightron
