// Flash-attention forward on tensor cores (mma.sync m16n8k16, F16/BF16 in,
// FP32 accumulation), the FlashAttention-2 schedule: a block owns 64 query rows
// of one head (16 per warp), streams the visible key tiles through shared
// memory and keeps the online-softmax state (row max, row sum, output) in
// registers, so each query row's scores never leave the SM.
//
// Pipeline per key tile (one K and one V buffer, cp.async):
//   wait K(t) -> issue V(t) -> S = Q K(t)^T, mask, softmax -> wait V(t)
//   -> issue K(t+1) -> O += P V(t)
// so the V load overlaps the QK^T product and the next K load overlaps PV.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), with
// g = lane / 4 and c = lane % 4:
//   A (16x16, row-major) a0:(g, 2c..2c+1) a1:(g+8, 2c..) a2:(g, 2c+8..) a3:(g+8, 2c+8..)
//   B (16x8, k x n)      b0:(k 2c..2c+1, n g) b1:(k 2c+8.., n g)
//   C (16x8)             c0,c1:(g, 2c..2c+1) c2,c3:(g+8, 2c..2c+1)
// K stored [key][d] is B of QK^T as is (plain ldmatrix); V stored [key][d] is
// B of PV transposed (ldmatrix.trans); the C fragments of two adjacent score
// tiles are exactly the A fragment of P for PV, so P never touches memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "backends/cuda/flash_kernel.h"

namespace attnserve::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

template <int kD>
struct TileConfig {
  static_assert(kD % 32 == 0, "head dim tiles come in pairs of 16-wide chunks");
  static constexpr int kRows = kQueryTile;      // query rows per block, 16 per warp
  static constexpr int kKeys = kD <= 128 ? 64 : 32;  // keys per tile; 32 keeps d=256 in registers
  // Shared-memory row stride in elements. The 16-byte pad shifts consecutive
  // rows by 4 banks, so the 8 row addresses of one ldmatrix hit distinct banks.
  static constexpr int kStride = kD + 8;
  // Q fragments stay in registers for d <= 128 (32 registers at d = 128); at
  // d = 256 they would not fit beside the 128 output accumulators.
  static constexpr bool kQInRegisters = kD <= 128;
  static constexpr int kSmemBytes = (kRows + 2 * kKeys) * kStride * 2;
};

// --- Element types -------------------------------------------------------------

template <typename T>
struct ElemOps;

template <>
struct ElemOps<__half> {
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);  // .x (low half) = lo
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  }
  static __device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct ElemOps<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  }
  static __device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// --- Shared-memory movement ------------------------------------------------------

__device__ __forceinline__ uint32_t SmemAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; when !valid nothing is read and the destination is zeroed.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

