// lightron/pipeline_engine.hpp — pipeline parallelism, part 3: the engine that runs a
// rank's list of actions (pipeline_schedule.hpp). A forward receives its input from the
// previous stage (unless it is the first chunk), runs the chunk and posts the send of its
// output; a backward receives the output's gradient from the next stage and sends its
// input's gradient back. Sends are waited for at the end of the step, receives when their
// data is needed, and every message has its own tag. With data parallelism too, the
// gradient buckets start their all-reduces during this rank's last backward. Each action's
// start and end, each wait for a message and each bucket's all-reduce are recorded on a
// timeline; the bubble is measured from it and replayed from its CPU costs. Chapter 3.
#pragma once

#include "activation_meter.hpp"  // CountAllocations: the bytes a forward leaves for backward
#include "data.hpp"  // Batch: a micro-batch of token ids and labels
#include "data_parallel.hpp"  // BucketedDataParallel: buckets launched during the last backward
#include "pipeline_schedule.hpp"

#include <time.h>  // clock_gettime: CPU time of this thread

#include <algorithm>
#include <optional>

namespace lightron {

inline double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

struct PipelineEvent {
  std::string kind;  // "F", "B", "wait" (for a message) or "allreduce" (a dp bucket, launch to waited for)
  int64_t micro_batch, chunk;  // for "allreduce": -1 and the bucket's index
  double start, end;  // seconds since the step began (after a barrier of the pp group)
  double cpu = 0;     // CPU seconds of this thread during the action (F and B)
};

class PipelineEngine {
 public:
  // Keeps copies of the stage (it shares the model) and of the groups: nothing to dangle.
  PipelineEngine(const PipelineStage& stage, const ProcessGroups& g, int64_t hidden, int64_t seq_divisor)
      : stage_(stage), g_(g), hidden_(hidden), seq_divisor_(seq_divisor) {}
  PipelineEngine(const PipelineEngine&) = delete;  // the dp hook of run() refers to this engine
  PipelineEngine& operator=(const PipelineEngine&) = delete;

  // Forward (and backward, if `train`) of every micro-batch; returns the mean loss over
  // the micro-batches on every pipeline rank (computed on the last stage, then broadcast).
  // With `ddp`, backwards only accumulate until this rank's last one, whose gradient hooks
  // start the all-reduce of each bucket they complete while backward goes on; ddp->finish()
  // starts the others (chunks whose last backward came earlier) and waits for all of them.
  torch::Tensor run(const std::vector<Batch>& micro, const std::string& schedule, bool train,
                    BucketedDataParallel* ddp = nullptr) {
    const int64_t m = int64_t(micro.size()), p = stage_.pp_size, v = stage_.num_virtual;
    auto actions = pipeline_actions(schedule, m, p, v, stage_.pp_rank);
    if (!train) {  // evaluation: forwards only, in order
      actions.erase(std::remove_if(actions.begin(), actions.end(), [](auto& a) { return !a.forward; }), actions.end());
      std::sort(actions.begin(), actions.end(), [&](auto& a, auto& b) { return global(a) < global(b); });
    }
    std::optional<torch::NoGradGuard> no_grad;
    if (!train) no_grad.emplace();
    // [snippet: engine_dp_overlap]
    BucketedDataParallel::NoSync no_sync;
    if (train && ddp) {
      no_sync = ddp->no_sync();
      // finish() may come after this engine is gone: the hook checks that it is still alive
      ddp->observe_this_step([this, alive = std::weak_ptr<int>(alive_)](size_t bucket, bool done) {
        if (alive.lock()) record_allreduce(bucket, done);
      });
    }
    size_t last_backward = actions.size();
    for (size_t i = 0; i < actions.size(); ++i)
      if (!actions[i].forward) last_backward = i;
    start_step(schedule, micro);
    for (size_t i = 0; i < actions.size(); ++i) {
      const auto& a = actions[i];
      if (i == last_backward) no_sync = {};  // dp: this backward's hooks start the all-reduces
      const double start = clock_.seconds(), cpu = thread_cpu_seconds();
      a.forward ? forward(a, micro, m, train) : backward(a);
      timeline.push_back({a.forward ? "F" : "B", a.micro_batch, a.chunk, start, clock_.seconds(),
                          thread_cpu_seconds() - cpu});
    }
    // [end snippet: engine_dp_overlap]
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
      if (is_action(e)) busy += e.end - e.start - waited_inside(e);
    return 1.0 - busy / step_seconds;
  }

  // The last run's schedule replayed with every stage's measured CPU cost per action
  // (a collective over the pp group); see replay_bubble.
  double replayed_bubble() const {
    std::vector<double> mine;
    for (const auto& e : timeline)
      if (is_action(e)) mine.push_back(e.cpu);
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
  int64_t peak_activation_bytes = 0;  // measured (with CountingCPUAllocator installed), else 0
  double step_seconds = 0;

 private:
  static bool is_action(const PipelineEvent& e) { return e.kind == "F" || e.kind == "B"; }

  void start_step(const std::string& schedule, const std::vector<Batch>& micro) {
    inputs_.assign(stage_.num_virtual, std::vector<torch::Tensor>(micro.size()));
    outputs_ = inputs_;
    total_ = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(micro.at(0).tokens.device()));
    timeline.clear();
    in_flight_ = peak_in_flight = peak_activation_bytes = 0;
    barrier(g_.pp);
    clock_.reset();
    schedule_ = schedule;
    micro_batches_ = int64_t(micro.size());
  }

  // A bucket's all-reduce started (from a gradient hook or finish()), or finish() waited for it.
  void record_allreduce(size_t bucket, bool done) {
    const double now = clock_.seconds();
    if (!done) timeline.push_back({"allreduce", -1, int64_t(bucket), now, now});
    for (auto& e : timeline)
      if (done && e.kind == "allreduce" && e.chunk == int64_t(bucket)) e.end = now;
  }

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

  // [snippet: engine_forward]
  void forward(const PipelineAction& a, const std::vector<Batch>& micro, int64_t m, bool train) {
    const auto& batch = micro[a.micro_batch];
    const int64_t gc = stage_.global_chunk(a.chunk);
    CountAllocations count(activations_);  // what this forward leaves alive for backward
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
    peak_activation_bytes = std::max(peak_activation_bytes, activations_->settled());
  }
  // [end snippet: engine_forward]

  // [snippet: engine_backward]
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
  // [end snippet: engine_backward]

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
  std::shared_ptr<ActivationCounter> activations_ = std::make_shared<ActivationCounter>();
  Timer clock_;
  std::string schedule_;
  std::shared_ptr<int> alive_ = std::make_shared<int>(0);  // expires with the engine (see run)
  int64_t micro_batches_ = 0;
};

}  // namespace lightron
