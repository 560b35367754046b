// The GPU path (run by bench/gpu_check.sh on a CUDA machine; skipped without a GPU):
// the same single-device training on CUDA reproduces the CPU run in fp32, and bf16
// mixed precision trains to about the same loss.
#include "testing.hpp"

namespace test_cuda_detail {
using namespace lightron;
using namespace lightron_testing;

RunResult run_on(const GPTConfig& c, const TrainConfig& t, torch::Device device, bool bf16 = false) {
  auto single = make_process_groups(c10::make_intrusive<c10d::HashStore>(), 0, Layout{});
  ParallelOptions o;
  o.device = device;
  o.bf16 = bf16;
  return run_training(c, t, o, *single);
}
}  // namespace test_cuda_detail

using namespace test_cuda_detail;

TEST_SUITE("cuda") {
  // Stated tolerance CPU vs CUDA, fp32 (TF32 off, LibTorch's default): the parity
  // tolerance of the layouts, 1e-5 relative on losses and grad norms.
  TEST_CASE("cuda parity: fp32 training on CUDA reproduces the CPU run") {
    if (!torch::cuda::is_available()) return;
    for (auto flavour : {GPTConfig::gpt2(), GPTConfig::llama()}) {
      const auto c = tiny_config(flavour);
      const auto t = tiny_train(8, 4);
      auto cpu = run_on(c, t, torch::kCPU);
      auto gpu = run_on(c, t, torch::Device(torch::kCUDA, 0));
      for (auto& [name, p] : gpu.params) p = p.cpu();
      double worst = 0;
      for (size_t i = 0; i < cpu.losses.size(); ++i) worst = std::max(worst, std::abs(cpu.losses[i] - gpu.losses[i]) / cpu.losses[i]);
      MESSAGE("CPU vs CUDA fp32, " << (c.rope() ? "Llama" : "GPT-2") << ": largest relative loss difference " << worst);
      check_parity(cpu, gpu);
    }
  }

  TEST_CASE("cuda bf16: mixed precision follows the fp32 losses") {
    if (!torch::cuda::is_available()) return;
    const auto c = tiny_config(GPTConfig::gpt2());
    const auto t = tiny_train(8, 4);
    auto fp32 = run_on(c, t, torch::Device(torch::kCUDA, 0));
    auto bf16 = run_on(c, t, torch::Device(torch::kCUDA, 0), /*bf16=*/true);
    for (size_t i = 0; i < fp32.losses.size(); ++i)
      CHECK_MESSAGE(std::abs(fp32.losses[i] - bf16.losses[i]) <= 2e-2 * fp32.losses[i],
                    "step " << i + 1 << ": bf16 " << bf16.losses[i] << " vs fp32 " << fp32.losses[i]);
    CHECK(bf16.losses.back() < bf16.losses.front());
    for (auto& [name, p] : bf16.params) CHECK_MESSAGE((p.scalar_type() == torch::kFloat), name);  // fp32 masters
  }
}