__device__ __forceinline__ void CpAsyncWaitAll() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Starts copying rows [row0, row0 + kTileRows) of one head (`base` points at
// row 0 of that head) into `tile` (row stride kStride). Rows >= row_limit and
// columns >= dim (a multiple of 8) become zeros, so padding never carries
// garbage (0 * NaN) into the products.
template <typename T, int kTileRows, int kD>
__device__ __forceinline__ void LoadTileAsync(T* tile, const T* base, int64_t row_stride,
                                              int64_t row0, int64_t row_limit, int dim) {
  constexpr int kChunks = kD / 8;  // 16-byte chunks per row
  constexpr int kStride = TileConfig<kD>::kStride;
  for (int c = threadIdx.x; c < kTileRows * kChunks; c += kThreads) {
    const int r = c / kChunks;
    const int col = (c % kChunks) * 8;
    const int64_t row = row0 + r;
    const bool valid = row < row_limit && col < dim;
    const T* src = valid ? base + row * row_stride + col : base;
    CpAsync16(SmemAddress(tile + r * kStride + col), src, valid);
  }
}

// 2^x on the special-function unit (2 ulp; -inf -> +0), as the softmax needs
// no more: P is rounded to 16 bits right after.
__device__ __forceinline__ float FastExp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// --- Masking (the semantics of VisibleKeyRange in src/attention/params.h) -------

struct KeySpan {
  int64_t begin;
  int64_t end;
};

__device__ __forceinline__ KeySpan VisibleKeys(const DeviceJob& job, int64_t key_len,
                                               int64_t diag_offset, int64_t i) {
  if (i >= job.seqlen_q) return KeySpan{0, 0};  // padding row of the last tile
  const int64_t diag = i + diag_offset;
  int64_t begin = 0;
  int64_t end = key_len;
  if (job.window_left >= 0) begin = max(begin, diag - job.window_left);
  if (job.window_right >= 0) end = min(end, diag + job.window_right + 1);
  return KeySpan{begin, max(begin, end)};
}

__device__ __forceinline__ void StoreOut(void* o, DType dtype, int64_t idx, float x) {
  switch (dtype) {
    case DType::kF16:
      static_cast<__half*>(o)[idx] = __float2half_rn(x);
      break;
    case DType::kBF16:
      static_cast<__nv_bfloat16*>(o)[idx] = __float2bfloat16_rn(x);
      break;
    default:
      static_cast<float*>(o)[idx] = x;
      break;
  }
}

// --- The kernel ----------------------------------------------------------------------

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads)
    FlashForwardKernel(const DeviceJob* __restrict__ jobs, const WorkItem* __restrict__ items) {
  using Cfg = TileConfig<kD>;
  using Ops = ElemOps<T>;
  constexpr int kRows = Cfg::kRows;
  constexpr int kKeys = Cfg::kKeys;
  constexpr int kStride = Cfg::kStride;
  constexpr int kOutTiles = kD / 8;    // n-tiles (8 columns) of the output
  constexpr int kKeyTiles = kKeys / 8;  // n-tiles of the scores
  constexpr int kDChunks = kD / 16;    // k-chunks of QK^T

  extern __shared__ __align__(16) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);
  T* s_k = s_q + kRows * kStride;
  T* s_v = s_k + kKeys * kStride;

  const WorkItem item = items[blockIdx.x];
  const DeviceJob& job = jobs[item.job];
  const int b = item.batch;
  const int h = item.head;
  const int kv_head = h / job.group_size;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int g = lane / 4;
  const int c4 = lane % 4;

  const int64_t q0 = int64_t{item.q_tile} * kRows;
  const int64_t q_last = min(q0 + kRows, int64_t{job.seqlen_q}) - 1;
  const int64_t key_len = job.key_lengths != nullptr ? job.key_lengths[b] : job.seqlen_k;
  const int64_t diag_offset = job.bottom_right ? key_len - job.seqlen_q : 0;

  // The block's keys: visible ranges are monotone in the row, so the union
  // over its rows runs from the first row's begin to the last row's end.
  const KeySpan first_row = VisibleKeys(job, key_len, diag_offset, q0);
  const KeySpan last_row = VisibleKeys(job, key_len, diag_offset, q_last);
  const int64_t block_begin = first_row.begin;
  const int64_t block_end = max(last_row.end, block_begin);
  const int64_t tile_begin = block_begin / kKeys;
  const int64_t num_tiles = block_end > block_begin ? (block_end + kKeys - 1) / kKeys - tile_begin : 0;

  // This thread's two rows: g and g + 8 of its warp's 16.
  int64_t rows[2];
  KeySpan spans[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    rows[r] = q0 + warp * 16 + g + r * 8;
    spans[r] = VisibleKeys(job, key_len, diag_offset, rows[r]);
  }
  const bool plain_scores = job.softcap == 0.f && job.alibi_slopes == nullptr && job.bias == nullptr;
  const float slope = job.alibi_slopes != nullptr ? job.alibi_slopes[h] : 0.f;

  const T* q_base = static_cast<const T*>(job.q) + b * job.q_batch_stride + h * job.q_head_stride;
  const T* k_base =
      static_cast<const T*>(job.k) + b * job.k_batch_stride + kv_head * job.k_head_stride;
  const T* v_base =
      static_cast<const T*>(job.v) + b * job.v_batch_stride + kv_head * job.v_head_stride;

  float o_acc[kOutTiles][4];
