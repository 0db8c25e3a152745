"""Matrix-vector products for batch-1 CPU decoding (``gpt2_accel.decode``): a small C++ kernel, or torch.

At batch 1 a decoded token reads every weight once, so decoding speed is how fast the matrix-vector products
stream the weights from memory. On the 2-core development CPU torch's kernels are uneven on the shapes we decode
(docs/performance.md): the (50304 x 384) LM head ran at 6-8 GB/s through ``F.linear`` / ``torch.mv`` and 10-21
GB/s through ``x @ W^T`` with a transposed copy (MKL; faster than this kernel for that one product, so the
decoder keeps it there), the blocks' small matrices pay per-call overhead, and 2-32 input rows take MKL 4-8x the
time of one. The kernel below reads each weight row once, contiguously:

* weights in ``nn.Linear``'s own (out, in) row-major layout (no copy), each output an AVX2/FMA dot product of a
  weight row with the input rows (up to :data:`MAX_ROWS` inputs share each weight row read);
* four output rows at a time (four independent accumulators hide the FMA latency; one ``hadd`` tree reduces
  them), the blocks of output rows split over torch's intra-op threads (``at::parallel_for``, so
  ``torch.set_num_threads`` governs it like any torch op);
* optionally int8 weights with one fp32 scale per output row (weight-only quantisation: the input stays fp32,
  each weight is converted to fp32 in registers, the row's sum is scaled once), a quarter of the bytes.

``decode_step`` runs a whole one-token step of GPT-2's blocks (LayerNorm, qkv, cached single-query softmax
attention, output product, GELU MLP, residuals; then ln_f) in one call, with the same products: at batch 1 a
small model's step is otherwise dominated by the dispatch of ~20 torch ops per layer (``gpt2_accel.decode``).

It is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (g++ and ninja; cached under
``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``, so later runs load it in well under a second).
Where it cannot be built (no compiler, no AVX2) :func:`kernel` returns None once with a warning, and the decoder
computes the same products with torch (same values up to fp32 summation order).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MAX_ROWS = 32
"""Most input rows (batch x positions) sent to the fp32 kernel; more (a long prompt) go to torch's BLAS, which is
compute-bound there and better at it. From 2 to 32 rows the kernel was faster than ``x @ W^T`` on every decoding
shape measured (MKL's small-M products of the (50304 x 384) head took 4-8x its one-row time; docs/performance.md)."""

FUSED_SPLIT_BYTES = 512 << 10
"""Least work (bytes of weights or cache read) the fused step hands to a second thread: 512 KB splits each block
matrix of the reference shape over 2 threads. On a quiet 2-core host that took the batch-1 token from 10.3 to
7.7 ms (the blocks then stream with both cores' bandwidth); on a loaded one it made the step ~2.4x slower (each
hand-off waits for a descheduled thread), as every 2-thread decoder there: sample with 1 thread on a busy
machine (then nothing is split). The plain ``gemv`` keeps 4 MB (docs/performance.md)."""

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// Sum of each of four 8-lane vectors -> (sum a0, sum a1, sum a2, sum a3).
inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {  // 8 int8 weights -> 8 floats
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline float load1(const float* p) { return *p; }
inline float load1(const int8_t* p) { return static_cast<float>(*p); }

// Dot products of 4 consecutive weight rows (w, stride K) with 2 input rows x0, x1: 8 accumulators, each
// weight vector loaded once for both inputs. s0[r] = <w_r, x0>, s1[r] = <w_r, x1>.
template <typename W>
inline void dot4x2(const W* w, int64_t K, const float* x0, const float* x1, float* s0, float* s1) {
  const int64_t K8 = K & ~int64_t(7);
  const W *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8) {
    const __m256 u = _mm256_loadu_ps(x0 + k), v = _mm256_loadu_ps(x1 + k);
    __m256 q = load8(w0 + k);
    a0 = _mm256_fmadd_ps(q, u, a0); b0 = _mm256_fmadd_ps(q, v, b0);
    q = load8(w1 + k);
    a1 = _mm256_fmadd_ps(q, u, a1); b1 = _mm256_fmadd_ps(q, v, b1);
    q = load8(w2 + k);
    a2 = _mm256_fmadd_ps(q, u, a2); b2 = _mm256_fmadd_ps(q, v, b2);
    q = load8(w3 + k);
    a3 = _mm256_fmadd_ps(q, u, a3); b3 = _mm256_fmadd_ps(q, v, b3);
  }
  _mm_storeu_ps(s0, hsum4(a0, a1, a2, a3));
  _mm_storeu_ps(s1, hsum4(b0, b1, b2, b3));
  for (int64_t k = K8; k < K; ++k) {  // K not a multiple of 8
    const float u = x0[k], v = x1[k];
    s0[0] += load1(w0 + k) * u; s0[1] += load1(w1 + k) * u; s0[2] += load1(w2 + k) * u; s0[3] += load1(w3 + k) * u;
    s1[0] += load1(w0 + k) * v; s1[1] += load1(w1 + k) * v; s1[2] += load1(w2 + k) * v; s1[3] += load1(w3 + k) * v;
  }
}

// The same for one input row: 4 accumulators.
template <typename W>
inline void dot4x1(const W* w, int64_t K, const float* x0, float* s0) {
  const int64_t K8 = K & ~int64_t(7);
  const W *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8) {
    const __m256 u = _mm256_loadu_ps(x0 + k);
    a0 = _mm256_fmadd_ps(load8(w0 + k), u, a0);
    a1 = _mm256_fmadd_ps(load8(w1 + k), u, a1);
    a2 = _mm256_fmadd_ps(load8(w2 + k), u, a2);
    a3 = _mm256_fmadd_ps(load8(w3 + k), u, a3);
  }
  _mm_storeu_ps(s0, hsum4(a0, a1, a2, a3));
  for (int64_t k = K8; k < K; ++k) {
    const float u = x0[k];
    s0[0] += load1(w0 + k) * u; s0[1] += load1(w1 + k) * u; s0[2] += load1(w2 + k) * u; s0[3] += load1(w3 + k) * u;
  }
}

