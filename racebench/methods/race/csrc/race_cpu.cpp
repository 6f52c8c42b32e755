// Native CPU twins of lean.py's four non-causal per-head functions (key_state, query_forward, query_backward,
// key_backward): the same math, in tiles of TILE tokens. Everything a tile needs is one of three small products
// (AnyD, FixedD below) plus the soft hash's elementwise work across the tile's tokens (SoftHash):
//   project     out[i, j] = M_i . x_j          the projections W x, and G = Z dO, g = dKV v
//   accumulate  rows_s += sum_j c[s, j] x_j     the states KV and dKV
//   combine     out_j (+)= sum_s c[s, j] M_s    the outputs o, dv, and dq, dk back through the projections
// For the common head dimensions (64, 128) they run register-blocked on whole SIMD vectors (FixedD); for any other
// the plain loops of AnyD serve. One head per call; rows [T, D] with unit stride along D (the output gradient may
// have any strides: the protocol's is a broadcast view); accumulation in the input type (fp32 or fp64), in chunks
// of CHUNK tokens so that long sums stay accurate.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t CHUNK = 512;  // tokens summed into a chunk's partial state before it joins the total
constexpr int MAX_LP = 64, MAX_S = 512;
// The register-blocked products' vectors: AVX-512's 64 bytes, else AVX2's 32. 64-byte vectors on AVX2 are pairs
// of registers, and the blocks of accumulators sized for AVX-512's 32 registers, doubled, spill out of AVX2's 16:
// every multiply-add then went through memory (11x slower, benchmarks/native_kernels.py on an AVX2 machine).
#if defined(__AVX512F__)
constexpr int VBYTES = 64;
#else
constexpr int VBYTES = 32;
#endif
constexpr int TILE = 32;  // tokens handled together; tile arrays are feature-major: a[i * TILE + j], token j

// The soft hash's elementwise work, across a tile's tokens (SIMD lanes).
template <typename T>
struct SoftHash {
  int L, P, R, S, LP;
  T beta;

  // u: the projections W x in, tanh(W x) out ([LP, TILE]); f: the features phi(x) [S, TILE], per table the
  // product over bits of sigmoid(+-2 beta u).
  void activate(T* u, T* f) const {
    T plus[16 * TILE], minus[16 * TILE];
    for (int l = 0; l < L; ++l) {
      for (int p = 0; p < P; ++p) {
        T* ui = u + (l * P + p) * TILE;
#pragma omp simd
        for (int j = 0; j < TILE; ++j) {
          T t = std::tanh(ui[j]);
          ui[j] = t;
          T z = 2 * beta * t, e = std::exp(-std::abs(z)), big = T(1) / (T(1) + e);  // sigmoid(|z|)
          plus[p * TILE + j] = z >= 0 ? big : e * big;
          minus[p * TILE + j] = z >= 0 ? e * big : big;
        }
      }
      // Bit p of r, most significant first: 1 is corner +1, 0 is -1. Products over the first p bits extend to
      // p + 1 bits in place (r to 2r and 2r + 1, from the top down so nothing is overwritten before it is read).
      T* fl = f + l * R * TILE;
      for (int j = 0; j < TILE; ++j) fl[j] = 1;
      for (int p = 0; p < P; ++p)
        for (int r = (1 << p) - 1; r >= 0; --r) {
          const T *fr = fl + r * TILE, *pl = plus + p * TILE, *mi = minus + p * TILE;
          T *hi = fl + (2 * r + 1) * TILE, *lo = fl + 2 * r * TILE;
#pragma omp simd
          for (int j = 0; j < TILE; ++j) {
            T x = fr[j];
            hi[j] = x * pl[j];
            lo[j] = x * mi[j];
          }
        }
    }
  }

  // One token's features, for a decode step: u [LP] the projections W x in, tanh(W x) out; f [S]. The tile's
  // arithmetic for a single lane, without the TILE - 1 lanes that activate() would compute and discard.
  void activate_one(T* u, T* f) const {
    for (int l = 0; l < L; ++l) {
      T* fl = f + l * R;
      fl[0] = 1;
      for (int p = 0; p < P; ++p) {
        T t = std::tanh(u[l * P + p]);
        u[l * P + p] = t;
        T z = 2 * beta * t, e = std::exp(-std::abs(z)), big = T(1) / (T(1) + e);
        T plus = z >= 0 ? big : e * big, minus = z >= 0 ? e * big : big;
        for (int r = (1 << p) - 1; r >= 0; --r) {
          T x = fl[r];
          fl[2 * r + 1] = x * plus;
          fl[2 * r] = x * minus;
        }
      }
    }
  }

