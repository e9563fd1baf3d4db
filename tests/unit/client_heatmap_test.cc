// Tests of client/heatmap.h: head lists, token files, the request cut to some
// query heads, the bertviz JSON and the heatmap PNG's geometry. No server;
// the PNG's pixels are checked by tests/e2e/heatmap_e2e_test.py.
#include "client/heatmap.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "client/shapes.h"

namespace attnserve::client {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string TempPath(const std::string& name) { return ::testing::TempDir() + "/" + name; }

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
}

std::string ReadText(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// Weights F32 [B, H, Lq, Lk] with w[b, h, q, k] = f(b, h, q, k).
template <typename F>
Tensor Weights(int64_t b, int64_t h, int64_t lq, int64_t lk, F f) {
  Tensor t = Tensor::Zeros(DType::kF32, {b, h, lq, lk});
  float* p = t.mutable_data<float>();
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < h; ++j)
      for (int64_t q = 0; q < lq; ++q)
        for (int64_t k = 0; k < lk; ++k) *p++ = f(i, j, q, k);
  return t;
}

TEST(ClientHeatmapTest, ParseHeadsTakesListsAndRanges) {
  EXPECT_THAT(ParseHeads("0,3,5", 8).value(), ElementsAre(0, 3, 5));
  EXPECT_THAT(ParseHeads(" 6, 0-2 ", 8).value(), ElementsAre(6, 0, 1, 2));
  EXPECT_THAT(ParseHeads("8", 8).status().message(), HasSubstr("head 8 is outside [0, 8)"));
  EXPECT_THAT(ParseHeads("1,1", 8).status().message(), HasSubstr("head 1 is repeated"));
  EXPECT_THAT(ParseHeads("a", 8).status().message(), HasSubstr("got \"a\""));
  EXPECT_THAT(ParseHeads("3-1", 8).status().message(), HasSubstr("no range"));
  EXPECT_THAT(ParseHeads("", 8).status().message(), HasSubstr("no head"));
  EXPECT_THAT(ParseHeads("0-99", 100).status().message(), HasSubstr("at most 64"));
  EXPECT_EQ(HeadListString({0, 1, 2, 3, 7, 9, 10}), "0-3,7,9,10");
}

TEST(ClientHeatmapTest, TokenFilesAreOneTokenPerLineAndCountsNameTheFile) {
  const std::string path = TempPath("tokens.txt");
  WriteText(path, "The\r\n quick\nfox\n");
  absl::StatusOr<std::vector<std::string>> t = ReadTokens(path);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_THAT(*t, ElementsAre("The", " quick", "fox"));
  EXPECT_TRUE(CheckTokens(*t, path, 3, 3).ok());
  absl::Status wrong = CheckTokens(*t, path, 4, 4);
  EXPECT_THAT(wrong.message(), HasSubstr(path));
  EXPECT_THAT(wrong.message(), HasSubstr("expected 4 tokens"));
  EXPECT_THAT(wrong.message(), HasSubstr("got 3"));
  EXPECT_THAT(CheckTokens(*t, path, 3, 5).message(), HasSubstr("Lq=3 and Lk=5"));

  const std::string missing = TempPath("no-such-tokens.txt");
  EXPECT_THAT(ReadTokens(missing).status().message(), HasSubstr(missing));
  const std::string empty = TempPath("empty-tokens.txt");
  WriteText(empty, "");
  EXPECT_THAT(ReadTokens(empty).status().message(), HasSubstr("got none"));
}

