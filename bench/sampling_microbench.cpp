// The sampling part of the fused CPU op on its own: process_range (csrc/cpu/landmark_patch_rows.h,
// free of torch) on one thread, rows in chunks of 512 as the fused forward samples them, for
// each instruction-set path the CPU supports. B32 N196 P8 C3 on 112 x 112 images, landmarks
// uniform in the image (as bench/test_bench_ops.py). Reports the median thread CPU time of 15
// passes over all rows, with the images cached (one set, re-read every pass) and cold (24 sets
// in turn, 115 MB: each pass reads its images from memory).
//
//   g++ -O3 -std=c++20 -Icsrc bench/sampling_microbench.cpp -o sampling_microbench
//   ./sampling_microbench [token]     # token: the token layout of landmark_patches
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/landmark_patch_rows.h"

using namespace lafs_fast;
using namespace lafs_fast::cpu;

namespace {
double thread_cpu_ms() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

bool cpu_has(const char* flag) {
  FILE* f = std::fopen("/proc/cpuinfo", "r");
  if (!f) return false;
  char line[8192];
  bool found = false;
  while (!found && std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, "flags", 5) != 0) continue;
    for (char* tok = std::strtok(line, " \t\n:"); tok; tok = std::strtok(nullptr, " \t\n:"))
      found = found || std::strcmp(tok, flag) == 0;
    break;
  }
  std::fclose(f);
  return found;
}

// The token layout switch (older kernels have none: they sample in the token layout only).
template <typename G>
void set_token_layout(G& g, bool token) {
  if constexpr (requires { g.token_layout; }) g.token_layout = token;
}

template <CpuIsa I>
double run(Geometry<float>& g, const std::vector<float>& img, int sets, std::vector<float>& buf) {
  constexpr int64_t kChunk = 512;
  const int64_t M = g.B * g.K, image_set = g.B * g.sB;
  std::vector<double> ms;
  for (int pass = 0; pass < 16; ++pass) {
    g.img = img.data() + (pass % sets) * image_set;
    const double t0 = thread_cpu_ms();
    for (int64_t r0 = 0; r0 < M; r0 += kChunk) {
      const int64_t r1 = std::min(M, r0 + kChunk);
      process_range_isa(IsaTag<I>{}, std::integral_constant<int, 8>{}, std::integral_constant<int, 3>{},
                        g, r0, r1, r0, buf.data(), static_cast<const float*>(nullptr),
                        static_cast<float*>(nullptr), static_cast<float*>(nullptr));
    }
    if (pass > 0) ms.push_back(thread_cpu_ms() - t0);  // the first pass warms up
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}
}  // namespace

int main(int argc, char** argv) {
  const bool token = argc > 1 && std::strcmp(argv[1], "token") == 0;
  const int64_t B = 32, N = 196, P = 8, C = 3, H = 112, W = 112;
  const int kSets = 24;
  std::mt19937 rng(0);
  std::normal_distribution<float> pixel;
  std::uniform_real_distribution<float> where(0.f, 111.f);
  std::vector<float> img(kSets * B * C * H * W), lm(B * N * 2), buf(512 * P * P * C);
  for (auto& v : img) v = pixel(rng);
  for (auto& v : lm) v = where(rng);
  Geometry<float> g{};
  g.sB = C * H * W, g.sC = H * W, g.sH = W, g.sW = 1;
  g.B = B, g.C = C, g.H = H, g.W = W, g.N = N, g.K = N, g.P = P, g.L = P * P * C;
  g.lm = lm.data(), g.idx = nullptr, g.perturb_std = 0.f, g.seed = 0;
  g.dense_bytes = C * H * W * sizeof(float);
  set_token_layout(g, token);
  std::printf("rows %ld (B%ld N%ld P%ld C%ld), %s layout; thread CPU ms per pass, median of 15\n",
              long(B * N), long(B), long(N), long(P), long(C), token ? "token" : "kernel's own");
  std::printf("| path | images cached | images cold |\n|---|---:|---:|\n");
  auto row = [&](const char* name, auto isa) {
    constexpr CpuIsa I = decltype(isa)::value;
    const double warm = run<I>(g, img, 1, buf), cold = run<I>(g, img, kSets, buf);
    std::printf("| %s | %.3f | %.3f |\n", name, warm, cold);
  };
  if (cpu_has("avx512f") && cpu_has("avx512bw") && cpu_has("avx512vl") && cpu_has("avx512dq"))
    row("avx512", IsaTag<CpuIsa::kAvx512>{});
  if (cpu_has("avx2")) row("avx2", IsaTag<CpuIsa::kAvx2>{});
  row("baseline", IsaTag<CpuIsa::kBaseline>{});
  return 0;
}
