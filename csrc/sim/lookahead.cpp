#include "lookahead.h"

#include <unordered_map>
#include <vector>

namespace tandem {

LookaheadResult run_lookahead(Scheduler& s, const StepCost& cost, double now, double horizon_s, double floor_s,
                              double idle_s) {
  TANDEM_REQUIRE(horizon_s > 0 && idle_s > 0, "run_lookahead: horizon_s and idle_s must be > 0");
  LookaheadResult out;
  const double stop = now + horizon_s;
  const int64_t filler = s.config().vocab_size - 1;
  struct Last {
    double time = 0.0;  // its last output token's time, or its arrival
    bool token = false;  // whether `time` is a token's
  };
  std::unordered_map<RequestId, Last> last;
  std::vector<int64_t> tokens;
  std::vector<FinishedRequest> finished;
  double t = now;
  Plan plan;
  while (t < stop && s.has_unfinished()) {
    s.step_into(plan, t);
    if (plan.num_reqs() == 0 && plan.kv_ops.empty()) {
      s.commit(plan, nullptr, 0, t, &finished);
      t += idle_s;
      continue;
    }
    const double end = t + cost.seconds(plan);
    out.preemptions += static_cast<int64_t>(plan.preempted_ids.size());
    // what each sampled request had before this step: its previous token's time, or its arrival
    for (int i = 0; i < plan.num_reqs(); ++i) {
      if (!plan.sample[i]) continue;
      const RequestId id = plan.req_ids[i];
      if (last.count(id)) continue;
      const Request& r = s.request(id);
      last[id] = r.token_times.empty() ? Last{r.arrival_time, false} : Last{r.token_times.back(), true};
    }
    tokens.assign(static_cast<size_t>(plan.num_sampled()), filler);
    finished.clear();
    s.commit(plan, tokens.data(), tokens.size(), end, &finished);
    ++out.steps;
    for (int i = 0; i < plan.num_reqs(); ++i) {
      if (!plan.sample[i]) continue;
      Last& prev = last[plan.req_ids[i]];
      ++out.tokens;
      if (!prev.token) {
        ++out.first_tokens;
        out.ttft_sum += end - prev.time;
      } else if (end - prev.time <= floor_s) {
        ++out.floor_tokens;
      }
      prev = Last{end, true};
    }
    out.finished += static_cast<int64_t>(finished.size());
    t = end;
  }
  out.end = t;
  // requests still without a first token: queued, or prefilling
  for (double arrival : s.arrivals_without_output()) {
    ++out.waiting;
    out.waiting_age_sum += t - arrival;
  }
  return out;
}

}  // namespace tandem