  // dh [LP, TILE]: the gradient of <phi(x), g> with respect to the projections W x (softmax backward per table,
  // then tanh), from u = tanh(W x), f and g [S, TILE].
  void backward(const T* u, const T* f, const T* g, T* dh) const {
    for (int l = 0; l < L; ++l) {
      const T *fl = f + l * R * TILE, *gl = g + l * R * TILE;
      T fg[TILE] = {};
      for (int r = 0; r < R; ++r)
#pragma omp simd
        for (int j = 0; j < TILE; ++j) fg[j] += fl[r * TILE + j] * gl[r * TILE + j];
      for (int p = 0; p < P; ++p) {
        T du[TILE] = {};
        for (int r = 0; r < R; ++r) {
          T sign = ((r >> (P - 1 - p)) & 1) ? T(1) : T(-1);
#pragma omp simd
          for (int j = 0; j < TILE; ++j) du[j] += sign * fl[r * TILE + j] * (gl[r * TILE + j] - fg[j]);
        }
        const T* ui = u + (l * P + p) * TILE;
        T* d = dh + (l * P + p) * TILE;
#pragma omp simd
        for (int j = 0; j < TILE; ++j) d[j] = beta * du[j] * (T(1) - ui[j] * ui[j]);
      }
    }
  }
};

// The three products for any head dimension, plain loops. A tile's rows are x0 + j * xs; a tile of n < TILE tokens
// repeats its last row (finite, unused: sums and stores stop at n).
template <typename T>
struct AnyD {
  int64_t D;
  struct Matrix {
    const T* M;  // [m, D]
    int m;
  };
  Matrix matrix(const T* M, int m) const { return {M, m}; }

  void project(const Matrix& A, const T* x0, int64_t xs, int n, T* out) const {
    for (int j = 0; j < TILE; ++j) {
      const T* x = x0 + std::min(j, n - 1) * xs;
      for (int i = 0; i < A.m; ++i) {
        const T* w = A.M + i * D;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) acc += w[d] * x[d];
        out[i * TILE + j] = acc;
      }
    }
  }

  void accumulate(T* rows, const T* c, int S, const T* x0, int64_t xs, int n) const {
    for (int s = 0; s < S; ++s) {
      T* row = rows + s * D;
      for (int j = 0; j < n; ++j) {
        const T* x = x0 + j * xs;
        T w = c[s * TILE + j];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) row[d] += w * x[d];
      }
    }
  }

  void combine(T* out0, int64_t os, const T* c, int S, const T* M, int n, bool keep) const {
    for (int j = 0; j < n; ++j) {
      T* out = out0 + j * os;
      if (!keep) std::fill(out, out + D, T(0));
      for (int s = 0; s < S; ++s) {
        const T* m = M + s * D;
        T w = c[s * TILE + j];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) out[d] += w * m[d];
      }
    }
  }
};

