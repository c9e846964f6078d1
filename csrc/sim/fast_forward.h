// The simulator's fast path: one replica's steps, many per call, while nothing else can happen.
//
// A simulated replica runs `plan = step(now); now += cost(plan); commit(plan, tokens, now)`.
// Between two events of the rest of the simulation (an arrival, a tool pause ending, another
// replica's step), nothing but this replica can act, so its steps up to the next such event
// may run back to back here, with the same Scheduler::step/commit calls, the same `now`
// values, the same cost formula and the same synthetic tokens the step-by-step loop
// (sim/cluster.py) would use:
//
//   now ──step──commit──step──commit── ... ──step──┐          horizon (next other event)
//        |<- s1 ->|<- s2 ->|             |<- sk ->|···········|······>
//                                          ends at or after the horizon: returned
//                                          uncommitted, the caller runs it as one event
//
// It also stops right after a commit that finished a request (sessions react to it at
// that time) or that left the scheduler empty, and before an empty plan (the caller waits
// for an arrival). No decision is made here.
//
// Its plans fill no per-token arrays (Plan::token_arrays is false: no model reads them), the
// rest of a plan, its cost features included, being what step() would give.
//
// KV usage is sampled as sim/metrics.py's Collector does after each step: after the commit
// of the first step that starts at or after `sample_at`, then `sample_interval` later.
#pragma once

#include <memory>
#include <tuple>
#include <vector>

#include "scheduler.h"
#include "step_cost.h"

namespace tandem {

struct ForwardResult {
  // One entry per committed step: its start, its seconds, its token and request counts.
  std::vector<double> starts, seconds;
  std::vector<int32_t> num_tokens, num_reqs;
  std::vector<FinishedRequest> finished;  // what the last committed step finished
  // KV samples: (step start, used, cached, free blocks) after that step's commit.
  std::vector<std::tuple<double, int, int, int>> samples;
  double sample_at = 0.0;                 // when the next sample is due
  std::shared_ptr<Plan> plan;             // made at `now` and not committed, or null
  double plan_seconds = 0.0;              // its cost (0 if it is empty)
  double now = 0.0;                       // end of the last committed step (the start if none)
  int64_t token_at = 0;                   // the synthetic token cursor after the committed steps
};

class FastForward {
 public:
  // `token_pool`: the replica's synthetic token ids, taken in turn (wrapping to 0 when a
  // step needs more than remain), exactly as sim/cluster.py's `Replica._tokens`.
  FastForward(StepCost cost, std::vector<int64_t> token_pool);

  // Runs steps from `now`; every committed step ends strictly before `horizon`.
  ForwardResult advance(Scheduler& scheduler, double now, double horizon, double sample_at, double sample_interval,
                        int64_t token_at, int64_t max_steps);

  const StepCost& cost() const { return cost_; }

 private:
  StepCost cost_;
  std::vector<int64_t> pool_;
  std::shared_ptr<Plan> scratch_;  // reused from step to step until handed out uncommitted
};

}  // namespace tandem
