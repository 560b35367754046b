// lightron/activation_meter.hpp — activation memory measured, not estimated: the bytes a
// forward pass leaves alive for backward, per rank. A counting CPU allocator, installed once
// with c10::SetCPUAllocator around the default one, charges each allocation made while a
// CountAllocations scope is open on this thread to that scope's counter, until the memory is
// freed. Read after a forward (its graph alive), the counter holds what autograd keeps:
// saved activations, the pipeline stage's received input, the logits of the loss. Memory
// freed before the forward ends (temporaries) has left it again; the peak over a step is
// what the schedule's in-flight micro-batches hold at once.
// Leaves out: CUDA (its caching allocator keeps statistics of its own), allocations made
// outside tensors (BLAS workspaces, Gloo buffers). Introduced in chapter 3 (memory).
#pragma once

#include "core.hpp"

#include <c10/core/CPUAllocator.h>  // GetCPUAllocator, SetCPUAllocator

#include <atomic>
#include <memory>
#include <mutex>
#include <thread>  // this_thread::sleep_for
#include <unordered_map>

namespace lightron {

// Bytes allocated inside CountAllocations scopes that are still alive.
struct ActivationCounter {
  std::atomic<int64_t> live{0};
  // `live` once other threads have let go: a collective's worker thread drops its reference
  // to a buffer (already released here) a moment after the collective returned. Waits only
  // while measuring (the counting allocator installed).
  int64_t settled() const {
    int64_t now = live.load();
    for (int i = 0; i < 20 && c10::GetCPUAllocator() != c10::GetDefaultCPUAllocator(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      const int64_t again = live.load();
      if (again == now && i > 0) break;
      now = again;
    }
    return now;
  }
};

namespace meter_detail {
inline std::shared_ptr<ActivationCounter>& current() {  // this thread's open scope, if any
  thread_local std::shared_ptr<ActivationCounter> counter;
  return counter;
}
}  // namespace meter_detail

// Wraps the CPU allocator that was installed before it; its DataPtrs free through free_counted,
// which looks up who was charged. Only counted allocations go through the table.
class CountingCPUAllocator final : public c10::Allocator {
 public:
  // Installs the counting allocator (once per process; later calls do nothing).
  static void install() {
    static std::once_flag once;
    std::call_once(once, [] { c10::SetCPUAllocator(&instance(), /*priority=*/100); });
  }
  static bool installed() { return c10::GetCPUAllocator() == &instance(); }

  c10::DataPtr allocate(size_t bytes) const override {
    auto& counter = meter_detail::current();
    if (!counter) return base_->allocate(bytes);
    c10::DataPtr inner = base_->allocate(bytes);
    void* data = inner.release_context();  // the default CPU allocator's context is the data itself
    {
      std::lock_guard<std::mutex> lock(mutex_);
      charged_[data] = {int64_t(bytes), counter};
    }
    counter->live += int64_t(bytes);
    return {data, data, &free_counted, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_counted; }

 private:
  CountingCPUAllocator() : base_(c10::GetCPUAllocator()) {
    require(base_->raw_deleter() != nullptr, "CountingCPUAllocator: the CPU allocator has no raw deleter to wrap");
  }
  static CountingCPUAllocator& instance() {  // never destroyed: tensors may outlive static destructors
    static auto* allocator = new CountingCPUAllocator();
    return *allocator;
  }
  static void free_counted(void* data) {  // counted or not (raw_deallocate comes here too)
    auto& self = instance();
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      auto it = self.charged_.find(data);
      if (it != self.charged_.end()) {
        it->second.second->live -= it->second.first;
        self.charged_.erase(it);
      }
    }
    self.base_->raw_deleter()(data);
  }

  c10::Allocator* base_;
  mutable std::mutex mutex_;
  mutable std::unordered_map<void*, std::pair<int64_t, std::shared_ptr<ActivationCounter>>> charged_;
};

// While alive, this thread's CPU allocations are charged to `counter` (when the counting
// allocator is installed; otherwise nothing is counted).
class CountAllocations {
 public:
  explicit CountAllocations(std::shared_ptr<ActivationCounter> counter) : previous_(meter_detail::current()) {
    meter_detail::current() = std::move(counter);
  }
  ~CountAllocations() { meter_detail::current() = previous_; }
  CountAllocations(const CountAllocations&) = delete;
  CountAllocations& operator=(const CountAllocations&) = delete;

 private:
  std::shared_ptr<ActivationCounter> previous_;
};

}  // namespace lightron
