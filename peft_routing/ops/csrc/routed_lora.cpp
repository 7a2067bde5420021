// Routed LoRA for float32 on the CPU: every token's top-k experts and their LoRA, in one op.
//
// PyTorch's own ops cannot do the sparse part fast on a CPU: the grouped path's small matmuls run at about a
// seventh of the base matmul's FLOP rate, and gathering rows, scattering them back and each op's dispatch cost as
// much again (benchmarks/RESULTS.md). Here the pairs are bucketed by expert and each expert's A and B rows are
// reused from registers across blocks of its pairs, reading the token rows in place and adding into the output.
//
//   1. select : top-k of each score row (ties and NaN as torch.max: NaN wins, then the lower index) and the mixing
//               weights (softmax of score / temperature, or sigmoid), exactly routing.select_experts;
//   2. bucket : a counting sort of the T*k pairs by expert (stable), then blocks of up to kBlock pairs of one expert;
//   3. shrink : h[p] = gate_p * A_e x_t for every pair, blocks in parallel;
//   4. expand : out[t] += B_e h[p], output columns split between the threads (a token's k pairs never race).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <utility>
#include <vector>

namespace {

// The vector width and blocking follow the ISA the build targets: with AVX-512's 32 registers, 16-float vectors and
// 4-pair blocks (16 shrink accumulators); elsewhere (AVX2's 16 ymm, NEON's 32 128-bit registers) 8-float vectors
// and 2-pair blocks, so that the accumulators and the loaded rows still fit the register file and nothing spills.
#if defined(__AVX512F__)
#define PEFT_ROUTING_LANES 16
constexpr int64_t kBlock = 4;     // pairs of one expert computed together: each A/B row is loaded once per block
#else
#define PEFT_ROUTING_LANES 8
constexpr int64_t kBlock = 2;
#endif
constexpr int64_t kLanes = PEFT_ROUTING_LANES;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));  // kLanes floats, any alignment

constexpr int64_t kRanks = 4;     // ranks per shrink step: kBlock x kRanks accumulators
constexpr int64_t kVectors = 4;   // output vectors per expand step: kBlock x kVectors accumulators
constexpr int64_t kColumns = kVectors * kLanes;
static_assert(kBlock * kRanks <= kLanes, "a shrink step's dot products are reduced as one vector");
constexpr int64_t kMinFlopsPerTask = 1 << 16;  // below this, a parallel task costs more than it saves

inline Vec load(const float* p) { return *reinterpret_cast<const Vec*>(p); }
inline void store(float* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }

// Horizontal sums of kLanes vectors at once: a tree of kLanes - 1 two-shuffle folds instead of kLanes serial sums.
// A fold halves the partial sums per vector: in each block of 2W lanes, W partial sums of x, then W of y.
typedef int32_t Lanes __attribute__((vector_size(kLanes * sizeof(int32_t))));
template <int64_t W, int64_t Half>
constexpr int32_t fold_lane(int64_t l) {
  const int64_t block = l / (2 * W) * (2 * W), pos = l % (2 * W);
  return static_cast<int32_t>(pos < W ? block + pos + Half * W : kLanes + block + pos - W + Half * W);
}
template <int64_t W, int64_t Half, size_t... L>
constexpr Lanes fold_mask(std::index_sequence<L...>) { return Lanes{fold_lane<W, Half>(L)...}; }
template <int64_t W>
inline Vec fold(Vec x, Vec y) {
  constexpr Lanes first = fold_mask<W, 0>(std::make_index_sequence<kLanes>{});
  constexpr Lanes second = fold_mask<W, 1>(std::make_index_sequence<kLanes>{});
  return __builtin_shuffle(x, y, first) + __builtin_shuffle(x, y, second);
}
// The tree leaves lane i holding the vector at the bit-reversed position i, so the inputs go in bit-reversed.
constexpr int64_t reversed(int64_t i) {
  int64_t r = 0;
  for (int64_t bit = 1; bit < kLanes; bit <<= 1, i >>= 1) r = (r << 1) | (i & 1);
  return r;
}
// lane i of the result = the sum of v[i]'s lanes
#if PEFT_ROUTING_LANES == 16
inline Vec lane_sums(const Vec* v) {
  Vec u[8], s[4], q[2];
  for (int64_t i = 0; i < 8; ++i) u[i] = fold<8>(v[reversed(2 * i)], v[reversed(2 * i + 1)]);
  for (int64_t i = 0; i < 4; ++i) s[i] = fold<4>(u[2 * i], u[2 * i + 1]);
  for (int64_t i = 0; i < 2; ++i) q[i] = fold<2>(s[2 * i], s[2 * i + 1]);
  return fold<1>(q[0], q[1]);
}
#else
inline Vec lane_sums(const Vec* v) {
  Vec u[4], s[2];
  for (int64_t i = 0; i < 4; ++i) u[i] = fold<4>(v[reversed(2 * i)], v[reversed(2 * i + 1)]);
  for (int64_t i = 0; i < 2; ++i) s[i] = fold<2>(u[2 * i], u[2 * i + 1]);
  return fold<1>(s[0], s[1]);
}
#endif

