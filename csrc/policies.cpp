#include "policies.h"

#include <algorithm>
#include <cmath>
#include <tuple>

namespace tandem {

template <typename Policy>
void PolicyRegistry<Policy>::add(const std::string& name, Factory factory) {
  factories_[name] = std::move(factory);
}

template <typename Policy>
std::shared_ptr<Policy> PolicyRegistry<Policy>::make(const std::string& name, const PolicyParams& params) const {
  auto it = factories_.find(name);
  if (it == factories_.end()) {
    std::string msg = "unknown policy '" + name + "'; registered:";
    for (const auto& kv : factories_) msg += " " + kv.first;
    throw InvalidInput(msg);
  }
  return it->second(params);
}

template <typename Policy>
std::vector<std::string> PolicyRegistry<Policy>::names() const {
  std::vector<std::string> out;
  for (const auto& kv : factories_) out.push_back(kv.first);
  return out;
}

std::string policy_label(const char* kind, const std::string& name) {
  return std::string(kind) + " policy '" + name + "'";
}

void check_params(const std::string& policy, const PolicyParams& params, const std::vector<std::string>& allowed) {
  for (const auto& kv : params) {
    if (std::find(allowed.begin(), allowed.end(), kv.first) == allowed.end()) {
      std::string msg = "policy '" + policy + "' has no parameter '" + kv.first + "'";
      if (allowed.empty()) {
        msg += " (it takes none)";
      } else {
        msg += " (it takes:";
        for (const auto& a : allowed) msg += " " + a;
        msg += ")";
      }
      throw InvalidInput(msg);
    }
    if (!std::isfinite(kv.second)) {
      throw InvalidInput("policy '" + policy + "': parameter '" + kv.first + "' must be finite");
    }
  }
}

void parse_policy_spec(const std::string& spec, std::string* name, PolicyParams* params) {
  auto colon = spec.find(':');
  *name = spec.substr(0, colon);
  params->clear();
  if (name->empty()) throw InvalidInput("empty policy name in spec '" + spec + "'");
  if (colon == std::string::npos) return;
  const std::string rest = spec.substr(colon + 1);
  for (size_t begin = 0; begin <= rest.size();) {
    size_t end = rest.find(',', begin);
    if (end == std::string::npos) end = rest.size();
    const std::string item = rest.substr(begin, end - begin);
    begin = end + 1;
    if (item.empty() && begin > rest.size()) break;  // a trailing comma
    auto eq = item.find('=');
    if (eq == std::string::npos || eq == 0) {
      throw InvalidInput("policy spec '" + spec + "': expected key=value, got '" + item + "'");
    }
    std::string value = item.substr(eq + 1);
    try {
      size_t used = 0;
      double v = std::stod(value, &used);
      if (used != value.size()) throw std::invalid_argument(value);
      (*params)[item.substr(0, eq)] = v;
    } catch (const std::exception&) {
      throw InvalidInput("policy spec '" + spec + "': '" + value + "' is not a number");
    }
  }
}

namespace {

// ---- ordering --------------------------------------------------------------

class Fcfs final : public OrderingPolicy {
 public:
  std::string name() const override { return "fcfs"; }
  OrderKey key(const RequestView& r) const override { return {r.arrival_time, 0.0}; }
  bool key_is_fixed() const override { return true; }
};

class Priority final : public OrderingPolicy {
 public:
  std::string name() const override { return "priority"; }
  OrderKey key(const RequestView& r) const override { return {static_cast<double>(r.priority), r.arrival_time}; }
  bool key_is_fixed() const override { return true; }
};

// Most cached tokens first (SGLang's "lpm"), then arrival.
class LongestPrefixMatch final : public OrderingPolicy {
 public:
  std::string name() const override { return "longest_prefix_match"; }
  OrderKey key(const RequestView& r) const override {
    return {-static_cast<double>(r.num_cached_tokens), r.arrival_time};
  }
  bool needs_prefix_match() const override { return true; }
};

// Program-level fairness (Autellix's PLAS): least attained service per session first, where a
// session's service is the tokens its earlier turns computed when this call arrived. Service is
// counted in levels of `quantum` tokens, first come first served within a level, so a long agent
// session does not starve short ones. The key is fixed for a call's life: counting the call's own
// progress too made the request closest to finishing the preemption victim, and under KV pressure
// the conformance suite found that livelock (recompute, overtake, be preempted again).
class SessionLas final : public OrderingPolicy {
 public:
  explicit SessionLas(double quantum) : quantum_(quantum) {}
  std::string name() const override { return "session_las"; }
  OrderKey key(const RequestView& r) const override {
    return {std::floor(static_cast<double>(r.session_service) / quantum_), r.arrival_time};
  }
  bool key_is_fixed() const override { return true; }  // session_service: as of its arrival