#pragma unroll
  for (int n = 0; n < kOutTiles; ++n) {
    for (int e = 0; e < 4; ++e) o_acc[n][e] = 0.f;
  }
  float row_max[2] = {kNegInf, kNegInf};  // log2 units
  float row_sum[2] = {0.f, 0.f};          // this thread's columns only; reduced at the end
  uint32_t q_frag[Cfg::kQInRegisters ? kDChunks : 1][4];

  // ldmatrix lane addresses (see the layouts at the top of the file).
  const int a_row = warp * 16 + lane % 16;  // Q: matrices (rows 0-7|8-15) x (k 0-7|8-15)
  const int a_col = (lane / 16) * 8;
  const int k_row = lane % 8;               // K: 8 keys x four 8-wide d blocks
  const int k_col = (lane / 8) * 8;
  const int v_row = lane % 8 + ((lane / 8) % 2) * 8;  // V: (keys 0-7|8-15) x (two 8-wide d blocks)
  const int v_col = (lane / 16) * 8;

  if (num_tiles > 0) {
    LoadTileAsync<T, kRows, kD>(s_q, q_base, job.q_row_stride, q0, job.seqlen_q, job.head_dim);
    LoadTileAsync<T, kKeys, kD>(s_k, k_base, job.k_row_stride, tile_begin * kKeys, key_len,
                                job.head_dim);
    CpAsyncCommit();
  }

  for (int64_t t = 0; t < num_tiles; ++t) {
    const int64_t j0 = (tile_begin + t) * kKeys;
    CpAsyncWaitAll();
    __syncthreads();  // K(t) landed; every warp is done with V(t-1)
    LoadTileAsync<T, kKeys, kD>(s_v, v_base, job.v_row_stride, j0, key_len, job.value_dim);
    CpAsyncCommit();

    if constexpr (Cfg::kQInRegisters) {
      if (t == 0) {
#pragma unroll
        for (int kk = 0; kk < kDChunks; ++kk) {
          LdMatrixX4(q_frag[kk], SmemAddress(s_q + a_row * kStride + kk * 16 + a_col));
        }
      }
    }

    // S = Q K^T for this warp's 16 rows and the tile's keys.
    float s[kKeyTiles][4];
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n) {
      for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < kDChunks; kk += 2) {
      uint32_t a0[4], a1[4];
      if constexpr (Cfg::kQInRegisters) {
        for (int e = 0; e < 4; ++e) {
          a0[e] = q_frag[kk][e];
          a1[e] = q_frag[kk + 1][e];
        }
      } else {
        LdMatrixX4(a0, SmemAddress(s_q + a_row * kStride + kk * 16 + a_col));
        LdMatrixX4(a1, SmemAddress(s_q + a_row * kStride + (kk + 1) * 16 + a_col));
      }
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
        uint32_t bk[4];  // chunk kk: bk[0], bk[1]; chunk kk + 1: bk[2], bk[3]
        LdMatrixX4(bk, SmemAddress(s_k + (n * 8 + k_row) * kStride + kk * 16 + k_col));
        Ops::Mma(s[n], a0, bk[0], bk[1]);
        Ops::Mma(s[n], a1, bk[2], bk[3]);
      }
    }

    // Scores in log2 units. Element s[n][2r + e] is row rows[r], key
    // j0 + n*8 + 2*c4 + e. Interior tiles of a plain request skip the masks.
    const bool interior = j0 >= last_row.begin && j0 + kKeys <= first_row.end;
    if (plain_scores && interior) {
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
        for (int e = 0; e < 4; ++e) s[n][e] *= job.scale_log2;
      }
    } else {
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e / 2;
          const int64_t i = rows[r];
          const int64_t j = j0 + n * 8 + 2 * c4 + (e % 2);
          float x = kNegInf;
          if (j >= spans[r].begin && j < spans[r].end) {
            x = s[n][e] * job.scale;
            if (job.softcap > 0.f) x = job.softcap * tanhf(x / job.softcap);
            if (job.alibi_slopes != nullptr) {
              const int64_t dist = i + diag_offset - j;
              x -= slope * static_cast<float>(dist < 0 ? -dist : dist);
            }
            if (job.bias != nullptr) {
              x += job.bias[b * job.bias_batch_stride + h * job.bias_head_stride +
                            i * job.bias_row_stride + j * job.bias_col_stride];
            }
            x *= kLog2e;
          }
          s[n][e] = x;
        }
      }
    }

    // Online softmax: rescale the running state to the new row max.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float m = row_max[r];
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) m = fmaxf(m, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));  // the 4 lanes of a quad share a row
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
      const float m_used = m == kNegInf ? 0.f : m;  // avoids -inf - -inf for masked rows
      const float correction = FastExp2(row_max[r] - m_used);
      row_max[r] = m;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          s[n][e] = FastExp2(s[n][e] - m_used);
          sum += s[n][e];
        }
      }
      row_sum[r] = row_sum[r] * correction + sum;
