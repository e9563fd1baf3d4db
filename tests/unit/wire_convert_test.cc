// The conversions the server and the client share (wire/convert.h): each
// core value survives the trip to the wire and back, and the wire's errors
// name the field.
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "wire/convert.h"

namespace attnserve {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(WireConvertTest, EveryDTypeRoundTrips) {
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16, DType::kI32}) {
    absl::StatusOr<DType> back = DTypeFromProto(DTypeToProto(d), "t.dtype");
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, d);
  }
}

TEST(WireConvertTest, DTypeErrorsNameTheField) {
  EXPECT_EQ(DTypeFromProto(v1::DTYPE_UNSPECIFIED, "lse.dtype").status().message(),
            "lse.dtype: expected F32, F16, BF16 or I32, got 0");
  EXPECT_EQ(DTypeFromProto(42, "lse.dtype").status().code(), absl::StatusCode::kInvalidArgument);
  // A request tensor is never I32 (top-k indices are an output).
  EXPECT_THAT(RequestDTypeFromProto(v1::I32, "query.dtype").status().message(),
              HasSubstr("query.dtype: expected F32, F16 or BF16, got I32 (output only)"));
  EXPECT_TRUE(RequestDTypeFromProto(v1::BF16, "query.dtype").ok());
}

TEST(WireConvertTest, TensorViewRoundTripsAndMovedTensorsKeepTheirBytes) {
  const std::string bytes = "abcdefgh";
  const TensorView view{DType::kF16, {2, 2}, bytes};
  v1::Tensor proto;
  ViewToProto(view, &proto);
  EXPECT_EQ(proto.dtype(), v1::F16);
  EXPECT_THAT(proto.shape(), ElementsAre(2, 2));
  EXPECT_EQ(proto.data(), bytes);

  absl::StatusOr<TensorView> back = ViewFromProto(proto, "query");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->dtype, DType::kF16);
  EXPECT_EQ(back->shape, view.shape);
  EXPECT_EQ(back->data, bytes);
  EXPECT_EQ(back->data.data(), proto.data().data());  // a view, not a copy

  Tensor owned{DType::kI32, {2}, "12345678"};
  v1::Tensor moved;
  TensorToProto(owned, &moved);
  EXPECT_EQ(moved.dtype(), v1::I32);
  EXPECT_EQ(moved.data(), "12345678");
}

// Finds every tensor's bytes in one buffer of its own.
class FixedSource final : public TensorSource {
 public:
  explicit FixedSource(std::string bytes) : bytes_(std::move(bytes)) {}
  absl::StatusOr<std::optional<std::string_view>> Bytes(const v1::Tensor& t,
                                                        absl::string_view field) const override {
    if (!t.has_shm()) return std::optional<std::string_view>();
    if (t.shm().region() != "r") {
      return absl::InvalidArgumentError(absl::StrCat(field, ".shm.region: unknown"));
    }
    return std::optional<std::string_view>(bytes_);
  }

 private:
  const std::string bytes_;
};

TEST(WireConvertTest, ViewsComeFromTheSourceWhenItHasTheBytes) {
  const FixedSource source("elsewhere");
  v1::Tensor t;
  t.set_dtype(v1::F32);
  t.set_data("inline");
  absl::StatusOr<TensorView> inline_view = ViewFromProto(t, "key", &source);
  ASSERT_TRUE(inline_view.ok());
  EXPECT_EQ(inline_view->data, "inline");

  t.clear_data();
  t.mutable_shm()->set_region("r");
  absl::StatusOr<TensorView> shm_view = ViewFromProto(t, "key", &source);
  ASSERT_TRUE(shm_view.ok());
  EXPECT_EQ(shm_view->data, "elsewhere");

  t.mutable_shm()->set_region("other");
  EXPECT_EQ(ViewFromProto(t, "key", &source).status().message(), "key.shm.region: unknown");
}

TEST(WireConvertTest, OptionsRoundTripWithUnboundedWindowsUnset) {
  AttentionOptions o;
  o.scale = 0.125f;
  o.causal = true;
  o.causal_alignment = CausalAlignment::kTopLeft;
  o.window_left = 64;
  o.softcap = 30.f;
  o.alibi_slopes = {0.5f, 0.25f};
  o.variant = Variant::kLinear;
  v1::AttentionOptions proto;
  OptionsToProto(o, &proto);
  EXPECT_TRUE(proto.has_window_left());
  EXPECT_FALSE(proto.has_window_right());  // -1: unbounded, unset on the wire

  absl::StatusOr<AttentionOptions> back = OptionsFromProto(proto);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->scale, o.scale);
  EXPECT_EQ(back->causal, o.causal);
  EXPECT_EQ(back->causal_alignment, o.causal_alignment);
  EXPECT_EQ(back->window_left, 64);
  EXPECT_EQ(back->window_right, -1);
  EXPECT_EQ(back->softcap, o.softcap);
  EXPECT_EQ(back->alibi_slopes, o.alibi_slopes);
  EXPECT_EQ(back->variant, o.variant);

  proto.set_variant(static_cast<v1::Variant>(9));
  EXPECT_EQ(OptionsFromProto(proto).status().message(),
            "options.variant: expected SOFTMAX (0) or LINEAR (1), got 9");
}

TEST(WireConvertTest, OutputsRoundTrip) {
  const OutputSpec outputs{.lse = true, .entropy = true, .weights = false, .top_k = 4};
  v1::OutputSpec proto;
  OutputsToProto(outputs, &proto);
  const OutputSpec back = OutputsFromProto(proto);
  EXPECT_EQ(back.lse, true);
  EXPECT_EQ(back.entropy, true);
  EXPECT_EQ(back.weights, false);
  EXPECT_EQ(back.top_k, 4);
}

TEST(WireConvertTest, SparsityRoundTrips) {
  const std::string indptr("\0\0\0\0\1\0\0\0", 8);
  const std::string indices("\0\0\0\0", 4);
  SparsitySpec spec;
  spec.block_mask = BlockMaskSpec{};
  spec.block_mask->block_rows = 64;
  spec.block_mask->block_cols = 32;
  spec.block_mask->indptr = TensorView{DType::kI32, {2}, indptr};
  spec.block_mask->indices = TensorView{DType::kI32, {1}, indices};
  spec.global_tokens = {0, 3};
  spec.sink_logits = {0.5f};
  v1::Sparsity proto;
  SparsityToProto(spec, &proto);
  EXPECT_FALSE(proto.has_key_indices());
  EXPECT_FALSE(proto.block_mask().has_full_indptr());

  absl::StatusOr<SparsitySpec> back = SparsityFromProto(proto);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_TRUE(back->block_mask.has_value());
  EXPECT_EQ(back->block_mask->block_rows, 64);
  EXPECT_EQ(back->block_mask->block_cols, 32);
  EXPECT_EQ(back->block_mask->indptr.data, indptr);
  EXPECT_EQ(back->block_mask->indices.data, indices);
  EXPECT_FALSE(back->block_mask->full_indptr.has_value());
  EXPECT_FALSE(back->key_indices.has_value());
  EXPECT_EQ(back->global_tokens, spec.global_tokens);
  EXPECT_EQ(back->sink_logits, spec.sink_logits);

  proto.mutable_block_mask()->mutable_indices()->set_dtype(v1::F32);
  EXPECT_THAT(SparsityFromProto(proto).status().message(),
              HasSubstr("sparsity.block_mask.indices.dtype: expected I32, got F32"));
}

}  // namespace
}  // namespace attnserve
