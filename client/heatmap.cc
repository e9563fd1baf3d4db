#include "client/heatmap.h"

#include <cairo.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace attnserve::client {
namespace {

// Layout, in pixels.
constexpr int kPad = 12;          // around the image
constexpr int kGap = 18;          // between tiles, and before the colour bar
constexpr double kTitleFont = 14;
constexpr int kTitleLine = 19;
constexpr double kHeadFont = 12;
constexpr int kHeaderHeight = 18;  // a tile's "head N" line
constexpr double kTickFont = 11;
constexpr int kBarWidth = 16;
constexpr int kTargetTilePx = 384;  // a tile's cells take about this much per axis
constexpr int kMaxCellPx = 24;
// With tokens of at most this many per axis, cells grow to kLabelCellPx so
// the labels can be read; labels are drawn only in cells of >= kMinLabelCellPx.
constexpr int64_t kLabelledMaxTokens = 64;
constexpr int kLabelCellPx = 12;
constexpr int kMinLabelCellPx = 8;
constexpr int kMaxLabelPx = 110;  // longest token label
constexpr size_t kMaxLabelChars = 16;
// Log scale: the low end is at most this far below the highest weight.
constexpr double kLogRange = 1e-6;

// matplotlib's viridis at 0, 1/9, ..., 1; interpolated linearly between.
constexpr uint8_t kViridis[10][3] = {
    {0x44, 0x01, 0x54}, {0x48, 0x28, 0x78}, {0x3e, 0x4a, 0x89}, {0x31, 0x68, 0x8e},
    {0x26, 0x82, 0x8e}, {0x1f, 0x9e, 0x89}, {0x35, 0xb7, 0x79}, {0x6d, 0xcd, 0x59},
    {0xb4, 0xde, 0x2c}, {0xfd, 0xe7, 0x25}};

constexpr int kLutSize = 1024;

struct Shape4 {
  int64_t batch = 0, heads = 0, lq = 0, lk = 0;
};

// The weights' dims as [B, H, Lq, Lk] (a rank-3 tensor has B = 1).
absl::StatusOr<Shape4> WeightsShape(const Tensor& w) {
  if (w.dtype != DType::kF32 || (w.shape.size() != 3 && w.shape.size() != 4)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "weights: expected F32 [B, Hq, Lq, Lk] or [Hq, Lq, Lk], got ", DTypeName(w.dtype), " ",
        ShapeString(w.shape)));
  }
  const size_t o = w.shape.size() - 3;
  Shape4 s{o == 1 ? w.shape[0] : 1, w.shape[o], w.shape[o + 1], w.shape[o + 2]};
  const int64_t n = CheckedElementCount(w.shape, INT64_MAX / 4);
  if (n < 0 || static_cast<uint64_t>(n) * 4 != w.data.size()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "weights.data: expected %d bytes for F32 %s, got %d", n * 4, ShapeString(w.shape),
        w.data.size()));
  }
  return s;
}

// The floats of one (batch row, head) matrix [Lq, Lk]; unaligned-safe copy.
std::vector<float> HeadMatrix(const Tensor& w, const Shape4& s, int64_t b, int64_t h) {
  const int64_t n = s.lq * s.lk;
  std::vector<float> out(static_cast<size_t>(n));
  std::memcpy(out.data(), w.data.data() + ((b * s.heads + h) * n) * 4, n * 4);
  return out;
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Replaces what cairo cannot show (invalid UTF-8, control characters) and
// shortens long tokens to kMaxLabelChars code points plus an ellipsis.
std::string LabelText(absl::string_view token) {
  std::string out;
  size_t chars = 0;
  size_t i = 0;
  while (i < token.size()) {
    const unsigned char c = token[i];
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    bool valid = len > 0 && i + len <= token.size();
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1f) : len == 3 ? (c & 0x0f) : (c & 0x07);
    for (size_t j = 1; valid && j < len; ++j) {
      const unsigned char next = static_cast<unsigned char>(token[i + j]);
      valid = (next & 0xc0) == 0x80;
      cp = (cp << 6) | (next & 0x3f);
    }
    // Strict UTF-8 (cairo refuses the rest): no overlong forms, surrogates
    // or code points past U+10FFFF.
    if (valid && len > 1) {
      const uint32_t least = len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000;
      valid = cp >= least && cp <= 0x10ffff && !(cp >= 0xd800 && cp <= 0xdfff);
    }
    if (chars == kMaxLabelChars) {
      out += "\xe2\x80\xa6";  // …
      break;
    }
    if (!valid) {
      out += '?';
      i += 1;
    } else if (len == 1 && (c < 0x20 || c == 0x7f)) {
      out += ' ';
      i += 1;
    } else {
      out.append(token.data() + i, len);
      i += len;
    }
    ++chars;
  }
  return out;
}