// One weight row with one input row (the last N % 4 rows).
template <typename W>
inline float dot1(const W* w, int64_t K, const float* x) {
  const int64_t K8 = K & ~int64_t(7);
  __m256 a = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8) a = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a);
  float s[4];
  const __m256 z = _mm256_setzero_ps();
  _mm_storeu_ps(s, hsum4(a, z, z, z));
  float v = s[0];
  for (int64_t k = K8; k < K; ++k) v += load1(w + k) * x[k];
  return v;
}

inline void put(float* y, int64_t N, int64_t m, int64_t o, float s, const float* scale, const float* bias) {
  if (scale) s *= scale[o];
  y[m * N + o] = bias ? s + bias[o] : s;
}

// y[m, o] = scale[o] * <w[o], x[m]> + bias[o] for the output rows [o0, o1); w is (N, K) row-major.
template <typename W>
void rows(const float* x, int64_t M, const W* w, int64_t K, const float* scale, const float* bias,
          float* y, int64_t N, int64_t o0, int64_t o1) {
  // With int8 weights and more than 2 inputs, each block of 4 rows is converted to fp32 once (into a buffer
  // that stays in L1) instead of once per pair of inputs.
  std::vector<float> buf;
  if (!std::is_same<W, float>::value && M > 2) buf.resize(4 * K);
  float s0[4], s1[4];
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    const W* wo = w + o * K;
    auto run = [&](auto* wb) {
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) {
        dot4x2(wb, K, x + m * K, x + (m + 1) * K, s0, s1);
        for (int r = 0; r < 4; ++r) {
          put(y, N, m, o + r, s0[r], scale, bias);
          put(y, N, m + 1, o + r, s1[r], scale, bias);
        }
      }
      if (m < M) {
        dot4x1(wb, K, x + m * K, s0);
        for (int r = 0; r < 4; ++r) put(y, N, m, o + r, s0[r], scale, bias);
      }
    };
    if (buf.empty()) {
      run(wo);
    } else {
      int64_t i = 0;
      for (; i + 8 <= 4 * K; i += 8) _mm256_storeu_ps(buf.data() + i, load8(wo + i));
      for (; i < 4 * K; ++i) buf[i] = load1(wo + i);
      run(static_cast<const float*>(buf.data()));
    }
  }
  for (; o < o1; ++o)
    for (int64_t m = 0; m < M; ++m) put(y, N, m, o, dot1(w + o * K, K, x + m * K), scale, bias);
}

}  // namespace

