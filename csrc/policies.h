// Policy interfaces: small, pure, registered by name.
//
// A policy reads a plain view of the state and returns a decision; it never
// reads a clock, mutates a request or touches the block pool. The scheduler
// applies the decision. The same object serves the GPU engine and the
// simulator, because both drive the same Scheduler.
//
// Five kinds, one registry each (name -> factory(params)):
//   ordering    OrderingPolicy::key(RequestView)        who is admitted first / preempted last
//   eviction    EvictionPolicy::key(CachedBlockView)    which unheld cached block goes first
//               EvictionPolicy::pin_seconds(TurnView)   retention: how long a finished turn is kept
//   preemption  PreemptionPolicy::mode(RequestView,..)  recompute or swap a victim
//   router      RouterPolicy::route(RouteView, replicas) which replica serves a model call (simulator)
//   admission   AdmissionPolicy::chunk(AdmissionView)   how much of a prefill chunk (or a new request) a step takes
// Python subclasses of the bound classes register into the same registries (csrc/py_policies.cpp;
// admission policies are C++ only: they run once per prefill chunk and request); see docs/policies.md.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common.h"
#include "step_cost.h"

namespace tandem {

// Policies compare keys ascending: the smaller key runs first (ordering) or
// is evicted first (eviction). Ties fall back to a stable, deterministic order.
struct OrderKey {
  double primary = 0.0;
  double secondary = 0.0;
};

inline bool operator<(const OrderKey& a, const OrderKey& b) {
  if (a.primary != b.primary) return a.primary < b.primary;
  return a.secondary < b.secondary;
}

// Named numeric parameters, e.g. {"ttl": 30.0}. Unknown keys are rejected.
using PolicyParams = std::map<std::string, double>;

// What an ordering or preemption policy may read about one request.
struct RequestView {
  RequestId id = 0;
  double arrival_time = 0.0;
  int priority = 0;               // smaller value = more important (vLLM's convention)
  int num_prompt_tokens = 0;
  int num_output_tokens = 0;
  int num_computed_tokens = 0;    // tokens whose KV is on the device now
  int num_cached_tokens = 0;      // prefix-cache hit: what would match now (waiting) or matched at admission
  int num_blocks = 0;             // device blocks held
  bool preempted = false;
  bool swapped = false;
  std::string_view session_id;    // valid during the policy call only
  int64_t num_computed_total = 0; // tokens this request computed so far, recomputation included
  // Its session's history (zero without a session): what the earlier, finished turns did.
  int session_turns = 0;          // finished turns of the session before this request
  int64_t session_service = 0;    // tokens those turns computed (attained service, PLAS's measure)
  double session_last_end = kNever;  // `now` when the previous turn finished (kNever: none)
};

// What an eviction policy may read about a cached block nobody holds.
struct CachedBlockView {
  BlockId block = kNoBlock;
  double last_access = 0.0;  // `now` of the last hit or release
  int depth = 0;             // position of the block in its sequence (0 = first)
  int priority = 0;          // priority of the request that released it last
  int64_t hits = 0;          // prefix-cache hits since it was cached
};

// A session's turn that just ended; its blocks enter the prefix cache.
// `pauses` is the session's own history: for each earlier turn that had a successor, the
// seconds between that turn finishing and the next one arriving (a tool call or a human).
struct TurnView {
  std::string session_id;
  RequestId request_id = 0;
  double now = 0.0;
  int num_tokens = 0;        // prompt + output of the turn
  int num_blocks = 0;        // full blocks it leaves in the cache
  int priority = 0;
  int cache_blocks = 0;      // device blocks of the whole cache
  int turn_index = 0;        // 0 for the session's first turn
  int64_t session_service = 0;  // tokens the session's turns computed, this one included
  std::vector<double> pauses;   // the latest kMaxPauseHistory pauses, oldest first
};

constexpr int kMaxPauseHistory = 32;

class OrderingPolicy {
 public:
  virtual ~OrderingPolicy() = default;
  virtual std::string name() const = 0;
  // Ascending: the smallest key is admitted first and preempted last.
  virtual OrderKey key(const RequestView& request) const = 0;
  // True if key() reads num_cached_tokens of waiting requests (costs a prefix lookup).
  virtual bool needs_prefix_match() const { return false; }
  // True if key() reads only what is fixed for a request's life (id, arrival time, priority,
  // its session's history at arrival): the scheduler then orders its waiting requests again
  // only when the waiting set changes, not every step. The invariant checks recompute the keys.
  virtual bool key_is_fixed() const { return false; }
};

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  virtual std::string name() const = 0;
  // Retention: seconds a finished turn's blocks stay pinned (not evictable).
  virtual double pin_seconds(const TurnView& turn) const {
    (void)turn;
    return 0.0;
  }
  // Ascending among unpinned, unheld cached blocks: the smallest is evicted first.
  virtual OrderKey key(const CachedBlockView& block) const = 0;
  // True if key() is a pure function of last_access and priority alone: the blocks of one
  // release (one time, one priority) then share a key, computed once (a release parks ~3,000
  // blocks of a long context). Python policies keep the default: key() is asked for each block.
  virtual bool key_reads_only_time_and_priority() const { return false; }
};

enum class PreemptMode { kRecompute = 0, kSwap = 1 };

class PreemptionPolicy {
 public:
  virtual ~PreemptionPolicy() = default;
  virtual std::string name() const = 0;
  // How to preempt `victim`, holding `blocks_needed` device blocks, when the
  // host tier has `host_free_blocks` free. kSwap without room falls back to recompute.
  virtual PreemptMode mode(const RequestView& victim, int host_free_blocks, int blocks_needed) const = 0;
};

