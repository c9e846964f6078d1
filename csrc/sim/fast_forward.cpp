#include "fast_forward.h"

namespace tandem {

FastForward::FastForward(StepCost cost, std::vector<int64_t> token_pool)
    : cost_(std::move(cost)), pool_(std::move(token_pool)) {
  TANDEM_REQUIRE(!pool_.empty(), "FastForward: the token pool is empty");
}

ForwardResult FastForward::advance(Scheduler& scheduler, double now, double horizon, double sample_at,
                                   double sample_interval, int64_t token_at, int64_t max_steps) {
  TANDEM_REQUIRE(token_at >= 0 && token_at <= static_cast<int64_t>(pool_.size()),
                 "FastForward: token cursor out of range");
  ForwardResult r;
  r.now = now;
  r.token_at = token_at;
  r.sample_at = sample_at;
  for (int64_t steps = 0;; ++steps) {
    if (!scratch_) {
      scratch_ = std::make_shared<Plan>();
      scratch_->token_arrays = false;  // read by nothing here nor by the replica (sim/cluster.py)
    }
    Plan& plan = *scratch_;
    scheduler.step_into(plan, r.now);
    const bool empty = plan.num_reqs() == 0 && plan.kv_ops.empty();
    const double seconds = empty ? 0.0 : cost_.seconds(plan);
    const double end = r.now + seconds;
    if (empty || !(end < horizon)) {
      r.plan = std::move(scratch_);
      r.plan_seconds = seconds;
      return r;
    }
    const int64_t n = plan.num_sampled();
    int64_t at = r.token_at;
    TANDEM_REQUIRE(n <= static_cast<int64_t>(pool_.size()), "FastForward: a step samples more than the token pool");
    if (at + n > static_cast<int64_t>(pool_.size())) at = 0;
    r.token_at = at + n;
    scheduler.commit(plan, pool_.data() + at, static_cast<size_t>(n), end, &r.finished);
    const double start = r.now;
    r.starts.push_back(start);
    r.seconds.push_back(seconds);
    r.num_tokens.push_back(plan.num_tokens());
    r.num_reqs.push_back(plan.num_reqs());
    r.now = end;
    if (start >= r.sample_at) {
      r.sample_at = start + sample_interval;
      const Stats st = scheduler.stats();
      r.samples.emplace_back(start, st.num_used_blocks, st.num_cached_blocks, st.num_free_blocks);
    }
    if (!r.finished.empty() || !scheduler.has_unfinished() || steps + 1 >= max_steps) {
      return r;
    }
  }
}

}  // namespace tandem
