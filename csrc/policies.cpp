#include "policies.h"

#include <algorithm>
#include <cmath>

namespace tandem {

template <typename Policy>
void PolicyRegistry<Policy>::add(const std::string& name, Factory factory) {
  factories_[name] = std::move(factory);
}

template <typename Policy>
std::shared_ptr<Policy> PolicyRegistry<Policy>::make(const std::string& name,
                                                     const PolicyParams& params) const {
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

void check_params(const std::string& policy, const PolicyParams& params,
                  const std::vector<std::string>& allowed) {
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
};

class Priority final : public OrderingPolicy {
 public:
  std::string name() const override { return "priority"; }
  OrderKey key(const RequestView& r) const override {
    return {static_cast<double>(r.priority), r.arrival_time};
  }
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

// ---- eviction / retention ----------------------------------------------------

class Lru final : public EvictionPolicy {
 public:
  std::string name() const override { return "lru"; }
  OrderKey key(const CachedBlockView& b) const override { return {b.last_access, 0.0}; }
};

// A session's finished turn stays pinned for `ttl` seconds, then falls back to LRU.
class Ttl final : public EvictionPolicy {
 public:
  explicit Ttl(double ttl) : ttl_(ttl) {}
  std::string name() const override { return "ttl"; }
  double pin_seconds(const TurnView&) const override { return ttl_; }
  OrderKey key(const CachedBlockView& b) const override { return {b.last_access, 0.0}; }

 private:
  double ttl_;
};

// Blocks last used by less important requests (larger priority value) go first, then LRU.
class PriorityEviction final : public EvictionPolicy {
 public:
  std::string name() const override { return "priority"; }
  OrderKey key(const CachedBlockView& b) const override {
    return {-static_cast<double>(b.priority), b.last_access};
  }
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

}  // namespace

PolicyRegistry<OrderingPolicy>& ordering_registry() {
  static PolicyRegistry<OrderingPolicy> registry = [] {
    PolicyRegistry<OrderingPolicy> r;
    r.add("fcfs", no_params<Fcfs, OrderingPolicy>("fcfs"));
    r.add("priority", no_params<Priority, OrderingPolicy>("priority"));
    r.add("longest_prefix_match", no_params<LongestPrefixMatch, OrderingPolicy>("longest_prefix_match"));
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

template class PolicyRegistry<OrderingPolicy>;
template class PolicyRegistry<EvictionPolicy>;
template class PolicyRegistry<PreemptionPolicy>;

}  // namespace tandem
