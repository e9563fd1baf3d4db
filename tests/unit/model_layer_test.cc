// Attention layers from weights (model/layer.h) against the PyTorch float64
// references of tests/golden/models (tests/golden/README.md): every case and
// layer, self- and cross-attention, explicit positions, on the reference and
// cpu backends, and several calls batched through one stage.
#include "model/layer.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "backends/registry.h"
#include "core/half.h"
#include "gtest/gtest.h"
#include "model/model.h"
#include "tests/unit/golden_files.h"

namespace attnserve {
namespace {

namespace fs = std::filesystem;

// Largest |y - expected| over the largest |expected|. F32 weights agree to
// F32 rounding; BF16 weights run BF16 matmuls (x rounded to BF16).
double RelativeError(const Tensor& y, const Tensor& expected) {
  EXPECT_EQ(y.shape, expected.shape);
  double err = 0, scale = 0;
  for (int64_t i = 0; i < expected.num_elements(); ++i) {
    const double e = LoadFloat(expected.data.data(), expected.dtype, i);
    err = std::max(err, std::abs(LoadFloat(y.data.data(), y.dtype, i) - e));
    scale = std::max(scale, std::abs(e));
  }
  return err / scale;
}

double Tolerance(const Model& model) { return model.weights_dtype() == DType::kBF16 ? 1e-2 : 2e-6; }

// Plans `inputs`, runs them as one stage group on `backend`, returns each y.
std::vector<Tensor> RunLayers(const std::vector<LayerInput>& inputs, Backend& backend) {
  std::vector<std::unique_ptr<LayerCall>> calls;
  std::vector<std::unique_ptr<AttentionJob>> jobs;
  std::vector<TaskStage*> stages;
  for (const LayerInput& input : inputs) {
    absl::StatusOr<std::unique_ptr<LayerCall>> call = LayerCall::Plan(input, RequestLimits{});
    EXPECT_TRUE(call.ok()) << call.status();
    if (!call.ok()) return {};
    jobs.push_back((*call)->TakeJob());
    EXPECT_TRUE(AllocateOutputs(*jobs.back()).ok());
    EXPECT_TRUE(backend.Supports(jobs.back()->params).ok());
    stages.push_back(call->get());
    calls.push_back(*std::move(call));
  }
  EXPECT_TRUE(stages[0]->Prepare(stages).ok());
  std::vector<AttentionParams> params;
  for (const auto& job : jobs) params.push_back(job->params);
  EXPECT_TRUE(backend.Run(params).ok());
  EXPECT_TRUE(stages[0]->Finish(stages).ok());
  std::vector<Tensor> ys;
  for (auto& call : calls) ys.push_back(std::move(call->y()));
  return ys;
}

class ModelLayerTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    dir_ = golden::Dir("models") / GetParam();
    absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(GetParam(), dir_.string());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = *std::move(model);
    x_ = golden::MustRead(dir_ / "x.npy");
  }
  fs::path dir_;
  std::unique_ptr<Model> model_;
  Tensor x_;
};

TEST_P(ModelLayerTest, MatchesTheFloat64ReferenceOnEveryBackend) {
  for (const char* name : {"reference", "cpu"}) {
    absl::StatusOr<std::unique_ptr<Backend>> backend = CreateBackend(name, BackendOptions{});
    ASSERT_TRUE(backend.ok()) << backend.status();
    for (int32_t layer = 0; layer < model_->config().num_layers; ++layer) {
      LayerInput input{.model = model_.get(), .layer = layer, .x = x_.view()};
      std::vector<Tensor> y = RunLayers({input}, **backend);
      ASSERT_EQ(y.size(), 1u);
      const Tensor expected =
          golden::MustRead(dir_ / ("expected_layer" + std::to_string(layer) + ".npy"));
      EXPECT_LE(RelativeError(y[0], expected), Tolerance(*model_))
          << name << " layer " << layer;
    }
  }
}

TEST_P(ModelLayerTest, BatchedCallsMatchTheReferenceRowByRow) {
  // Each batch row as its own call ([L, hidden]), all in one stage group:
  // one matmul per projection over both calls' rows.
  absl::StatusOr<std::unique_ptr<Backend>> backend = CreateBackend("cpu", BackendOptions{});
  ASSERT_TRUE(backend.ok());
  const int64_t L = x_.shape[1], hidden = x_.shape[2];
  const int64_t row_bytes = L * hidden * 4;
  std::vector<TensorView> rows;
  for (int64_t b = 0; b < x_.shape[0]; ++b) {
    rows.push_back(TensorView{DType::kF32, {L, hidden},
                              std::string_view(x_.data).substr(b * row_bytes, row_bytes)});
  }
  const Tensor expected = golden::MustRead(dir_ / "expected_layer1.npy");
  std::vector<LayerInput> inputs;
  for (const TensorView& row : rows) {
    inputs.push_back(LayerInput{.model = model_.get(), .layer = 1, .x = row});
  }
  std::vector<Tensor> ys = RunLayers(inputs, **backend);
  ASSERT_EQ(ys.size(), rows.size());
  for (size_t b = 0; b < ys.size(); ++b) {
    Tensor want{DType::kF32, {L, hidden}, expected.data.substr(b * row_bytes, row_bytes)};
    EXPECT_LE(RelativeError(ys[b], want), Tolerance(*model_)) << "row " << b;
  }
}

