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
  std::unordered_map<RequestId, double> last;  // each request's last output token time, once it has one
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
      last[id] = r.token_times.empty() ? -(r.arrival_time + 1.0) : r.token_times.back();  // < 0: none yet
    }
    tokens.assign(static_cast<size_t>(plan.num_sampled()), filler);
    finished.clear();
    s.commit(plan, tokens.data(), tokens.size(), end, &finished);
    ++out.steps;
    for (int i = 0; i < plan.num_reqs(); ++i) {
      if (!plan.sample[i]) continue;
      double& prev = last[plan.req_ids[i]];
      ++out.tokens;
      if (prev < 0) {
        ++out.first_tokens;
        out.ttft_sum += end - (-prev - 1.0);
      } else if (end - prev <= floor_s) {
        ++out.floor_tokens;
      }
      prev = end;
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
