// lightron/guards.hpp — what stands between a long run and the faults it meets, at the one
// place every rank passes together: after the gradient reductions, before the update.
//   * NaN/inf (--check-for-nan-in-loss-and-grad, on by default): each rank notes its own loss
//     and gradients *before* any all-reduce mixes in other ranks' (NonFiniteProbe; with
//     buckets, as each bucket's all-reduce starts). A non-finite value anywhere makes the
//     reduced loss or gradient norm non-finite on every rank, so every rank stops before the
//     update, and the first rank whose own numbers were non-finite names them: the rank, the
//     parameter (or "the loss") and the iteration. The weights and the last checkpoint are
//     untouched.
//   * Loss spikes (--skip-spike-factor K, opt-in): an update whose loss or gradient norm is
//     above K x the median of the last --skip-spike-window accepted ones is skipped on every
//     rank alike (one all-reduce of a flag) and counted; training goes on with the next batch.
//   * Ending early and cleanly (EarlyExit): --exit-signal-handler (SIGTERM, SIGINT, SIGUSR1:
//     finish the iteration, save, exit 0; a second signal exits at once), --exit-interval N
//     and --exit-duration-in-mins M, as in Megatron-LM; every rank agrees on the iteration.
// Leaves out: rewinding to a checkpoint and skipping the data around a spike (PaLM's recipe):
// a teacher's run is short enough to restart by hand. Introduced with the resilience notes
// of chapter 5.
#pragma once

#include "data_parallel.hpp"

#include <pthread.h>
#include <signal.h>
#include <unistd.h>  // write, _exit

#include <atomic>
#include <cstdio>  // sscanf
#include <deque>
#include <limits>
#include <memory>
#include <mutex>  // call_once
#include <thread>

namespace lightron {

// The lowest rank of `world` for which `mine` is true (world.size if none): the one that speaks
// for a failure several ranks may see, so that the user reads one line.
inline int first_rank_that(const Group& world, bool mine) {
  auto flag = torch::tensor({mine ? int64_t(world.size - world.rank) : int64_t(0)}, torch::kLong);
  all_reduce_max(world, flag);
  return world.size - int(flag.item<int64_t>());
}

// Every rank runs a check of its own (a path it writes, its share of the data): the first rank
// that failed reports the whole job's failure (exit 2), the others exit quietly.
inline void agree_on_failure(const Group& world, const std::string& my_failure) {
  const int speaker = first_rank_that(world, !my_failure.empty());
  if (speaker == world.size) return;
  if (speaker == world.rank) throw LocalUsageError(my_failure);
  throw ReportedElsewhere("reported by rank " + std::to_string(speaker));
}

// This rank's own loss and gradients, noted before any reduction (one norm per tensor).
class NonFiniteProbe {
 public:
  void reset() {
    records_.clear();
    loss_ = torch::Tensor();
  }
  void note_loss(const torch::Tensor& local_loss) { loss_ = local_loss.detach().clone(); }
  void note_gradients(const std::vector<std::string>& names, const std::vector<torch::Tensor>& grads) {
    std::vector<std::string> held;
    std::vector<torch::Tensor> defined;
    for (size_t i = 0; i < grads.size(); ++i)
      if (grads[i].defined()) {
        held.push_back(names[i]);
        defined.push_back(grads[i].detach());
      }
    if (!defined.empty()) records_.push_back({held, torch::stack(at::_foreach_norm(defined))});
  }
  // "the loss", "the gradient of NAME" (and how many more), or "" when all were finite here.
  std::string culprit() const {
    if (loss_.defined() && !torch::isfinite(loss_).all().item<bool>()) return "the loss";
    std::vector<std::string> bad;
    for (const auto& [names, norms] : records_) {
      const auto finite = torch::isfinite(norms).to(torch::kCPU);
      for (size_t i = 0; i < names.size(); ++i)
        if (!finite[int64_t(i)].item<bool>()) bad.push_back(names[i]);
    }
    if (bad.empty()) return "";
    return fmt::format("the gradient of {}{}", bad.front(),
                       bad.size() > 1 ? fmt::format(" (and {} more)", bad.size() - 1) : std::string());
  }