// The three products for D = ND vectors of N lanes (VBYTES: one AVX-512 or one AVX2 register), with
// accumulators held in registers across a block of tokens or state rows: GCC vector extensions, so the compiler
// keeps the fully unrolled arrays in registers.
template <typename T, int ND>
struct FixedD {
  static constexpr int N = VBYTES / sizeof(T);
  static constexpr int64_t D = ND * N;
  typedef T V __attribute__((vector_size(VBYTES)));
  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static void store(T* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }
  // A store past the caches to 64-byte aligned p: output rows, written once and not read here, need not be read
  // in first (finish_streams() before the writing thread's results are used).
  static void stream(T* p, const V& v) {
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == 4) _mm512_stream_ps(p, (__m512)v);
    else _mm512_stream_pd(p, (__m512d)v);
#else
    store(p, v);
#endif
  }

  struct Matrix {
    std::vector<T> t;  // M transposed, [D, width], zero columns past m
    int m, width;      // width: m rounded up to whole vectors
  };
  Matrix matrix(const T* M, int m) const {
    int width = (m + N - 1) / N * N;
    Matrix A{std::vector<T>(D * width, T(0)), m, width};
    for (int i = 0; i < m; ++i)
      for (int64_t d = 0; d < D; ++d) A.t[d * width + i] = M[i * D + d];
    return A;
  }

  // CW vectors of output columns from c0 for JB tokens from j0, into tmp (token-major): JB * CW accumulators in
  // registers over 16 terms at a time (as accurate as a SIMD dot product), then added up in tmp.
  template <int CW, int JB>
  static void project_block(const Matrix& A, int c0, const T* rows, int j0, T* tmp) {
    const T* x = rows + j0 * D;  // the block's rows at fixed offsets, which spares general-purpose registers
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      V part[JB][CW] = {};
      for (int64_t d = d0; d < d0 + 16; ++d) {
        const T* row = A.t.data() + d * A.width + c0;
        V m[CW];
#pragma GCC unroll 4
        for (int c = 0; c < CW; ++c) m[c] = load(row + c * N);
#pragma GCC unroll 16
        for (int b = 0; b < JB; ++b) {
          T xv = x[b * D + d];
#pragma GCC unroll 4
          for (int c = 0; c < CW; ++c) part[b][c] += xv * m[c];
        }
      }
      for (int b = 0; b < JB; ++b)
        for (int c = 0; c < CW; ++c) {
          T* out = tmp + (j0 + b) * A.width + c0 + c * N;
          store(out, d0 ? load(out) + part[b][c] : part[b][c]);
        }
    }
  }

  void project(const Matrix& A, const T* x0, int64_t xs, int n, T* out) const {
    // The tile's rows copied in back to back first: read column by column straight from DRAM, they stall.
    T rows[TILE * D], tmp[TILE * (MAX_S + 16)];  // tmp: out, token-major
    if (xs == D && n == TILE) std::memcpy(rows, x0, sizeof(rows));
    else
      for (int j = 0; j < TILE; ++j) std::memcpy(rows + j * D, x0 + std::min(j, n - 1) * xs, D * sizeof(T));
    int c0 = 0;
    for (; c0 + 2 * N <= A.width; c0 += 2 * N)
      for (int j0 = 0; j0 < TILE; j0 += 8) project_block<2, 8>(A, c0, rows, j0, tmp);
    if (c0 < A.width)
      for (int j0 = 0; j0 < TILE; j0 += 16) project_block<1, 16>(A, c0, rows, j0, tmp);
    for (int i = 0; i < A.m; ++i)
      for (int j = 0; j < TILE; ++j) out[i * TILE + j] = tmp[j * A.width + i];
  }

  // SB state rows from s0 in registers while the tile's tokens pass.
  template <int SB>
  static void accumulate_block(T* rows, const T* c, int s0, const T* x0, int64_t xs, int n) {
    V acc[SB][ND];
    for (int b = 0; b < SB; ++b)
      for (int k = 0; k < ND; ++k) acc[b][k] = load(rows + (s0 + b) * D + k * N);
    for (int j = 0; j < n; ++j) {
      const T* x = x0 + j * xs;
      T w[SB];
      for (int b = 0; b < SB; ++b) w[b] = c[(s0 + b) * TILE + j];
#pragma GCC unroll 16
      for (int k = 0; k < ND; ++k) {
        V xv = load(x + k * N);
#pragma GCC unroll 8
        for (int b = 0; b < SB; ++b) acc[b][k] += w[b] * xv;
      }
    }
    for (int b = 0; b < SB; ++b)
      for (int k = 0; k < ND; ++k) store(rows + (s0 + b) * D + k * N, acc[b][k]);
  }

  void accumulate(T* rows, const T* c, int S, const T* x0, int64_t xs, int n) const {
    constexpr int SB = ND <= 8 ? 24 / ND : 1;
    int s0 = 0;
    for (; s0 + SB <= S; s0 += SB) accumulate_block<SB>(rows, c, s0, x0, xs, n);
    for (; s0 < S; ++s0) accumulate_block<1>(rows, c, s0, x0, xs, n);
  }

  // JB tokens' output rows from j0 in registers while the S rows of M pass.
  template <int JB>
  static void combine_block(T* out0, int64_t os, const T* c, int S, const T* M, int j0, int n, bool keep) {
    V acc[JB][ND] = {};
    if (keep)
      for (int b = 0; b < JB && j0 + b < n; ++b)
        for (int k = 0; k < ND; ++k) acc[b][k] = load(out0 + (j0 + b) * os + k * N);
    for (int s = 0; s < S; ++s) {
      T w[JB];
      for (int b = 0; b < JB; ++b) w[b] = c[s * TILE + j0 + b];
#pragma GCC unroll 16
      for (int k = 0; k < ND; ++k) {
        V m = load(M + s * D + k * N);
#pragma GCC unroll 8
        for (int b = 0; b < JB; ++b) acc[b][k] += w[b] * m;
      }
    }
    bool aligned = (reinterpret_cast<std::uintptr_t>(out0) | (os * sizeof(T))) % 64 == 0;
    for (int b = 0; b < JB && j0 + b < n; ++b)
      for (int k = 0; k < ND; ++k) {
        T* p = out0 + (j0 + b) * os + k * N;
        if (aligned) stream(p, acc[b][k]);
        else store(p, acc[b][k]);
      }
  }

  void combine(T* out0, int64_t os, const T* c, int S, const T* M, int n, bool keep) const {
    constexpr int JB = ND <= 8 ? 16 / ND : 1;
    for (int j0 = 0; j0 < n; j0 += JB) combine_block<JB>(out0, os, c, S, M, j0, n, keep);
  }
};

