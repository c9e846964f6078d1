// A scheduler's snapshot run forward on a step-cost model: what a look-ahead controller scores a
// candidate policy by (sim/lookahead.py). No new request arrives; every sampled token is a filler.
#pragma once

#include <cstdint>

#include "scheduler.h"
#include "step_cost.h"

namespace tandem {

struct LookaheadResult {
  int64_t steps = 0;
  int64_t tokens = 0;         // output tokens committed
  int64_t floor_tokens = 0;   // of those after a request's first, those within floor_s of its previous one
  int64_t first_tokens = 0;   // requests' first output tokens
  double ttft_sum = 0.0;      // their times since arrival
  int64_t waiting = 0;        // requests with no output token yet at the end (still queued or prefilling)
  double waiting_age_sum = 0.0;  // their times since arrival at the end
  int64_t finished = 0;
  int64_t preemptions = 0;
  double end = 0.0;           // the clock when the run stopped
};

// Steps `scheduler` (a copy: it is changed) from `now` until `now + horizon_s` or until it holds no
// request, each step lasting `cost`'s seconds; an empty plan with requests left (pins, admission)
// moves the clock by idle_s.
LookaheadResult run_lookahead(Scheduler& scheduler, const StepCost& cost, double now, double horizon_s, double floor_s,
                              double idle_s = 0.005);

}  // namespace tandem