 private:
  struct Record {
    std::vector<std::string> names;
    torch::Tensor norms;  // (n,) one 2-norm per gradient: NaN or inf when it holds one
  };
  std::vector<Record> records_;
  torch::Tensor loss_;
};

// The running medians of the last `window` accepted losses and gradient norms.
class SpikeRule {
 public:
  SpikeRule(double factor, int64_t window) : factor_(factor), window_(size_t(window)) {}
  bool enabled() const { return factor_ > 0; }
  // Judged once the window is full; a spike is above factor x the median.
  bool is_spike(double loss, double norm) const {
    if (!enabled() || losses_.size() < window_) return false;
    return loss > factor_ * median(losses_) || norm > factor_ * median(norms_);
  }
  void accept(double loss, double norm) {
    losses_.push_back(loss);
    norms_.push_back(norm);
    if (losses_.size() > window_) {
      losses_.pop_front();
      norms_.pop_front();
    }
  }
  std::string describe(double loss, double norm) const {
    return fmt::format("loss {:.4f} (median {:.4f}), grad norm {:.3f} (median {:.3f}), factor {}", loss,
                       median(losses_), norm, median(norms_), factor_);
  }

 private:
  static double median(std::deque<double> values) {
    if (values.empty()) return 0;
    auto mid = values.begin() + values.size() / 2;
    std::nth_element(values.begin(), mid, values.end());
    return *mid;
  }
  double factor_;
  size_t window_;
  std::deque<double> losses_, norms_;
};

// The decision after the reductions, made alike on every rank. Not copyable or movable: the
// bucket hook of watch() points at it (hold it in a unique_ptr, as Trainer does).
class UpdateGuard {
 public:
  using NamedParams = std::vector<std::pair<std::string, torch::Tensor>>;
  UpdateGuard(bool check_for_nan, double spike_factor, int64_t spike_window)
      : check_for_nan_(check_for_nan), spike_(spike_factor, spike_window) {}
  UpdateGuard(const UpdateGuard&) = delete;
  UpdateGuard& operator=(const UpdateGuard&) = delete;
  bool checks_anything() const { return check_for_nan_ || spike_.enabled(); }

  // With buckets, each bucket's gradients are noted as its all-reduce starts.
  void watch(BucketedDataParallel* ddp) {
    if (ddp == nullptr || !check_for_nan_) return;
    ddp->inspect_before_all_reduce([probe = &probe_](const auto& names, const auto& grads) {
      probe->note_gradients(names, grads);
    });
  }
  void start_step(int64_t iteration) {
    iteration_->store(iteration);
    probe_.reset();
  }
  // After backward, before any reduction: this rank's own loss (if it computed one: a
  // pipeline's last stage) and, unless watch() notes them bucket by bucket, its gradients.
  void note_own_numbers(const torch::Tensor& loss, const NamedParams& named, bool bucketed) {
    if (!check_for_nan_) return;
    if (loss.defined()) probe_.note_loss(loss);
    if (bucketed) return;
    std::vector<std::string> names;
    std::vector<torch::Tensor> grads;
    for (const auto& [name, p] : named) {
      names.push_back(name);
      grads.push_back(p.grad());
    }
    probe_.note_gradients(names, grads);
  }
  // The iteration under way (for plant_test_fault's hook).
  std::shared_ptr<std::atomic<int64_t>> iteration() const { return iteration_; }

  // True: take the update. A non-finite loss or norm throws (one rank speaks); a spike
  // returns false on every rank.
  bool allow_update(double loss, double norm, int64_t iteration, const Group& world) {
    if (check_for_nan_ && !(std::isfinite(loss) && std::isfinite(norm))) stop(loss, norm, iteration, world);
    if (!spike_.enabled()) return true;
    auto spike = torch::tensor({spike_.is_spike(loss, norm) ? 1.0 : 0.0});
    all_reduce_max(world, spike);  // one rank's verdict is everybody's
    if (spike.item<double>() > 0) {
      ++skipped_iterations;
      print0(" iteration {}: update skipped (a spike: {})\n", iteration, spike_.describe(loss, norm));
      return false;
    }
    spike_.accept(loss, norm);
    return true;
  }
  int64_t skipped_iterations = 0;