// y (M, N) = x (M, K) @ w^T (scaled per row for int8) + bias; nullptr scale/bias = none. Blocks of 4 output
// rows. A thread's share is at least ~4 MB of weights (or as much work with several inputs): on a shared 2-core
// host each hand-off to a second thread can wait milliseconds for it to be scheduled, so only the big matrix of
// a small model (its LM head) is split; the blocks' matrices (~2 MB at 384 wide) run on the calling thread
// (measured: docs/performance.md).
void linear(const float* xp, int64_t M, int64_t K, const torch::Tensor& w, const float* sp, const float* bp,
            float* yp, int64_t split_bytes = 4 << 20) {
  const int64_t N = w.size(0);
  const bool q = w.scalar_type() == at::kChar;
  const int64_t blocks = (N + 3) / 4;
  const int64_t block_cost = 4 * K * w.element_size() * std::max<int64_t>(1, M / 2);
  const int64_t grain = std::max<int64_t>(1, split_bytes / std::max<int64_t>(1, block_cost));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t o0 = b0 * 4, o1 = std::min(N, b1 * 4);
    if (q)
      rows<int8_t>(xp, M, w.data_ptr<int8_t>(), K, sp, bp, yp, N, o0, o1);
    else
      rows<float>(xp, M, w.data_ptr<float>(), K, nullptr, bp, yp, N, o0, o1);
  });
}

// x (M, K) fp32; w (N, K) fp32 or int8; scale (N,) fp32 with int8 weights; bias (N,) fp32 -> (M, N) fp32.
torch::Tensor gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> scale,
                   c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv: x (M, K) and w (N, K)");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gemv: CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && w.is_contiguous(), "gemv: contiguous fp32 x, w");
  const bool q = w.scalar_type() == at::kChar;
  TORCH_CHECK(q || w.scalar_type() == at::kFloat, "gemv: w must be fp32 or int8");
  TORCH_CHECK(q == scale.has_value(), "gemv: a scale goes with int8 weights, and only with them");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* sp = nullptr;
  const float* bp = nullptr;
  if (scale) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->numel() == N, "gemv: scale (N,)");
    sp = scale->data_ptr<float>();
  }
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "gemv: bias (N,)");
    bp = bias->data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  linear(x.data_ptr<float>(), M, K, w, sp, bp, y.data_ptr<float>());
  return y;
}

// ------------------------------------------------------------------------------------- the fused decode step
namespace {

// LayerNorm of each of M rows of width C (biased variance, as torch), sums in double: y = (x - mean) * rstd * g + b
// (no g / b: a norm without them).
void layer_norm(const float* x, int64_t M, int64_t C, const float* g, const float* b, double eps, float* y) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * C;
    float* yr = y + m * C;
    double s = 0;
    for (int64_t c = 0; c < C; ++c) s += xr[c];
    const double mean = s / C;
    double v = 0;
    for (int64_t c = 0; c < C; ++c) v += (xr[c] - mean) * (xr[c] - mean);
    const double rstd = 1.0 / std::sqrt(v / C + eps);
    for (int64_t c = 0; c < C; ++c) {
      float n = static_cast<float>((xr[c] - mean) * rstd);
      if (g) n *= g[c];
      yr[c] = b ? n + b[c] : n;
    }
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  const int64_t n8 = n & ~int64_t(7);
  __m256 s = _mm256_setzero_ps();
  for (int64_t i = 0; i < n8; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s);
  float t[4];
  const __m256 z = _mm256_setzero_ps();
  _mm_storeu_ps(t, hsum4(s, z, z, z));
  float r = t[0];
  for (int64_t i = n8; i < n; ++i) r += a[i] * b[i];
  return r;
}