// Streamed stores are weakly ordered: each writing thread fences them before its results are used.
inline void finish_streams() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

// The hash's planes and the products that use them. Ops: AnyD<T> or FixedD<T, ND>.
template <typename T, typename Ops>
struct Kernel {
  Ops ops;
  SoftHash<T> hash;
  const T* W;  // [LP, D]
  typename Ops::Matrix Wm;

  // u = tanh(W x_j) [LP, TILE] and f = phi(x_j) [S, TILE] for a tile of rows x0 + j * xs.
  void features(const T* x0, int64_t xs, int n, T* u, T* f) const {
    ops.project(Wm, x0, xs, n, u);
    hash.activate(u, f);
  }

  // dx_j (= or +=) the gradient of <phi(x_j), g_j> with respect to x_j, for the tile's n tokens.
  void vjp(const T* u, const T* f, const T* g, T* dx0, int64_t dxs, int n, bool accumulate) const {
    T dh[MAX_LP * TILE];
    hash.backward(u, f, g, dh);
    ops.combine(dx0, dxs, dh, hash.LP, W, n, accumulate);
  }
};

template <typename T>
SoftHash<T> make_hash(const torch::Tensor& W, int64_t L, int64_t P, double beta) {
  TORCH_CHECK(W.is_contiguous() && W.dim() == 2 && W.size(0) == L * P, "W must be contiguous [L*P, D]");
  TORCH_CHECK(P >= 1 && P <= 9 && L * P <= MAX_LP && L * (1 << P) <= MAX_S, "race_cpu: L*P <= 64, S <= 512");
  return {int(L), int(P), int(1 << P), int(L << P), int(L * P), T(beta)};
}

template <typename T, typename Ops>
Kernel<T, Ops> make_kernel(Ops ops, const torch::Tensor& W, int64_t L, int64_t P, double beta) {
  auto hash = make_hash<T>(W, L, P, beta);
  const T* Wp = W.data_ptr<T>();
  auto Wm = ops.matrix(Wp, hash.LP);
  return {ops, hash, Wp, std::move(Wm)};
}

void check_rows(const torch::Tensor& x, int64_t D, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == D && (x.stride(1) == 1 || x.size(1) == 1), name,
              " must be [T, D] with unit stride along D");
}

// Sums over tokens: each chunk of CHUNK tokens accumulates into its own partial, partials are added in order.
template <typename T, typename Body>
void chunked_sum(int64_t n_tokens, int64_t width, T* total, Body body) {
  int64_t n_chunks = (n_tokens + CHUNK - 1) / CHUNK;
  std::vector<T> partial(n_chunks * width, T(0));
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) body(c * CHUNK, std::min(n_tokens, (c + 1) * CHUNK), partial.data() + c * width);
    finish_streams();
  });
  for (int64_t c = 0; c < n_chunks; ++c)
    for (int64_t i = 0; i < width; ++i) total[i] += partial[c * width + i];
}

// sums[s] += sum over the tile's n tokens of c[s, j].
template <typename T>
void add_sums(T* sums, const T* c, int S, int n) {
  for (int s = 0; s < S; ++s)
    for (int j = 0; j < n; ++j) sums[s] += c[s * TILE + j];
}

