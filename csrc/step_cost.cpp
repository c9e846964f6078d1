#include "step_cost.h"

#include <algorithm>

#include "common.h"
#include "scheduler.h"

namespace tandem {

StepFeatures features_of(const Plan& plan) {
  StepFeatures f;
  f.num_tokens = plan.num_tokens();
  f.num_reqs = plan.num_reqs();
  f.num_sampled = plan.num_sampled();
  f.attn_pairs = plan.attn_pairs;
  f.kv_read_tokens = plan.kv_read_tokens;
  f.num_swap_out_blocks = plan.num_swap_out_blocks;
  f.num_swap_in_blocks = plan.num_swap_in_blocks;
  f.block_size = plan.block_size;
  return f;
}

StepCost StepCost::roofline(RooflineCoefficients c) {
  TANDEM_REQUIRE(c.intercepts.size() == c.breaks.size() + 1 && c.slopes.size() == c.intercepts.size(),
                 "roofline cost: need len(breaks) + 1 pieces (intercept, slope)");
  TANDEM_REQUIRE(std::is_sorted(c.breaks.begin(), c.breaks.end()), "roofline cost: breaks must be sorted");
  StepCost cost;
  cost.kind_ = Kind::kRoofline;
  cost.roof_ = std::move(c);
  return cost;
}

StepCost StepCost::linear(LinearCoefficients c) {
  StepCost cost;
  cost.kind_ = Kind::kLinear;
  cost.lin_ = c;
  return cost;
}

double StepCost::seconds(const StepFeatures& f) const {
  return kind_ == Kind::kRoofline ? roofline_seconds(f) : linear_seconds(f);
}

// Term by term, in the order of the formula at the top of step_cost.h.
double StepCost::roofline_seconds(const StepFeatures& f) const {
  const RooflineCoefficients& c = roof_;
  const double tokens = f.num_tokens;
  const double copies = f.num_swap_out_blocks + f.num_swap_in_blocks;
  double seconds = c.overhead_s;
  if (copies != 0) {
    seconds += copies * f.block_size * c.swap_token_s;
  } else if (tokens <= 0) {
    return 0.0;
  }
  if (tokens > 0) {
    const size_t k = std::upper_bound(c.breaks.begin(), c.breaks.end(), tokens) - c.breaks.begin();
    seconds += c.intercepts[k] + c.slopes[k] * tokens;
    const double sampled = f.num_sampled;
    if (sampled > 0) {
      const double flop = sampled * c.head_flop_s;
      const double mem = c.head_weight_s + sampled * c.head_act_s;
      seconds += flop > mem ? flop : mem;
    }
    const double flop = f.attn_pairs * c.attn_pair_s;
    const double mem = f.kv_read_tokens * c.attn_kv_s;
    seconds += flop > mem ? flop : mem;
  }
  return seconds;
}

double StepCost::linear_seconds(const StepFeatures& f) const {
  const LinearCoefficients& c = lin_;
  if (f.num_tokens <= 0 && f.num_swap_out_blocks == 0 && f.num_swap_in_blocks == 0) return 0.0;
  return c.intercept + c.tokens * f.num_tokens + c.reqs * f.num_reqs + c.sampled * f.num_sampled +
         c.pairs * f.attn_pairs + c.kv * f.kv_read_tokens + c.swap_out * f.num_swap_out_blocks +
         c.swap_in * f.num_swap_in_blocks;
}

}  // namespace tandem