inline void axpy(float a, const float* x, float* y, int64_t n) {  // y += a * x
  const int64_t n8 = n & ~int64_t(7);
  const __m256 av = _mm256_set1_ps(a);
  for (int64_t i = 0; i < n8; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (int64_t i = n8; i < n; ++i) y[i] += a * x[i];
}

// One query per (row, head) against the cached keys/values 0..pos (causal: the newest key is the query's own),
// softmax in fp32 with the max subtracted, scale 1/sqrt(hs) (causal_attention's "SM").
// qkv (M, 3C) = [q | k | v]; kc, vc (M, nh, Tmax, hs) get this position's k, v; y (M, C) heads side by side.
void attention(const float* qkv, int64_t M, int64_t C, int64_t nh, float* kc, float* vc, int64_t Tmax,
               int64_t pos, float* y, int64_t split_bytes) {
  const int64_t hs = C / nh, T = pos + 1;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t h = 0; h < nh; ++h) {
      float* kd = kc + ((m * nh + h) * Tmax + pos) * hs;
      float* vd = vc + ((m * nh + h) * Tmax + pos) * hs;
      std::memcpy(kd, qkv + m * 3 * C + C + h * hs, hs * sizeof(float));
      std::memcpy(vd, qkv + m * 3 * C + 2 * C + h * hs, hs * sizeof(float));
    }
  // Each (row, head) is independent; split over threads by the same rule as the products (split_bytes of
  // cache to read per thread).
  const int64_t task_bytes = 2 * T * hs * 4;
  const int64_t grain = std::max<int64_t>(1, split_bytes / task_bytes);
  at::parallel_for(0, M * nh, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(T);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m = t / nh, h = t % nh;
      const float* q = qkv + m * 3 * C + h * hs;
      const float* K = kc + (m * nh + h) * Tmax * hs;
      const float* V = vc + (m * nh + h) * Tmax * hs;
      float mx = -INFINITY;
      for (int64_t j = 0; j < T; ++j) {
        p[j] = dot(q, K + j * hs, hs) * scale;
        mx = std::max(mx, p[j]);
      }
      float sum = 0;
      for (int64_t j = 0; j < T; ++j) {
        p[j] = std::exp(p[j] - mx);
        sum += p[j];
      }
      float* yr = y + m * C + h * hs;
      std::fill(yr, yr + hs, 0.0f);
      for (int64_t j = 0; j < T; ++j) axpy(p[j], V + j * hs, yr, hs);
      const float inv = 1.0f / sum;
      for (int64_t d = 0; d < hs; ++d) yr[d] *= inv;
    }
  });
}

// GPT-2's GELU, the tanh approximation 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), written as
// x / (1 + exp(-2u)) (the same function: 1 + tanh(u) = 2 / (1 + exp(-2u))), which keeps its relative accuracy
// for large negative x, where 1 + tanh(u) cancels.
void gelu_tanh(float* x, int64_t n) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float u = k * (v + 0.044715f * v * v * v);
    x[i] = v / (1.0f + std::exp(-2.0f * u));
  }
}

const float* opt(const torch::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

}  // namespace

