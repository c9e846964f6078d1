// Policies written in Python: pybind11 trampolines for the four policy kinds, the views they
// read, and registration into the same registries the C++ policies use (csrc/policies.h).
//
// A Python policy is a subclass of controlplane.OrderingPolicy (EvictionPolicy,
// PreemptionPolicy, RouterPolicy) registered by name; a SchedulerConfig (or a simulator or
// engine config) then selects it by that name exactly as it selects a C++ one. Every call into
// Python goes through `call()` below: an exception or a result of the wrong type becomes a
// PolicyError that names the policy and keeps the Python exception as its __cause__.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <memory>
#include <set>
#include <string>

#include "policies.h"

namespace py = pybind11;

namespace tandem {
namespace {

// A PolicyError carrying the Python exception that caused it.
struct PyPolicyError : PolicyError {
  PyPolicyError(const std::string& msg, py::error_already_set cause)
      : PolicyError(msg), cause(std::make_shared<py::error_already_set>(std::move(cause))) {}
  std::shared_ptr<py::error_already_set> cause;
};

// What every trampoline shares: its registered name and kind, for error messages.
class PyPolicyBase {
 public:
  virtual ~PyPolicyBase() = default;
  std::string registered_name;
  const char* kind = "";
};

// Owned copies of the views (a view's string_view must not outlive the call).
struct PyRequestView {
  RequestView v;
  std::string session_id;
};

struct PyRouteView {
  RouteView v;
  std::string session_id;
};

PyRequestView own(const RequestView& r) {
  PyRequestView out{r, std::string(r.session_id)};
  out.v.session_id = {};
  return out;
}

// The registered name, or the class name of an instance built directly (GIL held).
std::string display_name(const PyPolicyBase& p, const py::handle self) {
  if (!p.registered_name.empty()) return p.registered_name;
  return py::str(py::type::handle_of(self).attr("__qualname__")).cast<std::string>();
}

std::string label_of(const PyPolicyBase& p, const py::handle self) {
  return policy_label(p.kind, display_name(p, self));
}

template <typename Base>
std::string name_of(const Base* self, const PyPolicyBase& p) {
  if (!p.registered_name.empty()) return p.registered_name;
  py::gil_scoped_acquire gil;
  return display_name(p, py::cast(self, py::return_value_policy::reference));
}

// Calls the Python override `method` of `self` (a trampoline), converting failures.
template <typename Ret, typename Base, typename Convert, typename... Args>
Ret call(const Base* self, const PyPolicyBase& meta, const char* method, Convert convert, Args&&... args) {
  py::gil_scoped_acquire gil;
  py::function override = py::get_override(self, method);
  const py::handle obj = py::cast(self, py::return_value_policy::reference);
  if (!override) throw PolicyError(label_of(meta, obj) + " does not define " + method + "()");
  try {
    py::object result = override(std::forward<Args>(args)...);
    return convert(result);
  } catch (py::error_already_set& e) {
    const std::string msg = label_of(meta, obj) + " raised in " + method + "(): " + e.what();
    throw PyPolicyError(msg, std::move(e));
  } catch (const py::cast_error& e) {
    throw PolicyError(label_of(meta, obj) + ": " + method + "() returned a value of the wrong type (" + e.what() + ")");
  }
}

// A key is a number or a (primary, secondary) pair of numbers.
OrderKey to_key(const py::object& r) {
  if (py::isinstance<py::tuple>(r) || py::isinstance<py::list>(r)) {
    py::sequence s = r;
    if (s.size() == 0 || s.size() > 2) throw py::cast_error("a key is a number or a pair of numbers");
    OrderKey k;
    k.primary = s[0].cast<double>();
    if (s.size() == 2) k.secondary = s[1].cast<double>();
    return k;
  }
  if (py::isinstance<OrderKey>(r)) return r.cast<OrderKey>();
  if (py::isinstance<py::bool_>(r)) throw py::cast_error("a key is a number, not a bool");
  return OrderKey{r.cast<double>(), 0.0};
}

bool to_bool(const py::object& r) { return r.cast<bool>(); }

template <typename Base>
bool has_override(const Base* self, const char* method) {
  py::gil_scoped_acquire gil;
  return static_cast<bool>(py::get_override(self, method));
}

// Trampolines: name() is the registered name (or the class name for an unregistered
// instance); every other virtual goes to Python if the subclass defines it.
class PyOrderingPolicy : public OrderingPolicy, public PyPolicyBase {
 public:
  PyOrderingPolicy() { kind = "ordering"; }
  std::string name() const override { return name_of(static_cast<const OrderingPolicy*>(this), *this); }
  OrderKey key(const RequestView& r) const override {
    return call<OrderKey>(static_cast<const OrderingPolicy*>(this), *this, "key", to_key, own(r));
  }
  bool needs_prefix_match() const override {
    if (!has_override(static_cast<const OrderingPolicy*>(this), "needs_prefix_match")) return false;
    return call<bool>(static_cast<const OrderingPolicy*>(this), *this, "needs_prefix_match", to_bool);
  }
};

class PyEvictionPolicy : public EvictionPolicy, public PyPolicyBase {
 public:
  PyEvictionPolicy() { kind = "eviction"; }
  std::string name() const override { return name_of(static_cast<const EvictionPolicy*>(this), *this); }
  double pin_seconds(const TurnView& turn) const override {
    if (!has_override(static_cast<const EvictionPolicy*>(this), "pin_seconds")) return 0.0;
    return call<double>(
        static_cast<const EvictionPolicy*>(this), *this, "pin_seconds",
        [](const py::object& r) { return r.cast<double>(); }, turn);
  }
  OrderKey key(const CachedBlockView& b) const override {
    return call<OrderKey>(static_cast<const EvictionPolicy*>(this), *this, "key", to_key, b);
  }
};

class PyPreemptionPolicy : public PreemptionPolicy, public PyPolicyBase {
 public:
  PyPreemptionPolicy() { kind = "preemption"; }
  std::string name() const override { return name_of(static_cast<const PreemptionPolicy*>(this), *this); }
  PreemptMode mode(const RequestView& victim, int host_free_blocks, int blocks_needed) const override {
    return call<PreemptMode>(
        static_cast<const PreemptionPolicy*>(this), *this, "mode",
        [](const py::object& r) {
          if (py::isinstance<py::str>(r)) {
            const std::string s = r.cast<std::string>();
            if (s == "recompute") return PreemptMode::kRecompute;
            if (s == "swap") return PreemptMode::kSwap;
            throw py::cast_error("mode '" + s + "' is neither 'recompute' nor 'swap'");
          }
          return r.cast<PreemptMode>();
        },
        own(victim), host_free_blocks, blocks_needed);
  }
};

class PyRouterPolicy : public RouterPolicy, public PyPolicyBase {
 public:
  PyRouterPolicy() { kind = "router"; }
  std::string name() const override { return name_of(static_cast<const RouterPolicy*>(this), *this); }
  int route(const RouteView& c, const std::vector<ReplicaView>& replicas) override {
    PyRouteView call_view{c, std::string(c.session_id)};
    call_view.v.session_id = {};
    return call<int>(
        static_cast<const RouterPolicy*>(this), *this, "route",
        [](const py::object& r) {
          if (py::isinstance<py::bool_>(r)) throw py::cast_error("a replica index, not a bool");
          return r.cast<int>();
        },
        call_view, replicas);
  }
  bool needs_prefix_match() const override {
    if (!has_override(static_cast<const RouterPolicy*>(this), "needs_prefix_match")) return false;
    return call<bool>(static_cast<const RouterPolicy*>(this), *this, "needs_prefix_match", to_bool);
  }
  bool needs_step_prediction() const override {
    if (!has_override(static_cast<const RouterPolicy*>(this), "needs_step_prediction")) return false;
    return call<bool>(static_cast<const RouterPolicy*>(this), *this, "needs_step_prediction", to_bool);
  }
  void end_session(const std::string& session_id) override {
    if (!has_override(static_cast<const RouterPolicy*>(this), "end_session")) return;
    call<int>(
        static_cast<const RouterPolicy*>(this), *this, "end_session", [](const py::object&) { return 0; }, session_id);
  }
};

// The py::object behind a Python policy, released with the GIL held (or leaked if the
// interpreter is already gone).
struct KeepAlive {
  py::object obj;
  ~KeepAlive() {
    if (!Py_IsInitialized()) {
      obj.release();
      return;
    }
    py::gil_scoped_acquire gil;
    obj = py::object();
  }
};

// Names registered from Python, per kind (built-in C++ names cannot be replaced).
std::map<std::string, std::set<std::string>>& python_names() {
  static auto* names = new std::map<std::string, std::set<std::string>>();
  return *names;
}

template <typename Policy, typename Tramp>
void register_python(PolicyRegistry<Policy>& registry, const std::string& kind, const std::string& name,
                     py::object factory) {
  auto& mine = python_names()[kind];
  if (registry.contains(name) && !mine.count(name)) {
    throw InvalidInput("'" + name + "' is a built-in " + kind + " policy; choose another name");
  }
  if (name.empty() || name.find(':') != std::string::npos || name.find(',') != std::string::npos) {
    throw InvalidInput("policy name '" + name + "' must be non-empty without ':' or ','");
  }
  auto holder = std::make_shared<KeepAlive>();
  holder->obj = std::move(factory);
  registry.add(name, [holder, name, kind](const PolicyParams& params) -> std::shared_ptr<Policy> {
    py::gil_scoped_acquire gil;
    py::dict kwargs;
    for (const auto& [k, v] : params) kwargs[py::str(k)] = v;
    py::object obj;
    try {
      obj = holder->obj(**kwargs);
    } catch (py::error_already_set& e) {
      throw InvalidInput("policy '" + name + "': could not be built with these parameters: " + e.what());
    }
    Tramp* tramp = nullptr;
    try {
      tramp = dynamic_cast<Tramp*>(obj.cast<Policy*>());
    } catch (const py::cast_error&) {
    }
    if (tramp == nullptr) {
      throw InvalidInput("policy '" + name + "': its factory must return a Python subclass of controlplane." +
                         std::string(kind == "ordering"     ? "OrderingPolicy"
                                     : kind == "eviction"   ? "EvictionPolicy"
                                     : kind == "preemption" ? "PreemptionPolicy"
                                                            : "RouterPolicy"));
    }
    tramp->registered_name = name;
    auto keep = std::make_shared<KeepAlive>();
    keep->obj = obj;
    return std::shared_ptr<Policy>(keep, static_cast<Policy*>(tramp));  // owns the Python object
  });
  mine.insert(name);
}

template <typename Policy>
void unregister_python(PolicyRegistry<Policy>& registry, const std::string& kind) {
  for (const auto& name : python_names()[kind]) registry.remove(name);
  python_names()[kind].clear();
}

}  // namespace

std::vector<std::string> registered_names(const std::string& kind) {
  if (kind == "ordering") return ordering_registry().names();
  if (kind == "eviction") return eviction_registry().names();
  if (kind == "preemption") return preemption_registry().names();
  if (kind == "router") return router_registry().names();
  if (kind == "admission") return admission_registry().names();
  throw InvalidInput("unknown policy kind '" + kind + "' (ordering, eviction, preemption, router, admission)");
}

// A router chosen by spec, validating every decision (what the simulator calls).
class Router {
 public:
  explicit Router(const std::string& spec) {
    std::string name;
    PolicyParams params;
    parse_policy_spec(spec, &name, &params);
    policy_ = router_registry().make(name, params);
    name_ = policy_->name();
    prefix_ = policy_->needs_prefix_match();
    predict_ = policy_->needs_step_prediction();
  }
  int route(RequestId id, const std::string& session_id, int num_prompt_tokens, double now,
            const std::vector<ReplicaView>& replicas) {
    TANDEM_REQUIRE(!replicas.empty(), "route(): no replicas");
    RouteView call;
    call.request_id = id;
    call.session_id = session_id;
    call.num_prompt_tokens = num_prompt_tokens;
    call.now = now;
    const int chosen = policy_->route(call, replicas);
    if (chosen < 0 || chosen >= static_cast<int>(replicas.size())) {
      throw PolicyError(policy_label("router", name_) + " chose replica " + std::to_string(chosen) + " of " +
                        std::to_string(replicas.size()));
    }
    return chosen;
  }
  void end_session(const std::string& session_id) { policy_->end_session(session_id); }
  const std::string& name() const { return name_; }
  bool needs_prefix_match() const { return prefix_; }
  bool needs_step_prediction() const { return predict_; }

