// The simulator's fast path for several replicas: all replicas' steps, merged in time order.
//
// Between two events of the rest of the simulation (an arrival, a tool pause ending, a session
// reacting to a finish), replicas cannot influence each other: each one's steps depend only on
// its own scheduler. So the steps of all busy replicas up to the next such event may run here,
// in the order SimPy would have run them in the step-by-step loop (sim/cluster.py):
//
//   SimPy queue position of a step's end = (end time, NORMAL, eid of its timeout)
//
//   replica 0  ──s──c──s──c────────s──c──┐
//   replica 1  ────s──────c──s───c───────┼──┐       horizon = the queue's next entry
//   merged:       commits in order of (end, eid), each followed by that replica's next plan
//
// Each plan gets the eid its SimPy timeout would have had (one more from the environment's
// counter, in the order the plans are made), so ties with other events at the same time are
// ordered exactly as in the step-by-step loop. A run stops before the first step end at or after
// the horizon, and right after a commit whose replica needs Python at that time: it finished a
// request (sessions react), it has nothing left, or its next plan is empty (it waits for an
// arrival). No decision is made here.
#pragma once

#include <memory>
#include <tuple>
#include <vector>

#include "scheduler.h"
#include "step_cost.h"

namespace tandem {

struct ClusterResult {
  // One entry per committed step, in commit order.
  std::vector<double> starts, seconds;
  std::vector<int32_t> num_tokens, num_reqs;
  // KV samples: (step start, replica, used, cached, free blocks) after that step's commit.
  std::vector<std::tuple<double, int, int, int, int>> samples;
  int32_t stopped = -1;  // the replica whose last commit needs Python, or -1 (the horizon came first)
  bool idle = false;  // it has nothing runnable: no unfinished request, or an empty plan (committed)
  std::vector<FinishedRequest> finished;  // what that commit finished
  double stop_time = 0.0;  // the end of that step
  int64_t stop_eid = 0;  // the eid of that step's timeout
  int64_t next_eid = 0;  // the environment's eid counter after the plans made here
};

class ClusterForward {
 public:
  // `token_pools[i]`: replica i's synthetic token ids (sim/cluster.py's `Replica._tokens`);
  // `sample_at[i]`: when replica i's first KV sample is due (sim/metrics.py's Collector).
  ClusterForward(StepCost cost, std::vector<Scheduler*> schedulers, std::vector<std::vector<int64_t>> token_pools,
                 std::vector<double> sample_at, double sample_interval);

  // Replica `i`'s loop at `now`: makes its next plan, its timeout's eid `eid`. Returns true if the
  // replica is now busy; false if the plan was empty (it is committed, the replica waits).
  bool start(int i, double now, int64_t eid);

  // Commits busy replicas' steps in queue order while they come before the horizon entry
  // (h_time, h_priority, h_eid); plans made here take eids from `next_eid` on.
  ClusterResult advance(double h_time, int h_priority, int64_t h_eid, int64_t next_eid);

  // The queue position (end, eid) of the earliest busy replica's step end; eid -1 if none is busy.
  std::pair<double, int64_t> next() const;

 private:
  struct Slot {
    Scheduler* scheduler;
    std::vector<int64_t> pool;
    int64_t token_at = 0;
    double sample_at = 0.0;
    Plan plan;
    bool busy = false;
    double start = 0.0, seconds = 0.0, end = 0.0;
    int64_t eid = 0;
  };
  int earliest() const;
  void commit(Slot& s, int index, ClusterResult& r);

  StepCost cost_;
  double sample_interval_;
  std::vector<Slot> slots_;
};

}  // namespace tandem