 private:
  [[noreturn]] void stop(double loss, double norm, int64_t iteration, const Group& world) {
    const std::string culprit = probe_.culprit();
    int speaker = first_rank_that(world, !culprit.empty());  // the lowest that saw it first-hand
    if (speaker == world.size) speaker = 0;                     // none did: rank 0 speaks
    if (speaker != world.rank) throw ReportedElsewhere("a non-finite loss or gradient, reported by another rank");
    const std::string what = culprit.empty()
        ? fmt::format("the loss ({}) or the gradient norm ({}) after the reductions (every rank's own numbers were "
                      "finite: an overflow in the sums)", loss, norm)
        : culprit + " on rank " + std::to_string(world.rank);
    throw RuntimeFailure(fmt::format("iteration {}: non-finite value (NaN or inf) in {}; stopped before the update: "
                                     "the weights and the last checkpoint are untouched (lower --lr, or "
                                     "--no-check-for-nan-in-loss-and-grad to train on regardless)", iteration, what));
  }
  bool check_for_nan_;
  SpikeRule spike_;
  NonFiniteProbe probe_;
  std::shared_ptr<std::atomic<int64_t>> iteration_ = std::make_shared<std::atomic<int64_t>>(0);
};

// Test-only: LIGHTRON_TEST_FAULT=nan@ITERATION:RANK (or spike@...) puts a NaN into (or
// multiplies by 1000) one gradient of that rank during that iteration's backward, before any
// reduction: the faults the guards must catch, planted where real ones arise.
inline void plant_test_fault(const std::vector<std::pair<std::string, torch::Tensor>>& named, int rank,
                             std::shared_ptr<std::atomic<int64_t>> iteration) {
  const char* spec = std::getenv("LIGHTRON_TEST_FAULT");
  if (spec == nullptr || named.empty()) return;
  char kind[8] = {};
  long at = 0, on = 0;
  require(std::sscanf(spec, "%7[a-z]@%ld:%ld", kind, &at, &on) == 3 && (kind == std::string("nan") || kind ==
          std::string("spike")), "LIGHTRON_TEST_FAULT={}: expected nan@ITERATION:RANK or spike@ITERATION:RANK", spec);
  if (on != rank) return;
  auto target = named.front().second;
  for (const auto& [name, p] : named)
    if (name.find("mlp") != std::string::npos && p.dim() == 2) target = p;
  const bool nan = kind == std::string("nan");
  target.register_hook([iteration, at, nan](torch::Tensor g) -> torch::Tensor {
    if (iteration->load() != at) return g;
    g = g.clone();
    if (nan) g.view(-1)[0] = std::numeric_limits<float>::quiet_NaN();
    else g.mul_(1000);
    return g;
  });
}

// Why to end the run after this iteration, the same answer on every rank.
class EarlyExit {
 public:
  EarlyExit(bool handle_signals, int64_t exit_interval, double exit_minutes)
      : interval_(exit_interval), minutes_(exit_minutes), signals_(handle_signals) {
    if (signals_) watch_signals();
  }
  // "" to go on; else the reason, e.g. "SIGTERM received" or "--exit-interval 50".
  std::string reason(int64_t iteration, const Group& world) const {
    std::string why = interval_ > 0 && iteration % interval_ == 0 ? fmt::format("--exit-interval {}", interval_) : "";
    if (!signals_ && minutes_ <= 0) return why;
    // a signal reaches ranks at different moments, clocks differ: agree on one answer
    const int sig = signal_received().load();
    auto flags = torch::tensor({double(sig), minutes_ > 0 && started_.seconds() / 60 >= minutes_ ? 1.0 : 0.0});
    all_reduce_max(world, flags);
    if (flags[0].item<double>() > 0) return fmt::format("{} received", signal_name(int(flags[0].item<double>())));
    if (flags[1].item<double>() > 0) return fmt::format("--exit-duration-in-mins {} reached", minutes_);
    return why;
  }

 private:
  static std::atomic<int>& signal_received() {
    static std::atomic<int> sig{0};
    return sig;
  }
  static const char* signal_name(int sig) {
    return sig == SIGTERM ? "SIGTERM" : sig == SIGINT ? "SIGINT" : sig == SIGUSR1 ? "SIGUSR1" : "a signal";
  }
  // The signals are blocked in this thread (and so in every thread started after it: the
  // process groups' and OpenMP's), and one thread waits for them: no system call anywhere is
  // interrupted. The first one is noted; a second ends the process at once.
  static void watch_signals() {
    static std::once_flag once;
    std::call_once(once, [] {
      sigset_t set;
      sigemptyset(&set);
      for (int sig : {SIGTERM, SIGINT, SIGUSR1}) sigaddset(&set, sig);
      pthread_sigmask(SIG_BLOCK, &set, nullptr);
      std::thread([set] {
        for (;;) {
          int sig = 0;
          if (sigwait(&set, &sig) != 0) continue;
          if (signal_received().exchange(sig) != 0) {
            fmt::print(stderr, "{}\n", with_prefix(fmt::format("error: a second signal ({}): exiting now, without "
                                                               "saving", signal_name(sig))));
            std::fflush(stderr);
            std::_Exit(128 + sig);
          }
        }
      }).detach();
    });
  }
  int64_t interval_;
  double minutes_;
  bool signals_;
  Timer started_;
};

}  // namespace lightron