// torch.max's order: NaN above everything, then larger values; equal keys keep the lower index.
inline bool beats(float v, float best) { return (v > best) || (std::isnan(v) && !std::isnan(best)); }

void select_row(const float* scores, int64_t n, int64_t k, bool sigmoid, float temperature, int64_t* ids,
                float* weights) {
  // one pass, keeping the best k so far in order (a later equal score never passes an earlier one)
  int64_t kept = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (kept == k && !beats(scores[j], weights[k - 1])) continue;
    int64_t i = kept < k ? kept++ : k - 1;
    for (; i > 0 && beats(scores[j], weights[i - 1]); --i) {
      weights[i] = weights[i - 1];
      ids[i] = ids[i - 1];
    }
    weights[i] = scores[j];
    ids[i] = j;
  }
  if (sigmoid) {
    for (int64_t i = 0; i < k; ++i) weights[i] = 1.f / (1.f + std::exp(-weights[i]));
    return;
  }
  for (int64_t i = 0; i < k; ++i) weights[i] /= temperature;
  const float top = weights[0];  // the largest (NaN if any is NaN, which then spreads as in torch.softmax)
  float total = 0.f;
  for (int64_t i = 0; i < k; ++i) total += (weights[i] = std::exp(weights[i] - top));
  for (int64_t i = 0; i < k; ++i) weights[i] /= total;
}

struct Buckets {
  std::vector<int64_t> token;   // [P] the token of each pair, pairs sorted by expert
  std::vector<float> gate;      // [P] w_tj * s_j
  std::vector<int64_t> blocks;  // start of each block of pairs (one expert each), then P
  std::vector<int64_t> expert;  // the expert of each block
};

Buckets bucket(const int64_t* ids, const float* weights, const float* scales, int64_t pairs, int64_t k,
               int64_t n) {
  std::vector<int64_t> start(n + 1, 0);
  for (int64_t p = 0; p < pairs; ++p) ++start[ids[p] + 1];
  for (int64_t e = 0; e < n; ++e) start[e + 1] += start[e];
  Buckets b;
  b.token.resize(pairs);
  b.gate.resize(pairs);
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t slot = next[ids[p]]++;
    b.token[slot] = p / k;
    b.gate[slot] = weights[p] * scales[ids[p]];
  }
  for (int64_t e = 0; e < n; ++e) {
    for (int64_t s = start[e]; s < start[e + 1]; s += kBlock) {
      b.blocks.push_back(s);
      b.expert.push_back(e);
    }
  }
  b.blocks.push_back(pairs);
  return b;
}