// Z = KV for the paper normalization, KV / (A + eps) row by row for the bucket one.
template <typename T>
std::vector<T> query_state(const torch::Tensor& A, const torch::Tensor& KV, bool paper, double eps) {
  int64_t S = KV.size(0), D = KV.size(1);
  const T* Ap = A.data_ptr<T>();
  std::vector<T> Z(KV.data_ptr<T>(), KV.data_ptr<T>() + S * D);
  if (!paper)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t d = 0; d < D; ++d) Z[s * D + d] /= Ap[s] + T(eps);
  return Z;
}

// 1 / (eps + A . phi(x_j)) per token of a tile: the paper normalization's denominator.
template <typename T>
void inverse_denominators(const T* A, const T* f, int S, double eps, T* inv) {
  T den[TILE];
  for (int j = 0; j < TILE; ++j) den[j] = T(eps);
  for (int s = 0; s < S; ++s)
#pragma omp simd
    for (int j = 0; j < TILE; ++j) den[j] += A[s] * f[s * TILE + j];
  for (int j = 0; j < TILE; ++j) inv[j] = T(1) / den[j];
}

template <typename T, typename Ops>
std::vector<torch::Tensor> key_state_impl(const torch::Tensor& k, const torch::Tensor& v, const Kernel<T, Ops>& K) {
  int64_t T_ = k.size(0), D = K.ops.D, S = K.hash.S;
  auto A = torch::zeros({S}, k.options()), KV = torch::zeros({S, D}, k.options());
  std::vector<T> total(S + S * D, T(0));
  const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  int64_t ks = k.stride(0), vs = v.stride(0);
  chunked_sum<T>(T_, S + S * D, total.data(), [&](int64_t t0, int64_t t1, T* acc) {
    T u[MAX_LP * TILE], f[MAX_S * TILE];
    for (int64_t tt = t0; tt < t1; tt += TILE) {
      int n = int(std::min<int64_t>(TILE, t1 - tt));
      K.features(kp + tt * ks, ks, n, u, f);
      add_sums(acc, f, int(S), n);
      K.ops.accumulate(acc + S, f, int(S), vp + tt * vs, vs, n);
    }
  });
  std::copy(total.begin(), total.begin() + S, A.data_ptr<T>());
  std::copy(total.begin() + S, total.end(), KV.data_ptr<T>());
  return {A, KV};
}

template <typename T, typename Ops>
void query_forward_impl(const torch::Tensor& q, const torch::Tensor& A, const torch::Tensor& KV, torch::Tensor& o,
                        bool paper, double eps, const Kernel<T, Ops>& K) {
  const int S = K.hash.S;
  const T *Ap = A.data_ptr<T>(), *qp = q.data_ptr<T>();
  std::vector<T> Z = query_state<T>(A, KV, paper, eps);
  T* op = o.data_ptr<T>();
  int64_t qs = q.stride(0), os = o.stride(0);
  at::parallel_for(0, q.size(0), 256, [&](int64_t t0, int64_t t1) {
    T u[MAX_LP * TILE], f[MAX_S * TILE], inv[TILE];
    for (int64_t tt = t0; tt < t1; tt += TILE) {
      int n = int(std::min<int64_t>(TILE, t1 - tt));
      K.features(qp + tt * qs, qs, n, u, f);
      if (paper) {
        inverse_denominators(Ap, f, S, eps, inv);
        for (int s = 0; s < S; ++s)
#pragma omp simd
          for (int j = 0; j < TILE; ++j) f[s * TILE + j] *= inv[j];
      }
      K.ops.combine(op + tt * os, os, f, S, Z.data(), n, false);
    }
    finish_streams();
  });
}

