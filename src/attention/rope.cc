#include "attention/rope.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "core/errors.h"

namespace attnserve {
namespace {

constexpr double kDefaultTheta = 10000.0;
constexpr double kDefaultLowFreqFactor = 1.0;
constexpr double kDefaultHighFreqFactor = 4.0;

absl::string_view ScalingName(RopeScaling s) {
  switch (s) {
    case RopeScaling::kNone:
      return "NONE";
    case RopeScaling::kLinear:
      return "LINEAR";
    case RopeScaling::kNtk:
      return "NTK";
    case RopeScaling::kDynamic:
      return "DYNAMIC";
    case RopeScaling::kLlama3:
      return "LLAMA3";
  }
  return "unknown";
}

// theta · base^(rd / (rd - 2)): the NTK-aware change of base, which keeps the
// highest frequency and stretches the lowest by `base`. rd >= 4 (validated).
double NtkTheta(double theta, double base, int32_t rd) {
  return theta * std::pow(base, static_cast<double>(rd) / static_cast<double>(rd - 2));
}

}  // namespace

absl::Status ValidateRope(RopeConfig& config, int32_t head_dim, const char* field) {
  const auto name = [field](absl::string_view member) { return absl::StrCat(field, ".", member); };

  // Unknown enum values can arrive through a cast from the wire enum.
  if (config.style != RopeStyle::kNeox && config.style != RopeStyle::kGptj) {
    return InvalidField(name("style"), "NEOX or GPTJ",
                        absl::StrCat(static_cast<int>(config.style)));
  }
  if (static_cast<int>(config.scaling) > static_cast<int>(RopeScaling::kLlama3)) {
    return InvalidField(name("scaling"), "NONE, LINEAR, NTK, DYNAMIC or LLAMA3",
                        absl::StrCat(static_cast<int>(config.scaling)));
  }

  // Every float must be finite, whether or not this scaling reads it: a NaN is
  // a caller bug worth reporting, not a value to ignore.
  const struct {
    const char* member;
    double value;
  } floats[] = {{"theta", config.theta},
                {"factor", config.factor},
                {"low_freq_factor", config.low_freq_factor},
                {"high_freq_factor", config.high_freq_factor}};
  for (const auto& f : floats) {
    if (!std::isfinite(f.value)) {
      return InvalidField(name(f.member), "a finite value", absl::StrCat(f.value));
    }
  }

  if (config.theta == 0) config.theta = kDefaultTheta;  // the wire's "unset"
  if (!(config.theta > 1)) {
    return InvalidField(name("theta"), "a finite value > 1 (0 = 10000)",
                        absl::StrCat(config.theta));
  }

  // rotary_dim 0 means the whole head. NTK and DYNAMIC raise to rd / (rd - 2),
  // so they need at least two pairs.
  const int32_t min_rd =
      config.scaling == RopeScaling::kNtk || config.scaling == RopeScaling::kDynamic ? 4 : 2;
  const std::string rd_expected = absl::StrCat(
      "an even value in [", min_rd, ", ", head_dim, "] (head_dim)",
      min_rd == 4 ? absl::StrCat(" for ", ScalingName(config.scaling), " scaling") : std::string());
  if (config.rotary_dim == 0) {
    if (head_dim % 2 != 0 || head_dim < min_rd) {
      return InvalidField(name("rotary_dim"), rd_expected,
                          absl::StrCat("0, which means head_dim ", head_dim));
    }
    config.rotary_dim = head_dim;
  }
  if (config.rotary_dim % 2 != 0 || config.rotary_dim < min_rd || config.rotary_dim > head_dim) {
    return InvalidField(name("rotary_dim"), rd_expected, absl::StrCat(config.rotary_dim));
  }

  // The wire sends 0 for "default"; only LLAMA3 reads these two.
  if (config.low_freq_factor <= 0) config.low_freq_factor = kDefaultLowFreqFactor;
  if (config.high_freq_factor <= 0) config.high_freq_factor = kDefaultHighFreqFactor;

  if (config.scaling == RopeScaling::kNone) return absl::OkStatus();
  if (!(config.factor >= 1)) {
    return InvalidField(
        name("factor"),
        absl::StrCat("a finite value >= 1 for ", ScalingName(config.scaling), " scaling"),
        absl::StrCat(config.factor));
  }
  if ((config.scaling == RopeScaling::kDynamic || config.scaling == RopeScaling::kLlama3) &&
      config.original_max_positions <= 0) {
    return InvalidField(
        name("original_max_positions"),
        absl::StrCat("> 0 (the trained context) for ", ScalingName(config.scaling), " scaling"),
        absl::StrCat(config.original_max_positions));
  }
  if (config.scaling == RopeScaling::kLlama3 &&
      !(config.low_freq_factor < config.high_freq_factor)) {
    return InvalidField(name("low_freq_factor"),
                        absl::StrCat("a value below high_freq_factor (", config.high_freq_factor,
                                     ") for LLAMA3 scaling"),
                        absl::StrCat(config.low_freq_factor));
  }
  return absl::OkStatus();
}

std::vector<double> RopeInverseFrequencies(const RopeConfig& config, int64_t max_position) {
  const int32_t rd = config.rotary_dim;
  if (rd < 2) return {};
  const int32_t pairs = rd / 2;

  double theta = config.theta == 0 ? kDefaultTheta : config.theta;
  switch (config.scaling) {
    case RopeScaling::kNtk:
      theta = NtkTheta(theta, config.factor, rd);
      break;
    case RopeScaling::kDynamic: {
      // Hugging Face's dynamic NTK: the base grows with the call's length n
      // once it passes the trained context; at n = original it is unchanged.
      const double n = static_cast<double>(std::max<int64_t>(max_position, 0)) + 1;
      const double original = config.original_max_positions;
      if (n > original) {
        theta = NtkTheta(theta, config.factor * n / original - (config.factor - 1), rd);
      }
      break;
    }
    default:
      break;
  }

  std::vector<double> inv_freq(pairs);
  for (int32_t i = 0; i < pairs; ++i) {
    inv_freq[i] = 1.0 / std::pow(theta, 2.0 * i / rd);
  }

  if (config.scaling == RopeScaling::kLinear) {
    // Dividing positions by factor is dividing every frequency by it.
    for (double& f : inv_freq) f /= config.factor;
  } else if (config.scaling == RopeScaling::kLlama3) {
    // Llama 3.1: wavelengths shorter than original/high_freq_factor are kept,
    // longer than original/low_freq_factor are stretched by factor, and the
    // band between blends the two linearly in original/wavelength.
    const double original = config.original_max_positions;
    const double low = config.low_freq_factor, high = config.high_freq_factor;
    const double low_freq_wavelen = original / low;
    const double high_freq_wavelen = original / high;
    for (double& f : inv_freq) {
      const double wavelen = 2 * std::numbers::pi / f;
      if (wavelen < high_freq_wavelen) continue;
      if (wavelen > low_freq_wavelen) {
        f /= config.factor;
      } else {
        const double smooth = (original / wavelen - low) / (high - low);
        f = (1 - smooth) * f / config.factor + smooth * f;
      }
    }
  }
  return inv_freq;
}

void RotateRope(const RopeConfig& config, absl::Span<const int64_t> positions, int32_t heads,
                int32_t head_dim, float* x, int64_t max_position) {
  const int32_t pairs = config.rotary_dim / 2;
  if (positions.empty() || heads <= 0 || pairs <= 0) return;

  // Only DYNAMIC reads the last position; the others ignore it.
  if (max_position < 0) max_position = *std::max_element(positions.begin(), positions.end());
  const std::vector<double> inv_freq = RopeInverseFrequencies(config, max_position);

  // NeoX pairs dim i with i + rd/2; GPT-J pairs 2i with 2i + 1.
  const bool neox = config.style == RopeStyle::kNeox;
  const int64_t first_stride = neox ? 1 : 2;
  const int64_t partner_offset = neox ? pairs : 1;

  // cos/sin once per (token, pair), shared by the token's heads.
  std::vector<double> cos_t(pairs), sin_t(pairs);
  for (size_t t = 0; t < positions.size(); ++t) {
    const double pos = static_cast<double>(positions[t]);
    for (int32_t i = 0; i < pairs; ++i) {
      const double angle = pos * inv_freq[i];
      cos_t[i] = std::cos(angle);
      sin_t[i] = std::sin(angle);
    }
    float* token = x + static_cast<int64_t>(t) * heads * head_dim;
    for (int32_t h = 0; h < heads; ++h) {
      float* v = token + static_cast<int64_t>(h) * head_dim;
      for (int32_t i = 0; i < pairs; ++i) {
        float& a = v[i * first_stride];
        float& b = v[i * first_stride + partner_offset];
        const double da = a, db = b;
        a = static_cast<float>(da * cos_t[i] - db * sin_t[i]);
        b = static_cast<float>(db * cos_t[i] + da * sin_t[i]);
      }
    }
  }
}

}  // namespace attnserve