// dots[m][j] = x_m . a_j for M token rows and kRanks rank rows of length d_in, vectorised along d_in.
template <int64_t M>
void shrink_step(const float* const* x, const float* const* a, int64_t d_in, float dots[][kRanks]) {
  Vec acc[M][kRanks] = {};
  int64_t c = 0;
  for (; c + kLanes <= d_in; c += kLanes) {
    Vec av[kRanks];
#pragma GCC unroll 8
    for (int64_t j = 0; j < kRanks; ++j) av[j] = load(a[j] + c);
#pragma GCC unroll 8
    for (int64_t m = 0; m < M; ++m) {
      const Vec xv = load(x[m] + c);
#pragma GCC unroll 8
      for (int64_t j = 0; j < kRanks; ++j) acc[m][j] += xv * av[j];
    }
  }
  Vec all[kLanes] = {};  // the M * kRanks dot products' partial sums, then zeros
#pragma GCC unroll 16
  for (int64_t i = 0; i < M * kRanks; ++i) all[i] = acc[i / kRanks][i % kRanks];
  const Vec sums = lane_sums(all);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < kRanks; ++j) {
      float sum = sums[m * kRanks + j];
      for (int64_t t = c; t < d_in; ++t) sum += x[m][t] * a[j][t];
      dots[m][j] = sum;
    }
  }
}

// out_m[0:kColumns] += sum_j h[m, j] * b_t[j, 0:kColumns] for M pairs (h rows of length r, b_t rows d_out apart).
template <int64_t M>
void expand_step(const float* h, const float* b_t, int64_t r, int64_t d_out, float* const* out) {
  Vec acc[M][kVectors] = {};
  for (int64_t j = 0; j < r; ++j) {
    Vec bv[kVectors];
#pragma GCC unroll 8
    for (int64_t v = 0; v < kVectors; ++v) bv[v] = load(b_t + j * d_out + v * kLanes);
#pragma GCC unroll 8
    for (int64_t m = 0; m < M; ++m) {
      const float hm = h[m * r + j];
#pragma GCC unroll 8
      for (int64_t v = 0; v < kVectors; ++v) acc[m][v] += hm * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int64_t m = 0; m < M; ++m) {
#pragma GCC unroll 8
    for (int64_t v = 0; v < kVectors; ++v) store(out[m] + v * kLanes, load(out[m] + v * kLanes) + acc[m][v]);
  }
}

// The step for a block's number of pairs, so that a short block (an expert's last) computes no padding rows.
template <template <int64_t> class Step, int64_t M = kBlock>
struct BySize {
  template <typename... Args>
  static void run(int64_t size, Args&&... args) {
    if constexpr (M > 1) {
      if (size < M) return BySize<Step, M - 1>::run(size, std::forward<Args>(args)...);
    }
    Step<M>::run(std::forward<Args>(args)...);
  }
};
template <int64_t M>
struct Shrink { template <typename... A> static void run(A&&... a) { shrink_step<M>(std::forward<A>(a)...); } };
template <int64_t M>
struct Expand { template <typename... A> static void run(A&&... a) { expand_step<M>(std::forward<A>(a)...); } };

void shrink(const Buckets& b, const float* x, const float* a, int64_t d_in, int64_t r, float* h) {
  const int64_t num_blocks = static_cast<int64_t>(b.expert.size());
  const int64_t grain = std::max<int64_t>(1, kMinFlopsPerTask / (2 * kBlock * r * d_in));
  at::parallel_for(0, num_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t first = b.blocks[i], size = b.blocks[i + 1] - first;
      const float* rows[kBlock];
      for (int64_t m = 0; m < size; ++m) rows[m] = x + b.token[first + m] * d_in;
      const float* expert_a = a + b.expert[i] * r * d_in;
      for (int64_t j0 = 0; j0 < r; j0 += kRanks) {
        const float* a_rows[kRanks];  // past r: repeats of the last row, computed and dropped
        for (int64_t j = 0; j < kRanks; ++j) a_rows[j] = expert_a + std::min(j0 + j, r - 1) * d_in;
        float dots[kBlock][kRanks];
        BySize<Shrink>::run(size, rows, a_rows, d_in, dots);
        for (int64_t m = 0; m < size; ++m) {
          for (int64_t j = 0; j < kRanks && j0 + j < r; ++j) {
            h[(first + m) * r + j0 + j] = dots[m][j] * b.gate[first + m];
          }
        }
      }
    }
  });
}

void expand_tail(const float* h, int64_t size, const float* b_t, int64_t r, int64_t d_out, int64_t c0,
                 int64_t c1, float* const* out) {
  for (int64_t m = 0; m < size; ++m) {
    for (int64_t j = 0; j < r; ++j) {
      const float hm = h[m * r + j];
      for (int64_t c = c0; c < c1; ++c) out[m][c] += hm * b_t[j * d_out + c];
    }
  }
}

