// Native CPU twins of lean.py's four non-causal per-head functions (key_state, query_forward, query_backward,
// key_backward): the same math, in tiles of TILE tokens whose soft-hash features are computed together (tanh and
// exp across the tokens, in SIMD lanes) and stay in cache, with each token's output and gradient rows and the
// state rows accumulated in registers, instead of [S, block] and [LP, block] temporaries streamed through memory
// between PyTorch operators. One head per call; rows [T, D] with unit stride along D (the output gradient may have
// any strides: the protocol's is a broadcast view); accumulation in the input type (fp32 or fp64), in chunks of
// CHUNK tokens so that long sums stay accurate.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t CHUNK = 512;     // tokens summed into a chunk's partial state before it joins the total
constexpr int MAX_LP = 64, MAX_S = 512;
constexpr int TILE = 16;  // tokens whose features are computed together

// A row of D values to accumulate into `out`: in registers when D is known at compile time (DC > 0), else in
// place. Starts from out's values (keep) or from zero; store() writes it back.
template <typename T, int DC>
struct Row {
  T local[DC > 0 ? DC : 1];
  T *out, *p;
  int64_t D;
  Row(T* out_, int64_t D_, bool keep) : out(out_), p(DC > 0 ? local : out_), D(D_) {
    if (DC > 0 || !keep)
      for (int64_t d = 0; d < D; ++d) p[d] = keep ? out[d] : T(0);
  }
  void store() {
    if (DC > 0)
      for (int64_t d = 0; d < D; ++d) out[d] = p[d];
  }
};

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

template <typename T, int DC>  // DC: the head dimension when known at compile time (64, 128), else 0
struct Hash {
  const T* W;  // [LP, D]
  int L, P, R, S, LP;
  int64_t D_;
  T beta;
  int64_t dim() const { return DC ? DC : D_; }

  // For a tile of n <= TILE tokens (rows x0 + j * xs), feature-major: u[i * TILE + j] = tanh(W x_j)_i and
  // f[s * TILE + j] = phi(x_j)_s, per table the product over bits of sigmoid(+-2 beta u). The transcendental
  // functions run across the tile's tokens, in SIMD lanes.
  void features(const T* x0, int64_t xs, int n, T* u, T* f) const {
    const int64_t D = dim();
    for (int j = 0; j < TILE; ++j) {
      const T* x = x0 + std::min(j, n - 1) * xs;  // a short tile repeats its last token: finite, unused
      for (int i = 0; i < LP; ++i) {
        const T* w = W + i * D;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) acc += w[d] * x[d];
        u[i * TILE + j] = acc;
      }
    }
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
      for (int r = 0; r < R; ++r) {  // bit p of r, most significant first: 1 is corner +1, 0 is -1
        T* fr = f + (l * R + r) * TILE;
        for (int j = 0; j < TILE; ++j) fr[j] = 1;
        for (int p = 0; p < P; ++p) {
          const T* sel = (((r >> (P - 1 - p)) & 1) ? plus : minus) + p * TILE;
#pragma omp simd
          for (int j = 0; j < TILE; ++j) fr[j] *= sel[j];
        }
      }
    }
  }

  // dx (= or +=) the gradient of <phi(x), g> with respect to x: softmax backward per table, tanh, projection.
  // u, f: token j's column of a tile (stride TILE); g [S].
  void vjp(const T* u, const T* f, const T* g, T* dx, bool accumulate) const {
    const int64_t D = dim();
    T dh[MAX_LP];
    for (int l = 0; l < L; ++l) {
      const T *fl = f + l * R * TILE, *gl = g + l * R;
      T fg = 0;
      for (int r = 0; r < R; ++r) fg += fl[r * TILE] * gl[r];
      for (int p = 0; p < P; ++p) {
        T du = 0;
        for (int r = 0; r < R; ++r) {
          T dlogit = fl[r * TILE] * (gl[r] - fg);
          du += ((r >> (P - 1 - p)) & 1) ? dlogit : -dlogit;
        }
        T ui = u[(l * P + p) * TILE];
        dh[l * P + p] = beta * du * (T(1) - ui * ui);
      }
    }
    Row<T, DC> row(dx, D, accumulate);
    for (int i = 0; i < LP; ++i) {
      const T* w = W + i * D;
      T h = dh[i];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) row.p[d] += h * w[d];
    }
    row.store();
  }
};

