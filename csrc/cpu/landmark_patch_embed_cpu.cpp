// CPU kernels of the lafs_fast ops (semantics: lafs_fast/reference.py, schemas: lafs_ops.cpp).
//
// Design. Rows are the B*K output slots; the per-row work (sampling, landmark and image
// gradients) is in landmark_patch_rows.h. The embedding never materialises all patches: the rows
// are cut into chunks of at most kChunkRows, and each thread takes chunks in turn (dynamically),
// samples one into a cache-resident (rows, P*P*C) buffer in the compute dtype and multiplies it
// by weight^T with one single-threaded BLAS call straight into the output. The fused op's
// patches are planar (channel, y, x: the order the row kernels produce them in, no transpose);
// the weight's columns are permuted to match (planar_columns), and grad_weight permuted back,
// so the results are those of the token layout up to the GEMMs' summation order. The backward
// recomputes the patches chunk by chunk in a fixed number of row groups (independent of the
// thread count): per chunk grad_patches = grad_out @ weight, then one pass over the rows samples
// the patch (for grad_weight) and reduces grad_patches to landmark / image gradients, then
// grad_weight^T += patches^T @ grad_out (the two backward GEMMs on oneDNN where it is available,
// see onednn_matmul). grad_weight / grad_bias are summed per group and the
// group partials added in order, so every gradient is deterministic for any thread count;
// landmark gradients are kept per slot and reduced serially per image; image gradients are
// scattered with one thread per image (no atomics).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "cpu/landmark_patch_rows.h"