 private:
  double quantum_;
};

// Earliest virtual deadline (ours): deadline = arrival + uncached work / tokens_per_s. A cached
// agent turn after a tool call overtakes a cold 50K-token first call only within the time the
// cold call's own prefill would take (2.5 s at 20K tokens/s), so nobody starves and the bound is
// in seconds; FCFS makes the cheap, latency-critical turn wait, lpm lets a cold call starve. It
// was a Python policy first: a call into Python for the key of every waiting and running request
// every step made whole simulations 4-7x slower (tests/test_sim_cache_credit.py keeps that
// definition and checks that runs with either are identical).
class CacheCredit final : public OrderingPolicy {
 public:
  explicit CacheCredit(double tokens_per_s) : tokens_per_s_(tokens_per_s) {}
  std::string name() const override { return "cache_credit"; }
  OrderKey key(const RequestView& r) const override {
    const int64_t done = std::max(r.num_cached_tokens, r.num_computed_tokens);
    const int64_t work = std::max<int64_t>(0, static_cast<int64_t>(r.num_prompt_tokens) + r.num_output_tokens - done);
    return {r.arrival_time + static_cast<double>(work) / tokens_per_s_, r.arrival_time};
  }
  bool needs_prefix_match() const override { return true; }

 private:
  double tokens_per_s_;
};

// ---- eviction / retention ----------------------------------------------------

class Lru final : public EvictionPolicy {
 public:
  std::string name() const override { return "lru"; }
  OrderKey key(const CachedBlockView& b) const override { return {b.last_access, 0.0}; }
  bool key_reads_only_time_and_priority() const override { return true; }
};

// A session's finished turn stays pinned for `ttl` seconds, then falls back to LRU.
class Ttl final : public EvictionPolicy {
 public:
  explicit Ttl(double ttl) : ttl_(ttl) {}
  std::string name() const override { return "ttl"; }
  double pin_seconds(const TurnView&) const override { return ttl_; }
  OrderKey key(const CachedBlockView& b) const override { return {b.last_access, 0.0}; }
  bool key_reads_only_time_and_priority() const override { return true; }

