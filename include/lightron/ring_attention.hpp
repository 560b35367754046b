// lightron/ring_attention.hpp — causal attention over a sequence split across the cp ranks of a
// ring (Liu et al., arXiv:2310.01889; Megatron's context parallelism). Each rank keeps its own
// queries; the key/value blocks travel round the ring, one hop per step, the next block's
// transfer overlapped with the current block's arithmetic. Partial results merge by the
// online-softmax rule: a running log-sum-exp per query (Milakov & Gimelshein, arXiv:1805.02867),
// so no rank ever holds a T x T matrix of probabilities.
//   forward:  cp steps; at step s rank r attends to the block of rank r - s (its own first).
//   backward: the blocks go round again; each carries the dK/dV its visits have summed so
//             far, and after the last step every accumulator is sent home.
// The sequence is cut into 2·cp equal chunks and each rank holds two (SequenceSplit). Whole
// (query chunk, key chunk) pairs above the causal diagonal are skipped; the counted work
// (ring_attention_flops) shows which splits balance it. Introduced in chapter 8.
#pragma once

#include "collectives.hpp"  // send_async, recv_async
#include "gpt.hpp"          // repeat_groups

#include <array>
#include <cmath>

namespace lightron {

// Which 2 of the 2·cp chunks of the sequence each rank holds. Head-tail ("zigzag"): rank r
// holds chunks r and 2·cp-1-r, so under the causal mask every rank has the same work.
// Contiguous: chunks 2r and 2r+1; rank cp-1 has 2·cp-1 times rank 0's causal work (and
// computes (4·cp-1)/3 times its chunk pairs, a diagonal pair being computed whole).
struct SequenceSplit {
  int64_t size = 1;  // cp
  bool zigzag = true;
  std::array<int64_t, 2> chunks(int64_t rank) const {
    if (zigzag) return {rank, 2 * size - 1 - rank};
    return {2 * rank, 2 * rank + 1};
  }
};

// Attention work this process performed, in FLOPs of the matrix products (2 per multiply-add):
// counted, not timed, per forward and backward block pair.
inline int64_t& ring_attention_flops() {
  static int64_t flops = 0;
  return flops;
}

namespace ring_detail {
constexpr int kKeyValueTag = 1, kGradientTag = 2;  // the two kinds of message on the cp group

// A tensor sent to the next rank of the ring while the previous rank's arrives.
struct Hop {
  Pending sent, received;
  torch::Tensor incoming;
  void wait() { sent.wait(), received.wait(); }
};
inline Hop pass_on(const Group& cp, const torch::Tensor& mine, int tag) {
  Hop hop;
  hop.incoming = torch::empty_like(mine);
  hop.sent = send_async(cp, mine, (cp.rank + 1) % cp.size, tag);
  hop.received = recv_async(cp, hop.incoming, (cp.rank + cp.size - 1) % cp.size, tag);
  return hop;
}

// Scores q kᵀ / sqrt(D) of one chunk pair in fp32 (B, H, c, c); `diagonal`: the same chunk,
// masked above the diagonal.
inline torch::Tensor scores(const torch::Tensor& q, const torch::Tensor& k, bool diagonal) {
  auto s = torch::matmul(q.to(torch::kFloat), repeat_groups(k, q.size(1)).to(torch::kFloat).transpose(-2, -1)) /
           std::sqrt(static_cast<double>(q.size(-1)));
  if (!diagonal) return s;
  return s.masked_fill(future_positions(q.size(2), q.options()), -INFINITY);
}
inline int64_t pair_flops(const torch::Tensor& q) { return 2 * q.size(0) * q.size(1) * q.size(2) * q.size(2) * q.size(3); }

// (B, H, c, D) per query head -> (B, G, c, D) per key/value group: the repeated heads' sum.
inline torch::Tensor sum_groups(const torch::Tensor& t, int64_t groups) {
  if (t.size(1) == groups) return t;
  return t.view({t.size(0), groups, t.size(1) / groups, t.size(2), t.size(3)}).sum(2);
}

// Online softmax: folds a block's (output, log-sum-exp) into the running pair.
inline void merge(torch::Tensor& out, torch::Tensor& lse, const torch::Tensor& o, const torch::Tensor& l) {
  if (!out.defined()) {
    out = o, lse = l;
    return;
  }
  const auto both = torch::logaddexp(lse, l);
  out = out * (lse - both).exp().unsqueeze(-1) + o * (l - both).exp().unsqueeze(-1);
  lse = both;
}

struct Ring : torch::CustomClassHolder {
  Group cp;
  SequenceSplit split;
};
inline c10::intrusive_ptr<Ring> make_ring(const Group& cp, const SequenceSplit& split) {
  auto ring = c10::make_intrusive<Ring>();
  ring->cp = cp, ring->split = split;
  return ring;
}

// The chunk pairs this rank computes when it holds key/value block `source`: (i, j) for its
// query chunk i and the block's chunk j, skipping pairs wholly above the diagonal.
inline std::vector<std::array<int64_t, 3>> pairs(const Ring& ring, int64_t source) {  // {i, j, diagonal}
  std::vector<std::array<int64_t, 3>> out;
  const auto mine = ring.split.chunks(ring.cp.rank), theirs = ring.split.chunks(source);
  for (int64_t i = 0; i < 2; ++i)
    for (int64_t j = 0; j < 2; ++j)
      if (theirs[j] <= mine[i]) out.push_back({i, j, theirs[j] == mine[i]});
  return out;
}
}  // namespace ring_detail

// softmax(q kᵀ / sqrt(D) + causal mask) v over the whole ring's sequence, for this rank's
// queries. q (B, H, T, D), k/v (B, G, T, D): T = this rank's two chunks, in its split's order.
struct RingAttentionFunction : torch::autograd::Function<RingAttentionFunction> {
  using Tensor = torch::Tensor;
  static Tensor forward(torch::autograd::AutogradContext* ctx, Tensor q, Tensor k, Tensor v, c10::IValue held) {
    using namespace ring_detail;
    const Ring& ring = *static_cast<Ring*>(held.toCapsule().get());
    const int64_t c = q.size(2) / 2, n = ring.cp.size;
    const auto qs = q.split(c, 2);
    std::array<Tensor, 2> out, lse;  // per query chunk: (B, H, c, D) and (B, H, c), fp32
    auto kv = torch::stack({k, v}).contiguous();  // (2, B, G, T, D): one message per step
    // [snippet: ring_forward]
    for (int64_t s = 0; s < n; ++s) {
      Hop next;
      if (s + 1 < n) next = pass_on(ring.cp, kv, kKeyValueTag);  // the next block, while we compute
      const auto ks = kv[0].split(c, 2), vs = kv[1].split(c, 2);
      for (const auto& [i, j, diagonal] : pairs(ring, (ring.cp.rank - s + n) % n)) {
        const auto scores_ij = scores(qs[i], ks[j], diagonal);
        const auto l = scores_ij.logsumexp(-1);  // (B, H, c)
        const auto o = torch::matmul((scores_ij - l.unsqueeze(-1)).exp(), repeat_groups(vs[j], q.size(1)).to(torch::kFloat));
        merge(out[i], lse[i], o, l);
        ring_attention_flops() += 2 * pair_flops(qs[i]);
      }
      if (s + 1 < n) next.wait(), kv = next.incoming;
    }
    // [end snippet: ring_forward]
    const auto o = torch::cat({out[0], out[1]}, 2), l = torch::cat({lse[0], lse[1]}, 2);
    ctx->save_for_backward({q, k, v, o, l});
    ctx->saved_data["ring"] = held;
    return o.to(q.scalar_type());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    using namespace ring_detail;
    const Ring& ring = *static_cast<Ring*>(ctx->saved_data["ring"].toCapsule().get());
    const auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &k = saved[1], &v = saved[2], &o = saved[3], &l = saved[4];
    const int64_t c = q.size(2) / 2, n = ring.cp.size, groups = k.size(1);
    const auto dout = grads[0].to(torch::kFloat);
    const auto delta = (dout * o).sum(-1);  // rowsum(dO ∘ O) (B, H, T): softmax's backward term
    const auto qs = q.split(c, 2), dos = dout.split(c, 2), ls = l.split(c, 2), deltas = delta.split(c, 2);
    auto dq = torch::zeros(q.sizes(), q.options().dtype(torch::kFloat));
    const auto dqs = dq.split(c, 2);
    auto kv = torch::stack({k, v}).contiguous();
    Hop carried;  // the dK/dV accumulator of the block held last step, on its way round
    // [snippet: ring_backward]
    for (int64_t s = 0; s < n; ++s) {
      Hop next;
      if (s + 1 < n) next = pass_on(ring.cp, kv, kKeyValueTag);
      auto part = torch::zeros(kv.sizes(), kv.options().dtype(torch::kFloat));  // this visit's dK | dV
      const auto ks = kv[0].split(c, 2), vs = kv[1].split(c, 2), dks = part[0].split(c, 2), dvs = part[1].split(c, 2);
      for (const auto& [i, j, diagonal] : pairs(ring, (ring.cp.rank - s + n) % n)) {
        const auto p = (scores(qs[i], ks[j], diagonal) - ls[i].unsqueeze(-1)).exp();  // probabilities again
        const auto kf = repeat_groups(ks[j], q.size(1)).to(torch::kFloat), vf = repeat_groups(vs[j], q.size(1)).to(torch::kFloat);
        const auto ds = p * (torch::matmul(dos[i], vf.transpose(-2, -1)) - deltas[i].unsqueeze(-1));
        const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
        dqs[i].add_(torch::matmul(ds, kf), scale);
        dks[j].add_(sum_groups(torch::matmul(ds.transpose(-2, -1), qs[i].to(torch::kFloat)), groups), scale);
        dvs[j].add_(sum_groups(torch::matmul(p.transpose(-2, -1), dos[i]), groups));
        ring_attention_flops() += 5 * pair_flops(qs[i]);
      }
      if (s > 0) carried.wait(), part += carried.incoming;  // what the block's earlier visits summed
      if (n > 1) carried = pass_on(ring.cp, part, kGradientTag);  // on with the block (home after the last)
      else carried.incoming = part;
      if (s + 1 < n) next.wait(), kv = next.incoming;
    }
    carried.wait();  // this rank's own block's dK | dV, from every rank's queries
    // [end snippet: ring_backward]
    return {dq.to(q.scalar_type()), carried.incoming[0].to(k.scalar_type()), carried.incoming[1].to(v.scalar_type()),
            torch::Tensor()};
  }
};

inline torch::Tensor ring_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                    const c10::intrusive_ptr<ring_detail::Ring>& ring) {
  return RingAttentionFunction::apply(q, k, v, c10::IValue::make_capsule(ring));
}
inline torch::Tensor ring_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                    const Group& cp, const SequenceSplit& split) {
  return ring_attention(q, k, v, ring_detail::make_ring(cp, split));
}

// Bytes one rank sends over the cp group per attention layer and micro-batch: forward, the
// (cp-1) hops of its key/value block (2·B·G·T·D elements of `element_bytes`); backward, the
// same hops again plus cp hops of the fp32 dK/dV accumulator. (Full recompute runs forward twice.)
struct RingBytes {
  int64_t forward = 0, backward = 0;
};
inline RingBytes ring_attention_bytes(int64_t B, int64_t G, int64_t T, int64_t D, int64_t cp, int64_t element_bytes = 4) {
  const int64_t block = 2 * B * G * T * D;
  return {(cp - 1) * block * element_bytes, (cp - 1) * block * element_bytes + cp * block * 4};
}

}  // namespace lightron