template <typename T, typename Ops>
std::vector<torch::Tensor> query_backward_impl(const torch::Tensor& q, const torch::Tensor& dout,
                                               const torch::Tensor& A, const torch::Tensor& KV, torch::Tensor& dq,
                                               bool paper, double eps, const Kernel<T, Ops>& K) {
  const int64_t D = K.ops.D;
  const int S = K.hash.S;
  const T *Ap = A.data_ptr<T>(), *qp = q.data_ptr<T>(), *gp = dout.data_ptr<T>();
  int64_t gcs = dout.stride(1);  // 0 for a broadcast gradient: rows are gathered into a local buffer
  std::vector<T> Z = query_state<T>(A, KV, paper, eps);
  auto Zm = K.ops.matrix(Z.data(), S);
  T* dqp = dq.data_ptr<T>();
  int64_t qs = q.stride(0), gs = dout.stride(0), dqs = dq.stride(0);
  std::vector<T> total(S + S * D, T(0));  // dA, then dKV (paper) or the gradient of Z (bucket)
  chunked_sum<T>(q.size(0), S + S * D, total.data(), [&](int64_t t0, int64_t t1, T* acc) {
    T u[MAX_LP * TILE], f[MAX_S * TILE], G[MAX_S * TILE], inv[TILE], w[TILE];
    // Output-gradient rows with unit stride: in place, or gathered (a broadcast gradient: once).
    std::vector<T> gathered(gcs == 1 ? 0 : (gs == 0 ? 1 : TILE) * D);
    if (gcs != 1 && gs == 0)
      for (int64_t d = 0; d < D; ++d) gathered[d] = gp[d * gcs];
    for (int64_t tt = t0; tt < t1; tt += TILE) {
      int n = int(std::min<int64_t>(TILE, t1 - tt));
      K.features(qp + tt * qs, qs, n, u, f);
      const T* g0 = gp + tt * gs;
      int64_t g_stride = gs;
      if (gcs != 1) {
        if (gs != 0)
          for (int j = 0; j < n; ++j)
            for (int64_t d = 0; d < D; ++d) gathered[j * D + d] = g0[j * gs + d * gcs];
        g0 = gathered.data(), g_stride = gs == 0 ? 0 : D;
      }
      K.ops.project(Zm, g0, g_stride, n, G);  // G = Z g: the gradient of the features (paper: of phi / den)
      if (paper) {  // through the denominator: dphi = G / den - A (phi . G) / den^2; dA -= phi (phi . G) / den^2
        inverse_denominators(Ap, f, S, eps, inv);
        for (int j = 0; j < TILE; ++j) w[j] = 0;
        for (int s = 0; s < S; ++s)
#pragma omp simd
          for (int j = 0; j < TILE; ++j) w[j] += f[s * TILE + j] * G[s * TILE + j];
        for (int j = 0; j < TILE; ++j) w[j] *= inv[j] * inv[j];
        for (int s = 0; s < S; ++s) {
          T* Gs = G + s * TILE;
          const T* fs = f + s * TILE;
#pragma omp simd
          for (int j = 0; j < TILE; ++j) Gs[j] = Gs[j] * inv[j] - Ap[s] * w[j];
          for (int j = 0; j < n; ++j) acc[s] -= fs[j] * w[j];
        }
      }
      K.vjp(u, f, G, dqp + tt * dqs, dqs, n, false);
      if (paper)  // dKV += (phi / den) g^T
        for (int s = 0; s < S; ++s)
#pragma omp simd
          for (int j = 0; j < TILE; ++j) f[s * TILE + j] *= inv[j];
      K.ops.accumulate(acc + S, f, S, g0, g_stride, n);
    }
  });
  auto dA = torch::empty({S}, q.options()), dKV = torch::empty({S, D}, q.options());
  T *dAp = dA.data_ptr<T>(), *dKVp = dKV.data_ptr<T>();
  for (int s = 0; s < S; ++s) {
    if (paper) {
      dAp[s] = total[s];
      for (int64_t d = 0; d < D; ++d) dKVp[s * D + d] = total[S + s * D + d];
    } else {  // Z = KV / (A + eps): the gradient of Z splits into those of KV and A
      T a_eps = Ap[s] + T(eps), dz_z = 0;
      for (int64_t d = 0; d < D; ++d) {
        dz_z += total[S + s * D + d] * Z[s * D + d];
        dKVp[s * D + d] = total[S + s * D + d] / a_eps;
      }
      dAp[s] = -dz_z / a_eps;
    }
  }
  return {dA, dKV};
}