// "%.3g" without the exponent's leading zeros: 1e-06 -> 1e-6.
std::string ScaleLabel(double v) {
  std::string s = absl::StrFormat("%.3g", v);
  for (const char* from : {"e-0", "e+0"}) {
    const size_t at = s.find(from);
    if (at != std::string::npos) s.replace(at, 3, from[1] == '-' ? "e-" : "e");
  }
  const size_t plus = s.find("e+");
  if (plus != std::string::npos) s.erase(plus + 1, 1);
  return s;
}

// A cairo context that draws text in the one font this file uses.
void SetFont(cairo_t* cr, double size, bool bold = false) {
  cairo_select_font_face(cr, "sans-serif", CAIRO_FONT_SLANT_NORMAL,
                         bold ? CAIRO_FONT_WEIGHT_BOLD : CAIRO_FONT_WEIGHT_NORMAL);
  cairo_set_font_size(cr, size);
}

double TextWidth(cairo_t* cr, const std::string& text) {
  cairo_text_extents_t e;
  cairo_text_extents(cr, text.c_str(), &e);
  return e.x_advance;
}

void ShowText(cairo_t* cr, double x, double y, const std::string& text) {
  cairo_move_to(cr, x, y);
  cairo_show_text(cr, text.c_str());
}

// Owns a cairo surface and context.
struct Canvas {
  cairo_surface_t* surface = nullptr;
  cairo_t* cr = nullptr;
  ~Canvas() {
    if (cr != nullptr) cairo_destroy(cr);
    if (surface != nullptr) cairo_surface_destroy(surface);
  }
};

void AppendJsonString(std::string* out, absl::string_view s) {
  out->push_back('"');
  for (const char c : s) {
    switch (c) {
      case '"':
        out->append("\\\"");
        break;
      case '\\':
        out->append("\\\\");
        break;
      case '\n':
        out->append("\\n");
        break;
      case '\t':
        out->append("\\t");
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          absl::StrAppendFormat(out, "\\u%04x", static_cast<unsigned char>(c));
        } else {
          out->push_back(c);
        }
    }
  }
  out->push_back('"');
}

absl::Status WriteFile(const std::string& path, const std::string& contents) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) return absl::InternalError(absl::StrCat(path, ": cannot open for writing"));
  f.write(contents.data(), static_cast<std::streamsize>(contents.size()));
  f.close();
  if (!f) return absl::InternalError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

// Copies elements `heads` of axis rank-2 (the heads of [B, L, H, D] or
// [L, H, D]) into a new tensor.
Tensor GatherHeads(const TensorView& t, const std::vector<int64_t>& heads, size_t axis) {
  Tensor out;
  out.dtype = t.dtype;
  out.shape = t.shape;
  out.shape[axis] = static_cast<int64_t>(heads.size());
  int64_t outer = 1;
  for (size_t i = 0; i < axis; ++i) outer *= t.shape[i];
  int64_t inner = DTypeSize(t.dtype);
  for (size_t i = axis + 1; i < t.shape.size(); ++i) inner *= t.shape[i];
  const int64_t n = t.shape[axis];
  out.data.resize(static_cast<size_t>(outer * heads.size() * inner));
  char* dst = out.data.data();
  for (int64_t o = 0; o < outer; ++o) {
    for (const int64_t h : heads) {
      std::memcpy(dst, t.data.data() + (o * n + h) * inner, inner);
      dst += inner;
    }
  }
  return out;
}

}  // namespace

