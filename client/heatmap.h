// Looking at attention weights on the client: a PNG heatmap of the
// probabilities (attnctl attend --heatmap), the JSON that bertviz's head_view
// takes (--bertviz), token files, and a request restricted to some query heads
// (--heads), so the weights the server returns stay under its size cap.
//
// The weights are the server's outputs.weights: F32 [B, Hq, Lq, Lk] (or
// [Hq, Lq, Lk]), row-major. Pure functions apart from the files they read and
// write; thread-safe.
#ifndef ATTNSERVE_CLIENT_HEATMAP_H_
#define ATTNSERVE_CLIENT_HEATMAP_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "attention/request.h"
#include "core/tensor.h"

namespace attnserve::client {

// Cells per axis of one head's tile; a longer axis is max-pooled down to it
// (a cell then shows the largest weight of the queries × keys it covers, so
// a sharp peak survives the downsampling).
inline constexpr int64_t kHeatmapMaxCells = 256;
// Heads drawn when HeatmapOptions::heads is empty (the first ones).
inline constexpr int64_t kHeatmapDefaultHeads = 16;
// Most heads one image may hold.
inline constexpr int64_t kHeatmapMaxHeads = 64;

struct HeatmapOptions {
  int64_t batch_row = 0;  // which row of B to draw
  // Indices into the weights' head axis, one tile each in this order. Empty:
  // the first kHeatmapDefaultHeads.
  std::vector<int64_t> heads;
  // The number to label each of the weights' heads with (the query head it
  // was in the full request, when the request carried a subset). Empty: the
  // index. Else one per head of the weights.
  std::vector<int64_t> head_numbers;
  // Colours by log10 of the weight instead of the weight; weights below
  // max·1e-6 (masked keys' zeros among them) take the lowest colour.
  bool log_scale = false;
  // Token labels for both axes (self-attention: Lq == Lk of them), drawn
  // when every cell is one token and large enough for text. Empty: none.
  std::vector<std::string> tokens;
  int64_t max_cells = kHeatmapMaxCells;  // per axis before max-pooling
  std::string description;  // appended to the title: the request's options
};

// Where RenderHeatmap put things, for callers that read the image back.
struct HeatmapGeometry {
  int width = 0;  // px
  int height = 0;
  int64_t rows = 0;  // cells per tile, down (queries) and across (keys)
  int64_t cols = 0;
  int64_t pool_rows = 1;  // queries and keys per cell (1: not pooled)
  int64_t pool_cols = 1;
  int cell_width = 0;  // px per cell
  int cell_height = 0;
  std::vector<int64_t> heads;  // the head numbers drawn, one per tile in order
  // Top-left pixel (x, y) of each tile's first cell; cell (r, c) of tile i
  // covers x in [x + c·cell_width, +cell_width), y likewise with rows.
  std::vector<std::pair<int, int>> tile_origins;
  float min_value = 0;  // the colour scale's ends (the lowest and highest
  float max_value = 0;  // weight drawn; log scale: its clamped low end)
  bool token_labels = false;  // whether the tokens were drawn
};

// Draws one tile per head (queries down, keys across) in a grid, a colour bar
// with the scale's ends, and a title with the shape and options, and writes
// it as a PNG to `path`. Colours are viridis: dark purple for the lowest
// weight drawn, yellow for the highest (luminance rises with the weight).
// INVALID_ARGUMENT naming the field for a tensor that is not F32 of rank 3
// or 4, a batch row or head out of range, more than kHeatmapMaxHeads heads,
// head_numbers of the wrong length or tokens whose count is not Lq = Lk;
// INTERNAL naming `path` when cairo cannot draw or write the file.
absl::Status RenderHeatmap(const Tensor& weights, const HeatmapOptions& options,
                           const std::string& path, HeatmapGeometry* geometry = nullptr);

// Query heads from a list such as "0,3,5" or "0-3,8" (ranges inclusive), in
// the order given. INVALID_ARGUMENT for a malformed list, a head outside
// [0, num_heads), a repeated head or more than kHeatmapMaxHeads.
absl::StatusOr<std::vector<int64_t>> ParseHeads(absl::string_view spec, int64_t num_heads);

// One token per line (a final newline ends the last line, "\r\n" counts as a
// newline; other whitespace is part of the token). INVALID_ARGUMENT naming
// `path` when it cannot be read or holds no token.
absl::StatusOr<std::vector<std::string>> ReadTokens(const std::string& path);

// OK when `tokens` (read from `path`) label both axes of [Lq, Lk]: Lq == Lk
// == tokens.size(). Else INVALID_ARGUMENT naming `path` and the counts.
absl::Status CheckTokens(const std::vector<std::string>& tokens, const std::string& path,
                         int64_t lq, int64_t lk);

// Writes {"attention": [[[[...]]]], "tokens": [...]}: the weights of
// `batch_row` as one layer of shape [1, H, Lq, Lk] in nested lists (every
// head of the tensor; floats printed so they read back exactly) and the
// tokens, the structure bertviz's head_view(attention, tokens) takes once
// each layer is made a tensor. `tokens` empty: the positions "0".."L-1".
// INVALID_ARGUMENT for a tensor as in RenderHeatmap, Lq != Lk (head_view's
// self-attention form) or a token count other than Lq; INTERNAL naming
// `path` when it cannot be written.
absl::Status WriteBertvizJson(const Tensor& weights, int64_t batch_row,
                              const std::vector<std::string>& tokens, const std::string& path);

// A request restricted to some query heads, with the tensors it views.
struct HeadSubset {
  Tensor query, key, value;
  std::optional<Tensor> bias;
  AttentionRequest request;
};

// `request` with only the query heads `heads` (in that order): each keeps
// its own KV head (the key and value get one head per chosen query head, so
// GQA becomes MHA with the same scores), a bias with a head axis of Hq and
// ALiBi slopes (one per head) are cut alike. Everything else is kept, so the
// weights, lse and entropy of the heads are those of the full request.
// Heap-allocated: the request views the subset's tensors. INVALID_ARGUMENT
// for a query or key that is not rank 3 or 4, Hq % Hkv != 0 or a head out
// of range. Not for session (paged) requests.
absl::StatusOr<std::unique_ptr<HeadSubset>> SelectQueryHeads(const AttentionRequest& request,
                                                             const std::vector<int64_t>& heads);

// The viridis colour of t in [0, 1] (clamped) as 0x00RRGGBB.
uint32_t ViridisRgb(double t);

// "0-3,7,9": heads as ranges where consecutive.
std::string HeadListString(const std::vector<int64_t>& heads);

}  // namespace attnserve::client

#endif  // ATTNSERVE_CLIENT_HEATMAP_H_