TEST(ClientHeatmapTest, SelectQueryHeadsKeepsEachHeadsKvHeadBiasAndSlope) {
  // GQA: Hq 4 over Hkv 2 (heads 0,1 -> kv 0; 2,3 -> kv 1).
  const Tensor q = RandomTensor(DType::kF32, {2, 3, 4, 8}, 1);
  const Tensor k = RandomTensor(DType::kF32, {2, 5, 2, 8}, 2);
  const Tensor v = RandomTensor(DType::kF32, {2, 5, 2, 6}, 3);
  const Tensor bias = RandomTensor(DType::kF32, {4, 3, 5}, 4);  // [Hq, Lq, Lk]
  AttentionRequest r;
  r.query = q.view();
  r.key = k.view();
  r.value = v.view();
  r.bias = bias.view();
  r.options.alibi_slopes = {1, 2, 3, 4};
  r.options.causal = true;
  r.outputs.weights = true;
  r.key_lengths = {5, 4};

  absl::StatusOr<std::unique_ptr<HeadSubset>> s = SelectQueryHeads(r, {3, 0});
  ASSERT_TRUE(s.ok()) << s.status();
  const AttentionRequest& c = (*s)->request;
  EXPECT_THAT(c.query.shape, ElementsAre(2, 3, 2, 8));
  EXPECT_THAT(c.key.shape, ElementsAre(2, 5, 2, 8));
  EXPECT_THAT(c.value.shape, ElementsAre(2, 5, 2, 6));
  ASSERT_TRUE(c.bias.has_value());
  EXPECT_THAT(c.bias->shape, ElementsAre(2, 3, 5));
  EXPECT_THAT(c.options.alibi_slopes, ElementsAre(4, 1));
  EXPECT_TRUE(c.options.causal);
  EXPECT_TRUE(c.outputs.weights);
  EXPECT_THAT(c.key_lengths, ElementsAre(5, 4));
  const auto at = [](const TensorView& t, std::vector<int64_t> idx) {
    int64_t flat = 0;
    for (size_t i = 0; i < idx.size(); ++i) flat = flat * t.shape[i] + idx[i];
    float x;
    std::memcpy(&x, t.data.data() + flat * 4, 4);
    return x;
  };
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t d = 0; d < 8; ++d) {
      EXPECT_EQ(at(c.query, {b, 1, 0, d}), at(q.view(), {b, 1, 3, d}));
      EXPECT_EQ(at(c.query, {b, 1, 1, d}), at(q.view(), {b, 1, 0, d}));
      EXPECT_EQ(at(c.key, {b, 4, 0, d}), at(k.view(), {b, 4, 1, d}));  // head 3's kv head
      EXPECT_EQ(at(c.key, {b, 4, 1, d}), at(k.view(), {b, 4, 0, d}));  // head 0's
    }
  }
  EXPECT_EQ(at(*c.bias, {0, 2, 4}), at(bias.view(), {3, 2, 4}));
  EXPECT_EQ(at(*c.bias, {1, 2, 4}), at(bias.view(), {0, 2, 4}));

  // A bias that broadcasts over heads is left alone.
  const Tensor flat_bias = RandomTensor(DType::kF32, {5}, 5);
  r.bias = flat_bias.view();
  s = SelectQueryHeads(r, {1});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*s)->request.bias->data, flat_bias.data);
  EXPECT_THAT(SelectQueryHeads(r, {4}).status().message(), HasSubstr("heads[0]"));
}

TEST(ClientHeatmapTest, BertvizJsonIsOneLayerOfTheBatchRowWithTokens) {
  const Tensor w = Weights(2, 2, 3, 3, [](int64_t b, int64_t h, int64_t q, int64_t k) {
    return b == 1 ? 0.25f * (h + 1) + 0.01f * q + 0.001f * k : 0.f;
  });
  const std::string path = TempPath("bertviz.json");
  ASSERT_TRUE(WriteBertvizJson(w, 1, {"a", "\"b\"", "c\\"}, path).ok());
  const std::string json = ReadText(path);
  EXPECT_THAT(json, HasSubstr("{\"attention\": [[[[[0.25,0.251,0.252], [0.26,"));
  EXPECT_THAT(json, HasSubstr("], [[0.5,0.501,"));
  EXPECT_THAT(json, HasSubstr("\"tokens\": [\"a\", \"\\\"b\\\"\", \"c\\\\\"]}"));

  ASSERT_TRUE(WriteBertvizJson(w, 0, {}, path).ok());
  EXPECT_THAT(ReadText(path), HasSubstr("\"tokens\": [\"0\", \"1\", \"2\"]"));
  EXPECT_THAT(WriteBertvizJson(w, 2, {}, path).message(), HasSubstr("batch_row"));
  EXPECT_THAT(WriteBertvizJson(w, 0, {"a"}, path).message(), HasSubstr("expected 3"));
  const Tensor cross = Weights(1, 1, 2, 3, [](auto...) { return 0.f; });
  EXPECT_THAT(WriteBertvizJson(cross, 0, {}, path).message(), HasSubstr("Lq == Lk"));
}

// Width and height from the PNG's IHDR chunk.
std::pair<int, int> PngSize(const std::string& path) {
  const std::string png = ReadText(path);
  if (png.size() < 24 || png.compare(1, 3, "PNG") != 0) return {-1, -1};
  const auto be32 = [&](size_t at) {
    return (static_cast<unsigned char>(png[at]) << 24) |
           (static_cast<unsigned char>(png[at + 1]) << 16) |
           (static_cast<unsigned char>(png[at + 2]) << 8) | static_cast<unsigned char>(png[at + 3]);
  };
  return {be32(16), be32(20)};
}

