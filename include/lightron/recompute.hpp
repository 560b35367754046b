// lightron/recompute.hpp — activation recomputation (Megatron-LM's --recompute-granularity;
// Korthikanti et al., arXiv:2205.05198): keep fewer activations for backward and compute the
// rest again when backward needs them, trading compute for memory.
//   full       keep only the input of a group of blocks; backward runs the group's forward
//              again (with grad), then its backward: about one extra forward per step.
//   selective  recompute only the attention core softmax(q kᵀ / sqrt(D)) v, whose
//              (B, H, T, T) matrices grow with T² but cost few FLOPs; q, k, v are kept.
// --recompute-method (full only) uniform: each model chunk's blocks in groups of N
// (--recompute-num-layers), each group keeping its input; block: the first N blocks of each
// chunk keep their input, the others keep everything.
// checkpoint() is the mechanism: a custom autograd function whose forward runs a region
// without grad and saves only the region's inputs, and whose backward runs it again with
// grad and backpropagates through it. Parameters' gradients accumulate into their .grad
// through their own gradient accumulators (the data-parallel buckets' hooks fire as usual);
// collectives inside a region (tensor parallel's f and g) run again, in the same order on
// every tp rank, since every rank recomputes the same regions in the same order.
// Applied to a model (apply_recompute), never baked into it: GPT runs its blocks through
// GPT::run_blocks and the attention core through Attention::core, which this header replaces.
// Leaves out: CPU offloading, the CUDA RNG state (lightron's model has no random op).
// Introduced in chapter 3 (memory).
#pragma once

#include "gpt.hpp"

#include <functional>

namespace lightron {

struct RecomputeOptions {
  std::string granularity;  // "" (none) | full | selective
  std::string method;       // "" (uniform) | uniform | block; full only
  int64_t num_layers = 0;   // N; 0: 1 for uniform, every block of the chunk for block
  bool full() const { return granularity == "full"; }
  bool selective() const { return granularity == "selective"; }
  bool uniform() const { return method.empty() || method == "uniform"; }
  // N for a chunk of `blocks` blocks.
  int64_t group(int64_t blocks) const { return num_layers > 0 ? num_layers : uniform() ? 1 : blocks; }
};

// Flag combinations, before anything is allocated; `chunk_blocks` is the fewest blocks a model
// chunk holds (--num-layers / (pipeline size x virtual stages)).
inline void validate_recompute(const RecomputeOptions& r, int64_t chunk_blocks) {
  const std::string given = r.granularity.empty() ? "none" : "'" + r.granularity + "'";
  require(r.granularity.empty() || r.full() || r.selective(),
          "--recompute-granularity must be full or selective, got '{}'", r.granularity);
  require(r.method.empty() || r.full(), "--recompute-method {} needs --recompute-granularity full, got {}", r.method,
          given);
  require(r.method.empty() || r.method == "uniform" || r.method == "block",
          "--recompute-method must be uniform or block, got '{}'", r.method);
  require(r.num_layers == 0 || r.full(), "--recompute-num-layers {} needs --recompute-granularity full, got {}",
          r.num_layers, given);
  require(r.num_layers >= 0 && r.num_layers <= chunk_blocks,
          "--recompute-num-layers ({}) must be between 1 and the blocks of a model chunk ({} = --num-layers / "
          "(pipeline size x virtual stages))", r.num_layers, chunk_blocks);
}

namespace recompute_detail {
using torch::autograd::variable_list;
using Region = std::function<variable_list(const variable_list&)>;

// What backward needs to run a region again exactly as forward did. Autograd contexts hold
// IValues: the region travels in a capsule.
struct HeldRegion : torch::CustomClassHolder {
  Region run;
  torch::Tensor cpu_rng_state;  // the CPU generator as forward found it
  bool autocast = false;        // bf16 autocast (CUDA) was on in forward
};

inline bool cuda_autocast_enabled() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  return at::autocast::is_autocast_enabled(at::kCUDA);
#else
  return at::autocast::is_enabled();
#endif
}

// Sets the CPU generator to `state` for the recomputation and gives back the state it had.
// lightron's model draws no random number in a block (no dropout), but a region that did
// (dropout in your own model) must draw the same numbers again, or its gradients would be
// those of another mask: Megatron restores the RNG state the same way.
class ReplayedCpuRng {
 public:
  explicit ReplayedCpuRng(const torch::Tensor& state) : generator_(at::detail::getDefaultCPUGenerator()) {
    std::lock_guard<std::mutex> lock(generator_.mutex());
    previous_ = generator_.get_state();
    generator_.set_state(state);
  }
  ~ReplayedCpuRng() {
    std::lock_guard<std::mutex> lock(generator_.mutex());
    generator_.set_state(previous_);
  }
  ReplayedCpuRng(const ReplayedCpuRng&) = delete;
  ReplayedCpuRng& operator=(const ReplayedCpuRng&) = delete;