void expand(const Buckets& b, const float* h, const float* b_t, int64_t r, int64_t d_out, float* out) {
  const int64_t chunks = (d_out + kColumns - 1) / kColumns;
  const int64_t pairs = b.blocks.back();
  const int64_t grain = std::max<int64_t>(1, kMinFlopsPerTask / std::max<int64_t>(1, 2 * pairs * r * kColumns));
  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    const int64_t c_begin = begin * kColumns, c_end = std::min(end * kColumns, d_out);
    const int64_t full_end = c_begin + (c_end - c_begin) / kColumns * kColumns;
    for (size_t i = 0; i + 1 < b.blocks.size(); ++i) {
      const int64_t first = b.blocks[i], size = b.blocks[i + 1] - first;
      float* rows[kBlock];
      for (int64_t m = 0; m < size; ++m) rows[m] = out + b.token[first + m] * d_out;
      const float* expert_b = b_t + b.expert[i] * r * d_out;
      const float* block_h = h + first * r;
      for (int64_t c = c_begin; c < full_end; c += kColumns) {
        float* shifted[kBlock];
        for (int64_t m = 0; m < size; ++m) shifted[m] = rows[m] + c;
        BySize<Expand>::run(size, block_h, expert_b + c, r, d_out, shifted);
      }
      if (full_end < c_end) expand_tail(block_h, size, expert_b, r, d_out, full_end, c_end, rows);
    }
  });
}

void check(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dim,
              "routed_lora_: ", name, " must be a contiguous float32 CPU tensor of ", dim, " dimensions");
}

}  // namespace

// out [T, d_out] += the routed LoRA of x [T, d_in]; returns the routes: expert ids [T, k] and weights [T, k].
std::tuple<at::Tensor, at::Tensor> routed_lora_(at::Tensor out, const at::Tensor& x, const at::Tensor& scores,
                                                const at::Tensor& a, const at::Tensor& b_t, const at::Tensor& scales,
                                                int64_t k, bool sigmoid, double temperature) {
  check(out, "out", 2); check(x, "x", 2); check(scores, "scores", 2); check(a, "a", 3); check(b_t, "b_t", 3);
  check(scales, "scales", 1);
  const int64_t T = x.size(0), d_in = x.size(1), n = a.size(0), r = a.size(1), d_out = b_t.size(2);
  TORCH_CHECK(a.size(2) == d_in && b_t.size(0) == n && b_t.size(1) == r && scores.size(0) == T &&
              scores.size(1) == n && out.size(0) == T && out.size(1) == d_out && scales.size(0) == n &&
              k >= 1 && k <= n, "routed_lora_: shapes do not match");
  at::Tensor ids = at::empty({T, k}, x.options().dtype(at::kLong));
  at::Tensor weights = at::empty({T, k}, x.options());
  int64_t* id_ptr = ids.data_ptr<int64_t>();
  float* weight_ptr = weights.data_ptr<float>();
  const float* score_ptr = scores.data_ptr<float>();
  at::parallel_for(0, T, std::max<int64_t>(1, 4096 / (n * k)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      select_row(score_ptr + t * n, n, k, sigmoid, static_cast<float>(temperature), id_ptr + t * k,
                 weight_ptr + t * k);
    }
  });
  const Buckets b = bucket(id_ptr, weight_ptr, scales.data_ptr<float>(), T * k, k, n);
  std::vector<float> h(static_cast<size_t>(T * k * r));
  shrink(b, x.data_ptr<float>(), a.data_ptr<float>(), d_in, r, h.data());
  expand(b, h.data(), b_t.data_ptr<float>(), r, d_out, out.data_ptr<float>());
  return {ids, weights};
}

TORCH_LIBRARY(peft_routing, m) {
  m.def("routed_lora_(Tensor(a!) out, Tensor x, Tensor scores, Tensor a, Tensor b_t, Tensor scales, int k, "
        "bool sigmoid, float temperature) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peft_routing, CPU, m) { m.impl("routed_lora_", routed_lora_); }