// One decoded token per row through every GPT-2 block and ln_f, in one call (no per-op dispatch):
// x (M, C) the token + position embeddings; p: per layer 16 tensors, then ln_f's weight and bias:
//   ln_1 (weight, bias), c_attn (weight, scale, bias), attn c_proj (w, s, b), ln_2 (w, b), c_fc (w, s, b),
//   mlp c_proj (w, s, b) -- weights fp32 (N, K) or int8 with a scale (N,); an empty tensor = no bias / scale;
// kc, vc: per layer the (M, nh, Tmax, hs) fp32 caches, filled up to pos - 1; this call writes position pos;
// split_bytes: the least work (bytes of weights or cache read) handed to another thread (FUSED_SPLIT_BYTES).
// Returns ln_f(x) (M, C).
torch::Tensor decode_step(torch::Tensor x, std::vector<torch::Tensor> p, std::vector<torch::Tensor> kc,
                          std::vector<torch::Tensor> vc, int64_t pos, int64_t n_head, double eps,
                          int64_t split_bytes) {
  const int64_t L = static_cast<int64_t>(kc.size());
  TORCH_CHECK(L > 0 && static_cast<int64_t>(p.size()) == 16 * L + 2 && static_cast<int64_t>(vc.size()) == L,
              "decode_step: 16 tensors per layer + 2, one k and v cache per layer");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "decode_step: x (M, C) fp32");
  for (const auto& t : p)
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kChar),
                "decode_step: contiguous fp32/int8 CPU parameters");
  const int64_t M = x.size(0), C = x.size(1), nh = n_head, hs = C / nh;
  TORCH_CHECK(C % nh == 0, "decode_step: n_embd must be a multiple of n_head");
  for (int64_t l = 0; l < L; ++l)
    for (const auto* c : {&kc[l], &vc[l]})
      TORCH_CHECK(c->scalar_type() == at::kFloat && c->is_contiguous() && c->dim() == 4 && c->size(0) == M &&
                  c->size(1) == nh && c->size(3) == hs && pos >= 0 && pos < c->size(2),
                  "decode_step: caches (M, n_head, T, head_dim) fp32 with pos < T");
  const int64_t Tmax = kc[0].size(2);
  auto out = x.clone();
  float* r = out.data_ptr<float>();  // the residual stream (M, C)
  std::vector<float> a(M * C), big(M * std::max<int64_t>(3 * C, p[10].size(0))), y(M * C);
  auto lin = [&](const float* in, int64_t K, int64_t i, float* dst) {  // p[i], p[i + 1], p[i + 2]: w, s, b
    TORCH_CHECK(p[i].dim() == 2 && p[i].size(1) == K && (p[i].scalar_type() == at::kChar) == (p[i + 1].numel() > 0),
                "decode_step: a weight (N, K), a scale with int8 weights only");
    linear(in, M, K, p[i], opt(p[i + 1]), opt(p[i + 2]), dst, split_bytes);
  };
  for (int64_t l = 0; l < L; ++l) {
    const int64_t o = 16 * l;
    TORCH_CHECK(p[o + 2].size(0) == 3 * C, "decode_step: c_attn must have 3 * n_embd outputs");
    layer_norm(r, M, C, opt(p[o]), opt(p[o + 1]), eps, a.data());
    lin(a.data(), C, o + 2, big.data());  // (M, 3C)
    attention(big.data(), M, C, nh, kc[l].data_ptr<float>(), vc[l].data_ptr<float>(), Tmax, pos, y.data(),
              split_bytes);
    lin(y.data(), C, o + 5, a.data());  // (M, C)
    for (int64_t i = 0; i < M * C; ++i) r[i] += a[i];
    layer_norm(r, M, C, opt(p[o + 8]), opt(p[o + 9]), eps, a.data());
    const int64_t H = p[o + 10].size(0);
    TORCH_CHECK(static_cast<int64_t>(big.size()) >= M * H && p[o + 13].size(0) == C, "decode_step: MLP shapes");
    lin(a.data(), C, o + 10, big.data());  // (M, 4C)
    gelu_tanh(big.data(), M * H);
    lin(big.data(), H, o + 13, a.data());  // (M, C)
    for (int64_t i = 0; i < M * C; ++i) r[i] += a[i];
  }
  auto h = torch::empty_like(out);
  layer_norm(r, M, C, opt(p[16 * L]), opt(p[16 * L + 1]), eps, h.data_ptr<float>());
  return h;
}
"""

_NAME = "gpt2_accel_gemv_v8"  # bump with the source: the on-disk cache is keyed by name and source
_lock = threading.Lock()
_state: dict[str, object] = {}


def kernel():
    """The compiled extension module (its ``gemv(x, w, scale, bias)``), or None where it cannot be built.

    Built once per process (and cached on disk across processes). ``GPT2_ACCEL_GEMV=torch`` in the environment
    skips it (the torch path everywhere).
    """
    with _lock:
        if "module" in _state:
            return _state["module"]
        _state["module"] = None
        if os.environ.get("GPT2_ACCEL_GEMV", "").lower() == "torch":
            return None
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            logger.warning("no AVX2 on this CPU: decoding uses torch's matrix products")
            return None
        try:
            from torch.utils.cpp_extension import load_inline

            _announce_build(_NAME)
            _state["module"] = load_inline(
                name=_NAME,
                cpp_sources=_SOURCE,
                functions=["gemv", "decode_step"],
                # -fopenmp: at::parallel_for is a header template that runs threads only when compiled with
                # OpenMP; the library it links (libgomp.so.1) is the one torch has already loaded.
                extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as e:  # no compiler / ninja / headers: the torch path computes the same products
            logger.warning(
                "could not build the CPU decoding kernel (%s: %s); decoding uses torch's matrix products. "
                "Install g++ and ninja (pip install ninja) for the faster path.",
                type(e).__name__,
                str(e).strip().splitlines()[-1] if str(e).strip() else "",
            )
        return _state["module"]


def _announce_build(name: str) -> None:
    """Say so when the kernel is about to be compiled (not cached yet): the first sample waits 1-5 minutes."""
    try:  # a private helper of torch's: where load_inline builds and caches ``name``
        from torch.utils.cpp_extension import _get_build_directory

        built = any(p.suffix == ".so" for p in Path(_get_build_directory(name, verbose=False)).glob("*"))
    except Exception:
        return
    if not built:
        logger.warning("compiling gpt2_accel's CPU decoding kernel (first use only, 1-5 min; then cached)")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (int8 (N, K), fp32 scale (N,)): symmetric, one scale per output row,
    ``w ~= q * scale[:, None]`` with ``q = round(w / scale)`` in [-127, 127], ``scale = max|w_row| / 127``."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (N,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()