TEST(ClientHeatmapTest, HeatmapTilesHeadsAndPoolsLongAxes) {
  // 3 heads of 300 x 40: queries pooled 2 per cell (150 rows), keys not.
  const Tensor w = Weights(1, 3, 300, 40, [](int64_t, int64_t h, int64_t q, int64_t k) {
    return k == h ? 0.9f : q == 7 && k == 39 ? 1.f : 0.1f / 39;
  });
  const std::string path = TempPath("heatmap.png");
  HeatmapGeometry g;
  HeatmapOptions options;
  options.description = "test";
  ASSERT_TRUE(RenderHeatmap(w, options, path, &g).ok());
  EXPECT_EQ(PngSize(path), std::make_pair(g.width, g.height));
  EXPECT_EQ(g.rows, 150);
  EXPECT_EQ(g.cols, 40);
  EXPECT_EQ(g.pool_rows, 2);
  EXPECT_EQ(g.pool_cols, 1);
  EXPECT_THAT(g.heads, ElementsAre(0, 1, 2));
  ASSERT_EQ(g.tile_origins.size(), 3u);
  // Two tiles per row of the grid (ceil(sqrt(3))): the third under the first.
  EXPECT_EQ(g.tile_origins[0].second, g.tile_origins[1].second);
  EXPECT_EQ(g.tile_origins[2].first, g.tile_origins[0].first);
  EXPECT_GT(g.tile_origins[2].second, g.tile_origins[0].second + 150 * g.cell_height);
  EXPECT_FLOAT_EQ(g.max_value, 1.f);
  EXPECT_FLOAT_EQ(g.min_value, 0.1f / 39);

  // Chosen heads under their numbers in the full request, log scale.
  options.heads = {2};
  options.head_numbers = {5, 6, 7};
  options.log_scale = true;
  ASSERT_TRUE(RenderHeatmap(w, options, path, &g).ok());
  EXPECT_THAT(g.heads, ElementsAre(7));
  EXPECT_EQ(PngSize(path), std::make_pair(g.width, g.height));

  options = {};
  options.heads = {3};
  EXPECT_THAT(RenderHeatmap(w, options, path).message(), HasSubstr("heads[0]"));
  options = {};
  options.tokens = {"a", "b"};
  EXPECT_THAT(RenderHeatmap(w, options, path).message(), HasSubstr("Lq=300 Lk=40 and 2 tokens"));
  options = {};
  options.batch_row = 1;
  EXPECT_THAT(RenderHeatmap(w, options, path).message(), HasSubstr("batch_row"));
  Tensor f16 = w;
  f16.dtype = DType::kF16;
  EXPECT_THAT(RenderHeatmap(f16, {}, path).message(), HasSubstr("expected F32"));
  EXPECT_THAT(RenderHeatmap(w, {}, TempPath("no-such-dir/x.png")).message(),
              HasSubstr("no-such-dir/x.png"));
}

TEST(ClientHeatmapTest, TokensAreDrawnWhenCellsAreOneTokenEach) {
  std::vector<std::string> tokens;
  // Invalid UTF-8 (a stray byte, an overlong form, a surrogate) becomes '?'
  // rather than failing the drawing.
  const char* bad[] = {"\xff bad utf-8", "\xc0\x80 overlong", "\xed\xa0\x80 surrogate",
                       "\xf4\x90\x80\x80 past U+10FFFF"};
  for (int i = 0; i < 24; ++i) tokens.push_back(i % 5 == 0 ? bad[(i / 5) % 4] : "tok");
  const Tensor w = Weights(1, 4, 24, 24, [](int64_t, int64_t h, int64_t q, int64_t k) {
    return k <= q ? 1.f / (q + 1) : 0.f;
  });
  HeatmapOptions options;
  options.tokens = tokens;
  HeatmapGeometry g;
  const std::string path = TempPath("tokens.png");
  ASSERT_TRUE(RenderHeatmap(w, options, path, &g).ok());
  EXPECT_TRUE(g.token_labels);
  EXPECT_GE(g.cell_width, 8);
  EXPECT_EQ(g.tile_origins.size(), 4u);
  EXPECT_EQ(PngSize(path), std::make_pair(g.width, g.height));
}

TEST(ClientHeatmapTest, ViridisGetsBrighterWithTheWeight) {
  EXPECT_EQ(ViridisRgb(0), 0x440154u);
  EXPECT_EQ(ViridisRgb(1), 0xfde725u);
  EXPECT_EQ(ViridisRgb(-1), ViridisRgb(0));
  EXPECT_EQ(ViridisRgb(std::nan("")), ViridisRgb(0));
  double last = -1;
  for (int i = 0; i <= 100; ++i) {
    const uint32_t c = ViridisRgb(i / 100.0);
    const double luma = 0.299 * (c >> 16) + 0.587 * ((c >> 8) & 0xff) + 0.114 * (c & 0xff);
    EXPECT_GT(luma, last) << i;
    last = luma;
  }
}

TEST(ClientHeatmapTest, NanWeightsDoNotSpoilTheScale) {
  Tensor w = Weights(1, 1, 2, 2, [](int64_t, int64_t, int64_t q, int64_t k) {
    return q == 0 && k == 0 ? std::nanf("") : 0.25f * (1 + q + k);
  });
  HeatmapGeometry g;
  const std::string path = TempPath("nan.png");
  ASSERT_TRUE(RenderHeatmap(w, {}, path, &g).ok());
  EXPECT_FLOAT_EQ(g.min_value, 0.5f);
  EXPECT_FLOAT_EQ(g.max_value, 0.75f);
}

}  // namespace
}  // namespace attnserve::client
