// Policy interfaces: small, pure, registered by name.
//
// A policy reads a plain view of the state and returns a decision; it never
// reads a clock, mutates a request or touches the block pool. The scheduler
// applies the decision. The same object serves the GPU engine and the
// simulator, because both drive the same Scheduler.
//
// Four kinds, one registry each (name -> factory(params)):
//   ordering    OrderingPolicy::key(RequestView)        who is admitted first / preempted last
//   eviction    EvictionPolicy::key(CachedBlockView)    which unheld cached block goes first
//               EvictionPolicy::pin_seconds(TurnView)   retention: how long a finished turn is kept
//   preemption  PreemptionPolicy::mode(RequestView,..)  recompute or swap a victim
//   router      RouterPolicy::route(RouteView, replicas) which replica serves a model call (simulator)
// Python subclasses of the bound classes register into the same registries
// (csrc/py_policies.cpp); see docs/policies.md.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common.h"

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
  // The session ended: forget what was kept about it.
  virtual void end_session(const std::string& session_id) { (void)session_id; }
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
