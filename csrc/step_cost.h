// Step-cost formulas the simulator evaluates once per simulated step.
//
// sim/cost.py derives the coefficients (from a model and a machine, or fitted
// to engine profiles); this is the one place the formulas are evaluated, for
// the Python cost models (`step_seconds`) and for the simulator's fast path
// (csrc/sim/cluster_forward.h) alike, so both give bit-identical seconds. The
// operations run in the same order as the formulas below, in IEEE double
// arithmetic (the build turns off FMA contraction).
//
//   roofline:  overhead + copies*block_size*swap_token_s       (if copies)
//              + intercept_k + slope_k*T                       (k: pieces of the linear layers)
//              + max(S*head_flop_s, head_weight_s + S*head_act_s)   (if S > 0)
//              + max(pairs*attn_pair_s, kv_read*attn_kv_s)
//   profile:   sum of coef_i * basis_i(plan) over the terms of the plan's path, in order:
//              the graph path for an all-decode plan (0 < T == R) of at most max_graph_batch rows
//              (the engine replays a CUDA graph), the eager path otherwise (docs/profile-format.md)
//
// Both cost an empty plan (T == 0, no copies) 0 seconds.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tandem {

struct Plan;

// A plan reduced to what cost formulas read (sim/cost.py FEATURES, plus block_size).
// Doubles, so that Python callers may pass floats as well as ints; every count a plan holds
// (< 2^53) converts exactly, and products of two such counts are exact too.
struct StepFeatures {
  double num_tokens = 0, num_reqs = 0, num_sampled = 0, attn_pairs = 0, kv_read_tokens = 0;
  double num_swap_out_blocks = 0, num_swap_in_blocks = 0;
  double num_decode_reqs = 0, decode_kv_tokens = 0, follows_decode = 0, continues_decode = 0;
  double block_size = 16;
  // The rows themselves (a plan's query_lens / cached_lens; null when only the sums are known):
  // the prefill_waves_kv basis reads them.
  const int32_t* query_lens = nullptr;
  const int32_t* cached_lens = nullptr;
  int64_t rows = 0;
};

StepFeatures features_of(const Plan& plan);

struct RooflineCoefficients {
  double overhead_s = 0.0;
  double swap_token_s = 0.0;
  std::vector<double> breaks;       // sorted token counts where a linear layer turns compute bound
  std::vector<double> intercepts;   // breaks.size() + 1 pieces of the linear layers' cost
  std::vector<double> slopes;
  double head_flop_s = 0.0, head_weight_s = 0.0, head_act_s = 0.0;
  double attn_pair_s = 0.0, attn_kv_s = 0.0;
};

// The basis functions of a profile term (sim/cost.py PROFILE_BASIS has the same, by name):
//   one 1 | tokens T | reqs R | sampled S | sampled_any [S > 0] | decode_reqs Rd | prefill_reqs R - Rd
//   decode_kv Kd | prefill_pairs pairs - Kd | prefill_kv kv_read - Kd
//   strict [not continues_decode] | dropped [follows_decode and not continues_decode] | dropped_kv dropped*Kd
//   swap_out | swap_in (blocks) | tokens_over max(0, T - knot) | reqs_over max(0, R - knot)
//   prefill_waves_kv  sum over rows with q > 1 of (c + q) * ceil(q / knot): a prefill's attention runs
//                     in waves of query tiles, each reading the whole context (0 without the rows)
enum class Basis : int {
  kOne,
  kTokens,
  kReqs,
  kSampled,
  kSampledAny,
  kDecodeReqs,
  kPrefillReqs,
  kDecodeKv,
  kPrefillPairs,
  kPrefillKv,
  kStrict,
  kDropped,
  kDroppedKv,
  kSwapOut,
  kSwapIn,
  kTokensOver,
  kReqsOver,
  kPrefillWavesKv
};
Basis basis_named(const std::string& name);  // throws InvalidInput naming the known ones
double basis_value(Basis basis, double knot, const StepFeatures& f);

struct ProfileTerm {
  Basis basis = Basis::kOne;
  double knot = 0.0;  // for tokens_over / reqs_over
  double coef = 0.0;
};

// One path of a fitted profile, and the largest value of each extensive basis seen when fitting:
// a step beyond any of them (or on a path no profiled step took) is an extrapolation.
struct ProfilePath {
  std::vector<ProfileTerm> terms;
  std::vector<std::pair<Basis, double>> limits;
  bool observed = true;
};

struct ProfileCoefficients {
  ProfilePath graph, eager;
  int max_graph_batch = 0;  // largest captured decode batch (0: the engine ran without graphs)
};

// How many steps a cost model priced, and how many of them outside what its profile covered.
struct CostCounts {
  int64_t steps = 0;
  int64_t extrapolated = 0;
};

class StepCost {
 public:
  static StepCost roofline(RooflineCoefficients c);  // throws InvalidInput on a malformed table
  static StepCost profile(ProfileCoefficients c);

  double seconds(const StepFeatures& f) const;
  double seconds(const Plan& plan) const { return seconds(features_of(plan)); }
  // A copy that counts its own steps (an admission policy's predictions stay out of a run's counts).
  StepCost with_own_counts() const;
  bool is_roofline() const { return kind_ == Kind::kRoofline; }
  // Shared by every copy of this cost (a fast path holds one): the counts of all of them.
  const CostCounts& counts() const { return *counts_; }
  void reset_counts() { *counts_ = CostCounts{}; }

 private:
  enum class Kind { kRoofline, kProfile };
  double roofline_seconds(const StepFeatures& f) const;
  double profile_seconds(const StepFeatures& f) const;

  Kind kind_ = Kind::kProfile;
  RooflineCoefficients roof_;
  ProfileCoefficients prof_;
  std::shared_ptr<CostCounts> counts_ = std::make_shared<CostCounts>();
};

// A step being planned, as the features a cost model reads: the planner adds each row it grants,
// and an admission policy asks what one more row would cost (csrc/scheduler.cpp, AdmissionPolicy).
class StepDraft {
 public:
  // Empty, for plans of `block_size`-token blocks; the flags are the plan's (step_cost.h's basis).
  void clear(int block_size, bool follows_decode, bool continues_decode);
  // One row: `query` tokens computed on top of `cached` ones; `sampled` if the row ends in a sampled token.
  void add(int cached, int query, bool sampled);
  void set_swaps(int out_blocks, int in_blocks) {
    f_.num_swap_out_blocks = out_blocks;
    f_.num_swap_in_blocks = in_blocks;
  }
  const StepFeatures& features() const { return f_; }
  double seconds(const StepCost& cost) const;
  // The cost with one more row (not kept).
  double seconds_with(const StepCost& cost, int cached, int query, bool sampled) const;

 private:
  StepFeatures f_;
  // the rows with query > 1 (the only ones prefill_waves_kv reads); mutable: seconds_with adds its row for the call
  mutable std::vector<int32_t> query_lens_, cached_lens_;
};

}  // namespace tandem