template <typename T, typename Ops>
void key_backward_impl(const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& dA,
                       const torch::Tensor& dKV, torch::Tensor& dk, torch::Tensor& dv, bool accumulate,
                       const Kernel<T, Ops>& K) {
  const int S = K.hash.S;
  const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *dAp = dA.data_ptr<T>(), *dKVp = dKV.data_ptr<T>();
  auto dKVm = K.ops.matrix(dKVp, S);
  T *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();
  int64_t ks = k.stride(0), vs = v.stride(0), dks = dk.stride(0), dvs = dv.stride(0);
  at::parallel_for(0, k.size(0), 256, [&](int64_t t0, int64_t t1) {
    T u[MAX_LP * TILE], f[MAX_S * TILE], g[MAX_S * TILE];
    for (int64_t tt = t0; tt < t1; tt += TILE) {
      int n = int(std::min<int64_t>(TILE, t1 - tt));
      K.features(kp + tt * ks, ks, n, u, f);
      K.ops.project(dKVm, vp + tt * vs, vs, n, g);  // g = dA + dKV v: the gradient of the features
      for (int s = 0; s < S; ++s)
#pragma omp simd
        for (int j = 0; j < TILE; ++j) g[s * TILE + j] += dAp[s];
      K.ops.combine(dvp + tt * dvs, dvs, f, S, dKVp, n, accumulate);  // dv (+)= phi(k)^T dKV
      K.vjp(u, f, g, dkp + tt * dks, dks, n, accumulate);
    }
    finish_streams();
  });
}

// One decoded token for every head (rows n of q, k, v [N, D], N = B * H): its key and value added to the head's
// state A [N, S], KV [N, S, D] in place, then its output o [N, D] against the state. One call per token: the
// PyTorch form of a step is some forty tiny operations, whose dispatch costs more than their arithmetic. A token is
// too little work for the tiles (their projections and hash run TILE lanes for one token), so plain loops for one.
template <typename T>
void decode_step_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& A,
                      torch::Tensor& KV, torch::Tensor& o, bool paper, double eps, const T* W,
                      const SoftHash<T>& hash) {
  const int64_t N = q.size(0), D = q.size(1), S = hash.S, LP = hash.LP;
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  T *Ap = A.data_ptr<T>(), *KVp = KV.data_ptr<T>(), *op = o.data_ptr<T>();
  auto features = [&](const T* x, T* u, T* f) {  // u = W x, then phi(x) into f
    for (int64_t i = 0; i < LP; ++i) {
      const T* w = W + i * D;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < D; ++d) acc += w[d] * x[d];
      u[i] = acc;
    }
    hash.activate_one(u, f);
  };
  // Threads only for heads worth waking them for: a head's step is a few microseconds of arithmetic, about what
  // handing work to another thread costs.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (S * D));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    T u[MAX_LP], f[MAX_S];
    for (int64_t n = n0; n < n1; ++n) {
      T *An = Ap + n * S, *KVn = KVp + n * S * D, *on = op + n * o.stride(0);
      const T* vn = vp + n * v.stride(0);
      features(kp + n * k.stride(0), u, f);
      for (int64_t s = 0; s < S; ++s) {
        const T fs = f[s];
        An[s] += fs;
        T* row = KVn + s * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) row[d] += fs * vn[d];
      }
      features(qp + n * q.stride(0), u, f);
      T den = T(eps);
      if (paper)
        for (int64_t s = 0; s < S; ++s) den += f[s] * An[s];
      for (int64_t d = 0; d < D; ++d) on[d] = T(0);
      for (int64_t s = 0; s < S; ++s) {
        const T w = paper ? f[s] / den : f[s] / (An[s] + T(eps));
        const T* row = KVn + s * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) on[d] += w * row[d];
      }
    }
  });
}

// Runs the lambda with `scalar` the tensor's type and `ops` the products for its head dimension: register-blocked
// where it is a common one (64, 128), plain loops otherwise.
template <typename F>
auto dispatch(const torch::Tensor& x, int64_t D, F f) {
  auto by_dim = [&](auto type_tag) {
    using scalar = decltype(type_tag);
    constexpr int N = VBYTES / sizeof(scalar);
    if (D == 128) return f(scalar(), FixedD<scalar, 128 / N>());
    if (D == 64) return f(scalar(), FixedD<scalar, 64 / N>());
    return f(scalar(), AnyD<scalar>{D});
  };
  if (x.scalar_type() == torch::kFloat) return by_dim(float());
  TORCH_CHECK(x.scalar_type() == torch::kDouble, "race_cpu takes fp32 or fp64");
  return by_dim(double());
}