 private:
  double ttl_;
};

// Tool-pause-aware retention (the idea behind Continuum and InferCept): after a session's turn,
// hold its KV for the time T that minimises the expected cost of the coming pause,
//     cost(T) = hold_cost * share * E[min(pause, T)] + reload_s_per_token * tokens * P(pause > T),
// where share = the turn's blocks / the cache's blocks and hold_cost is what holding the whole
// cache for a second costs in GPU seconds (1: memory is what limits the batch). The pause law is
// the session's own history (its earlier pauses), with `prior_pause_s` standing in until it has
// `min_history` of them. cost(T) is piecewise linear between observed pauses, so the best T is
// 0 or one of them; `margin` stretches it so a call arriving exactly at T still finds its KV.
class PauseAware final : public EvictionPolicy {
 public:
  PauseAware(double reload_s_per_token, double hold_cost, double prior_pause_s, int min_history, double margin,
             double max_pin_s)
      : reload_(reload_s_per_token),
        hold_(hold_cost),
        prior_(prior_pause_s),
        min_history_(min_history),
        margin_(margin),
        max_pin_(max_pin_s) {}
  std::string name() const override { return "pause_aware"; }
  OrderKey key(const CachedBlockView& b) const override { return {b.last_access, 0.0}; }
  bool key_reads_only_time_and_priority() const override { return true; }
  double pin_seconds(const TurnView& turn) const override {
    if (turn.num_blocks <= 0 || turn.cache_blocks <= 0) return 0.0;
    std::vector<double> pauses = turn.pauses;
    if (static_cast<int>(pauses.size()) < min_history_) pauses.push_back(prior_);
    std::sort(pauses.begin(), pauses.end());
    const double n = static_cast<double>(pauses.size());
    const double share = static_cast<double>(turn.num_blocks) / turn.cache_blocks;
    const double reload = reload_ * turn.num_tokens;
    // T = 0: nothing held, every pause pays the reload.
    double best_t = 0.0, best_cost = reload;
    double below = 0.0;  // sum of the pauses <= T
    for (size_t i = 0; i < pauses.size(); ++i) {
      const double t = pauses[i];
      below += t;
      const double longer = n - static_cast<double>(i + 1);  // pauses > t (ties are held too)
      const double held = (below + longer * t) / n;          // E[min(pause, T)]
      const double cost = hold_ * share * held + reload * longer / n;
      if (cost < best_cost) best_cost = cost, best_t = t;
    }
    return std::min(best_t * margin_, max_pin_);
  }

 private:
  double reload_, hold_, prior_;
  int min_history_;
  double margin_, max_pin_;
};

// Blocks last used by less important requests (larger priority value) go first, then LRU.
class PriorityEviction final : public EvictionPolicy {
 public:
  std::string name() const override { return "priority"; }
  OrderKey key(const CachedBlockView& b) const override { return {-static_cast<double>(b.priority), b.last_access}; }
  bool key_reads_only_time_and_priority() const override { return true; }
};

// ---- preemption ---------------------------------------------------------------

class Recompute final : public PreemptionPolicy {
 public:
  std::string name() const override { return "recompute"; }
  PreemptMode mode(const RequestView&, int, int) const override { return PreemptMode::kRecompute; }
};

class Swap final : public PreemptionPolicy {
 public:
  std::string name() const override { return "swap"; }
  PreemptMode mode(const RequestView&, int host_free, int needed) const override {
    return host_free >= needed ? PreemptMode::kSwap : PreemptMode::kRecompute;
  }
};

template <typename P, typename Base>
typename PolicyRegistry<Base>::Factory no_params(const std::string& name) {
  return [name](const PolicyParams& params) -> std::shared_ptr<Base> {
    check_params(name, params, {});
    return std::make_shared<P>();
  };
}

// ---- routers -------------------------------------------------------------------

int least_loaded(const std::vector<ReplicaView>& replicas) {
  int best = 0;
  for (int i = 1; i < static_cast<int>(replicas.size()); ++i) {
    const auto& a = replicas[i];
    const auto& b = replicas[best];
    if (a.load < b.load || (a.load == b.load && a.index < b.index)) best = i;
  }
  return best;
}

class RoundRobin final : public RouterPolicy {
 public:
  std::string name() const override { return "round_robin"; }
  int route(const RouteView&, const std::vector<ReplicaView>& replicas) override {
    return static_cast<int>(next_++ % replicas.size());
  }