template <typename T, int DC>
Hash<T, DC> make_hash(const torch::Tensor& W, int64_t L, int64_t P, double beta) {
  TORCH_CHECK(W.is_contiguous() && W.dim() == 2 && W.size(0) == L * P, "W must be contiguous [L*P, D]");
  TORCH_CHECK(P >= 1 && P <= 9 && L * P <= MAX_LP && L * (1 << P) <= MAX_S, "race_cpu: L*P <= 64, S <= 512");
  Hash<T, DC> h;
  h.W = W.data_ptr<T>();
  h.L = int(L), h.P = int(P), h.R = 1 << P, h.S = int(L) << P, h.LP = int(L * P), h.D_ = W.size(1);
  h.beta = T(beta);
  return h;
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
  });
  for (int64_t c = 0; c < n_chunks; ++c)
    for (int64_t i = 0; i < width; ++i) total[i] += partial[c * width + i];
}

// rows[s * D + d] += sum_j f[s, j] x_j[d] over a tile's n tokens (rows x0 + j * xs), and sums[s] += sum_j f[s, j]
// unless sums is null: each state row is loaded once per tile and accumulates in registers (with D known).
template <typename T, int DC>
void add_outer(T* sums, T* rows, const T* f, const T* x0, int64_t xs, int n, int S, int64_t D_) {
  const int64_t D = DC ? DC : D_;
  for (int s = 0; s < S; ++s) {
    const T* fs = f + s * TILE;
    Row<T, DC> row(rows + s * D, D, true);
    T sum = 0;
    for (int j = 0; j < n; ++j) {
      const T* x = x0 + j * xs;
      T w = fs[j];
      sum += w;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) row.p[d] += w * x[d];
    }
    if (sums) sums[s] += sum;
    row.store();
  }
}

template <typename T, int DC>
std::vector<torch::Tensor> key_state_impl(const torch::Tensor& k, const torch::Tensor& v, const Hash<T, DC>& h) {
  int64_t T_ = k.size(0), D = h.dim(), S = h.S;
  auto A = torch::zeros({S}, k.options()), KV = torch::zeros({S, D}, k.options());
  std::vector<T> total(S + S * D, T(0));
  const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  int64_t ks = k.stride(0), vs = v.stride(0);
  chunked_sum<T>(T_, S + S * D, total.data(), [&](int64_t t0, int64_t t1, T* acc) {
    T u[MAX_LP * TILE], f[MAX_S * TILE];
    for (int64_t tt = t0; tt < t1; tt += TILE) {
      int n = int(std::min<int64_t>(TILE, t1 - tt));
      h.features(kp + tt * ks, ks, n, u, f);
      add_outer<T, DC>(acc, acc + S, f, vp + tt * vs, vs, n, S, D);
    }
  });
  std::copy(total.begin(), total.begin() + S, A.data_ptr<T>());
  std::copy(total.begin() + S, total.end(), KV.data_ptr<T>());
  return {A, KV};
}

template <typename T, int DC>
void query_forward_impl(const torch::Tensor& q, const torch::Tensor& A, const torch::Tensor& KV, torch::Tensor& o,
                        bool paper, double eps, const Hash<T, DC>& h) {
  const int64_t D = h.dim(), S = h.S;
  const T *Ap = A.data_ptr<T>(), *qp = q.data_ptr<T>();
  std::vector<T> Z = query_state<T>(A, KV, paper, eps);
  T* op = o.data_ptr<T>();
  int64_t qs = q.stride(0), os = o.stride(0);
  at::parallel_for(0, q.size(0), 256, [&](int64_t t0, int64_t t1) {
    T u[MAX_LP * TILE], f[MAX_S * TILE];
    for (int64_t tt = t0; tt < t1; tt += TILE) {
      int n = int(std::min<int64_t>(TILE, t1 - tt));
      h.features(qp + tt * qs, qs, n, u, f);
      for (int j = 0; j < n; ++j) {
        T scale = 1;
        if (paper) {
          T den = T(eps);
          for (int s = 0; s < S; ++s) den += Ap[s] * f[s * TILE + j];
          scale = T(1) / den;
        }
        Row<T, DC> row(op + (tt + j) * os, D, false);
        for (int s = 0; s < S; ++s) {
          const T* z = Z.data() + s * D;
          T fs = f[s * TILE + j] * scale;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) row.p[d] += fs * z[d];
        }
        row.store();
      }
    }
  });
}