#define DISPATCH(x, W, L, P, beta, ...) dispatch(x, W.size(1), [&](auto type_tag, auto ops) { \
    using scalar = decltype(type_tag);                                                      \
    auto K = make_kernel<scalar>(ops, W, L, P, beta);                                       \
    return __VA_ARGS__();                                                                   \
  })

std::vector<torch::Tensor> key_state(torch::Tensor k, torch::Tensor v, torch::Tensor W, int64_t L, int64_t P,
                                     double beta) {
  check_rows(k, W.size(1), "k"), check_rows(v, W.size(1), "v");
  return DISPATCH(k, W, L, P, beta, [&] { return key_state_impl<scalar>(k, v, K); });
}

void query_forward(torch::Tensor q, torch::Tensor A, torch::Tensor KV, torch::Tensor o, bool paper, double eps,
                   torch::Tensor W, int64_t L, int64_t P, double beta) {
  check_rows(q, W.size(1), "q"), check_rows(o, W.size(1), "o");
  DISPATCH(q, W, L, P, beta, [&] { query_forward_impl<scalar>(q, A, KV, o, paper, eps, K); });
}

std::vector<torch::Tensor> query_backward(torch::Tensor q, torch::Tensor dout, torch::Tensor A, torch::Tensor KV,
                                          torch::Tensor dq, bool paper, double eps, torch::Tensor W, int64_t L,
                                          int64_t P, double beta) {
  check_rows(q, W.size(1), "q"), check_rows(dq, W.size(1), "dq");
  TORCH_CHECK(dout.dim() == 2 && dout.size(1) == W.size(1), "the output gradient must be [T, D]");
  return DISPATCH(q, W, L, P, beta, [&] { return query_backward_impl<scalar>(q, dout, A, KV, dq, paper, eps, K); });
}

void key_backward(torch::Tensor k, torch::Tensor v, torch::Tensor dA, torch::Tensor dKV, torch::Tensor dk,
                  torch::Tensor dv, bool accumulate, torch::Tensor W, int64_t L, int64_t P, double beta) {
  check_rows(k, W.size(1), "k"), check_rows(v, W.size(1), "v");
  check_rows(dk, W.size(1), "dk"), check_rows(dv, W.size(1), "dv");
  DISPATCH(k, W, L, P, beta, [&] { key_backward_impl<scalar>(k, v, dA, dKV, dk, dv, accumulate, K); });
}

void decode_step(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor A, torch::Tensor KV,
                 torch::Tensor o, bool paper, double eps, torch::Tensor W, int64_t L, int64_t P, double beta) {
  // Any leading shape (a model's [B, H, 1, D]) as rows of D, one per head: reshaped here, where a reshape costs
  // nothing next to the microseconds each one costs from Python. o and the state must be views: they are written.
  const int64_t D = W.size(1), S = L << P;
  q = q.reshape({-1, D}), k = k.reshape({-1, D}), v = v.reshape({-1, D}), o = o.view({-1, D});
  A = A.view({-1, S}), KV = KV.view({-1, S, D});
  check_rows(q, D, "q"), check_rows(k, D, "k"), check_rows(v, D, "v"), check_rows(o, D, "o");
  const int64_t N = q.size(0);
  TORCH_CHECK(k.size(0) == N && v.size(0) == N && o.size(0) == N, "q, k, v and o must have one row per head");
  TORCH_CHECK(A.is_contiguous() && KV.is_contiguous() && A.numel() == N * S && KV.numel() == N * S * W.size(1),
              "the state must be contiguous A [N, S] and KV [N, S, D]");
  TORCH_CHECK(A.scalar_type() == q.scalar_type() && KV.scalar_type() == q.scalar_type(),
              "the state must have the inputs' dtype");
  auto step = [&](auto type_tag) {
    using scalar = decltype(type_tag);
    decode_step_impl<scalar>(q, k, v, A, KV, o, paper, eps, W.data_ptr<scalar>(), make_hash<scalar>(W, L, P, beta));
  };
  if (q.scalar_type() == torch::kFloat) return step(float());
  TORCH_CHECK(q.scalar_type() == torch::kDouble, "race_cpu takes fp32 or fp64");
  step(double());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("key_state", &key_state);
  m.def("query_forward", &query_forward);
  m.def("query_backward", &query_backward);
  m.def("key_backward", &key_backward);
  m.def("decode_step", &decode_step);
}