 private:
  std::shared_ptr<RouterPolicy> policy_;
  std::string name_;
  bool prefix_ = false;
  bool predict_ = false;
};

void bind_policies(py::module_& m) {
  static py::exception<PolicyError> policy_error(m, "PolicyError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const PyPolicyError& e) {
      py::raise_from(*e.cause, policy_error.ptr(), e.what());
    } catch (const PolicyError& e) {
      PyErr_SetString(policy_error.ptr(), e.what());
    }
  });

  py::class_<OrderKey>(m, "OrderKey", "An ascending sort key: (primary, secondary).")
      .def(py::init<double, double>(), py::arg("primary"), py::arg("secondary") = 0.0)
      .def_readonly("primary", &OrderKey::primary)
      .def_readonly("secondary", &OrderKey::secondary)
      .def("__repr__", [](const OrderKey& k) {
        return "OrderKey(" + format_number(k.primary) + ", " + format_number(k.secondary) + ")";
      });

  py::enum_<PreemptMode>(m, "PreemptMode")
      .value("RECOMPUTE", PreemptMode::kRecompute)
      .value("SWAP", PreemptMode::kSwap);

  py::class_<PyRequestView>(m, "RequestView", "What ordering and preemption policies read about a request.")
      .def(py::init([](RequestId id, double arrival_time, int priority, int num_prompt_tokens, int num_output_tokens,
                       int num_computed_tokens, int num_cached_tokens, int num_blocks, bool preempted, bool swapped,
                       std::string session_id, int64_t num_computed_total, int session_turns, int64_t session_service,
                       py::object session_last_end) {
             PyRequestView r;
             r.v.id = id;
             r.v.arrival_time = arrival_time;
             r.v.priority = priority;
             r.v.num_prompt_tokens = num_prompt_tokens;
             r.v.num_output_tokens = num_output_tokens;
             r.v.num_computed_tokens = num_computed_tokens;
             r.v.num_cached_tokens = num_cached_tokens;
             r.v.num_blocks = num_blocks;
             r.v.preempted = preempted;
             r.v.swapped = swapped;
             r.session_id = std::move(session_id);
             r.v.num_computed_total = num_computed_total;
             r.v.session_turns = session_turns;
             r.v.session_service = session_service;
             r.v.session_last_end = session_last_end.is_none() ? kNever : session_last_end.cast<double>();
             return r;
           }),
           py::kw_only(), py::arg("id") = 0, py::arg("arrival_time") = 0.0, py::arg("priority") = 0,
           py::arg("num_prompt_tokens") = 0, py::arg("num_output_tokens") = 0, py::arg("num_computed_tokens") = 0,
           py::arg("num_cached_tokens") = 0, py::arg("num_blocks") = 0, py::arg("preempted") = false,
           py::arg("swapped") = false, py::arg("session_id") = "", py::arg("num_computed_total") = 0,
           py::arg("session_turns") = 0, py::arg("session_service") = 0, py::arg("session_last_end") = py::none(),
           "A view built by hand, to unit-test a policy's decision.")
      .def_property_readonly("id", [](const PyRequestView& r) { return r.v.id; })
      .def_property_readonly("arrival_time", [](const PyRequestView& r) { return r.v.arrival_time; })
      .def_property_readonly("priority", [](const PyRequestView& r) { return r.v.priority; })
      .def_property_readonly("num_prompt_tokens", [](const PyRequestView& r) { return r.v.num_prompt_tokens; })
      .def_property_readonly("num_output_tokens", [](const PyRequestView& r) { return r.v.num_output_tokens; })
      .def_property_readonly("num_computed_tokens", [](const PyRequestView& r) { return r.v.num_computed_tokens; })
      .def_property_readonly("num_cached_tokens", [](const PyRequestView& r) { return r.v.num_cached_tokens; })
      .def_property_readonly("num_blocks", [](const PyRequestView& r) { return r.v.num_blocks; })
      .def_property_readonly("preempted", [](const PyRequestView& r) { return r.v.preempted; })
      .def_property_readonly("swapped", [](const PyRequestView& r) { return r.v.swapped; })
      .def_property_readonly("session_id", [](const PyRequestView& r) { return r.session_id; })
      .def_property_readonly("num_computed_total", [](const PyRequestView& r) { return r.v.num_computed_total; })
      .def_property_readonly("session_turns", [](const PyRequestView& r) { return r.v.session_turns; })
      .def_property_readonly("session_service", [](const PyRequestView& r) { return r.v.session_service; })
      .def_property_readonly("session_last_end",
                             [](const PyRequestView& r) {
                               return r.v.session_last_end == kNever ? py::object(py::none())
                                                                     : py::object(py::float_(r.v.session_last_end));
                             })
      .def("__repr__", [](const PyRequestView& r) {
        return "RequestView(id=" + std::to_string(r.v.id) + ", session='" + r.session_id + "')";
      });

  py::class_<CachedBlockView>(m, "CachedBlockView", "What an eviction policy reads about an unheld cached block.")
      .def(py::init([](BlockId block, double last_access, int depth, int priority, int64_t hits) {
             CachedBlockView b;
             b.block = block;
             b.last_access = last_access;
             b.depth = depth;
             b.priority = priority;
             b.hits = hits;
             return b;
           }),
           py::kw_only(), py::arg("block") = 0, py::arg("last_access") = 0.0, py::arg("depth") = 0,
           py::arg("priority") = 0, py::arg("hits") = 0)
      .def_readonly("block", &CachedBlockView::block)
      .def_readonly("last_access", &CachedBlockView::last_access)
      .def_readonly("depth", &CachedBlockView::depth)
      .def_readonly("priority", &CachedBlockView::priority)
      .def_readonly("hits", &CachedBlockView::hits);

  py::class_<TurnView>(m, "TurnView", "A session's turn that just finished (for retention).")
      .def(py::init([](std::string session_id, RequestId request_id, double now, int num_tokens, int num_blocks,
                       int priority, int cache_blocks, int turn_index, int64_t session_service,
                       std::vector<double> pauses) {
             TurnView t;
             t.session_id = std::move(session_id);
             t.request_id = request_id;
             t.now = now;
             t.num_tokens = num_tokens;
             t.num_blocks = num_blocks;
             t.priority = priority;
             t.cache_blocks = cache_blocks;
             t.turn_index = turn_index;
             t.session_service = session_service;
             t.pauses = std::move(pauses);
             return t;
           }),
           py::kw_only(), py::arg("session_id") = "", py::arg("request_id") = 0, py::arg("now") = 0.0,
           py::arg("num_tokens") = 0, py::arg("num_blocks") = 0, py::arg("priority") = 0, py::arg("cache_blocks") = 0,
           py::arg("turn_index") = 0, py::arg("session_service") = 0, py::arg("pauses") = std::vector<double>())
      .def_readonly("session_id", &TurnView::session_id)
      .def_readonly("request_id", &TurnView::request_id)
      .def_readonly("now", &TurnView::now)
      .def_readonly("num_tokens", &TurnView::num_tokens)
      .def_readonly("num_blocks", &TurnView::num_blocks)
      .def_readonly("priority", &TurnView::priority)
      .def_readonly("cache_blocks", &TurnView::cache_blocks)
      .def_readonly("turn_index", &TurnView::turn_index)
      .def_readonly("session_service", &TurnView::session_service)
      .def_readonly("pauses", &TurnView::pauses);

  py::class_<PyRouteView>(m, "RouteView", "A model call to route.")
      .def(py::init([](RequestId request_id, std::string session_id, int num_prompt_tokens, double now) {
             PyRouteView c;
             c.v.request_id = request_id;
             c.session_id = std::move(session_id);
             c.v.num_prompt_tokens = num_prompt_tokens;
             c.v.now = now;
             return c;
           }),
           py::kw_only(), py::arg("request_id") = 0, py::arg("session_id") = "", py::arg("num_prompt_tokens") = 0,
           py::arg("now") = 0.0)
      .def_property_readonly("request_id", [](const PyRouteView& c) { return c.v.request_id; })
      .def_property_readonly("session_id", [](const PyRouteView& c) { return c.session_id; })
      .def_property_readonly("num_prompt_tokens", [](const PyRouteView& c) { return c.v.num_prompt_tokens; })
      .def_property_readonly("now", [](const PyRouteView& c) { return c.v.now; });

  py::class_<ReplicaView>(m, "ReplicaView", "One replica a router may choose.")
      .def(py::init([](int index, int load, int num_free_blocks, int num_blocks, int cached_prefix_tokens,
                       double decode_step_s) {
             ReplicaView v;
             v.index = index;
             v.load = load;
             v.num_free_blocks = num_free_blocks;
             v.num_blocks = num_blocks;
             v.cached_prefix_tokens = cached_prefix_tokens;
             v.decode_step_s = decode_step_s;
             return v;
           }),
           py::arg("index"), py::arg("load"), py::arg("num_free_blocks") = 0, py::arg("num_blocks") = 0,
           py::arg("cached_prefix_tokens") = 0, py::arg("decode_step_s") = 0.0)
      .def_readonly("index", &ReplicaView::index)
      .def_readonly("load", &ReplicaView::load)
      .def_readonly("num_free_blocks", &ReplicaView::num_free_blocks)
      .def_readonly("num_blocks", &ReplicaView::num_blocks)
      .def_readonly("cached_prefix_tokens", &ReplicaView::cached_prefix_tokens)
      .def_readonly("decode_step_s", &ReplicaView::decode_step_s);

  py::class_<OrderingPolicy, PyOrderingPolicy, std::shared_ptr<OrderingPolicy>>(
      m, "OrderingPolicy",
      "Subclass and define key(request: RequestView) -> number or (number, number); the smallest key "
      "is admitted first and preempted last. Optionally needs_prefix_match() -> True to read "
      "num_cached_tokens of waiting requests.")
      .def(py::init<>())
      .def("name", &OrderingPolicy::name)
      .def(
          "key",
          [](const OrderingPolicy& p, const PyRequestView& r) {
            RequestView v = r.v;
            v.session_id = r.session_id;
            const OrderKey k = p.key(v);
            return py::make_tuple(k.primary, k.secondary);
          },
          py::arg("request"))
      .def("needs_prefix_match", &OrderingPolicy::needs_prefix_match);
  py::class_<EvictionPolicy, PyEvictionPolicy, std::shared_ptr<EvictionPolicy>>(
      m, "EvictionPolicy",
      "Subclass and define key(block: CachedBlockView) (the smallest is evicted first) and optionally "
      "pin_seconds(turn: TurnView) -> seconds a finished turn's blocks stay unevictable.")
      .def(py::init<>())
      .def("name", &EvictionPolicy::name)
      .def(
          "key",
          [](const EvictionPolicy& p, const CachedBlockView& b) {
            const OrderKey k = p.key(b);
            return py::make_tuple(k.primary, k.secondary);
          },
          py::arg("block"))
      .def("pin_seconds", &EvictionPolicy::pin_seconds, py::arg("turn"));
  py::class_<PreemptionPolicy, PyPreemptionPolicy, std::shared_ptr<PreemptionPolicy>>(
      m, "PreemptionPolicy",
      "Subclass and define mode(victim: RequestView, host_free_blocks, blocks_needed) -> 'recompute' or 'swap' "
      "(swap without room on the host falls back to recompute).")
      .def(py::init<>())
      .def("name", &PreemptionPolicy::name)
      .def(
          "mode",
          [](const PreemptionPolicy& p, const PyRequestView& r, int host_free_blocks, int blocks_needed) {
            RequestView v = r.v;
            v.session_id = r.session_id;
            return p.mode(v, host_free_blocks, blocks_needed) == PreemptMode::kSwap ? "swap" : "recompute";
          },
          py::arg("victim"), py::arg("host_free_blocks"), py::arg("blocks_needed"));
  py::class_<RouterPolicy, PyRouterPolicy, std::shared_ptr<RouterPolicy>>(
      m, "RouterPolicy",
      "Subclass and define route(call: RouteView, replicas: list[ReplicaView]) -> index into replicas; "
      "optionally needs_prefix_match() and end_session(session_id).")
      .def(py::init<>())
      .def("name", &RouterPolicy::name)
      .def(
          "route",
          [](RouterPolicy& p, const PyRouteView& c, const std::vector<ReplicaView>& replicas) {
            RouteView v = c.v;
            v.session_id = c.session_id;
            return p.route(v, replicas);
          },
          py::arg("call"), py::arg("replicas"))
      .def("needs_prefix_match", &RouterPolicy::needs_prefix_match)
      .def("needs_step_prediction", &RouterPolicy::needs_step_prediction)
      .def("end_session", &RouterPolicy::end_session, py::arg("session_id"));

  m.def(
      "_register_python_policy",
      [](const std::string& kind, const std::string& name, py::object factory) {
        if (kind == "ordering") {
          register_python<OrderingPolicy, PyOrderingPolicy>(ordering_registry(), kind, name, factory);
        } else if (kind == "eviction") {
          register_python<EvictionPolicy, PyEvictionPolicy>(eviction_registry(), kind, name, factory);
        } else if (kind == "preemption") {
          register_python<PreemptionPolicy, PyPreemptionPolicy>(preemption_registry(), kind, name, factory);
        } else if (kind == "router") {
          register_python<RouterPolicy, PyRouterPolicy>(router_registry(), kind, name, factory);
        } else if (kind == "admission") {
          throw InvalidInput(
              "admission policies are written in C++ (csrc/policies.cpp): they are asked once per "
              "prefill chunk and predict step times; Python ones cannot be registered");
        } else {
          throw InvalidInput("unknown policy kind '" + kind + "' (ordering, eviction, preemption, router)");
        }
      },
      py::arg("kind"), py::arg("name"), py::arg("factory"));
  m.def(
      "make_policy",
      [](const std::string& kind, const std::string& spec) -> py::object {
        std::string name;
        PolicyParams params;
        parse_policy_spec(spec, &name, &params);
        if (kind == "ordering") return py::cast(ordering_registry().make(name, params));
        if (kind == "eviction") return py::cast(eviction_registry().make(name, params));
        if (kind == "preemption") return py::cast(preemption_registry().make(name, params));
        if (kind == "router") return py::cast(router_registry().make(name, params));
        throw InvalidInput("unknown policy kind '" + kind + "' (ordering, eviction, preemption, router)");
      },
      py::arg("kind"), py::arg("spec"), "A policy instance from a spec, e.g. to unit-test its decisions.");
  m.def(
      "_python_policy_names",
      [](const std::string& kind) {
        auto& names = python_names()[kind];
        return std::vector<std::string>(names.begin(), names.end());
      },
      py::arg("kind"));
  m.def(
      "_unregister_python_policy",
      [](const std::string& kind, const std::string& name) {
        auto& mine = python_names()[kind];
        if (!mine.count(name)) throw InvalidInput("no Python " + kind + " policy '" + name + "' is registered");
        mine.erase(name);
        if (kind == "ordering") return ordering_registry().remove(name);
        if (kind == "eviction") return eviction_registry().remove(name);
        if (kind == "preemption") return preemption_registry().remove(name);
        return router_registry().remove(name);
      },
      py::arg("kind"), py::arg("name"));
  m.def("_clear_python_policies", [] {
    unregister_python(ordering_registry(), "ordering");
    unregister_python(eviction_registry(), "eviction");
    unregister_python(preemption_registry(), "preemption");
    unregister_python(router_registry(), "router");
  });

  py::class_<Router>(m, "Router", "A router policy chosen by spec; checks every decision.")
      .def(py::init<const std::string&>(), py::arg("spec"))
      .def("route", &Router::route, py::arg("request_id"), py::arg("session_id"), py::arg("num_prompt_tokens"),
           py::arg("now"), py::arg("replicas"))
      .def("end_session", &Router::end_session, py::arg("session_id"))
      .def_property_readonly("name", &Router::name)
      .def_property_readonly("needs_prefix_match", &Router::needs_prefix_match)
      .def_property_readonly("needs_step_prediction", &Router::needs_step_prediction);
}

}  // namespace tandem