 private:
  uint64_t next_ = 0;
};

class LeastLoaded final : public RouterPolicy {
 public:
  std::string name() const override { return "least_loaded"; }
  int route(const RouteView&, const std::vector<ReplicaView>& replicas) override { return least_loaded(replicas); }
};

// A session's calls stay on the replica of its first call, which is chosen least loaded.
class SessionAffinity final : public RouterPolicy {
 public:
  std::string name() const override { return "session_affinity"; }
  int route(const RouteView& call, const std::vector<ReplicaView>& replicas) override {
    if (call.session_id.empty()) return least_loaded(replicas);
    auto it = affinity_.find(std::string(call.session_id));
    if (it != affinity_.end() && it->second < static_cast<int>(replicas.size())) return it->second;
    const int chosen = least_loaded(replicas);
    affinity_[std::string(call.session_id)] = chosen;
    return chosen;
  }
  void end_session(const std::string& session_id) override { affinity_.erase(session_id); }

 private:
  std::map<std::string, int> affinity_;
};

// Most of the prompt already in the replica's prefix cache; ties: least loaded, lowest index.
bool more_cached(const ReplicaView& a, const ReplicaView& b) {
  return std::make_tuple(a.cached_prefix_tokens, -a.load, -a.index) >
         std::make_tuple(b.cached_prefix_tokens, -b.load, -b.index);
}

int most_cached(const std::vector<ReplicaView>& replicas) {
  int best = 0;
  for (int i = 1; i < static_cast<int>(replicas.size()); ++i) {
    if (more_cached(replicas[i], replicas[best])) best = i;
  }
  return best;
}

class PrefixAware final : public RouterPolicy {
 public:
  std::string name() const override { return "prefix_aware"; }
  bool needs_prefix_match() const override { return true; }
  int route(const RouteView&, const std::vector<ReplicaView>& replicas) override { return most_cached(replicas); }
};

// The router that asks tps_floor's question: of the replicas whose decode step with this call stays
// within 1 / tok_s (by each one's step-cost model), prefix_aware's choice; if none does, prefix_aware's
// choice among all (the call waits where its context is cached rather than prefill it all again).
class FloorAware final : public RouterPolicy {
 public:
  explicit FloorAware(double tok_s) : limit_(1.0 / tok_s) {}
  std::string name() const override { return "floor_aware"; }
  bool needs_prefix_match() const override { return true; }
  bool needs_step_prediction() const override { return true; }
  int route(const RouteView&, const std::vector<ReplicaView>& replicas) override {
    int best = -1;
    for (int i = 0; i < static_cast<int>(replicas.size()); ++i) {
      if (replicas[i].decode_step_s <= limit_ && (best < 0 || more_cached(replicas[i], replicas[best]))) best = i;
    }
    return best >= 0 ? best : most_cached(replicas);
  }

 private:
  double limit_;
};

double param(const PolicyParams& params, const char* key, double fallback) {
  auto it = params.find(key);
  return it == params.end() ? fallback : it->second;
}

// ---- admission -------------------------------------------------------------------

class AdmitAll final : public AdmissionPolicy {
 public:
  std::string name() const override { return "all"; }
  int chunk(const AdmissionView& view) const override { return view.chunk; }
  bool admits_all() const override { return true; }
};

// A per-user speed floor of tok_s output tokens a second, kept by prediction: every step a decode
// runs in must cost at most 1 / tok_s seconds by the step-cost model, so a prefill chunk in such a
// step gets the largest size that fits (at least min_chunk tokens, else none); and a new request is
// admitted only if the decode step of every running request with it costs at most margin / tok_s
// (its context taken as its prompt: what it will have grown by is not known at admission). With
// nothing running, a request is always admitted: holding it would keep the floor for nobody.
class TpsFloor final : public AdmissionPolicy {
 public:
  TpsFloor(double tok_s, double margin, double max_wait_s, int min_chunk)
      : limit_(1.0 / tok_s), margin_(margin), max_wait_s_(max_wait_s), min_chunk_(min_chunk) {}
  std::string name() const override { return "tps_floor"; }
  bool needs_cost() const override { return true; }
  double max_wait_s() const override { return max_wait_s_; }

