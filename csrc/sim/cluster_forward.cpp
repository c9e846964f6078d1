#include "cluster_forward.h"

#include <limits>

namespace tandem {

namespace {
constexpr int kNormal = 1;  // simpy.events.NORMAL: the priority of a Timeout
}

ClusterForward::ClusterForward(StepCost cost, std::vector<Scheduler*> schedulers,
                               std::vector<std::vector<int64_t>> token_pools, std::vector<double> sample_at,
                               double sample_interval)
    : cost_(std::move(cost)), sample_interval_(sample_interval) {
  TANDEM_REQUIRE(schedulers.size() == token_pools.size() && schedulers.size() == sample_at.size(),
                 "ClusterForward: one scheduler, token pool and sample time per replica");
  slots_.resize(schedulers.size());
  for (size_t i = 0; i < schedulers.size(); ++i) {
    TANDEM_REQUIRE(schedulers[i] != nullptr && !token_pools[i].empty(), "ClusterForward: empty replica");
    slots_[i].scheduler = schedulers[i];
    slots_[i].pool = std::move(token_pools[i]);
    slots_[i].sample_at = sample_at[i];
    slots_[i].plan.token_arrays = false;  // read by nothing here nor by the driver (sim/cluster_fast.py)
  }
}

bool ClusterForward::start(int i, double now, int64_t eid) {
  TANDEM_REQUIRE(i >= 0 && i < static_cast<int>(slots_.size()), "ClusterForward: no such replica");
  Slot& s = slots_[i];
  TANDEM_REQUIRE(!s.busy, "ClusterForward: replica already busy");
  s.scheduler->step_into(s.plan, now);
  if (s.plan.num_reqs() == 0 && s.plan.kv_ops.empty()) {
    std::vector<FinishedRequest> none;  // an empty plan finishes nothing
    s.scheduler->commit(s.plan, nullptr, 0, now, &none);
    return false;
  }
  s.busy = true;
  s.start = now;
  s.seconds = cost_.seconds(s.plan);
  s.end = now + s.seconds;
  s.eid = eid;
  return true;
}

int ClusterForward::earliest() const {
  int best = -1;
  for (int i = 0; i < static_cast<int>(slots_.size()); ++i) {
    const Slot& s = slots_[i];
    if (!s.busy) continue;
    if (best < 0 || s.end < slots_[best].end || (s.end == slots_[best].end && s.eid < slots_[best].eid)) best = i;
  }
  return best;
}

std::pair<double, int64_t> ClusterForward::next() const {
  const int i = earliest();
  if (i < 0) return {std::numeric_limits<double>::infinity(), -1};
  return {slots_[i].end, slots_[i].eid};
}

void ClusterForward::commit(Slot& s, int index, ClusterResult& r) {
  const int64_t n = s.plan.num_sampled();
  const int64_t size = static_cast<int64_t>(s.pool.size());
  TANDEM_REQUIRE(n <= size, "ClusterForward: a step samples more than the token pool");
  int64_t at = s.token_at;
  if (at + n > size) at = 0;
  s.token_at = at + n;
  s.busy = false;
  s.scheduler->commit(s.plan, s.pool.data() + at, static_cast<size_t>(n), s.end, &r.finished);
  r.starts.push_back(s.start);
  r.seconds.push_back(s.seconds);
  r.num_tokens.push_back(s.plan.num_tokens());
  r.num_reqs.push_back(s.plan.num_reqs());
  if (s.start >= s.sample_at) {
    s.sample_at = s.start + sample_interval_;
    const Stats st = s.scheduler->stats();
    r.samples.emplace_back(s.start, index, st.num_used_blocks, st.num_cached_blocks, st.num_free_blocks);
  }
}

ClusterResult ClusterForward::advance(double h_time, int h_priority, int64_t h_eid, int64_t next_eid) {
  ClusterResult r;
  for (;;) {
    const int i = earliest();
    if (i < 0) break;
    Slot& s = slots_[i];
    const bool before =
        s.end < h_time || (s.end == h_time && (kNormal < h_priority || (kNormal == h_priority && s.eid < h_eid)));
    if (!before) break;
    const double end = s.end;
    const int64_t eid = s.eid;
    commit(s, i, r);
    bool stop = !r.finished.empty();
    if (!stop && !s.scheduler->has_unfinished()) stop = r.idle = true;
    if (!stop && !start(i, end, next_eid++)) stop = r.idle = true;
    if (stop) {
      r.stopped = i;
      r.stop_time = end;
      r.stop_eid = eid;
      break;
    }
  }
  r.next_eid = next_eid;
  return r;
}

}  // namespace tandem