#pragma unroll
      for (int n = 0; n < kOutTiles; ++n) {
        o_acc[n][2 * r] *= correction;
        o_acc[n][2 * r + 1] *= correction;
      }
    }

    CpAsyncWaitAll();
    __syncthreads();  // V(t) landed; every warp is done with K(t)
    if (t + 1 < num_tiles) {
      LoadTileAsync<T, kKeys, kD>(s_k, k_base, job.k_row_stride, j0 + kKeys, key_len,
                                  job.head_dim);
      CpAsyncCommit();
    }

    // O += P V: score tiles 2kc and 2kc+1 form the A fragment of keys [16kc, 16kc+16).
#pragma unroll
    for (int kc = 0; kc < kKeys / 16; ++kc) {
      const uint32_t p[4] = {Ops::Pack(s[2 * kc][0], s[2 * kc][1]),
                             Ops::Pack(s[2 * kc][2], s[2 * kc][3]),
                             Ops::Pack(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                             Ops::Pack(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
      for (int n = 0; n < kOutTiles; n += 2) {
        uint32_t bv[4];  // columns n*8..: bv[0], bv[1]; columns (n+1)*8..: bv[2], bv[3]
        LdMatrixX4Trans(bv, SmemAddress(s_v + (kc * 16 + v_row) * kStride + n * 8 + v_col));
        Ops::Mma(o_acc[n], p, bv[0], bv[1]);
        Ops::Mma(o_acc[n + 1], p, bv[2], bv[3]);
      }
    }
  }

  // Epilogue: normalise and write the rows this thread holds.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int64_t i = rows[r];
    if (i >= job.seqlen_q) continue;
    // A row with no key taking part (masked, or every score -inf) is 0, lse -inf.
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int64_t out = b * job.o_batch_stride + i * job.o_row_stride + h * job.o_head_stride;
#pragma unroll
    for (int n = 0; n < kOutTiles; ++n) {
      const int col = n * 8 + 2 * c4;
      if (col < job.value_dim) StoreOut(job.o, job.out_dtype, out + col, o_acc[n][2 * r] * inv);
      if (col + 1 < job.value_dim) {
        StoreOut(job.o, job.out_dtype, out + col + 1, o_acc[n][2 * r + 1] * inv);
      }
    }
    if (job.lse != nullptr && c4 == 0) {
      job.lse[(int64_t{b} * job.num_heads_q + h) * job.seqlen_q + i] =
          sum > 0.f ? (row_max[r] + log2f(sum)) * kLn2 : kNegInf;
    }
  }
}

// --- Conversion --------------------------------------------------------------------

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename Src, typename Dst>
__global__ void ConvertRowsKernel(const Src* __restrict__ src, Dst* __restrict__ dst,
                                  int64_t rows, int32_t dim, int32_t dst_dim) {
  const int64_t n = rows * dst_dim;
  for (int64_t idx = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; idx < n;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = idx / dst_dim;
    const int32_t col = static_cast<int32_t>(idx - r * dst_dim);
    dst[idx] = FromFloat<Dst>(col < dim ? ToFloat(src[r * dim + col]) : 0.f);
  }
}