 private:
  at::Generator generator_;
  torch::Tensor previous_;
};
}  // namespace recompute_detail

// Forward: the region without grad, only its inputs saved. Backward: the region again with
// grad from detached copies of the inputs, then backward through it; parameters' gradients
// accumulate into their .grad, the inputs' gradients are returned.
struct CheckpointFunction : torch::autograd::Function<CheckpointFunction> {
  using variable_list = torch::autograd::variable_list;
  static variable_list forward(torch::autograd::AutogradContext* ctx, at::TensorList inputs, c10::IValue region) {
    ctx->save_for_backward(inputs.vec());
    ctx->saved_data["region"] = region;
    return held(ctx).run(inputs.vec());  // (apply runs forward without grad)
  }
  static variable_list backward(torch::autograd::AutogradContext* ctx, variable_list grad_outputs) {
    const auto& region = held(ctx);
    variable_list inputs, outputs, with_grad, grads;
    for (const auto& t : ctx->get_saved_variables()) inputs.push_back(t.detach().requires_grad_(t.requires_grad()));
    {
      torch::AutoGradMode grad_mode(true);
      recompute_detail::ReplayedCpuRng rng(region.cpu_rng_state);
      AutocastGuard autocast(region.autocast);
      outputs = region.run(inputs);
    }
    for (size_t i = 0; i < outputs.size(); ++i)
      if (outputs[i].requires_grad() && grad_outputs[i].defined()) with_grad.push_back(outputs[i]), grads.push_back(grad_outputs[i]);
    torch::autograd::backward(with_grad, grads);
    variable_list input_grads;
    for (const auto& x : inputs) input_grads.push_back(x.requires_grad() ? x.grad() : torch::Tensor());
    input_grads.push_back(torch::Tensor());  // the region
    return input_grads;
  }

 private:
  static const recompute_detail::HeldRegion& held(torch::autograd::AutogradContext* ctx) {
    return *static_cast<recompute_detail::HeldRegion*>(ctx->saved_data["region"].toCapsule().get());
  }
};

// Runs `region` on `inputs`, keeping only the inputs for backward (see CheckpointFunction).
// Without grad, or when no input needs one, there is nothing to keep: the region just runs.
inline torch::autograd::variable_list checkpoint(recompute_detail::Region region,
                                                 const torch::autograd::variable_list& inputs) {
  bool any_grad = false;
  for (const auto& t : inputs) any_grad = any_grad || t.requires_grad();
  if (!torch::GradMode::is_enabled() || !any_grad) return region(inputs);
  auto held = c10::make_intrusive<recompute_detail::HeldRegion>();
  held->run = std::move(region);
  held->cpu_rng_state = at::detail::getDefaultCPUGenerator().get_state();
  held->autocast = recompute_detail::cuda_autocast_enabled();
  return CheckpointFunction::apply(at::TensorList(inputs), c10::IValue::make_capsule(std::move(held)));
}

// Full recompute of one model chunk's blocks (in order): uniform, groups of N blocks each
// keeping its input; block, the first N blocks each keeping its input, the rest as usual.
inline torch::Tensor run_blocks_recomputed(const std::vector<std::shared_ptr<Block>>& blocks, torch::Tensor x,
                                           const RecomputeOptions& r) {
  const int64_t n = int64_t(blocks.size()), N = r.group(n), step = r.uniform() ? N : 1;
  for (int64_t i = 0; i < n; i += step) {
    if (!r.uniform() && i >= N) {
      x = blocks[i]->forward(x);
      continue;
    }
    std::vector<std::shared_ptr<Block>> group(blocks.begin() + i, blocks.begin() + std::min(n, i + step));
    x = checkpoint([group](const auto& in) { return torch::autograd::variable_list{run_in_order(group, in[0])}; }, {x})[0];
  }
  return x;
}

// Selective recompute: only the attention core, from the q, k, v it keeps.
inline torch::Tensor recomputed_attention_core(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  auto core = [](const torch::autograd::variable_list& in) {
    return torch::autograd::variable_list{causal_attention(in[0], in[1], in[2])};
  };
  return checkpoint(core, {q, k, v})[0];  // (B, H, T, D)
}

// Applies the options to `model` (whole, or this rank's shard and stage) in place.
inline void apply_recompute(GPT& model, const RecomputeOptions& r) {
  if (r.selective())
    for (auto& block : model.blocks)
      if (block) block->attn->core = recomputed_attention_core;
  if (r.full())
    model.run_blocks = [r](const std::vector<std::shared_ptr<Block>>& blocks, torch::Tensor x) {
      return run_blocks_recomputed(blocks, std::move(x), r);
    };
}

}  // namespace lightron