template <typename T, int DC>
std::vector<torch::Tensor> query_backward_impl(const torch::Tensor& q, const torch::Tensor& dout,
                                               const torch::Tensor& A, const torch::Tensor& KV, torch::Tensor& dq,
                                               bool paper, double eps, const Hash<T, DC>& h) {
  const int64_t D = h.dim(), S = h.S;
  const T *Ap = A.data_ptr<T>(), *qp = q.data_ptr<T>(), *gp = dout.data_ptr<T>();
  int64_t gcs = dout.stride(1);  // 0 for a broadcast gradient: rows are gathered into a local buffer
  std::vector<T> Z = query_state<T>(A, KV, paper, eps), a_eps(S);
  for (int s = 0; s < S; ++s) a_eps[s] = Ap[s] + T(eps);
  T* dqp = dq.data_ptr<T>();
  int64_t qs = q.stride(0), gs = dout.stride(0), dqs = dq.stride(0);
  std::vector<T> total(S + S * D, T(0));  // dA, then dKV (paper) or the gradient of Z (bucket)
  chunked_sum<T>(q.size(0), S + S * D, total.data(), [&](int64_t t0, int64_t t1, T* acc) {
    T u[MAX_LP * TILE], f[MAX_S * TILE], fs[MAX_S * TILE], G[MAX_S], dfq[MAX_S];
    // Output-gradient rows with unit stride: in place, or gathered (a broadcast gradient: once).
    std::vector<T> gathered(gcs == 1 ? 0 : (gs == 0 ? 1 : TILE) * D);
    if (gcs != 1 && gs == 0)
      for (int64_t d = 0; d < D; ++d) gathered[d] = gp[d * gcs];
    for (int64_t tt = t0; tt < t1; tt += TILE) {
      int n = int(std::min<int64_t>(TILE, t1 - tt));
      h.features(qp + tt * qs, qs, n, u, f);
      const T* g0 = gp + tt * gs;
      int64_t g_stride = gs;
      if (gcs != 1) {
        if (gs != 0)
          for (int j = 0; j < n; ++j)
            for (int64_t d = 0; d < D; ++d) gathered[j * D + d] = g0[j * gs + d * gcs];
        g0 = gathered.data(), g_stride = gs == 0 ? 0 : D;
      }
      for (int j = 0; j < n; ++j) {
        int64_t t = tt + j;
        const T* fj = f + j;  // this token's features, stride TILE
        const T* g = g0 + j * g_stride;
        for (int s = 0; s < S; ++s) {  // G = Z g
          const T* z = Z.data() + s * D;
          T dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += z[d] * g[d];
          G[s] = dot;
        }
        T scale = 1;
        if (paper) {
          T den = T(eps), fG = 0;
          for (int s = 0; s < S; ++s) den += Ap[s] * fj[s * TILE], fG += fj[s * TILE] * G[s];
          T w = fG / (den * den);
          for (int s = 0; s < S; ++s) {
            dfq[s] = G[s] / den - Ap[s] * w;
            acc[s] -= fj[s * TILE] * w;
          }
          scale = T(1) / den;
        } else {
          for (int s = 0; s < S; ++s) dfq[s] = G[s];
        }
        for (int s = 0; s < S; ++s) fs[s * TILE + j] = fj[s * TILE] * scale;
        h.vjp(u + j, fj, dfq, dqp + t * dqs, false);
      }
      add_outer<T, DC>(nullptr, acc + S, fs, g0, g_stride, n, S, D);
    }
  });
  auto dA = torch::empty({S}, q.options()), dKV = torch::empty({S, D}, q.options());
  T *dAp = dA.data_ptr<T>(), *dKVp = dKV.data_ptr<T>();
  for (int s = 0; s < S; ++s) {
    if (paper) {
      dAp[s] = total[s];
      for (int64_t d = 0; d < D; ++d) dKVp[s * D + d] = total[S + s * D + d];
    } else {  // Z = KV / (A + eps): the gradient of Z splits into those of KV and A
      T dz_z = 0;
      for (int64_t d = 0; d < D; ++d) {
        dz_z += total[S + s * D + d] * Z[s * D + d];
        dKVp[s * D + d] = total[S + s * D + d] / a_eps[s];
      }
      dAp[s] = -dz_z / a_eps[s];
    }
  }
  return {dA, dKV};
}