template <typename Src, typename Dst>
cudaError_t ConvertRows(const void* src, void* dst, int64_t rows, int32_t dim, int32_t dst_dim,
                        cudaStream_t stream) {
  constexpr int kBlock = 256;
  const int64_t n = rows * dst_dim;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const unsigned grid = static_cast<unsigned>(blocks < 8192 ? (blocks > 0 ? blocks : 1) : 8192);
  ConvertRowsKernel<Src, Dst><<<grid, kBlock, 0, stream>>>(
      static_cast<const Src*>(src), static_cast<Dst*>(dst), rows, dim, dst_dim);
  return cudaGetLastError();
}

template <typename Dst>
cudaError_t ConvertFrom(DType src_dtype, const void* src, void* dst, int64_t rows, int32_t dim,
                        int32_t dst_dim, cudaStream_t stream) {
  switch (src_dtype) {
    case DType::kF32:
      return ConvertRows<float, Dst>(src, dst, rows, dim, dst_dim, stream);
    case DType::kF16:
      return ConvertRows<__half, Dst>(src, dst, rows, dim, dst_dim, stream);
    case DType::kBF16:
      return ConvertRows<__nv_bfloat16, Dst>(src, dst, rows, dim, dst_dim, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// --- Dispatch (the one place runtime dtype / head dim become template arguments) --

template <typename T, int kD>
cudaError_t Launch(const DeviceJob* jobs, const WorkItem* items, int64_t num_items,
                   cudaStream_t stream) {
  // Grids are capped at 2^31 - 1 blocks; huge batches go in several launches.
  constexpr int64_t kMaxBlocks = int64_t{1} << 30;
  for (int64_t first = 0; first < num_items; first += kMaxBlocks) {
    const int64_t n = num_items - first < kMaxBlocks ? num_items - first : kMaxBlocks;
    FlashForwardKernel<T, kD><<<static_cast<unsigned>(n), kThreads, TileConfig<kD>::kSmemBytes,
                                stream>>>(jobs, items + first);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t LaunchForDim(int kernel_head_dim, const DeviceJob* jobs, const WorkItem* items,
                         int64_t num_items, cudaStream_t stream) {
  switch (kernel_head_dim) {
    case 64:
      return Launch<T, 64>(jobs, items, num_items, stream);
    case 128:
      return Launch<T, 128>(jobs, items, num_items, stream);
    case 256:
      return Launch<T, 256>(jobs, items, num_items, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T, int kD>
cudaError_t SetSmemLimit() {
  return cudaFuncSetAttribute(FlashForwardKernel<T, kD>,
                              cudaFuncAttributeMaxDynamicSharedMemorySize,
                              TileConfig<kD>::kSmemBytes);
}

}  // namespace

int LaunchFlashForward(DType compute_dtype, int kernel_head_dim, const DeviceJob* jobs,
                       const WorkItem* items, int64_t num_items, CUstream_st* stream) {
  if (num_items <= 0) return cudaSuccess;
  switch (compute_dtype) {
    case DType::kF16:
      return LaunchForDim<__half>(kernel_head_dim, jobs, items, num_items, stream);
    case DType::kBF16:
      return LaunchForDim<__nv_bfloat16>(kernel_head_dim, jobs, items, num_items, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

int PrepareFlashKernels() {
  const cudaError_t errs[] = {
      SetSmemLimit<__half, 64>(),         SetSmemLimit<__half, 128>(),
      SetSmemLimit<__half, 256>(),        SetSmemLimit<__nv_bfloat16, 64>(),
      SetSmemLimit<__nv_bfloat16, 128>(), SetSmemLimit<__nv_bfloat16, 256>(),
  };
  for (cudaError_t e : errs) {
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

int LaunchConvertRows(DType src_dtype, const void* src, DType dst_dtype, void* dst, int64_t rows,
                      int32_t dim, int32_t dst_dim, CUstream_st* stream) {
  if (rows <= 0) return cudaSuccess;
  switch (dst_dtype) {
    case DType::kF16:
      return ConvertFrom<__half>(src_dtype, src, dst, rows, dim, dst_dim, stream);
    case DType::kBF16:
      return ConvertFrom<__nv_bfloat16>(src_dtype, src, dst, rows, dim, dst_dim, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace attnserve::cuda
