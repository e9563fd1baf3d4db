// Backend conformance: every registered backend runs the same option matrix
// (sizes that are not multiples of any tile, every option, every output,
// sparse patterns, all dtypes) in one batch and must match the reference kernel within the
// tolerances documented in tests/README.md. A case the backend's Supports()
// refuses is skipped, counted and listed (RefusedCases), and is a failure when
// the backend's BackendInfo claims the dtype and every feature the case uses.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "attention/job.h"
#include "attention/reference.h"
#include "backends/registry.h"
#include "core/half.h"
#include "gtest/gtest.h"
#include "random_request.h"
#include "refused_cases.h"

namespace attnserve {
namespace {

// |got - want| <= atol + rtol·|want| per element (numpy.allclose).
struct Tolerance {
  double atol;
  double rtol;
};

// A backend that computes F32 requests from 16-bit copies (BackendInfo::
// f32_inputs_exact false, e.g. cuda) is held to the 16-bit tolerance.
Tolerance ToleranceFor(DType dtype, const BackendInfo& info) {
  const bool exact_f32 = dtype == DType::kF32 && info.f32_inputs_exact;
  return exact_f32 ? Tolerance{1e-5, 1e-5} : Tolerance{1e-2, 1e-2};
}

RequestSpec Base(std::string name) {
  RequestSpec s;
  s.name = std::move(name);
  s.batch = 2;
  s.seqlen_q = 33;
  s.seqlen_k = 65;
  s.heads_q = 4;
  s.heads_kv = 2;
  s.head_dim = 64;
  return s;
}

RequestSpec Sized(std::string name, int64_t lq, int64_t lk, int64_t d, int64_t hq = 2,
                  int64_t hkv = 2) {
  RequestSpec s;
  s.name = std::move(name);
  s.seqlen_q = lq;
  s.seqlen_k = lk;
  s.heads_q = hq;
  s.heads_kv = hkv;
  s.head_dim = d;
  return s;
}

// Sparse attention: each pattern form crossed with every option that changes
// which keys a row sees or how they are weighted, then decode-shaped and long
// requests (which the cpu backend computes with other kernels or in key
// chunks). The patterns are drawn from each case's seed (RandomRequest).
std::vector<RequestSpec> SparseCases() {
  using Heads = SparsePattern::Heads;
  struct Form {
    std::string name;
    SparsePattern pattern;
  };
  std::vector<Form> forms;
  auto block_mask = [](int32_t rows, int32_t cols) {
    SparsePattern p;
    p.block_rows = rows;
    p.block_cols = cols;
    return p;
  };
  auto selection = [](int32_t k, int32_t query_block, int32_t key_block, Heads heads) {
    SparsePattern p;
    p.select_k = k;
    p.query_block = query_block;
    p.key_block = key_block;
    p.select_heads = heads;
    return p;
  };
  {
    SparsePattern p = block_mask(1, 1);  // broadcast over batch and heads
    p.density = 0.3;
    forms.push_back({"bm1x1", p});
    p = block_mask(16, 16);
    p.per_head = true;
    p.full_blocks = true;
    forms.push_back({"bm16x16_head_full", p});
    p = block_mask(16, 64);  // R != C, the last key block short
    p.per_batch = true;
    p.density = 0.7;
    forms.push_back({"bm16x64_batch", p});
    p = block_mask(64, 16);  // one row block, padded past Lq
    p.rank1 = true;
    forms.push_back({"bm64x16_rank1", p});
    forms.push_back({"ki_key_hq", selection(24, 1, 1, Heads::kQuery)});
    forms.push_back({"ki_key_hkv_qb4", selection(16, 4, 1, Heads::kKv)});
    p = selection(4, 16, 8, Heads::kOne);  // key blocks, broadcast over batch and heads
    p.select_per_batch = false;
    forms.push_back({"ki_block8_qb16_h1", p});
    p = SparsePattern();
    p.global_tokens = 5;
    forms.push_back({"global5", p});
    p = SparsePattern();
    p.sinks = true;
    forms.push_back({"sinks", p});
    p = block_mask(16, 16);
    p.per_head = true;
    p.global_tokens = 4;
    p.sinks = true;
    forms.push_back({"bm16x16_global_sinks", p});
    p = selection(12, 2, 1, Heads::kKv);
    p.global_tokens = 4;
    p.sinks = true;
    forms.push_back({"ki_global_sinks", p});
  }
  struct Modifier {
    std::string name;
    std::function<void(RequestSpec&)> apply;
  };
  const std::vector<Modifier> modifiers = {
      {"plain",
       [](RequestSpec& s) {
         s.outputs.lse = true;
         s.outputs.entropy = true;
       }},
      {"causal_br",
       [](RequestSpec& s) {
         s.options.causal = true;
         s.outputs.lse = true;
       }},
      {"causal_tl_lq65_lk33",
       [](RequestSpec& s) {
         s.seqlen_q = 65;
         s.seqlen_k = 33;
         s.options.causal = true;
         s.options.causal_alignment = CausalAlignment::kTopLeft;
         s.outputs.lse = true;
         s.outputs.entropy = true;
       }},
      {"causal_br_lq65_lk33",  // bottom-right with Lq > Lk: fully masked rows
       [](RequestSpec& s) {
         s.seqlen_q = 65;
         s.seqlen_k = 33;
         s.options.causal = true;
         s.outputs.lse = true;
       }},
      {"window_l8_r4",
       [](RequestSpec& s) {
         s.options.window_left = 8;
         s.options.window_right = 4;
         s.outputs.lse = true;
       }},
      {"softcap_alibi",
       [](RequestSpec& s) {
         s.options.scale = 1.f;
         s.options.softcap = 5.f;
         s.options.alibi_slopes = AlibiSlopes(s.heads_q);
       }},
      {"bias_masks",
       [](RequestSpec& s) {
         s.bias_shape = std::vector<int64_t>{2, 1, 33, 65};
         s.bias_masks = true;
         s.outputs.lse = true;
       }},
      {"key_lengths_0_40",
       [](RequestSpec& s) {
         s.key_lengths = {0, 40};
         s.outputs.lse = true;
         s.outputs.entropy = true;
       }},
      {"gqa_8_2", [](RequestSpec& s) { s.heads_q = 8; }},
      {"mqa_4_1_causal",
       [](RequestSpec& s) {
         s.heads_kv = 1;
         s.options.causal = true;
       }},
      {"weights_top_k5",
       [](RequestSpec& s) {
         s.outputs.weights = true;
         s.outputs.top_k = 5;
       }},
  };
  std::vector<RequestSpec> c;
  for (const Form& form : forms) {
    for (const Modifier& m : modifiers) {
      RequestSpec s = Base(absl::StrCat("sparse_", form.name, "_", m.name));
      s.sparse = form.pattern;
      m.apply(s);
      c.push_back(s);
    }
  }
  // Block sizes of 64 and 100 on longer rows, and every form at once.
  {
    RequestSpec s = Sized("sparse_bm100x100_head_lq130_lk250_causal_tl", 130, 250, 64, 4, 2);
    s.sparse = block_mask(100, 100);
    s.sparse.per_head = true;
    s.sparse.density = 0.6;
    s.options.causal = true;
    s.options.causal_alignment = CausalAlignment::kTopLeft;
    s.outputs.lse = true;
    c.push_back(s);
    s = Sized("sparse_bm64x64_batch_head_full_lq130_lk130_key_lengths", 130, 130, 80, 4, 1);
    s.batch = 2;
    s.sparse = block_mask(64, 64);
    s.sparse.per_batch = true;
    s.sparse.per_head = true;
    s.sparse.full_blocks = true;
    s.sparse.density = 0.6;
    s.options.causal = true;
    s.key_lengths = {130, 77};
    s.outputs = {.lse = true, .entropy = true};
    c.push_back(s);
    s = Sized("sparse_everything_lq47_lk90", 47, 90, 32, 4, 2);
    s.batch = 2;
    s.sparse = block_mask(8, 24);
    s.sparse.per_batch = true;
    s.sparse.per_head = true;
    s.sparse.full_blocks = true;
    s.sparse.global_tokens = 6;
    s.sparse.sinks = true;
    s.options.causal = true;
    s.options.window_left = 30;
    s.options.softcap = 8.f;
    s.options.alibi_slopes = AlibiSlopes(s.heads_q);
    s.bias_shape = std::vector<int64_t>{1, 4, 1, 90};
    s.key_lengths = {90, 0};
    s.outputs = {.lse = true, .entropy = true, .weights = true, .top_k = 3};
    c.push_back(s);
  }
  // Key lists that are all empty (block masks whose indices and full_indices
  // are both empty, key selections of -1 only): only global tokens (keys, and
  // query rows on their diagonal) show keys.
  for (auto [lq, lk, align] : {std::tuple{6, 4, CausalAlignment::kTopLeft},
                               std::tuple{33, 65, CausalAlignment::kBottomRight}}) {
    RequestSpec s = Sized(absl::StrCat("sparse_bm_empty_global_causal_",
                                       align == CausalAlignment::kTopLeft ? "tl" : "br", "_lq",
                                       lq, "_lk", lk),
                          lq, lk, 16, 2, 2);
    s.sparse = block_mask(64, 16);
    s.sparse.full_blocks = true;
    s.sparse.density = 0;
    s.sparse.global_tokens = lk == 4 ? 3 : 6;
    s.options.causal = true;
    s.options.causal_alignment = align;
    s.outputs = {.lse = true, .entropy = true};
    c.push_back(s);
  }
  {
    RequestSpec s = Sized("sparse_ki_empty_global_causal_br_lq33_lk65", 33, 65, 16, 4, 2);
    s.sparse = selection(3, 2, 1, Heads::kKv);
    s.sparse.density = 0;
    s.sparse.global_tokens = 6;
    s.options.causal = true;
    s.outputs = {.lse = true, .entropy = true};
    c.push_back(s);
  }
  // Decode-shaped: one query row, Hq 32 over Hkv 8, D and Dv multiples of 16
  // (the cpu backend's decode kernel), Lk past 2048 (key chunks merged by lse).
  {
    RequestSpec s = Sized("sparse_decode_bm64x64_head_d64", 1, 2100, 64, 32, 8);
    s.sparse = block_mask(64, 64);
    s.sparse.per_head = true;
    s.outputs.lse = true;
    c.push_back(s);
    s = Sized("sparse_decode_ki_key_hkv_d128_key_lengths", 1, 2100, 128, 32, 8);
    s.batch = 2;
    s.sparse = selection(200, 1, 1, Heads::kKv);
    s.key_lengths = {1500, 0};
    s.outputs = {.lse = true, .entropy = true};
    c.push_back(s);
    s = Sized("sparse_decode_ki_block32_hq_d64_dv32", 1, 2100, 64, 32, 8);
    s.value_dim = 32;
    s.sparse = selection(12, 1, 32, Heads::kQuery);
    s.options.causal = true;
    s.outputs.top_k = 4;
    c.push_back(s);
    s = Sized("sparse_decode_global_sinks_window_d64", 1, 2100, 64, 32, 8);
    s.sparse.global_tokens = 16;
    s.sparse.sinks = true;
    s.options.causal = true;
    s.options.window_left = 700;
    s.outputs = {.lse = true, .entropy = true};
    c.push_back(s);
    s = Sized("sparse_decode_everything_d128", 1, 2100, 128, 32, 8);
    s.batch = 2;
    s.sparse = block_mask(1, 32);
    s.sparse.per_batch = true;
    s.sparse.per_head = true;
    s.sparse.full_blocks = true;
    s.sparse.global_tokens = 8;
    s.sparse.sinks = true;
    s.options.causal = true;
    s.options.softcap = 20.f;
    s.options.alibi_slopes = AlibiSlopes(32);
    s.key_lengths = {2100, 901};
    s.outputs = {.lse = true, .entropy = true};
    c.push_back(s);
  }
  // Several query rows over long keys: tiles of rows, keys in chunks.
  {
    RequestSpec s = Sized("sparse_chunked_lq70_lk2100_bm16x64_global_sinks", 70, 2100, 64, 4, 2);
    s.sparse = block_mask(16, 64);
    s.sparse.per_head = true;
    s.sparse.density = 0.25;
    s.sparse.global_tokens = 10;
    s.sparse.sinks = true;
    s.options.causal = true;
    s.outputs = {.lse = true, .entropy = true};
    c.push_back(s);
    s = Sized("sparse_chunked_lq70_lk2100_ki_key_qb8_hkv", 70, 2100, 64, 4, 2);
    s.sparse = selection(300, 8, 1, Heads::kKv);
    s.options.window_left = 1500;
    s.outputs.lse = true;
    c.push_back(s);
  }
  return c;
}

// The option matrix. Sizes stay small enough for the (slow, exact) reference.
std::vector<RequestSpec> Cases() {
  std::vector<RequestSpec> c;
  // --- Sizes: Lq, Lk not multiples of tiles, every head_dim, Lk = 1, Dv != D.
  c.push_back(Sized("lq1_lk1_d32", 1, 1, 32));
  c.push_back(Sized("lq1_lk7_d64", 1, 7, 64));
  c.push_back(Sized("lq7_lk7_d80", 7, 7, 80));
  c.push_back(Sized("lq33_lk65_d128", 33, 65, 128));
  c.push_back(Sized("lq65_lk33_d256", 65, 33, 256));
  c.push_back(Sized("lq130_lk130_d64", 130, 130, 64));
  c.push_back(Sized("lq1_lk130_d128_decode", 1, 130, 128, 8, 2));
  c.push_back(Sized("lq130_lk1_d32", 130, 1, 32));
  c.push_back(Sized("lq7_lk130_d256", 7, 130, 256));
  c.push_back(Sized("lq33_lk65_d80", 33, 65, 80, 3, 1));
  {
    RequestSpec s = Base("dv32_d64");
    s.value_dim = 32;
    c.push_back(s);
    s = Base("dv80_d32");
    s.head_dim = 32;
    s.value_dim = 80;
    c.push_back(s);
    s = Sized("rank3", 9, 17, 32, 2, 1);
    s.rank3 = true;
    c.push_back(s);
    s = Base("explicit_scale");
    s.options.scale = 0.3f;
    c.push_back(s);
    s = Base("batch3");
    s.batch = 3;
    c.push_back(s);
  }
  // --- Causal, both alignments, Lq <, =, > Lk (bottom-right with Lq > Lk has
  // fully masked rows).
  for (auto align : {CausalAlignment::kBottomRight, CausalAlignment::kTopLeft}) {
    const std::string a = align == CausalAlignment::kBottomRight ? "br" : "tl";
    for (auto [lq, lk] : {std::pair{33, 65}, std::pair{65, 65}, std::pair{65, 33}}) {
      RequestSpec s = Base(absl::StrCat("causal_", a, "_lq", lq, "_lk", lk));
      s.seqlen_q = lq;
      s.seqlen_k = lk;
      s.options.causal = true;
      s.options.causal_alignment = align;
      s.outputs.lse = true;
      s.outputs.entropy = true;      c.push_back(s);
    }
  }
  // --- Sliding windows.
  for (auto [l, r] : {std::pair{8, 4}, std::pair{0, 0}, std::pair{5, -1}, std::pair{-1, 3}}) {
    RequestSpec s = Base(absl::StrCat("window_l", l, "_r", r));
    s.options.window_left = l;
    s.options.window_right = r;
    c.push_back(s);
  }
  for (auto align : {CausalAlignment::kBottomRight, CausalAlignment::kTopLeft}) {
    RequestSpec s = Base(absl::StrCat("causal_window6_",
                                      align == CausalAlignment::kTopLeft ? "tl" : "br"));
    s.seqlen_q = 65;
    s.seqlen_k = 33;
    s.options.causal = true;
    s.options.causal_alignment = align;
    s.options.window_left = 6;
    s.outputs.lse = true;
    s.outputs.entropy = true;    c.push_back(s);
  }
  // --- Softcap (scale 1 so that scores reach the cap), ALiBi.
  {
    RequestSpec s = Base("softcap5");
    s.options.scale = 1.f;
    s.options.softcap = 5.f;
    c.push_back(s);
    s = Base("alibi");
    s.options.alibi_slopes = AlibiSlopes(s.heads_q);
    c.push_back(s);
    s.name = "alibi_causal";
    s.options.causal = true;
    c.push_back(s);
  }
  // --- Bias, every broadcast shape, and -inf masks.
  for (const std::vector<int64_t>& shape :
       std::vector<std::vector<int64_t>>{{2, 4, 33, 65}, {33, 65}, {4, 1, 65}, {2, 1, 1, 65},
                                         {1}, {65}, {2, 4, 1, 1}}) {
    std::vector<std::string> dims;
    for (int64_t d : shape) dims.push_back(absl::StrCat(d));
    RequestSpec s = Base(absl::StrCat("bias_", absl::StrJoin(dims, "x")));
    s.bias_shape = shape;
    c.push_back(s);
  }
  for (const std::vector<int64_t>& shape :
       std::vector<std::vector<int64_t>>{{2, 4, 33, 65}, {2, 1, 1, 65}}) {
    RequestSpec s = Base(absl::StrCat("bias_masks_", shape[1] == 4 ? "full" : "keys"));
    s.bias_shape = shape;
    s.bias_masks = true;
    s.outputs.lse = true;
    s.outputs.entropy = true;    c.push_back(s);
  }
  // --- key_lengths, with an empty row.
  {
    RequestSpec s = Base("key_lengths_0_40");
    s.key_lengths = {0, 40};
    s.outputs.lse = true;
    s.outputs.entropy = true;    c.push_back(s);
    s = Base("key_lengths_65_1");
    s.key_lengths = {65, 1};
    c.push_back(s);
    s = Base("key_lengths_causal");
    s.key_lengths = {20, 50};
    s.options.causal = true;
    s.outputs.lse = true;
    s.outputs.entropy = true;    c.push_back(s);
    s = Base("key_lengths_window_alibi");
    s.key_lengths = {64, 30};
    s.options.window_left = 10;
    s.options.window_right = 2;
    s.options.alibi_slopes = AlibiSlopes(s.heads_q);
    c.push_back(s);
  }
  // --- Sharded keys: one part of a longer sequence, positions counted in it.
  {
    RequestSpec s = Base("shard_causal_middle");  // keys 100..164 of 300, queries 267..299
    s.key_offset = 100;
    s.total_keys = 300;
    s.options.causal = true;
    s.outputs.lse = true;
    s.outputs.entropy = true;
    c.push_back(s);
    s = Base("shard_causal_crossing");  // the diagonal runs through the part
    s.key_offset = 250;
    s.total_keys = 0;  // the last part: 250 + 65 keys
    s.options.causal = true;
    s.outputs.lse = true;
    c.push_back(s);
    s = Base("shard_causal_after_queries");  // every row fully masked
    s.seqlen_q = 4;
    s.key_offset = 10;
    s.total_keys = 120;
    s.options.causal = true;
    s.options.causal_alignment = CausalAlignment::kTopLeft;
    s.outputs.lse = true;
    c.push_back(s);
    s = Base("shard_window_alibi");
    s.key_offset = 40;
    s.total_keys = 140;
    s.options.window_left = 50;
    s.options.window_right = 5;
    s.options.alibi_slopes = AlibiSlopes(s.heads_q);
    s.outputs.lse = true;
    c.push_back(s);
  }
  // --- GQA / MQA.
  {
    RequestSpec s = Base("gqa_8_2");
    s.heads_q = 8;
    c.push_back(s);
    s = Base("mqa_4_1_causal");
    s.heads_kv = 1;
    s.options.causal = true;
    c.push_back(s);
  }
  // --- LINEAR.
  {
    RequestSpec s = Base("linear");
    s.options.variant = Variant::kLinear;
    c.push_back(s);
    s.name = "linear_causal_br";
    s.options.causal = true;
    c.push_back(s);
    s.name = "linear_causal_tl_lq65_lk33";
    s.seqlen_q = 65;
    s.seqlen_k = 33;
    s.options.causal_alignment = CausalAlignment::kTopLeft;
    c.push_back(s);
    s = Base("linear_key_lengths_gqa");
    s.options.variant = Variant::kLinear;
    s.heads_q = 8;
    s.key_lengths = {0, 30};
    c.push_back(s);
  }
  // --- Optional outputs.
  {
    RequestSpec s = Base("lse");
    s.outputs.lse = true;
    s.outputs.entropy = true;    c.push_back(s);
    s = Base("weights");
    s.outputs.weights = true;
    c.push_back(s);
    s = Base("top_k5");
    s.outputs.top_k = 5;
    c.push_back(s);
    s = Base("top_k_all_key_lengths");
    s.outputs.top_k = 65;
    s.key_lengths = {0, 40};
    c.push_back(s);
    s = Base("outputs_all_causal_bias_alibi_softcap");
    s.options.causal = true;
    s.options.scale = 0.5f;
    s.options.softcap = 8.f;
    s.options.alibi_slopes = AlibiSlopes(s.heads_q);
    s.bias_shape = std::vector<int64_t>{2, 1, 33, 65};
    s.bias_masks = true;
    s.outputs = {.lse = true, .entropy = true, .weights = true, .top_k = 3};
    c.push_back(s);
  }
  // --- Long enough that tiled backends split the query rows into several
  // chunks whose visible key spans differ.
  {
    RequestSpec s = Sized("chunked_lq300_lk1000_causal_window", 300, 1000, 64, 2, 1);
    s.batch = 2;
    s.key_lengths = {1000, 517};
    s.options.causal = true;
    s.options.window_left = 300;
    s.outputs.lse = true;
    s.outputs.entropy = true;    c.push_back(s);
  }
  // --- Decode-shaped (one query row over many keys, which tiled backends
  // split into chunks and merge) with entropy.
  {
    RequestSpec s = Sized("decode_lq1_lk5000_entropy", 1, 5000, 64, 8, 2);
    s.outputs.lse = true;
    s.outputs.entropy = true;
    c.push_back(s);
    s = Sized("decode_lq1_lk5000_entropy_key_lengths", 1, 5000, 64, 8, 2);
    s.batch = 2;
    s.key_lengths = {4999, 0};
    s.outputs.entropy = true;
    c.push_back(s);
  }
  // --- Everything at odd sizes.
  {
    RequestSpec s = Sized("everything_lq130_lk130_d80_mqa", 130, 130, 80, 4, 1);
    s.options.causal = true;
    s.options.window_left = 40;
    s.options.softcap = 8.f;
    s.options.alibi_slopes = AlibiSlopes(s.heads_q);
    s.bias_shape = std::vector<int64_t>{1, 4, 1, 130};
    s.key_lengths = {100};
    s.outputs = {.lse = true, .entropy = true, .weights = true, .top_k = 3};
    c.push_back(s);
  }
  for (RequestSpec& s : SparseCases()) c.push_back(std::move(s));
  return c;
}

bool Contains(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

bool Close(double got, double want, Tolerance tol) {
  if (std::isinf(want) || std::isinf(got)) return got == want;
  return std::fabs(got - want) <= tol.atol + tol.rtol * std::fabs(want);  // false for NaN
}

// Element-wise comparison of a tensor; reports the count and the worst element.
template <typename Load>
void ExpectAllClose(const std::string& what, int64_t n, Load got, Load want, Tolerance tol) {
  int64_t bad = 0, worst = -1;
  double worst_excess = -1;
  for (int64_t i = 0; i < n; ++i) {
    const double g = got(i), w = want(i);
    if (Close(g, w, tol)) continue;
    ++bad;
    const double excess = std::isfinite(g - w) ? std::fabs(g - w) : INFINITY;
    if (excess > worst_excess || worst < 0) worst_excess = excess, worst = i;
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << n << " elements differ; worst [" << worst
                    << "] got " << (worst >= 0 ? got(worst) : 0) << ", want "
                    << (worst >= 0 ? want(worst) : 0) << " (atol " << tol.atol << ", rtol "
                    << tol.rtol << ")";
}

void ExpectFloatsClose(const std::string& what, const Tensor& got, const Tensor& want,
                       Tolerance tol) {
  ASSERT_EQ(got.shape, want.shape) << what;
  ASSERT_EQ(got.dtype, want.dtype) << what;
  auto load = [](const Tensor& t) {
    return [&t](int64_t i) { return double(LoadFloat(t.data.data(), t.dtype, i)); };
  };
  ExpectAllClose(what, got.num_elements(), std::function<double(int64_t)>(load(got)),
                 std::function<double(int64_t)>(load(want)), tol);
}

// Top-k: the k-th weights must match; where indices differ (near-ties) the
// reference's weight of the backend's key must match the k-th reference weight.
void ExpectTopKClose(const std::string& what, const AttentionJob& got, const AttentionJob& want,
                     int64_t seqlen_k, Tolerance tol) {
  const int64_t k = got.top_k_indices.shape.back();
  const int64_t rows = got.top_k_indices.num_elements() / k;
  const int32_t* gi = got.top_k_indices.data_as<int32_t>();
  const float* gw = got.top_k_weights.data_as<float>();
  const int32_t* wi = want.top_k_indices.data_as<int32_t>();
  const float* ww = want.top_k_weights.data_as<float>();
  const float* ref_weights = want.weights.data_as<float>();
  int64_t bad = 0;
  std::string first;
  for (int64_t r = 0; r < rows; ++r) {
    std::set<int32_t> seen;
    for (int64_t t = 0; t < k; ++t) {
      const int64_t e = r * k + t;
      bool ok = (gi[e] == -1) == (wi[e] == -1);
      if (ok && gi[e] == -1) {
        ok = gw[e] == 0.f;
      } else if (ok) {
        ok = gi[e] >= 0 && gi[e] < seqlen_k && seen.insert(gi[e]).second &&
             Close(gw[e], ww[e], tol) && Close(ref_weights[r * seqlen_k + gi[e]], ww[e], tol);
      }
      if (!ok && bad++ == 0) {
        first = absl::StrCat("row ", r, " rank ", t, ": got key ", gi[e], " weight ", gw[e],
                             ", want key ", wi[e], " weight ", ww[e]);
      }
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " top-k entries differ; first: " << first;
}

class ConformanceTest : public ::testing::TestWithParam<std::string> {
 protected:
  void RunMatrix(DType dtype);
};

void ConformanceTest::RunMatrix(DType dtype) {
  const std::string& name = GetParam();
  auto created = CreateBackend(name);
  if (created.status().code() == absl::StatusCode::kFailedPrecondition) {
    GTEST_SKIP() << "backend " << name << " cannot start here: " << created.status();
  }
  ASSERT_TRUE(created.ok()) << created.status();
  Backend& backend = **created;
  const Tolerance tol = ToleranceFor(dtype, backend.info());

  const std::vector<RequestSpec> specs = Cases();
  std::vector<std::unique_ptr<RandomRequest>> requests;
  std::vector<std::unique_ptr<AttentionJob>> jobs;
  std::vector<const RequestSpec*> run_specs;
  std::vector<AttentionParams> batch;
  RefusedCases refused;
  for (size_t i = 0; i < specs.size(); ++i) {
    const RequestSpec& spec = specs[i];
    auto request = std::make_unique<RandomRequest>(spec, dtype, 1000 + i);
    auto job = PrepareAttention(request->request());
    ASSERT_TRUE(job.ok()) << spec.name << ": " << job.status();
    if (!refused.Check(backend, spec, dtype, (*job)->params)) continue;
    batch.push_back((*job)->params);
    run_specs.push_back(&spec);
    requests.push_back(std::move(request));
    jobs.push_back(*std::move(job));
  }
  ASSERT_TRUE(backend.Run(batch).ok());

  for (size_t i = 0; i < jobs.size(); ++i) {
    const RequestSpec& spec = *run_specs[i];
    SCOPED_TRACE(absl::StrCat(name, " ", DTypeName(dtype), " ", spec.name));
    // The reference runs on the same (already rounded) input bytes. It also
    // writes the full weights when top-k is asked, to judge near-ties.
    AttentionRequest ref_request = requests[i]->request();
    if (spec.outputs.top_k > 0) ref_request.outputs.weights = true;
    auto ref = PrepareAttention(ref_request);
    ASSERT_TRUE(ref.ok()) << ref.status();
    RunReferenceAttention((*ref)->params);

    const AttentionJob& got = *jobs[i];
    ExpectFloatsClose("output", got.output, (*ref)->output, tol);
    if (spec.outputs.lse) ExpectFloatsClose("lse", got.lse, (*ref)->lse, tol);
    if (spec.outputs.entropy) ExpectFloatsClose("entropy", got.entropy, (*ref)->entropy, tol);
    if (spec.outputs.weights) ExpectFloatsClose("weights", got.weights, (*ref)->weights, tol);
    if (spec.outputs.top_k > 0) ExpectTopKClose("top_k", got, **ref, spec.seqlen_k, tol);
  }
  std::printf("[ %s %s ] %zu cases matched the reference, %s\n", name.c_str(), DTypeName(dtype),
              jobs.size(), refused.Summary().c_str());
}

TEST_P(ConformanceTest, F32) { RunMatrix(DType::kF32); }
TEST_P(ConformanceTest, F16) { RunMatrix(DType::kF16); }
TEST_P(ConformanceTest, BF16) { RunMatrix(DType::kBF16); }

std::vector<std::string> BackendsUnderTest() {
  std::vector<std::string> names = AvailableBackends();
  if (!Contains(names, "reference")) names.insert(names.begin(), "reference");
  return names;
}

INSTANTIATE_TEST_SUITE_P(AllBackends, ConformanceTest, ::testing::ValuesIn(BackendsUnderTest()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

}  // namespace
}  // namespace attnserve