uint32_t ViridisRgb(double t) {
  if (!(t > 0)) t = 0;  // NaN too
  if (t > 1) t = 1;
  const double x = t * 9;
  const int i = std::min(8, static_cast<int>(x));
  const double f = x - i;
  uint32_t rgb = 0;
  for (int c = 0; c < 3; ++c) {
    const double v = kViridis[i][c] + f * (kViridis[i + 1][c] - kViridis[i][c]);
    rgb = (rgb << 8) | static_cast<uint32_t>(std::lround(v));
  }
  return rgb;
}

std::string HeadListString(const std::vector<int64_t>& heads) {
  std::vector<std::string> parts;
  for (size_t i = 0; i < heads.size();) {
    size_t j = i;
    while (j + 1 < heads.size() && heads[j + 1] == heads[j] + 1) ++j;
    parts.push_back(j >= i + 2 ? absl::StrCat(heads[i], "-", heads[j])
                               : absl::StrCat(heads[i]));
    if (j == i + 1) parts.push_back(absl::StrCat(heads[j]));
    i = j + 1;
  }
  return absl::StrJoin(parts, ",");
}

absl::StatusOr<std::vector<int64_t>> ParseHeads(absl::string_view spec, int64_t num_heads) {
  std::vector<int64_t> heads;
  std::vector<bool> seen(static_cast<size_t>(std::max<int64_t>(num_heads, 0)), false);
  const auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("expected query heads such as 0,3,5 or 0-3 (", why, "), got \"", spec, "\""));
  };
  for (absl::string_view part : absl::StrSplit(spec, ',', absl::SkipWhitespace())) {
    part = absl::StripAsciiWhitespace(part);
    int64_t first = 0, last = 0;
    const std::vector<absl::string_view> ends = absl::StrSplit(part, '-');
    if (ends.size() == 1) {
      if (!absl::SimpleAtoi(part, &first)) return bad(absl::StrCat("\"", part, "\" is no number"));
      last = first;
    } else if (ends.size() != 2 || !absl::SimpleAtoi(ends[0], &first) ||
               !absl::SimpleAtoi(ends[1], &last) || last < first) {
      return bad(absl::StrCat("\"", part, "\" is no range FIRST-LAST"));
    }
    for (int64_t h = first; h <= last; ++h) {
      if (h < 0 || h >= num_heads) {
        return bad(absl::StrCat("head ", h, " is outside [0, ", num_heads, ")"));
      }
      if (seen[h]) return bad(absl::StrCat("head ", h, " is repeated"));
      seen[h] = true;
      heads.push_back(h);
      if (static_cast<int64_t>(heads.size()) > kHeatmapMaxHeads) {
        return bad(absl::StrCat("at most ", kHeatmapMaxHeads, " heads"));
      }
    }
  }
  if (heads.empty()) return bad("no head");
  return heads;
}

absl::StatusOr<std::vector<std::string>> ReadTokens(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokens file ", path, ": cannot read it: ", std::strerror(errno)));
  }
  std::stringstream contents;
  contents << f.rdbuf();
  if (f.bad()) {
    return absl::InvalidArgumentError(absl::StrCat("tokens file ", path, ": read failed"));
  }
  std::string text = contents.str();
  if (!text.empty() && text.back() == '\n') text.pop_back();
  if (text.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokens file ", path, ": expected one token per line, got none"));
  }
  std::vector<std::string> tokens = absl::StrSplit(text, '\n');
  for (std::string& t : tokens) {
    if (!t.empty() && t.back() == '\r') t.pop_back();
  }
  return tokens;
}

absl::Status CheckTokens(const std::vector<std::string>& tokens, const std::string& path,
                         int64_t lq, int64_t lk) {
  if (lq != lk) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tokens file %s: token labels are for self-attention (Lq == Lk), got Lq=%d and Lk=%d",
        path, lq, lk));
  }
  if (static_cast<int64_t>(tokens.size()) != lq) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tokens file %s: expected %d tokens (one per line, Lq = Lk = %d), got %d",
                        path, lq, lq, tokens.size()));
  }
  return absl::OkStatus();
}