namespace lafs_fast {
namespace cpu {
namespace {

// Rows per chunk: the patch buffer (512 x 192 floats for P=8, C=3) stays in L2, and chunked
// GEMMs of 256-1024 rows ran as fast as (or faster than) one GEMM on all rows (AMD EPYC, MKL).
constexpr int64_t kChunkRows = 512;
// Largest image read ahead into the cache (a fraction of a 512 KiB L2, the per-core L2 of AMD EPYC
// Zen 2 / Zen 3, the smallest of the CPUs it is tuned for).
constexpr int64_t kWarmImageBytes = 384 * 1024;

// A large output written right after its allocation pays one page fault per 4 KiB (about 2 us
// each on a 2-core Zen 4: 16 ms for a 38 MB token tensor, a third of the GEMM); advising
// transparent huge pages first, as torch's allocator does under THP_MEM_ALLOC_ENABLE=1, leaves
// a few faults. Only the 2 MiB-aligned interior of the tensor's own bytes is advised.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (t.nbytes() < 2 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + t.nbytes()) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // a hint only
#else
  (void)t;
#endif
}

template <typename S>
Geometry<S> make_geometry(const at::Tensor& images, const at::Tensor& lm_c,
                          const c10::optional<at::Tensor>& idx_c, int64_t K, int64_t P,
                          double perturb_std, int64_t seed, bool token_layout) {
  Geometry<S> g;
  g.token_layout = token_layout;
  g.img = images.const_data_ptr<S>();
  g.sB = images.stride(0);
  g.sC = images.stride(1);
  g.sH = images.stride(2);
  g.sW = images.stride(3);
  g.B = images.size(0);
  g.C = images.size(1);
  g.H = images.size(2);
  g.W = images.size(3);
  g.N = lm_c.size(1);
  g.K = K;
  g.P = P;
  g.L = P * P * g.C;
  g.lm = lm_c.const_data_ptr<acc_t<S>>();
  g.idx = idx_c.has_value() ? idx_c->const_data_ptr<int64_t>() : nullptr;
  g.perturb_std = static_cast<float>(perturb_std);
  g.seed = static_cast<uint64_t>(seed);
  // NCHW or NHWC-dense images up to kWarmImageBytes get warmed (Geometry::warm_image).
  const bool dense = g.H > 0 && g.W > 0 && g.C > 0 &&
                     ((g.sW == 1 && g.sH == g.W && g.sC == g.H * g.W) ||
                      (g.sC == 1 && g.sW == g.C && g.sH == g.W * g.C));
  const int64_t bytes = g.C * g.H * g.W * static_cast<int64_t>(sizeof(S));
  g.dense_bytes = dense && bytes <= kWarmImageBytes ? bytes : 0;
  return g;
}

// Runs f(isa tag): the active instruction-set path for float32 and bfloat16 images (training);
// float64 (gradcheck) and float16 always take the baseline build, which keeps the compile time
// of this file in bounds (each path is a full copy of every row kernel).
template <typename S, typename F>
void with_row_isa(F&& f) {
  if constexpr (std::is_same_v<S, float> || std::is_same_v<S, c10::BFloat16>) {
    with_cpu_isa(f);
  } else {
    f(IsaTag<CpuIsa::kBaseline>{});
  }
}

// process_range over rows [r0, r1) in parallel: over rows, or over images when image
// gradients are scattered (one thread per image, rows in order: deterministic, no atomics).
template <typename S>
void process_rows(const Geometry<S>& G, int64_t r0, int64_t r1, acc_t<S>* patch,
                  const acc_t<S>* gp, acc_t<S>* slot_grad, acc_t<S>* gimg) {
  with_row_isa<S>([&](auto isa) {
    with_shape(G.P, G.C, [&](auto pp, auto cc) {
      if (!gimg) {
        at::parallel_for(r0, r1, 16, [&](int64_t begin, int64_t end) {
          process_range_isa(isa, pp, cc, G, begin, end, r0, patch, gp, slot_grad,
                            static_cast<acc_t<S>*>(nullptr));
        });
        return;
      }
      const int64_t b0 = r0 / G.K, b1 = (r1 - 1) / G.K + 1;
      at::parallel_for(b0, b1, 1, [&](int64_t bb, int64_t be) {
        for (int64_t b = bb; b < be; ++b) {
          process_range_isa(isa, pp, cc, G, std::max(r0, b * G.K), std::min(r1, (b + 1) * G.K),
                            r0, patch, gp, slot_grad, gimg);
        }
      });
    });
  });
}

template <typename S>
void sample_rows(const Geometry<S>& G, int64_t r0, int64_t r1, acc_t<S>* dst) {
  process_rows<S>(G, r0, r1, dst, nullptr, nullptr, nullptr);
}

// Sums slot gradients into the landmarks they came from, serially per image (deterministic
// when index repeats a landmark).
template <typename T>
void reduce_slot_grads(const T* slot_grad, const int64_t* idx, int64_t B, int64_t K, int64_t N,
                       T* glm) {
  at::parallel_for(0, B, 1, [&](int64_t bb, int64_t be) {
    for (int64_t b = bb; b < be; ++b) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = b * K + k;
        const int64_t n = idx ? idx[r] : k;
        if (n < 0 || n >= N) continue;
        glm[(b * N + n) * 2] += slot_grad[2 * r];
        glm[(b * N + n) * 2 + 1] += slot_grad[2 * r + 1];
      }
    }
  });
}

// Column q of a planar patch row holds token column planar_columns(P, C)[q]: the weight's
// columns in this order multiply planar patches as the weight multiplies token-layout ones.
at::Tensor planar_columns(int64_t P, int64_t C) {
  at::Tensor perm = at::empty({P * P * C}, at::kLong);
  int64_t* p = perm.mutable_data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < P; ++j)
      for (int64_t i = 0; i < P; ++i) *p++ = (i * P + j) * C + c;
  return perm;
}

// oneDNN's matmul, through the mkldnn::_linear_pointwise op: usable when this torch has the op,
// oneDNN is enabled (torch.backends.mkldnn) and the operands are float32. On Zen 4 (one thread)
// its AVX-512 kernels run the backward's grad_out @ weight ~10 % faster than MKL's sgemm and
// patches^T @ grad_out ~4 % faster at D = 768; its results do not depend on the thread count.
// The forward stays on MKL: the op allocates its result, and copying each chunk into the
// output cost more than the faster GEMM saved.
const c10::optional<c10::OperatorHandle>& onednn_linear_op() {
  static const c10::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}

