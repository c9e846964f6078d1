// Step-cost formulas the simulator evaluates once per simulated step.
//
// sim/cost.py derives the coefficients (from a model and a machine, or fitted
// to engine profiles); this is the one place the formulas are evaluated, for
// the Python cost models (`step_seconds`) and for the simulator's fast path
// (csrc/fast_forward.h) alike, so both give bit-identical seconds. The
// operations run in the same order as the formulas below, in IEEE double
// arithmetic (the build turns off FMA contraction).
//
//   roofline:  overhead + copies*block_size*swap_token_s       (if copies)
//              + intercept_k + slope_k*T                       (k: pieces of the linear layers)
//              + max(S*head_flop_s, head_weight_s + S*head_act_s)   (if S > 0)
//              + max(pairs*attn_pair_s, kv_read*attn_kv_s)
//   linear:    intercept + c_T*T + c_R*R + c_S*S + c_pairs*pairs + c_kv*kv_read + c_out*out + c_in*in
//
// Both cost an empty plan (T == 0, no copies) 0 seconds.
#pragma once

#include <cstdint>
#include <vector>

namespace tandem {

struct Plan;

// A plan reduced to what cost formulas read (sim/cost.py FEATURES, plus block_size).
// Doubles, so that Python callers may pass floats as well as ints; every count a plan holds
// (< 2^53) converts exactly, and products of two such counts are exact too.
struct StepFeatures {
  double num_tokens = 0, num_reqs = 0, num_sampled = 0, attn_pairs = 0, kv_read_tokens = 0;
  double num_swap_out_blocks = 0, num_swap_in_blocks = 0;
  double block_size = 16;
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

struct LinearCoefficients {
  double intercept = 0.0;
  // per num_tokens, num_reqs, num_sampled, attn_pairs, kv_read_tokens, swap_out, swap_in
  double tokens = 0.0, reqs = 0.0, sampled = 0.0, pairs = 0.0, kv = 0.0, swap_out = 0.0, swap_in = 0.0;
};

class StepCost {
 public:
  static StepCost roofline(RooflineCoefficients c);  // throws InvalidInput on a malformed table
  static StepCost linear(LinearCoefficients c);

  double seconds(const StepFeatures& f) const;
  double seconds(const Plan& plan) const { return seconds(features_of(plan)); }
  bool is_roofline() const { return kind_ == Kind::kRoofline; }

 private:
  enum class Kind { kRoofline, kLinear };
  double roofline_seconds(const StepFeatures& f) const;
  double linear_seconds(const StepFeatures& f) const;

  Kind kind_ = Kind::kLinear;
  RooflineCoefficients roof_;
  LinearCoefficients lin_;
};

}  // namespace tandem