template <typename T, int DC>
void key_backward_impl(const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& dA,
                       const torch::Tensor& dKV, torch::Tensor& dk, torch::Tensor& dv, bool accumulate,
                       const Hash<T, DC>& h) {
  const int64_t D = h.dim(), S = h.S;
  const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *dAp = dA.data_ptr<T>(), *dKVp = dKV.data_ptr<T>();
  T *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();
  int64_t ks = k.stride(0), vs = v.stride(0), dks = dk.stride(0), dvs = dv.stride(0);
  at::parallel_for(0, k.size(0), 256, [&](int64_t t0, int64_t t1) {
    T u[MAX_LP * TILE], f[MAX_S * TILE], g[MAX_S];
    for (int64_t tt = t0; tt < t1; tt += TILE) {
      int n = int(std::min<int64_t>(TILE, t1 - tt));
      h.features(kp + tt * ks, ks, n, u, f);
      for (int j = 0; j < n; ++j) {
        int64_t t = tt + j;
        const T* fj = f + j;
        const T* vt = vp + t * vs;
        Row<T, DC> dv_row(dvp + t * dvs, D, accumulate);
        for (int s = 0; s < S; ++s) {  // g = dA + dKV v; dv (+)= phi(k)^T dKV
          const T* row = dKVp + s * D;
          T dot = 0, fs = fj[s * TILE];
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) {
            dot += row[d] * vt[d];
            dv_row.p[d] += fs * row[d];
          }
          g[s] = dAp[s] + dot;
        }
        dv_row.store();
        h.vjp(u + j, fj, g, dkp + t * dks, accumulate);
      }
    }
  });
}

// Runs the lambda with `scalar` the tensor's type and `dc` the head dimension as a compile-time constant where
// it is a common one, so the loops over D unroll and accumulate in registers.
template <typename F>
auto dispatch(const torch::Tensor& x, int64_t D, F f) {
  auto by_dim = [&](auto type_tag) {
    using scalar = decltype(type_tag);
    if (D == 128) return f(scalar(), std::integral_constant<int, 128>());
    if (D == 64) return f(scalar(), std::integral_constant<int, 64>());
    return f(scalar(), std::integral_constant<int, 0>());
  };
  if (x.scalar_type() == torch::kFloat) return by_dim(float());
  TORCH_CHECK(x.scalar_type() == torch::kDouble, "race_cpu takes fp32 or fp64");
  return by_dim(double());
}

#define DISPATCH(x, D, ...) dispatch(x, D, [&](auto type_tag, auto dim_tag) { \
    using scalar = decltype(type_tag);                                       \
    constexpr int dc = decltype(dim_tag)::value;                             \
    return __VA_ARGS__();                                                    \
  })

std::vector<torch::Tensor> key_state(torch::Tensor k, torch::Tensor v, torch::Tensor W, int64_t L, int64_t P,
                                     double beta) {
  check_rows(k, W.size(1), "k"), check_rows(v, W.size(1), "v");
  return DISPATCH(k, W.size(1), [&] { return key_state_impl<scalar, dc>(k, v, make_hash<scalar, dc>(W, L, P, beta)); });
}

void query_forward(torch::Tensor q, torch::Tensor A, torch::Tensor KV, torch::Tensor o, bool paper, double eps,
                   torch::Tensor W, int64_t L, int64_t P, double beta) {
  check_rows(q, W.size(1), "q"), check_rows(o, W.size(1), "o");
  DISPATCH(q, W.size(1), [&] { query_forward_impl<scalar, dc>(q, A, KV, o, paper, eps, make_hash<scalar, dc>(W, L, P, beta)); });
}

std::vector<torch::Tensor> query_backward(torch::Tensor q, torch::Tensor dout, torch::Tensor A, torch::Tensor KV,
                                          torch::Tensor dq, bool paper, double eps, torch::Tensor W, int64_t L,
                                          int64_t P, double beta) {
  check_rows(q, W.size(1), "q"), check_rows(dq, W.size(1), "dq");
  TORCH_CHECK(dout.dim() == 2 && dout.size(1) == W.size(1), "the output gradient must be [T, D]");
  return DISPATCH(q, W.size(1), [&] {
    return query_backward_impl<scalar, dc>(q, dout, A, KV, dq, paper, eps, make_hash<scalar, dc>(W, L, P, beta));
  });
}

void key_backward(torch::Tensor k, torch::Tensor v, torch::Tensor dA, torch::Tensor dKV, torch::Tensor dk,
                  torch::Tensor dv, bool accumulate, torch::Tensor W, int64_t L, int64_t P, double beta) {
  check_rows(k, W.size(1), "k"), check_rows(v, W.size(1), "v");
  check_rows(dk, W.size(1), "dk"), check_rows(dv, W.size(1), "dv");
  DISPATCH(k, W.size(1), [&] { key_backward_impl<scalar, dc>(k, v, dA, dKV, dk, dv, accumulate, make_hash<scalar, dc>(W, L, P, beta)); });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("key_state", &key_state);
  m.def("query_forward", &query_forward);
  m.def("query_backward", &query_backward);
  m.def("key_backward", &key_backward);
}