bool onednn_matmul_usable(at::ScalarType t) {
  return t == at::kFloat && onednn_linear_op().has_value() &&
         at::globalContext().userEnabledMkldnn();
}

// x (m, k) @ w_nk^T for an (n, k) w_nk (any strides), when onednn_matmul_usable.
at::Tensor onednn_matmul(const at::Tensor& x, const at::Tensor& w_nk) {
  torch::jit::Stack stack{x, w_nk, c10::IValue(), std::string("none"),
                          c10::List<c10::optional<c10::Scalar>>(), c10::IValue()};
  onednn_linear_op()->callBoxed(&stack);
  return stack.at(0).toTensor();
}

at::ScalarType compute_type(const at::Tensor& images) {
  return images.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

int64_t num_slots(const at::Tensor& landmarks, const c10::optional<at::Tensor>& index) {
  return index.has_value() ? index->size(1) : landmarks.size(1);
}

c10::optional<at::Tensor> contiguous_index(const c10::optional<at::Tensor>& index) {
  if (!index.has_value()) return c10::nullopt;
  return index->contiguous();
}

// Splits [0, M) rows into about `parts` contiguous ranges; with `align` > 1 the cuts fall on
// multiples of align (whole images). Returns the cut points (first 0, last M).
std::vector<int64_t> split_rows(int64_t M, int64_t parts, int64_t align) {
  std::vector<int64_t> cuts{0};
  parts = std::max<int64_t>(1, std::min(parts, M));
  for (int64_t s = 1; s < parts; ++s) {
    int64_t c = M * s / parts;
    if (align > 1) c = (c + align / 2) / align * align;
    if (c > cuts.back() && c < M) cuts.push_back(c);
  }
  cuts.push_back(M);
  return cuts;
}

// Runs body(g) for every group g of n: with only one group, directly (body's own at::parallel_for
// and BLAS calls use the threads); otherwise the groups in parallel, each on one thread (nested
// parallel_for and BLAS calls then stay on it), handed out dynamically so a thread that falls
// behind (a busy machine) does not hold the others up at the barrier.
template <typename F>
void for_groups(int64_t n, const F& body) {
  const int64_t threads = std::min<int64_t>(n, at::get_num_threads());
  if (n == 1 || threads <= 1 || at::in_parallel_region()) {
    for (int64_t g = 0; g < n; ++g) body(g);
    return;
  }
  // Worker threads must see the caller's dispatch state (below autograd), or the at:: calls in
  // body would try to record autograd on inputs that require grad.
  const at::ThreadLocalState state;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t g = next.fetch_add(1); g < n; g = next.fetch_add(1)) body(g);
  });
}

// Row groups of the backward: a fixed count (independent of the thread count, so the
// per-group partial sums of grad_weight / grad_bias, added in group order, are deterministic
// for any number of threads). Cut on image boundaries when image gradients are scattered, so
// no two groups write to the same image.
constexpr int64_t kBackwardGroups = 8;
constexpr int64_t kMinGroupRows = 64;

// acc[d] += sum of rows[r][d] for d in [d0, d1), in double (grad_bias partials).
template <typename T>
LAFS_INLINE void add_rows_double(const T* rows, int64_t n, int64_t D, int64_t d0, int64_t d1,
                                 double* acc) {
  for (int64_t r = 0; r < n; ++r) {
    const T* row = rows + r * D;
    for (int64_t d = d0; d < d1; ++d) acc[d] += static_cast<double>(row[d]);
  }
}
LAFS_ISA_WRAPPERS(add_rows_double_isa, add_rows_double)

// out[i] += part[s * n + i] for s = 0 .. S-1 in order, i in [i0, i1) (grad_weight partials),
// in blocks that stay in L1 across the S passes.
template <typename T>
LAFS_INLINE void add_partials(const T* part, int64_t S, int64_t n, int64_t i0, int64_t i1,
                              T* out) {
  constexpr int64_t kBlock = 1024;
  for (int64_t b0 = i0; b0 < i1; b0 += kBlock) {
    const int64_t b1 = std::min(i1, b0 + kBlock);
    for (int64_t s = 0; s < S; ++s) {
      const T* p = part + s * n;
      for (int64_t i = b0; i < b1; ++i) out[i] += p[i];
    }
  }
}
LAFS_ISA_WRAPPERS(add_partials_isa, add_partials)