absl::Status RenderHeatmap(const Tensor& weights, const HeatmapOptions& options,
                           const std::string& path, HeatmapGeometry* geometry) {
  absl::StatusOr<Shape4> shape_or = WeightsShape(weights);
  if (!shape_or.ok()) return shape_or.status();
  const Shape4 s = *shape_or;
  if (options.batch_row < 0 || options.batch_row >= s.batch) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "batch_row: expected in [0, %d) (B of the weights), got %d", s.batch, options.batch_row));
  }
  if (!options.head_numbers.empty() &&
      static_cast<int64_t>(options.head_numbers.size()) != s.heads) {
    return absl::InvalidArgumentError(
        absl::StrFormat("head_numbers: expected one per head of the weights (%d), got %d",
                        s.heads, options.head_numbers.size()));
  }
  std::vector<int64_t> heads = options.heads;
  if (heads.empty()) {
    for (int64_t h = 0; h < std::min(s.heads, kHeatmapDefaultHeads); ++h) heads.push_back(h);
  }
  if (static_cast<int64_t>(heads.size()) > kHeatmapMaxHeads) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "heads: expected at most %d, got %d", kHeatmapMaxHeads, heads.size()));
  }
  for (size_t i = 0; i < heads.size(); ++i) {
    if (heads[i] < 0 || heads[i] >= s.heads) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "heads[%d]: expected in [0, %d) (Hq of the weights), got %d", i, s.heads, heads[i]));
    }
  }
  const bool has_tokens = !options.tokens.empty();
  if (has_tokens && (s.lq != s.lk || static_cast<int64_t>(options.tokens.size()) != s.lq)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tokens: expected Lq = Lk = the token count, got Lq=%d Lk=%d and %d tokens", s.lq, s.lk,
        options.tokens.size()));
  }
  if (s.lq == 0 || s.lk == 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "weights: expected Lq and Lk >= 1 to draw, got %s", ShapeString(weights.shape)));
  }
  const auto number = [&](int64_t h) {
    return options.head_numbers.empty() ? h : options.head_numbers[h];
  };

  // Max-pool each head down to at most max_cells per axis.
  const int64_t max_cells = std::max<int64_t>(options.max_cells, 1);
  const int64_t pr = CeilDiv(s.lq, max_cells), pc = CeilDiv(s.lk, max_cells);
  const int64_t rows = CeilDiv(s.lq, pr), cols = CeilDiv(s.lk, pc);
  std::vector<std::vector<float>> cells;
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  float lowest_positive = std::numeric_limits<float>::infinity();
  for (const int64_t h : heads) {
    const std::vector<float> m = HeadMatrix(weights, s, options.batch_row, h);
    // NaN marks a cell with no number yet; NaN weights are skipped, so a
    // cell is NaN only when all its weights are (drawn in the lowest colour).
    std::vector<float> pooled(static_cast<size_t>(rows * cols),
                              std::numeric_limits<float>::quiet_NaN());
    for (int64_t q = 0; q < s.lq; ++q) {
      float* out = pooled.data() + (q / pr) * cols;
      const float* in = m.data() + q * s.lk;
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t end = std::min(s.lk, (c + 1) * pc);
        float v = out[c];
        for (int64_t k = c * pc; k < end; ++k) {
          if (!std::isnan(in[k]) && (std::isnan(v) || in[k] > v)) v = in[k];
        }
        out[c] = v;
      }
    }
    for (const float v : pooled) {
      if (!std::isfinite(v)) continue;  // the scale spans the finite weights
      lo = std::min(lo, v);
      hi = std::max(hi, v);
      if (v > 0) lowest_positive = std::min(lowest_positive, v);
    }
    cells.push_back(std::move(pooled));
  }
  if (!(lo <= hi)) lo = hi = 0;  // all NaN
  if (options.log_scale) {
    lo = hi > 0 ? std::max(lowest_positive, static_cast<float>(hi * kLogRange)) : 0;
  }

  // Cell size: a tile of about kTargetTilePx, larger cells for few tokens.
  const bool pooled = pr > 1 || pc > 1;
  int cell_w = static_cast<int>(std::clamp<int64_t>(kTargetTilePx / cols, 1, kMaxCellPx));
  int cell_h = static_cast<int>(std::clamp<int64_t>(kTargetTilePx / rows, 1, kMaxCellPx));
  if (has_tokens && !pooled && s.lq <= kLabelledMaxTokens) {
    cell_w = std::max(cell_w, kLabelCellPx);
    cell_h = std::max(cell_h, kLabelCellPx);
  }
  const bool labels = has_tokens && !pooled && cell_w >= kMinLabelCellPx &&
                      cell_h >= kMinLabelCellPx;
  const double label_font = std::min(12, std::min(cell_w, cell_h) - 2);

  // Text to measure before the image size is known.
  Canvas measure;
  measure.surface = cairo_image_surface_create(CAIRO_FORMAT_RGB24, 1, 1);
  measure.cr = cairo_create(measure.surface);
  std::vector<std::string> label_texts;
  int label_px = 0;
  if (labels) {
    SetFont(measure.cr, label_font);
    double widest = 0;
    for (const std::string& t : options.tokens) {
      label_texts.push_back(LabelText(t));
      widest = std::max(widest, TextWidth(measure.cr, label_texts.back()));
    }
    label_px = static_cast<int>(std::ceil(std::min<double>(widest, kMaxLabelPx))) + 4;
  }
  std::vector<int64_t> numbers;
  for (const int64_t h : heads) numbers.push_back(number(h));
  std::vector<std::string> title = {absl::StrFormat(
      "attention weights [B, Hq, Lq, Lk] = %s, batch row %d; queries down, keys across",
      ShapeString(weights.shape.size() == 4
                      ? weights.shape
                      : std::vector<int64_t>{1, s.heads, s.lq, s.lk}),
      options.batch_row)};
  std::string second = absl::StrFormat(
      "head%s %s%s; %s scale", numbers.size() == 1 ? "" : "s", HeadListString(numbers),
      options.heads.empty() && s.heads > static_cast<int64_t>(heads.size())
          ? absl::StrFormat(" (the first %d of %d; --heads chooses)", heads.size(), s.heads)
          : "",
      options.log_scale ? "log10" : "linear");
  if (!options.description.empty()) absl::StrAppend(&second, "; ", options.description);
  title.push_back(second);
  if (pooled) {
    title.push_back(absl::StrFormat(
        "max-pooled to %dx%d cells: each the largest weight of %dx%d queries x keys", rows, cols,
        pr, pc));
  }
  if (has_tokens && !labels) {
    title.push_back(absl::StrFormat("tokens not drawn: %s",
                                    pooled ? "cells cover several tokens"
                                           : "cells too small for text"));
  }
  double title_w = 0;
  for (size_t i = 0; i < title.size(); ++i) {
    SetFont(measure.cr, kTitleFont, i == 0);  // the first line is bold
    title_w = std::max(title_w, TextWidth(measure.cr, title[i]));
  }
  const std::string hi_text = ScaleLabel(hi);
  const std::string lo_text = absl::StrCat(options.log_scale && lo > 0 ? "<= " : "",
                                           ScaleLabel(lo));
  const std::string scale_text = options.log_scale ? "log10" : "linear";
  SetFont(measure.cr, kTickFont);
  const double tick_w = std::max({TextWidth(measure.cr, hi_text), TextWidth(measure.cr, lo_text),
                                  TextWidth(measure.cr, scale_text)});

  // Layout.
  const int n = static_cast<int>(heads.size());
  const int tile_cols = static_cast<int>(std::ceil(std::sqrt(static_cast<double>(n))));
  const int tile_rows = (n + tile_cols - 1) / tile_cols;
  const int grid_w = static_cast<int>(cols) * cell_w, grid_h = static_cast<int>(rows) * cell_h;
  const int tile_w = std::max(label_px + grid_w, 60);
  const int tile_h = kHeaderHeight + label_px + grid_h;
  const int title_h = static_cast<int>(title.size()) * kTitleLine + 8;
  const int tiles_x = kPad, tiles_y = kPad + title_h;
  const int tiles_right = tiles_x + tile_cols * tile_w + (tile_cols - 1) * kGap;
  const int tiles_bottom = tiles_y + tile_rows * tile_h + (tile_rows - 1) * kGap;
  const int bar_x = tiles_right + kGap;
  const int bar_y = tiles_y + kHeaderHeight + label_px;
  const int bar_h = std::clamp(grid_h, 120, 320);
  const int width = std::max(bar_x + kBarWidth + 6 + static_cast<int>(std::ceil(tick_w)) + kPad,
                             static_cast<int>(std::ceil(title_w)) + 2 * kPad);
  const int height =
      std::max(tiles_bottom, bar_y + bar_h + static_cast<int>(2 * kTickFont) + 4) + kPad;

  Canvas canvas;
  canvas.surface = cairo_image_surface_create(CAIRO_FORMAT_RGB24, width, height);
  if (cairo_surface_status(canvas.surface) != CAIRO_STATUS_SUCCESS) {
    return absl::InternalError(absl::StrFormat(
        "heatmap %s: cairo cannot make a %dx%d image: %s", path, width, height,
        cairo_status_to_string(cairo_surface_status(canvas.surface))));
  }
  // Cells and the colour bar are written as pixels (a cairo rectangle per
  // cell is far slower for 12 tiles of 256x256); text and frames with cairo.
  cairo_surface_flush(canvas.surface);
  unsigned char* pixels = cairo_image_surface_get_data(canvas.surface);
  const int stride = cairo_image_surface_get_stride(canvas.surface);
  std::memset(pixels, 0xff, static_cast<size_t>(stride) * height);
  uint32_t lut[kLutSize];
  for (int i = 0; i < kLutSize; ++i) lut[i] = ViridisRgb(static_cast<double>(i) / (kLutSize - 1));
  const double log_lo = lo > 0 ? std::log(lo) : 0;
  const double span = options.log_scale ? (lo > 0 ? std::log(hi) - log_lo : 0) : hi - lo;
  const auto colour = [&](float v) -> uint32_t {
    double t;
    if (options.log_scale) {
      t = lo > 0 && v > lo ? std::log(v) - log_lo : 0;
    } else {
      t = v - lo;
    }
    t = span > 0 ? t / span : 0;
    if (!(t > 0)) return lut[0];
    return lut[std::min(kLutSize - 1, static_cast<int>(t * (kLutSize - 1) + 0.5))];
  };
  const auto fill = [&](int x, int y, int w, int h, uint32_t rgb) {
    for (int yy = y; yy < y + h; ++yy) {
      uint32_t* row = reinterpret_cast<uint32_t*>(pixels + static_cast<size_t>(yy) * stride) + x;
      std::fill(row, row + w, rgb);
    }
  };
  std::vector<std::pair<int, int>> origins;
  std::vector<uint32_t> row_rgb(static_cast<size_t>(cols));
  for (int i = 0; i < n; ++i) {
    const int x0 = tiles_x + (i % tile_cols) * (tile_w + kGap) + label_px;
    const int y0 = tiles_y + (i / tile_cols) * (tile_h + kGap) + kHeaderHeight + label_px;
    origins.emplace_back(x0, y0);
    const std::vector<float>& m = cells[i];
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) row_rgb[c] = colour(m[r * cols + c]);
      for (int yy = 0; yy < cell_h; ++yy) {
        uint32_t* out = reinterpret_cast<uint32_t*>(
                            pixels + static_cast<size_t>(y0 + r * cell_h + yy) * stride) + x0;
        if (cell_w == 1) {
          std::memcpy(out, row_rgb.data(), cols * 4);
        } else {
          for (int64_t c = 0; c < cols; ++c) std::fill(out + c * cell_w, out + (c + 1) * cell_w, row_rgb[c]);
        }
      }
    }
  }
  for (int y = 0; y < bar_h; ++y) {
    fill(bar_x, bar_y + y, kBarWidth, 1, ViridisRgb(1.0 - static_cast<double>(y) / (bar_h - 1)));
  }
  cairo_surface_mark_dirty(canvas.surface);

  cairo_t* cr = canvas.cr = cairo_create(canvas.surface);
  cairo_set_source_rgb(cr, 0, 0, 0);
  for (size_t i = 0; i < title.size(); ++i) {
    SetFont(cr, kTitleFont, i == 0);
    ShowText(cr, kPad, kPad + kTitleFont + i * kTitleLine, title[i]);
  }
  for (int i = 0; i < n; ++i) {
    const auto [x0, y0] = origins[i];
    cairo_set_source_rgb(cr, 0, 0, 0);
    SetFont(cr, kHeadFont, true);
    ShowText(cr, x0 - label_px, y0 - label_px - 5, absl::StrCat("head ", numbers[i]));
    // A hairline frame just outside the cells.
    cairo_set_source_rgb(cr, 0.6, 0.6, 0.6);
    cairo_set_line_width(cr, 1);
    cairo_rectangle(cr, x0 - 0.5, y0 - 0.5, grid_w + 1, grid_h + 1);
    cairo_stroke(cr);
    if (!labels) continue;
    cairo_set_source_rgb(cr, 0.1, 0.1, 0.1);
    SetFont(cr, label_font);
    for (int64_t j = 0; j < rows; ++j) {
      const std::string& t = label_texts[j];
      const double w = std::min<double>(TextWidth(cr, t), kMaxLabelPx);
      // Queries: right-aligned left of their row.
      cairo_save(cr);
      cairo_rectangle(cr, x0 - label_px, y0 + j * cell_h, label_px, cell_h);
      cairo_clip(cr);
      ShowText(cr, x0 - 3 - w, y0 + j * cell_h + cell_h / 2.0 + label_font * 0.35, t);
      cairo_restore(cr);
      // Keys: rotated, reading upwards, above their column.
      cairo_save(cr);
      cairo_rectangle(cr, x0 + j * cell_w, y0 - label_px, cell_w, label_px);
      cairo_clip(cr);
      cairo_translate(cr, x0 + j * cell_w + cell_w / 2.0 + label_font * 0.35, y0 - 3);
      cairo_rotate(cr, -M_PI / 2);
      ShowText(cr, 0, 0, t);
      cairo_restore(cr);
    }
  }
  cairo_set_source_rgb(cr, 0.6, 0.6, 0.6);
  cairo_rectangle(cr, bar_x - 0.5, bar_y - 0.5, kBarWidth + 1, bar_h + 1);
  cairo_stroke(cr);
  cairo_set_source_rgb(cr, 0, 0, 0);
  SetFont(cr, kTickFont);
  ShowText(cr, bar_x + kBarWidth + 5, bar_y + kTickFont * 0.8, hi_text);
  ShowText(cr, bar_x + kBarWidth + 5, bar_y + bar_h, lo_text);
  ShowText(cr, bar_x, bar_y + bar_h + kTickFont * 1.8, scale_text);

  if (cairo_status(cr) != CAIRO_STATUS_SUCCESS) {
    return absl::InternalError(absl::StrCat("heatmap ", path, ": cairo cannot draw: ",
                                            cairo_status_to_string(cairo_status(cr))));
  }
  cairo_surface_flush(canvas.surface);
  const cairo_status_t written = cairo_surface_write_to_png(canvas.surface, path.c_str());
  if (written != CAIRO_STATUS_SUCCESS) {
    return absl::InternalError(absl::StrCat("heatmap ", path, ": cannot write the PNG: ",
                                            cairo_status_to_string(written)));
  }
  if (geometry != nullptr) {
    *geometry = HeatmapGeometry{width,  height, rows,    cols,  pr,       pc,     cell_w,
                                cell_h, numbers, origins, lo,   hi,       labels};
  }
  return absl::OkStatus();
}

