#include "step_cost.h"

#include <algorithm>
#include <cmath>

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
  f.num_decode_reqs = plan.num_decode_reqs;
  f.decode_kv_tokens = plan.decode_kv_tokens;
  f.follows_decode = plan.follows_decode ? 1.0 : 0.0;
  f.continues_decode = plan.continues_decode ? 1.0 : 0.0;
  f.block_size = plan.block_size;
  f.query_lens = plan.query_lens.data();
  f.cached_lens = plan.cached_lens.data();
  f.rows = plan.num_reqs();
  return f;
}

namespace {

const char* const kBasisNames[] = {
    "one",          "tokens",    "reqs",          "sampled",     "sampled_any", "decode_reqs",
    "prefill_reqs", "decode_kv", "prefill_pairs", "prefill_kv",  "strict",      "dropped",
    "dropped_kv",   "swap_out",  "swap_in",       "tokens_over", "reqs_over",   "prefill_waves_kv"};

}  // namespace

Basis basis_named(const std::string& name) {
  std::string known;
  for (size_t i = 0; i < std::size(kBasisNames); ++i) {
    if (name == kBasisNames[i]) return static_cast<Basis>(i);
    known += (i ? ", " : "") + std::string(kBasisNames[i]);
  }
  TANDEM_REQUIRE(false, "profile cost: unknown basis '" + name + "'; known: " + known);
  return Basis::kOne;
}

double basis_value(Basis basis, double knot, const StepFeatures& f) {
  const bool strict = f.continues_decode == 0.0;
  const bool dropped = f.follows_decode != 0.0 && strict;
  switch (basis) {
    case Basis::kOne:
      return 1.0;
    case Basis::kTokens:
      return f.num_tokens;
    case Basis::kReqs:
      return f.num_reqs;
    case Basis::kSampled:
      return f.num_sampled;
    case Basis::kSampledAny:
      return f.num_sampled > 0 ? 1.0 : 0.0;
    case Basis::kDecodeReqs:
      return f.num_decode_reqs;
    case Basis::kPrefillReqs:
      return f.num_reqs - f.num_decode_reqs;
    case Basis::kDecodeKv:
      return f.decode_kv_tokens;
    case Basis::kPrefillPairs:
      return f.attn_pairs - f.decode_kv_tokens;
    case Basis::kPrefillKv:
      return f.kv_read_tokens - f.decode_kv_tokens;
    case Basis::kStrict:
      return strict ? 1.0 : 0.0;
    case Basis::kDropped:
      return dropped ? 1.0 : 0.0;
    case Basis::kDroppedKv:
      return dropped ? f.decode_kv_tokens : 0.0;
    case Basis::kSwapOut:
      return f.num_swap_out_blocks;
    case Basis::kSwapIn:
      return f.num_swap_in_blocks;
    case Basis::kTokensOver:
      return f.num_tokens > knot ? f.num_tokens - knot : 0.0;
    case Basis::kReqsOver:
      return f.num_reqs > knot ? f.num_reqs - knot : 0.0;
    case Basis::kPrefillWavesKv: {
      double sum = 0.0;
      for (int64_t i = 0; i < f.rows; ++i) {
        const double q = f.query_lens[i];
        if (q > 1) sum += (f.cached_lens[i] + q) * std::ceil(q / knot);
      }
      return sum;
    }
  }
  return 0.0;
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

StepCost StepCost::profile(ProfileCoefficients c) {
  TANDEM_REQUIRE(c.max_graph_batch >= 0, "profile cost: max_graph_batch must be >= 0");
  for (const ProfilePath* path : {&c.graph, &c.eager}) {
    for (const ProfileTerm& t : path->terms) {
      TANDEM_REQUIRE(t.basis != Basis::kPrefillWavesKv || t.knot > 0,
                     "profile cost: a prefill_waves_kv term needs a knot (tokens a wave) > 0");
    }
  }
  StepCost cost;
  cost.kind_ = Kind::kProfile;
  cost.prof_ = std::move(c);
  return cost;
}

StepCost StepCost::with_own_counts() const {
  StepCost copy = *this;
  copy.counts_ = std::make_shared<CostCounts>();
  return copy;
}

double StepCost::seconds(const StepFeatures& f) const {
  return kind_ == Kind::kRoofline ? roofline_seconds(f) : profile_seconds(f);
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
  ++counts_->steps;
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

double StepCost::profile_seconds(const StepFeatures& f) const {
  if (f.num_tokens <= 0 && f.num_swap_out_blocks == 0 && f.num_swap_in_blocks == 0) return 0.0;
  const bool graph = prof_.max_graph_batch > 0 && f.num_tokens > 0 && f.num_tokens == f.num_reqs &&
                     f.num_reqs <= prof_.max_graph_batch;
  const ProfilePath& path = graph ? prof_.graph : prof_.eager;
  double seconds = 0.0;
  for (const ProfileTerm& t : path.terms) seconds += t.coef * basis_value(t.basis, t.knot, f);
  ++counts_->steps;
  bool outside = !path.observed;
  for (const auto& [basis, limit] : path.limits) outside = outside || basis_value(basis, 0.0, f) > limit;
  if (outside) ++counts_->extrapolated;
  return seconds > 0.0 ? seconds : 0.0;
}

void StepDraft::clear(int block_size, bool follows_decode, bool continues_decode) {
  f_ = StepFeatures{};
  f_.block_size = block_size;
  f_.follows_decode = follows_decode ? 1.0 : 0.0;
  f_.continues_decode = continues_decode ? 1.0 : 0.0;
  query_lens_.clear();
  cached_lens_.clear();
}

// As the planner counts a row (csrc/scheduler.cpp emit): a row of one token is a decode row.
void StepDraft::add(int cached, int query, bool sampled) {
  const double c = cached, q = query;
  f_.num_tokens += q;
  f_.num_reqs += 1;
  f_.num_sampled += sampled ? 1 : 0;
  f_.attn_pairs += q * c + q * (q + 1) / 2;
  f_.kv_read_tokens += c + q;
  if (query == 1) {
    f_.num_decode_reqs += 1;
    f_.decode_kv_tokens += c + 1;
  } else {
    query_lens_.push_back(query);
    cached_lens_.push_back(cached);
  }
}

double StepDraft::seconds(const StepCost& cost) const {
  StepFeatures f = f_;
  f.query_lens = query_lens_.data();
  f.cached_lens = cached_lens_.data();
  f.rows = static_cast<int64_t>(query_lens_.size());
  return cost.seconds(f);
}

double StepDraft::seconds_with(const StepCost& cost, int cached, int query, bool sampled) const {
  StepDraft& self = const_cast<StepDraft&>(*this);
  const StepFeatures saved = f_;
  self.add(cached, query, sampled);
  const double s = seconds(cost);
  self.f_ = saved;
  if (query != 1) {
    query_lens_.pop_back();
    cached_lens_.pop_back();
  }
  return s;
}

}  // namespace tandem
