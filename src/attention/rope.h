// Rotary position embedding (RoPE), applied by the server so callers send
// unrotated queries and keys. A RopeConfig names the frequencies (theta,
// rotary_dim, the scaling used by current models) and the pairing of dims
// (NeoX halves or GPT-J interleaved); RotateRope turns a [tokens, heads,
// head_dim] F32 buffer in place, token t at positions[t]. Angles are computed
// in double precision, so results agree with a float64 reference to F32
// rounding at any position.
//
// Value types and free functions; thread-compatible.
#ifndef ATTNSERVE_ATTENTION_ROPE_H_
#define ATTNSERVE_ATTENTION_ROPE_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace attnserve {

enum class RopeStyle : uint8_t {
  kNeox = 0,  // pairs (i, i + rotary_dim/2)
  kGptj = 1,  // pairs (2i, 2i + 1)
};

enum class RopeScaling : uint8_t {
  kNone = 0,
  kLinear = 1,   // positions / factor
  kNtk = 2,      // theta · factor^(rd / (rd - 2))
  kDynamic = 3,  // Hugging Face dynamic NTK, by the call's last position
  kLlama3 = 4,   // Llama 3.1 frequency-band scaling
};

struct RopeConfig {
  double theta = 10000.0;
  int32_t rotary_dim = 0;  // 0 = head_dim (resolved by ValidateRope)
  RopeStyle style = RopeStyle::kNeox;
  RopeScaling scaling = RopeScaling::kNone;
  double factor = 1.0;
  int32_t original_max_positions = 0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
};

// Checks `config` against `head_dim` and fills its defaults (rotary_dim 0 ->
// head_dim). INVALID_ARGUMENT naming the field with the prefix `field`
// ("rotary.rotary_dim: expected an even value in [2, 128], got 7"): theta
// finite and > 1, rotary_dim even in [2, head_dim], factor finite and >= 1
// when scaled, original_max_positions > 0 for DYNAMIC and LLAMA3, and for
// LLAMA3 0 < low_freq_factor < high_freq_factor.
absl::Status ValidateRope(RopeConfig& config, int32_t head_dim, const char* field = "rotary");

// The rotary_dim/2 inverse frequencies for a call whose last position is
// `max_position` (only DYNAMIC depends on it).
std::vector<double> RopeInverseFrequencies(const RopeConfig& config, int64_t max_position);

// Rotates x [positions.size(), heads, head_dim] (F32, row-major) in place:
// token t at positions[t]. `config` must have passed ValidateRope for
// head_dim. Positions are >= 0. `max_position` is the call's last position
// for DYNAMIC (a caller rotating one call in pieces passes the whole call's);
// -1 takes the largest of `positions`.
void RotateRope(const RopeConfig& config, absl::Span<const int64_t> positions, int32_t heads,
                int32_t head_dim, float* x, int64_t max_position = -1);

}  // namespace attnserve

#endif  // ATTNSERVE_ATTENTION_ROPE_H_