// Chunks of the forward: equal, at most kChunkRows rows each, and a multiple of the thread
// count when there are enough rows (no thread idles through the last round of chunks: with
// 13 chunks on 2 threads one thread ran the 13th alone).
int64_t forward_chunks(int64_t M) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  int64_t n = (M + kChunkRows - 1) / kChunkRows;
  const int64_t most = std::max<int64_t>(1, M / kMinGroupRows);
  if (threads > 1 && n < most) {
    n = std::min(most, (n + threads - 1) / threads * threads);
  }
  return n;
}

// ------------------------------------------------------------------------------------ ops
at::Tensor landmark_patch_embed_cpu(const at::Tensor& images, const at::Tensor& landmarks,
                                   const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                   const c10::optional<at::Tensor>& index, int64_t patch_size,
                                   double perturb_std, int64_t seed) {
  check_patch_args(images, landmarks, index, patch_size);
  check_weight(images, weight, bias, patch_size);
  const int64_t B = images.size(0), K = num_slots(landmarks, index), D = weight.size(0);
  const int64_t L = weight.size(1), M = B * K;
  const auto ct = compute_type(images);
  at::Tensor out = at::empty({B, K, D}, images.options());
  if (M == 0 || D == 0) return out;
  advise_huge_pages(out);

  const at::Tensor lm_c = landmarks.to(ct).contiguous();
  const auto idx_c = contiguous_index(index);
  const bool same = ct == images.scalar_type();
  const int64_t C = images.size(1);
  // (L, D) view of the planar-ordered weight: BLAS reads it transposed
  const at::Tensor w_t = weight.to(ct).index_select(1, planar_columns(patch_size, C)).t();
  const c10::optional<at::Tensor> b_c =
      bias.has_value() ? c10::optional<at::Tensor>(bias->to(ct)) : c10::nullopt;
  const at::Tensor out2 = out.view({M, D});
  const std::vector<int64_t> cuts = split_rows(M, forward_chunks(M), 1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images.scalar_type(), "landmark_patch_embed_cpu", [&] {
    using T = acc_t<scalar_t>;
    const auto G = make_geometry<scalar_t>(images, lm_c, idx_c, K, patch_size, perturb_std, seed,
                                           /*token_layout=*/false);
    // Each chunk: sample into a buffer that stays in cache, then one GEMM into the output.
    for_groups(static_cast<int64_t>(cuts.size()) - 1, [&](int64_t ci) {
      const int64_t r0 = cuts[ci], rows = cuts[ci + 1] - cuts[ci];
      at::Tensor buf = at::empty({rows, L}, images.options().dtype(ct));
      sample_rows<scalar_t>(G, r0, r0 + rows, buf.mutable_data_ptr<T>());
      at::Tensor dst = out2.narrow(0, r0, rows);
      at::Tensor o = same ? dst : at::empty({rows, D}, images.options().dtype(ct));
      if (b_c.has_value()) {
        at::addmm_out(o, *b_c, buf, w_t);
      } else {
        at::mm_out(o, buf, w_t);
      }
      if (!same) dst.copy_(o);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> landmark_patch_embed_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& landmarks,
    const at::Tensor& weight, const c10::optional<at::Tensor>& index, int64_t patch_size,
    double perturb_std, int64_t seed, std::array<bool, 4> output_mask) {
  check_patch_args(images, landmarks, index, patch_size);
  check_weight(images, weight, c10::nullopt, patch_size);
  const int64_t B = images.size(0), K = num_slots(landmarks, index), D = weight.size(0);
  const int64_t N = landmarks.size(1), L = weight.size(1), M = B * K;
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == B && grad_out.size(1) == K &&
                  grad_out.size(2) == D,
              "lafs_fast: grad_out must be (B, K, D), got ", grad_out.sizes());
  const auto ct = compute_type(images);
  const auto copt = images.options().dtype(ct);
  const bool need_img = output_mask[0], need_lm = output_mask[1];
  const bool need_w = output_mask[2], need_b = output_mask[3];

  at::Tensor g_img = need_img ? at::zeros(images.sizes(), copt) : images.new_empty(0);
  at::Tensor g_lm = need_lm ? at::zeros({B, N, 2}, copt) : landmarks.new_empty(0);
  // written in full below, except for an empty batch, where grad_weight is zero
  at::Tensor g_w = need_w ? (M > 0 ? at::empty({D, L}, copt) : at::zeros({D, L}, copt)) : weight.new_empty(0);
  at::Tensor g_b = need_b ? at::zeros({D}, copt) : weight.new_empty(0);

  if (M > 0 && D > 0 && (need_img || need_lm || need_w || need_b)) {
    const at::Tensor lm_c = landmarks.to(ct).contiguous();
    const auto idx_c = contiguous_index(index);
    const at::Tensor go = grad_out.reshape({M, D});
    const at::Tensor cols = planar_columns(patch_size, images.size(1));
    const bool need_gp = need_img || need_lm;
    // grad_patches = grad_out @ planar weight: oneDNN takes the weight as (L, D), MKL as (D, L)
    const bool gp_onednn = need_gp && onednn_matmul_usable(ct);
    const bool gw_onednn = need_w && onednn_matmul_usable(ct);
    const at::Tensor w_c = need_gp ? (gp_onednn ? weight.to(ct).t().index_select(0, cols)
                                                : weight.to(ct).index_select(1, cols))
                                   : at::Tensor();  // planar order, contiguous
    const std::vector<int64_t> cuts =
        split_rows(M, std::min(kBackwardGroups, (M + kMinGroupRows - 1) / kMinGroupRows),
                   need_img ? K : 1);
    const int64_t S = static_cast<int64_t>(cuts.size()) - 1;
    // Per-group partial sums of grad_weight^T (L, D) in planar order (each group's first chunk
    // writes its partial, so no zero fill); grad_bias partials in float64.
    at::Tensor w_part = need_w ? at::empty({S, L, D}, copt) : at::Tensor();
    if (need_w) advise_huge_pages(w_part);
    at::Tensor b_part = need_b ? at::zeros({S, D}, copt.dtype(at::kDouble)) : at::Tensor();
    at::Tensor slot_grad = need_lm ? at::empty({M, 2}, copt) : at::Tensor();

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images.scalar_type(), "landmark_patch_embed_backward_cpu", [&] {
      using T = acc_t<scalar_t>;
      const auto G = make_geometry<scalar_t>(images, lm_c, idx_c, K, patch_size, perturb_std, seed,
                                             /*token_layout=*/false);
      for_groups(S, [&](int64_t s) {
        const int64_t rows_s = cuts[s + 1] - cuts[s];
        const int64_t R = (rows_s + (rows_s + kChunkRows - 1) / kChunkRows - 1) /
                          ((rows_s + kChunkRows - 1) / kChunkRows);  // even chunks <= kChunkRows
        at::Tensor buf = need_w ? at::empty({R, L}, copt) : at::Tensor();
        at::Tensor gpbuf = need_gp && !gp_onednn ? at::empty({R, L}, copt) : at::Tensor();
        for (int64_t r0 = cuts[s]; r0 < cuts[s + 1]; r0 += R) {
          const int64_t rows = std::min(R, cuts[s + 1] - r0);
          const at::Tensor goc = go.narrow(0, r0, rows).to(ct).contiguous();
          // Patch gradients first, so one pass over the rows both samples the patches (for
          // grad_weight) and turns the patch gradients into landmark / image gradients.
          at::Tensor gp;
          if (gp_onednn) {
            gp = onednn_matmul(goc, w_c);
          } else if (need_gp) {
            gp = gpbuf.narrow(0, 0, rows);
            at::mm_out(gp, goc, w_c);
          }
          // grad_bias after the GEMM that read this chunk of grad_out: it is still in cache.
          if (need_b) {
            const T* g = goc.const_data_ptr<T>();
            double* acc = b_part[s].mutable_data_ptr<double>();
            with_cpu_isa([&](auto isa) {
              at::parallel_for(0, D, 64, [&](int64_t d0, int64_t d1) {
                add_rows_double_isa(isa, g, rows, D, d0, d1, acc);
              });
            });
          }
          at::Tensor p = need_w ? buf.narrow(0, 0, rows) : at::Tensor();
          if (need_w || need_gp) {
            process_rows<scalar_t>(G, r0, r0 + rows, need_w ? p.mutable_data_ptr<T>() : nullptr,
                                   need_gp ? gp.const_data_ptr<T>() : nullptr,
                                   need_lm ? slot_grad.mutable_data_ptr<T>() : nullptr,
                                   need_img ? g_img.mutable_data_ptr<T>() : nullptr);
          }
          if (need_w) {
            at::Tensor part = w_part[s];
            const bool first = r0 == cuts[s];
            if (gw_onednn) {
              const at::Tensor pg = onednn_matmul(p.t(), goc.t());  // patches^T @ grad_out
              first ? part.copy_(pg) : part.add_(pg);
            } else if (first) {
              at::mm_out(part, p.t(), goc);
            } else {
              part.addmm_(p.t(), goc);
            }
          }
        }
      });
      if (need_lm) {
        reduce_slot_grads<T>(slot_grad.const_data_ptr<T>(), G.idx, B, K, N,
                             g_lm.mutable_data_ptr<T>());
      }
    });
    // Partials added in group order (deterministic), in one parallel pass: S separate add_
    // calls were S parallel regions, each a barrier that waits for a descheduled thread on a
    // busy machine.
    if (need_w) {
      at::Tensor gw_planar_t = at::zeros({L, D}, copt);
      AT_DISPATCH_FLOATING_TYPES(ct, "landmark_patch_embed_backward_cpu_sum", [&] {
        const scalar_t* part = w_part.const_data_ptr<scalar_t>();
        scalar_t* gw = gw_planar_t.mutable_data_ptr<scalar_t>();
        const int64_t n = D * L;
        with_cpu_isa([&](auto isa) {
          at::parallel_for(0, n, 8192, [&](int64_t i0, int64_t i1) {
            add_partials_isa(isa, part, S, n, i0, i1, gw);
          });
        });
      });
      g_w.index_copy_(1, cols, gw_planar_t.t());  // back to (D, L), token order
    }
    if (need_b) {
      at::Tensor acc = b_part[0].clone();
      for (int64_t s = 1; s < S; ++s) acc.add_(b_part[s]);
      g_b.copy_(acc);
    }
  }
  if (need_img) g_img = g_img.to(images.scalar_type());
  if (need_lm) g_lm = g_lm.to(landmarks.scalar_type());
  if (need_w) g_w = g_w.to(weight.scalar_type());
  if (need_b) g_b = g_b.to(weight.scalar_type());
  return {g_img, g_lm, g_w, g_b};
}

at::Tensor landmark_patches_cpu(const at::Tensor& images, const at::Tensor& landmarks,
                                const c10::optional<at::Tensor>& index, int64_t patch_size,
                                double perturb_std, int64_t seed) {
  check_patch_args(images, landmarks, index, patch_size);
  const int64_t B = images.size(0), C = images.size(1), K = num_slots(landmarks, index);
  const int64_t L = patch_size * patch_size * C, M = B * K;
  const auto ct = compute_type(images);
  at::Tensor out = at::empty({B, K, L}, images.options());
  if (M == 0 || L == 0) return out;
  advise_huge_pages(out);
  const at::Tensor lm_c = landmarks.to(ct).contiguous();
  const auto idx_c = contiguous_index(index);
  const bool same = ct == images.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images.scalar_type(), "landmark_patches_cpu", [&] {
    using T = acc_t<scalar_t>;
    const auto G = make_geometry<scalar_t>(images, lm_c, idx_c, K, patch_size, perturb_std, seed,
                                           /*token_layout=*/true);
    if (same) {
      sample_rows<scalar_t>(G, 0, M, out.mutable_data_ptr<T>());
      return;
    }
    // Reduced precision: sample into float32 chunks, round once into the output.
    const at::Tensor out2 = out.view({M, L});
    at::parallel_for(0, M, kChunkRows, [&](int64_t begin, int64_t end) {
      at::Tensor buf = at::empty({std::min(kChunkRows, end - begin), L}, images.options().dtype(ct));
      for (int64_t r0 = begin; r0 < end; r0 += kChunkRows) {
        const int64_t rows = std::min(kChunkRows, end - r0);
        at::Tensor p = buf.narrow(0, 0, rows);
        sample_rows<scalar_t>(G, r0, r0 + rows, p.mutable_data_ptr<T>());
        out2.narrow(0, r0, rows).copy_(p);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> landmark_patches_backward_cpu(
    const at::Tensor& grad_patches, const at::Tensor& images, const at::Tensor& landmarks,
    const c10::optional<at::Tensor>& index, int64_t patch_size, double perturb_std, int64_t seed,
    std::array<bool, 2> output_mask) {
  check_patch_args(images, landmarks, index, patch_size);
  const int64_t B = images.size(0), C = images.size(1), K = num_slots(landmarks, index);
  const int64_t N = landmarks.size(1), L = patch_size * patch_size * C, M = B * K;
  TORCH_CHECK(grad_patches.dim() == 3 && grad_patches.size(0) == B && grad_patches.size(1) == K &&
                  grad_patches.size(2) == L,
              "lafs_fast: grad_patches must be (B, K, P*P*C), got ", grad_patches.sizes());
  const auto ct = compute_type(images);
  const auto copt = images.options().dtype(ct);
  const bool need_img = output_mask[0], need_lm = output_mask[1];
  at::Tensor g_img = need_img ? at::zeros(images.sizes(), copt) : images.new_empty(0);
  at::Tensor g_lm = need_lm ? at::zeros({B, N, 2}, copt) : landmarks.new_empty(0);
  if (M > 0 && L > 0 && (need_img || need_lm)) {
    const at::Tensor lm_c = landmarks.to(ct).contiguous();
    const auto idx_c = contiguous_index(index);
    const at::Tensor gp = grad_patches.to(ct).contiguous();
    at::Tensor slot_grad = need_lm ? at::empty({M, 2}, copt) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images.scalar_type(), "landmark_patches_backward_cpu", [&] {
      using T = acc_t<scalar_t>;
      const auto G = make_geometry<scalar_t>(images, lm_c, idx_c, K, patch_size, perturb_std, seed,
                                             /*token_layout=*/true);
      process_rows<scalar_t>(G, 0, M, nullptr, gp.const_data_ptr<T>(),
                                need_lm ? slot_grad.mutable_data_ptr<T>() : nullptr,
                                need_img ? g_img.mutable_data_ptr<T>() : nullptr);
      if (need_lm) {
        reduce_slot_grads<T>(slot_grad.const_data_ptr<T>(), G.idx, B, K, N,
                             g_lm.mutable_data_ptr<T>());
      }
    });
  }
  if (need_img) g_img = g_img.to(images.scalar_type());
  if (need_lm) g_lm = g_lm.to(landmarks.scalar_type());
  return {g_img, g_lm};
}

}  // namespace
}  // namespace cpu
}  // namespace lafs_fast

TORCH_LIBRARY_IMPL(lafs_fast, CPU, m) {
  m.impl("landmark_patch_embed", &lafs_fast::cpu::landmark_patch_embed_cpu);
  m.impl("landmark_patch_embed_backward", &lafs_fast::cpu::landmark_patch_embed_backward_cpu);
  m.impl("landmark_patches", &lafs_fast::cpu::landmark_patches_cpu);
  m.impl("landmark_patches_backward", &lafs_fast::cpu::landmark_patches_backward_cpu);
}