absl::Status WriteBertvizJson(const Tensor& weights, int64_t batch_row,
                              const std::vector<std::string>& tokens, const std::string& path) {
  absl::StatusOr<Shape4> shape_or = WeightsShape(weights);
  if (!shape_or.ok()) return shape_or.status();
  const Shape4 s = *shape_or;
  if (batch_row < 0 || batch_row >= s.batch) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "batch_row: expected in [0, %d) (B of the weights), got %d", s.batch, batch_row));
  }
  if (s.lq != s.lk) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "bertviz: head_view's self-attention form needs Lq == Lk, got Lq=%d Lk=%d", s.lq, s.lk));
  }
  if (!tokens.empty() && static_cast<int64_t>(tokens.size()) != s.lq) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tokens: expected %d (Lq = Lk), got %d", s.lq, tokens.size()));
  }
  std::string out;
  out.reserve(static_cast<size_t>(s.heads * s.lq * s.lk) * 11 + 64);
  out.append("{\"attention\": [[[");
  char buf[32];
  for (int64_t h = 0; h < s.heads; ++h) {
    const std::vector<float> m = HeadMatrix(weights, s, batch_row, h);
    out.append(h == 0 ? "[" : ", [");
    for (int64_t q = 0; q < s.lq; ++q) {
      out.append(q == 0 ? "[" : ", [");
      for (int64_t k = 0; k < s.lk; ++k) {
        if (k > 0) out.push_back(',');
        const float v = m[q * s.lk + k];
        if (!std::isfinite(v)) {  // JSON has no NaN or infinities
          out.append("null");
          continue;
        }
        // The shortest digits that read back as the same float.
        const std::to_chars_result r = std::to_chars(buf, buf + sizeof(buf), v);
        out.append(buf, r.ptr);
      }
      out.push_back(']');
    }
    out.push_back(']');
  }
  out.append("]]], \"tokens\": [");
  for (int64_t i = 0; i < s.lq; ++i) {
    if (i > 0) out.append(", ");
    AppendJsonString(&out, tokens.empty() ? absl::StrCat(i) : tokens[i]);
  }
  out.append("]}\n");
  return WriteFile(path, out);
}

