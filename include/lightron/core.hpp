// lightron/core.hpp — the few things every chapter needs: errors a user can act on, the
// rank prefix for messages, printing once, timing, and process set-up (threads, malloc).
//
// Leaves out: anything about models or ranks' communication (gpt.hpp, process_groups.hpp).
// Introduced in chapter 0.
//
// Legend used for shapes in every header (as trailing comments):
//   B batch (micro-batch), T sequence, C channels (hidden size), V vocabulary,
//   L layers, H attention heads, G key/value groups, D head size (C / H), F ffn size.
#pragma once

#include <torch/torch.h>
#include <fmt/format.h>
#include <fmt/ranges.h>  // fmt::join

#include <malloc.h>  // mallopt

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cctype>  // isdigit
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <exception>  // set_terminate
#include <stdexcept>
#include <string>
#include <thread>  // sleep_for
#include <vector>

namespace lightron {

// Exit code for bad input (a flag, a file, a layout): the user can fix it.
constexpr int kUsageExitCode = 2;

// An error the user caused and can fix. `run_main` prints it as one line and exits 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A UsageError that only this rank met (its own files): printed by this rank, not rank 0.
struct LocalUsageError : UsageError {
  using UsageError::UsageError;
};

// An error of the distributed run itself (a peer died, a collective timed out): exit 1.
struct RuntimeFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An error that another rank reports for the whole job (guards.hpp elects it): this rank
// exits 1 without a line of its own, so that the user reads one line, not one per rank.
struct ReportedElsewhere : RuntimeFailure {
  using RuntimeFailure::RuntimeFailure;
};

// Who is speaking: "[rank 5 | tp 1 dp 0 pp 1]" once process groups exist, "" before.
inline std::string& rank_prefix() {
  static std::string prefix;
  return prefix;
}
// The global rank (0 in a single process); set by process_groups.hpp.
inline int& global_rank() {
  static int rank = 0;
  return rank;
}

inline std::string with_prefix(const std::string& message) {
  return rank_prefix().empty() ? message : rank_prefix() + " " + message;
}

// Throws a UsageError unless `ok`: `require(h % n == 0, "hidden-size ({}) must ...", h)`.
template <typename... Args>
inline void require(bool ok, fmt::format_string<Args...> format, Args&&... args) {
  if (!ok) throw UsageError(fmt::format(format, std::forward<Args>(args)...));
}

// Prints once per job (on global rank 0), flushed so that mpirun interleaves cleanly.
template <typename... Args>
inline void print0(fmt::format_string<Args...> format, Args&&... args) {
  if (global_rank() != 0) return;
  fmt::print(format, std::forward<Args>(args)...);
  std::fflush(stdout);
}

// The first line of a c10 error, without LibTorch's stack trace.
inline std::string first_line(const std::string& text) {
  auto end = text.find('\n');
  return end == std::string::npos ? text : text.substr(0, end);
}

// One line on stderr, after whatever stdout holds. Never throws: on a fault path stderr may be
// a pipe whose reader (the launcher) is gone.
inline void print_error_line(const std::string& line) {
  std::fflush(stdout);
  std::fputs((line + "\n").c_str(), stderr);
  std::fflush(stderr);
}

// "[rank 5 | tp 1 dp 0 pp 1] error: text" once the groups exist; before, "error: rank 5: text"
// (rank 0, maybe a single process, and a text that names the rank already say "error: text").
inline std::string rank_error(const std::string& text) {
  if (!rank_prefix().empty()) return with_prefix("error: " + text);
  const std::string rank = fmt::format("rank {}", global_rank());
  const bool named = text.compare(0, rank.size(), rank) == 0 && text.size() > rank.size() &&
                     !std::isdigit(static_cast<unsigned char>(text[rank.size()]));
  return global_rank() == 0 || named ? "error: " + text : fmt::format("error: {}: {}", rank, text);
}

// Whether rank 0 reports the same bad input itself, so that this rank need not; rank 0 calls it
// after printing, to tell the others. Once the ranks have met, resilience.hpp answers through
// the store. Before that every rank has read the same command line and environment: rank 0
// speaks, and the others give it 2 s to do so (mpirun ends every rank when the first exits).
inline std::function<bool(const std::string&)>& rank0_says_it() {
  static std::function<bool(const std::string&)> says = [](const std::string&) {
    if (global_rank() != 0) std::this_thread::sleep_for(std::chrono::seconds(2));
    return global_rank() != 0;
  };
  return says;
}

// Tells the other ranks that this one fails, before it says why and exits, so that they do not
// take it for stopped or lost (resilience.hpp marks it in the store; a no-op before the ranks
// have met).
inline std::function<void()>& announce_failure() {
  static std::function<void()> announce = [] {};
  return announce;
}

// Set while this rank reports a fault of its own (a failed collective), which ends the process.
inline std::atomic<bool>& fault_reporting() {
  static std::atomic<bool> reporting{false};
  return reporting;
}

// The state run_main leaves for its terminate handler: which thread runs the program, and the
// exit code once the program's body has returned (-1 before).
struct MainState {
  std::thread::id thread;
  std::atomic<int> exit_code{-1};
};
inline MainState& main_state() {
  static MainState state;
  return state;
}

// An exception escaped a thread that nobody catches in (most often a library's background
// thread: the store's, when rank 0 is gone). One line instead of the C++ runtime's
// "terminate called after throwing ...". When this rank is already reporting a fault, or does
// so within 3 s (its main thread's collective fails too), that report has the word.
[[noreturn]] inline void on_terminate() noexcept {
  std::string what = "an unknown exception";
  if (const auto e = std::current_exception()) {
    try {
      std::rethrow_exception(e);
    } catch (const c10::Error& x) {
      what = first_line(x.what_without_backtrace());
    } catch (const std::exception& x) {
      what = first_line(x.what());
    } catch (...) {
    }
  }
  if (main_state().exit_code >= 0) std::_Exit(main_state().exit_code);  // the program had finished
  if (std::this_thread::get_id() != main_state().thread) {
    for (int i = 0; i < 30 && !fault_reporting(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    while (fault_reporting()) std::this_thread::sleep_for(std::chrono::seconds(1));  // the report exits
  }
  const bool connection = what.find("onnection") != std::string::npos || what.find("pipe") != std::string::npos;
  print_error_line(rank_error(fmt::format("{} in a background thread{}", what,
                                          connection ? " (a peer, or rank 0 which hosts the store, is gone)" : "")));
  std::_Exit(1);
}

// Runs a program's body and turns every error into one line on stderr and an exit code: 2 for
// bad input (UsageError), 1 for anything else. No raw stack traces, and no "terminate called"
// (on_terminate). Who speaks:
//   * an error about one rank (a file it cannot write, a collective that failed, a lost
//     peer) is printed by the rank that met it, whose prefix names it;
//   * bad input that every rank meets alike (flags, the layout, a checkpoint they all read) is
//     printed once, by rank 0. A rank > 0 with a UsageError keeps quiet only when rank 0
//     reports the very same text (rank0_says_it), so bad input that only rank 3 meets is
//     still reported, by rank 3 (at once when it is a LocalUsageError);
//   * an error that another rank reports for the whole job (ReportedElsewhere) is not printed.
inline int run_main(const std::function<int()>& body) {
  main_state().thread = std::this_thread::get_id();
  std::set_terminate(on_terminate);
  const auto finish = [](int code) { return main_state().exit_code = code; };
  try {
    return finish(body());
  } catch (const UsageError& e) {
    announce_failure()();
    const bool local = dynamic_cast<const LocalUsageError*>(&e) != nullptr;
    if (global_rank() == 0) {
      print_error_line(with_prefix(std::string("error: ") + e.what()));
      rank0_says_it()(e.what());
    } else if (local || !rank0_says_it()(e.what())) {
      print_error_line(rank_error(e.what()));
    }
    return finish(kUsageExitCode);
  } catch (const ReportedElsewhere&) {  // give the rank that reports it time to speak
    std::this_thread::sleep_for(std::chrono::seconds(2));
    return finish(1);
  } catch (const c10::Error& e) {
    announce_failure()();
    print_error_line(rank_error(first_line(e.what_without_backtrace())));
  } catch (const std::exception& e) {
    announce_failure()();
    print_error_line(rank_error(first_line(e.what())));
  }
  return finish(1);
}

// Process set-up for training on CPU: an explicit thread count (OpenMP may report 1 on a VM)
// and malloc thresholds high enough that big tensors are not unmapped and re-mapped every
// step (measured 1.3-2x faster training with glibc; see NOTES.md).
inline void setup_process(int num_threads) {
  if (num_threads > 0) torch::set_num_threads(num_threads);
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, INT_MAX);
}

// Wall-clock seconds since construction (or the last reset).
struct Timer {
  using Clock = std::chrono::steady_clock;
  Clock::time_point start = Clock::now();
  double seconds() const { return std::chrono::duration<double>(Clock::now() - start).count(); }
  void reset() { start = Clock::now(); }
};

// Removes a directory tree (or a file); a missing path is fine. Not std::filesystem::remove_all:
// pip PyTorch 2.11's libtorch.so exports its own copy of that symbol, which wins at link time
// and crashes (seen on the GPU check machine), so we walk the tree ourselves.
inline void remove_tree(const std::filesystem::path& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(std::filesystem::symlink_status(path, ec))) {
    std::vector<std::filesystem::path> children;
    for (const auto& entry : std::filesystem::directory_iterator(path, ec)) children.push_back(entry.path());
    for (const auto& child : children) remove_tree(child);
  }
  std::filesystem::remove(path, ec);
}

// "h.0.attn.c_proj.weight" ends with "c_proj.weight": parameter names pick init and sharding.
inline bool name_ends_with(const std::string& name, const std::string& suffix) {
  return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// "Break it" exercises (tutorials, chapters 1-4 and 8): LIGHTRON_BREAK=<name> plants one real bug,
// so that a student can watch a parity test catch it. Only the tests and the exercises set
// it; an unknown name is an error, and a planted bug says so on stderr (rank 0, once).
inline const std::vector<std::string>& planted_bug_names() {
  static const std::vector<std::string> names{
      "dp_average_twice",            // chapter 1: the gradients are divided by dp twice
      "tp_f_backward",               // chapter 2: f's backward forgets its all-reduce
      "skip_embedding_all_reduce",   // chapter 3: the tied embedding's copies drift apart
      "skip_sp_grad_all_reduce",     // chapter 4: sequence-parallel replicas are not summed over tp
      "cp_local_positions"};         // chapter 8: each cp rank numbers its tokens from 0
  return names;
}
inline bool planted_bug(const std::string& name) {
  static const std::string planted = [] {
    const char* v = std::getenv("LIGHTRON_BREAK");
    const std::string s = v ? v : "";
    const auto& names = planted_bug_names();
    if (!s.empty() && std::find(names.begin(), names.end(), s) == names.end())
      throw UsageError(fmt::format("LIGHTRON_BREAK={} is not a planted bug; one of: {}", s, fmt::join(names, ", ")));
    if (!s.empty() && global_rank() == 0) fmt::print(stderr, "warning: LIGHTRON_BREAK={}: a bug is planted on purpose\n", s);
    return s;
  }();
  return planted == name;
}

// Bytes a tensor holds.
inline int64_t nbytes(const torch::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

}  // namespace lightron
