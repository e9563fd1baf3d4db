#include "backends/cpu/flash_kernel.h"

#include <cpuid.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "backends/cpu/sparse_tile.h"
#include "core/half.h"

namespace attnserve::cpu {
namespace {

constexpr int64_t RoundUp16(int64_t x) { return (x + 15) / 16 * 16; }

// F16C (the 16-bit float conversions), from CPUID leaf 1, ECX bit 29:
// clang 14's __builtin_cpu_supports does not know "f16c".
bool HasF16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
}

}  // namespace

bool DecodeTileApplies(const AttentionParams& p) {
  return p.seqlen_q == 1 && p.variant == Variant::kSoftmax && p.softcap == 0.f &&
         p.alibi_slopes == nullptr && p.bias == nullptr && p.head_dim % 16 == 0 &&
         p.value_dim % 16 == 0;
}

int64_t FlashWorkspaceFloats(const AttentionParams& params) {
  const int64_t M = kMaxTileLanes;
  const int64_t D = params.head_dim;
  const int64_t Dv = params.value_dim;
  // qt, s, ot, then m, l, alpha, begin, end, u, then the widened K and V
  // blocks; the layout is carved in flash_kernel_impl.h in this order.
  // A sparse tile's key bitmap (two floats per 64-bit word) comes last.
  return RoundUp16(D * M) + RoundUp16(kKeyBlock * M) + RoundUp16(Dv * M) + 6 * M +
         RoundUp16(kKeyBlock * D) + RoundUp16(kKeyBlock * Dv) + 2 * SparseBitmapWords(params);
}

bool FlashTileFnForIsa(std::string_view isa, FlashTileFn* fn) {
  __builtin_cpu_init();
  if (isa == "avx512") {
    *fn = &RunFlashTileAvx512;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && HasF16c();
  }
  if (isa == "avx2") {
    *fn = &RunFlashTileAvx2;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && HasF16c();
  }
  *fn = nullptr;
  return isa == "scalar";
}

FlashTileFn SelectFlashTileFn(const char** isa) {
  for (const char* name : {"avx512", "avx2"}) {
    FlashTileFn fn;
    if (FlashTileFnForIsa(name, &fn)) {
      *isa = name;
      return fn;
    }
  }
  *isa = "scalar";
  return nullptr;
}

LaneResult FinishLane(const AttentionParams& p, int64_t head, float m, float l, float u) {
  constexpr float kLn2 = 0.6931471805599453f;
  LaneResult r;
  float a = 1.f;  // the output's factor from a sink raising the max
  if (p.sparse.sink_logits != nullptr) {
    const float sink = p.sparse.sink_logits[head] * 1.4426950408889634f;
    const float m_new = std::max(m, sink);
    a = std::exp2(m - m_new);  // 0 when the lane saw no key
    const float e = std::exp2(sink - m_new);
    u = a * (u + l * std::max(m - m_new, -1e30f)) + e * (sink - m_new);
    l = l * a + e;
    m = m_new;
  }
  if (l > 0.f) {
    r.out_scale = a == 1.f ? 1.f / l : a / l;
    r.lse = (m + std::log2(l)) * kLn2;
    r.entropy = std::max(0.f, kLn2 * (std::log2(l) - u / l));
  } else {
    r.lse = -std::numeric_limits<float>::infinity();
  }
  return r;
}

void MergePartials(const AttentionParams& p, const FlashTile& t, const float* partials,
                   int num_chunks) {
  const int lanes = t.num_heads * t.num_rows;
  const int64_t Dv = p.value_dim;
  const int64_t stride = kPartialHeader + Dv;
  const int64_t chunk_stride = lanes * stride;
  std::vector<float> acc(Dv);
  for (int lane = 0; lane < lanes; ++lane) {
    const int64_t h = t.head_begin + lane / t.num_rows;
    const int64_t i = t.row_begin + lane % t.num_rows;
    float m = -std::numeric_limits<float>::infinity();
    for (int c = 0; c < num_chunks; ++c) m = std::max(m, partials[c * chunk_stride + lane * stride]);
    float l = 0.f;
    float u = 0.f;  // Σ 2^(s − m)·(s − m) over every chunk's keys
    std::fill(acc.begin(), acc.end(), 0.f);
    if (m != -std::numeric_limits<float>::infinity()) {
      for (int c = 0; c < num_chunks; ++c) {
        const float* part = partials + c * chunk_stride + lane * stride;
        const float w = std::exp2(part[0] - m);  // 0 for a chunk that saw no key
        l += part[1] * w;
        // A chunk whose weight underflows to 0 adds nothing (its max can be
        // so far below m that l·(max − m) overflows, and 0·inf is NaN).
        if (p.entropy != nullptr && w > 0.f && part[1] > 0.f) {
          u += w * (part[2] + part[1] * (part[0] - m));
        }
        for (int64_t dv = 0; dv < Dv; ++dv) acc[dv] += part[kPartialHeader + dv] * w;
      }
    }
    const LaneResult r = FinishLane(p, h, m, l, u);
    const int64_t o0 = t.batch * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
    for (int64_t dv = 0; dv < Dv; ++dv) StoreFloat(p.o, p.dtype, o0 + dv, acc[dv] * r.out_scale);
    if (p.lse != nullptr) p.lse[(t.batch * p.num_heads_q + h) * p.seqlen_q + i] = r.lse;
    if (p.entropy != nullptr) p.entropy[(t.batch * p.num_heads_q + h) * p.seqlen_q + i] = r.entropy;
  }
}

}  // namespace attnserve::cpu