TEST_P(ModelLayerTest, ExplicitPositionsAndCrossAttention) {
  absl::StatusOr<std::unique_ptr<Backend>> backend = CreateBackend("cpu", BackendOptions{});
  ASSERT_TRUE(backend.ok());
  for (int32_t layer = 0; layer < model_->config().num_layers; ++layer) {
    const std::string l = std::to_string(layer);
    if (fs::exists(dir_ / "positions.npy")) {
      LayerInput input{.model = model_.get(), .layer = layer, .x = x_.view()};
      input.positions = golden::ReadPositions(dir_ / "positions.npy");
      std::vector<Tensor> y = RunLayers({input}, **backend);
      ASSERT_EQ(y.size(), 1u);
      EXPECT_LE(RelativeError(y[0], golden::MustRead(dir_ / ("expected_positions_layer" + l +
                                                              ".npy"))),
                Tolerance(*model_));
    }
    if (fs::exists(dir_ / "memory.npy")) {
      const Tensor memory = golden::MustRead(dir_ / "memory.npy");
      LayerInput input{.model = model_.get(), .layer = layer, .x = x_.view(),
                       .memory = memory.view()};
      std::vector<Tensor> y = RunLayers({input}, **backend);
      ASSERT_EQ(y.size(), 1u);
      EXPECT_LE(RelativeError(y[0], golden::MustRead(dir_ / ("expected_cross_layer" + l +
                                                              ".npy"))),
                Tolerance(*model_));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, ModelLayerTest,
                         ::testing::ValuesIn(golden::CaseNames("models")),
                         [](const auto& info) { return info.param; });

class LayerInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Model>> model = Model::Load(
        "bert", (golden::Dir("models") / "bert_cross").string());
    ASSERT_TRUE(model.ok()) << model.status();
    bert_ = *std::move(model);
    model = Model::Load("llama", (golden::Dir("models") / "llama3_scaled").string());
    ASSERT_TRUE(model.ok()) << model.status();
    llama_ = *std::move(model);
  }
  absl::Status PlanStatus(const LayerInput& input) {
    return LayerCall::Plan(input, RequestLimits{}).status();
  }
  std::unique_ptr<Model> bert_, llama_;
};

TEST_F(LayerInputTest, BadInputNamesTheField) {
  const Tensor x = Tensor::Zeros(DType::kF32, {2, 3, 48});
  const Tensor narrow = Tensor::Zeros(DType::kF32, {2, 3, 47});
  const Tensor memory_other_batch = Tensor::Zeros(DType::kF32, {3, 5, 48});
  const Tensor llama_x = Tensor::Zeros(DType::kF32, {2, 3, 64});
  struct Case {
    LayerInput input;
    const char* needle;
  };
  const std::vector<Case> cases = {
      {{.model = bert_.get(), .layer = 2, .x = x.view()}, "layer: expected a layer in [0, 2)"},
      {{.model = bert_.get(), .layer = -1, .x = x.view()}, "layer"},
      {{.model = bert_.get(), .x = narrow.view()}, "x.shape: expected [B, L, 48]"},
      {{.model = bert_.get(), .x = x.view(), .memory = memory_other_batch.view()},
       "memory.shape"},
      {{.model = llama_.get(), .x = llama_x.view(), .memory = llama_x.view()},
       "memory: expected none"},
      {{.model = bert_.get(), .x = x.view(), .positions = {0, 1, 2}}, "has no RoPE"},
      {{.model = llama_.get(), .x = llama_x.view(), .positions = {0, 1}},
       "positions: expected 0, 3 (one per token) or 6"},
      {{.model = llama_.get(), .x = llama_x.view(), .positions = {0, -1, 2}},
       "positions[1]: expected a position in [0, 2^31)"},
  };
  for (const Case& c : cases) {
    const absl::Status s = PlanStatus(c.input);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.needle << ": " << s;
    EXPECT_NE(s.message().find(c.needle), std::string::npos) << s;
  }
  TensorView short_data = x.view();
  short_data.data = short_data.data.substr(4);
  const absl::Status s = PlanStatus({.model = bert_.get(), .x = short_data});
  EXPECT_NE(s.message().find("x.data: expected 1152 bytes"), std::string::npos) << s;
}

TEST_F(LayerInputTest, ProjectionsCountInTheJobsCost) {
  const Tensor x = Tensor::Zeros(DType::kF32, {2, 3, 48});
  absl::StatusOr<std::unique_ptr<LayerCall>> call =
      LayerCall::Plan({.model = bert_.get(), .x = x.view()}, RequestLimits{});
  ASSERT_TRUE(call.ok());
  // q, k, v and o: 4 · 2·6·48·48 FLOPs.
  EXPECT_DOUBLE_EQ((*call)->projection_flops(), 4.0 * 2 * 6 * 48 * 48);
  std::unique_ptr<AttentionJob> job = (*call)->TakeJob();
  EXPECT_GE(job->cost, (*call)->projection_flops());
  EXPECT_GT((*call)->held_bytes(), 4 * 6 * 48 * 4);
}

}  // namespace
}  // namespace attnserve