// The simulator's router: a model call and the replicas that could serve it.
struct RouteView {
  RequestId request_id = 0;
  std::string_view session_id;  // empty: no session
  int num_prompt_tokens = 0;
  double now = 0.0;
};

struct ReplicaView {
  int index = 0;
  int load = 0;                  // requests in flight (waiting + running) on it
  int num_free_blocks = 0;       // free + evictable device blocks
  int num_blocks = 0;
  int cached_prefix_tokens = 0;  // of this call's prompt, if the router needs_prefix_match()
  // If the router needs_step_prediction(): the replica's decode step, by its step-cost model, with every
  // request it holds (running or waiting, each at its context) and this call; 0 without a cost model.
  double decode_step_s = 0.0;
};

// Unlike the other kinds, a router may keep state (a turn counter, session affinity): route()
// is called once per model call in arrival order, so it stays deterministic.
class RouterPolicy {
 public:
  virtual ~RouterPolicy() = default;
  virtual std::string name() const = 0;
  // Index into `replicas` (0 <= index < replicas.size()).
  virtual int route(const RouteView& call, const std::vector<ReplicaView>& replicas) = 0;
  // True if route() reads cached_prefix_tokens (a prefix lookup per replica per call).
  virtual bool needs_prefix_match() const { return false; }
  // True if route() reads decode_step_s (a prediction per replica per call).
  virtual bool needs_step_prediction() const { return false; }
  // The session ended: forget what was kept about it.
  virtual void end_session(const std::string& session_id) { (void)session_id; }
};

// What an admission policy reads when the planner is about to give a request a chunk: the step as
// planned so far and the running requests' decode step, as cost features, and the plane's step-cost
// model (Scheduler::set_step_cost: the one the simulator prices its steps with).
struct AdmissionView {
  const StepCost* cost = nullptr;    // null until the plane sets one
  double now = 0.0;
  // This step: a row for every decode it runs (counted before any chunk is granted, so a chunk is
  // priced with every decode of the step whatever the order) and the chunks granted before this one.
  const StepDraft* step = nullptr;
  // A pure decode step of every running request at its whole context, plus each request admitted
  // earlier in this step: the step every user's next tokens wait on once this step's prefills are done.
  const StepDraft* steady = nullptr;
  RequestView request;
  int start = 0;          // tokens computed or found in the prefix cache before this chunk
  int num_tokens = 0;     // the request's tokens (prompt, and output so far)
  int chunk = 0;          // the chunk the scheduler would give it (> 0): at most chunk_size and the budget
  bool first = false;     // the request has never run (an admission, not a resumption or a later chunk)
  bool running = false;   // it is running (this is a later prefill chunk of an admitted request)
};

class AdmissionPolicy {
 public:
  virtual ~AdmissionPolicy() = default;
  virtual std::string name() const = 0;
  // Tokens of the chunk this step may compute, 0..view.chunk; 0: the request waits (a waiting one
  // blocks those behind it, as one that does not fit in KV does).
  virtual int chunk(const AdmissionView& view) const = 0;
  // True: every chunk is taken whole, and the scheduler never asks (the default, "all").
  virtual bool admits_all() const { return false; }
  virtual bool needs_cost() const { return false; }
  // A request held back longer than this (seconds since its arrival) is counted in
  // Stats::num_held_too_long; <= 0: never.
  virtual double max_wait_s() const { return 0.0; }
};

// A policy raised, returned something invalid (a NaN key, a negative pin time, a replica out of
// range) or was built with bad parameters. Names the policy; surfaces in Python as PolicyError.
// A scheduler whose policy failed mid-step refuses further calls with the same message.
struct PolicyError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Registry: name -> factory(params). Unknown names and parameters throw InvalidInput.
template <typename Policy>
class PolicyRegistry {
 public:
  using Factory = std::function<std::shared_ptr<Policy>(const PolicyParams&)>;
  void add(const std::string& name, Factory factory);
  std::shared_ptr<Policy> make(const std::string& name, const PolicyParams& params) const;
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return factories_.count(name) > 0; }
  bool remove(const std::string& name) { return factories_.erase(name) > 0; }

 private:
  std::map<std::string, Factory> factories_;
};

PolicyRegistry<OrderingPolicy>& ordering_registry();
PolicyRegistry<EvictionPolicy>& eviction_registry();
PolicyRegistry<PreemptionPolicy>& preemption_registry();
PolicyRegistry<RouterPolicy>& router_registry();
PolicyRegistry<AdmissionPolicy>& admission_registry();

// "ordering policy 'name'": how errors name a policy.
std::string policy_label(const char* kind, const std::string& name);

// `key` unless a component is NaN (it would break the sort's strict weak order).
template <typename Policy>
OrderKey checked_key(const OrderKey& key, const char* kind, const Policy& policy) {
  if (key.primary != key.primary || key.secondary != key.secondary) {
    throw PolicyError(policy_label(kind, policy.name()) + " returned a NaN key");
  }
  return key;
}

// Parses "name" or "name:key=value,key=value" (e.g. "ttl:ttl=30").
void parse_policy_spec(const std::string& spec, std::string* name, PolicyParams* params);

// Throws InvalidInput naming the policy if `params` has a key outside `allowed`.
void check_params(const std::string& policy, const PolicyParams& params, const std::vector<std::string>& allowed);

}  // namespace tandem