absl::StatusOr<std::unique_ptr<HeadSubset>> SelectQueryHeads(const AttentionRequest& request,
                                                             const std::vector<int64_t>& heads) {
  const TensorView& q = request.query;
  const TensorView& k = request.key;
  for (auto [name, t] : {std::pair{"query", &q}, std::pair{"key", &k},
                         std::pair{"value", &request.value}}) {
    if (t->shape.size() != 3 && t->shape.size() != 4) {
      return absl::InvalidArgumentError(absl::StrCat(
          name, ".shape: expected [B, L, H, D] or [L, H, D] to choose heads from, got ",
          ShapeString(t->shape)));
    }
  }
  const auto whole = [](const TensorView& t) {
    const int64_t n = CheckedElementCount(t.shape, INT64_MAX / 8);
    return n >= 0 && static_cast<uint64_t>(n) * DTypeSize(t.dtype) == t.data.size();
  };
  for (auto [name, t] : {std::pair{"query", &q}, std::pair{"key", &k},
                         std::pair{"value", &request.value}}) {
    if (!whole(*t)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s.data: expected the bytes of %s %s, got %d", name, DTypeName(t->dtype),
          ShapeString(t->shape), t->data.size()));
    }
  }
  const size_t axis = q.shape.size() - 2;
  const int64_t hq = q.shape[axis];
  const int64_t hkv = k.shape[k.shape.size() - 2];
  if (hkv <= 0 || hq % hkv != 0 || request.value.shape[request.value.shape.size() - 2] != hkv) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "key.shape: expected a number of heads that divides the query's %d (and the value's), "
        "got key %s value %s", hq, ShapeString(k.shape), ShapeString(request.value.shape)));
  }
  std::vector<int64_t> kv_heads;
  for (size_t i = 0; i < heads.size(); ++i) {
    if (heads[i] < 0 || heads[i] >= hq) {
      return absl::InvalidArgumentError(
          absl::StrFormat("heads[%d]: expected in [0, %d) (Hq), got %d", i, hq, heads[i]));
    }
    kv_heads.push_back(heads[i] / (hq / hkv));
  }
  auto out = std::make_unique<HeadSubset>();
  out->query = GatherHeads(q, heads, axis);
  out->key = GatherHeads(k, kv_heads, k.shape.size() - 2);
  out->value = GatherHeads(request.value, kv_heads, request.value.shape.size() - 2);
  AttentionRequest& r = out->request;
  r = request;
  r.query = out->query.view();
  r.key = out->key.view();
  r.value = out->value.view();
  // A bias broadcast to [B, Hq, Lq, Lk] has its head axis third from the end.
  if (request.bias.has_value()) {
    const TensorView& b = *request.bias;
    if (b.shape.size() >= 3 && b.shape[b.shape.size() - 3] == hq && hq > 1 && whole(b)) {
      out->bias = GatherHeads(b, heads, b.shape.size() - 3);
      r.bias = out->bias->view();
    }
  }
  if (static_cast<int64_t>(request.options.alibi_slopes.size()) == hq) {
    r.options.alibi_slopes.clear();
    for (const int64_t h : heads) r.options.alibi_slopes.push_back(request.options.alibi_slopes[h]);
  }
  return out;
}

}  // namespace attnserve::client