  int chunk(const AdmissionView& v) const override {
    const StepCost& cost = *v.cost;
    if (v.first && v.steady->features().num_reqs > 0 &&
        v.steady->seconds_with(cost, v.num_tokens, 1, true) > margin_ * limit_) {
      return 0;
    }
    if (v.step->features().num_decode_reqs == 0) return v.chunk;  // nobody's next token waits on this step
    const auto fits = [&](int n) {
      return v.step->seconds_with(cost, v.start, n, v.start + n == v.num_tokens) <= limit_;
    };
    if (fits(v.chunk)) return v.chunk;
    // The cost grows with the chunk: the largest n that fits, by bisection (fits(lo), not fits(hi)).
    int lo = 0, hi = v.chunk;
    while (hi - lo > 1) {
      const int mid = lo + (hi - lo) / 2;
      (fits(mid) ? lo : hi) = mid;
    }
    return lo >= std::min(min_chunk_, v.chunk) ? lo : 0;
  }

 private:
  double limit_, margin_, max_wait_s_;
  int min_chunk_;
};

}  // namespace

PolicyRegistry<OrderingPolicy>& ordering_registry() {
  static PolicyRegistry<OrderingPolicy> registry = [] {
    PolicyRegistry<OrderingPolicy> r;
    r.add("fcfs", no_params<Fcfs, OrderingPolicy>("fcfs"));
    r.add("session_las", [](const PolicyParams& params) -> std::shared_ptr<OrderingPolicy> {
      check_params("session_las", params, {"quantum"});
      const double quantum = param(params, "quantum", 2048.0);
      if (!(quantum > 0)) throw InvalidInput("policy 'session_las': quantum must be > 0 tokens");
      return std::make_shared<SessionLas>(quantum);
    });
    r.add("priority", no_params<Priority, OrderingPolicy>("priority"));
    r.add("longest_prefix_match", no_params<LongestPrefixMatch, OrderingPolicy>("longest_prefix_match"));
    r.add("cache_credit", [](const PolicyParams& params) -> std::shared_ptr<OrderingPolicy> {
      check_params("cache_credit", params, {"tokens_per_s"});
      const double tokens_per_s = param(params, "tokens_per_s", 20000.0);
      if (!(tokens_per_s > 0)) throw InvalidInput("policy 'cache_credit': tokens_per_s must be > 0");
      return std::make_shared<CacheCredit>(tokens_per_s);
    });
    return r;
  }();
  return registry;
}

PolicyRegistry<EvictionPolicy>& eviction_registry() {
  static PolicyRegistry<EvictionPolicy> registry = [] {
    PolicyRegistry<EvictionPolicy> r;
    r.add("lru", no_params<Lru, EvictionPolicy>("lru"));
    r.add("priority", no_params<PriorityEviction, EvictionPolicy>("priority"));
    r.add("ttl", [](const PolicyParams& params) -> std::shared_ptr<EvictionPolicy> {
      check_params("ttl", params, {"ttl"});
      auto it = params.find("ttl");
      double ttl = it == params.end() ? 60.0 : it->second;
      if (ttl < 0) throw InvalidInput("policy 'ttl': ttl must be >= 0 seconds");
      return std::make_shared<Ttl>(ttl);
    });
    r.add("pause_aware", [](const PolicyParams& params) -> std::shared_ptr<EvictionPolicy> {
      check_params("pause_aware", params,
                   {"reload_s_per_token", "hold_cost", "prior_pause_s", "min_history", "margin", "max_pin_s"});
      // Defaults: an 8B model prefills ~20K tokens/s on an H100; holding memory costs its share of
      // the GPU; a 5 s pause until the session has shown two; 10% slack; at most 10 minutes.
      const double reload = param(params, "reload_s_per_token", 5e-5);
      const double hold = param(params, "hold_cost", 1.0);
      const double prior = param(params, "prior_pause_s", 5.0);
      const double min_history = param(params, "min_history", 2.0);
      const double margin = param(params, "margin", 1.1);
      const double max_pin = param(params, "max_pin_s", 600.0);
      if (reload < 0 || hold < 0 || prior < 0 || max_pin < 0) {
        throw InvalidInput(
            "policy 'pause_aware': reload_s_per_token, hold_cost, prior_pause_s and max_pin_s must be >= 0");
      }
      if (min_history < 0 || min_history != std::floor(min_history) || min_history > kMaxPauseHistory) {
        throw InvalidInput("policy 'pause_aware': min_history must be a whole number in [0, " +
                           std::to_string(kMaxPauseHistory) + "]");
      }
      if (margin < 1) throw InvalidInput("policy 'pause_aware': margin must be >= 1");
      return std::make_shared<PauseAware>(reload, hold, prior, static_cast<int>(min_history), margin, max_pin);
    });
    return r;
  }();
  return registry;
}

PolicyRegistry<PreemptionPolicy>& preemption_registry() {
  static PolicyRegistry<PreemptionPolicy> registry = [] {
    PolicyRegistry<PreemptionPolicy> r;
    r.add("recompute", no_params<Recompute, PreemptionPolicy>("recompute"));
    r.add("swap", no_params<Swap, PreemptionPolicy>("swap"));
    return r;
  }();
  return registry;
}

PolicyRegistry<RouterPolicy>& router_registry() {
  static PolicyRegistry<RouterPolicy> registry = [] {
    PolicyRegistry<RouterPolicy> r;
    r.add("round_robin", no_params<RoundRobin, RouterPolicy>("round_robin"));
    r.add("least_loaded", no_params<LeastLoaded, RouterPolicy>("least_loaded"));
    r.add("session_affinity", no_params<SessionAffinity, RouterPolicy>("session_affinity"));
    r.add("prefix_aware", no_params<PrefixAware, RouterPolicy>("prefix_aware"));
    r.add("floor_aware", [](const PolicyParams& params) -> std::shared_ptr<RouterPolicy> {
      check_params("floor_aware", params, {"tok_s"});
      const double tok_s = param(params, "tok_s", 70.0);
      if (!(tok_s > 0)) throw InvalidInput("policy 'floor_aware': tok_s must be > 0 tokens a second");
      return std::make_shared<FloorAware>(tok_s);
    });
    return r;
  }();
  return registry;
}

PolicyRegistry<AdmissionPolicy>& admission_registry() {
  static PolicyRegistry<AdmissionPolicy> registry = [] {
    PolicyRegistry<AdmissionPolicy> r;
    r.add("all", no_params<AdmitAll, AdmissionPolicy>("all"));
    r.add("tps_floor", [](const PolicyParams& params) -> std::shared_ptr<AdmissionPolicy> {
      check_params("tps_floor", params, {"tok_s", "margin", "max_wait_s", "min_chunk"});
      const double tok_s = param(params, "tok_s", 70.0);
      const double margin = param(params, "margin", 1.0);
      const double max_wait = param(params, "max_wait_s", 60.0);
      const double min_chunk = param(params, "min_chunk", 64.0);
      if (!(tok_s > 0)) throw InvalidInput("policy 'tps_floor': tok_s must be > 0 tokens a second");
      if (!(margin > 0)) throw InvalidInput("policy 'tps_floor': margin must be > 0");
      if (max_wait < 0) throw InvalidInput("policy 'tps_floor': max_wait_s must be >= 0 seconds");
      if (min_chunk < 1 || min_chunk != std::floor(min_chunk) || min_chunk > 1e9) {
        throw InvalidInput("policy 'tps_floor': min_chunk must be a whole number of tokens >= 1");
      }
      return std::make_shared<TpsFloor>(tok_s, margin, max_wait, static_cast<int>(min_chunk));
    });
    return r;
  }();
  return registry;
}

template class PolicyRegistry<OrderingPolicy>;
template class PolicyRegistry<AdmissionPolicy>;
template class PolicyRegistry<RouterPolicy>;
template class PolicyRegistry<EvictionPolicy>;
template class PolicyRegistry<PreemptionPolicy>;

}  // namespace tandem
