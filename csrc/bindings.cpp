// pybind11 face of the control plane: `controlplane._core`.
// Plans hand their arrays to numpy without copies; the arrays are read-only
// and keep the plan (and through it the scheduler) alive.
#include <algorithm>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "hashing.h"
#include "policies.h"
#include "py_arrays.h"
#include "request.h"
#include "scheduler.h"

namespace py = pybind11;
using namespace tandem;

namespace tandem {
void bind_policies(py::module_& m);  // csrc/py_policies.cpp
std::vector<std::string> registered_names(const std::string& kind);
}  // namespace tandem

namespace {

template <typename T>
py::array view(const std::vector<T>& v, py::handle owner, py::dtype dtype = py::dtype::of<T>()) {
  py::array out(dtype, {static_cast<py::ssize_t>(v.size())}, {static_cast<py::ssize_t>(sizeof(T))}, v.data(), owner);
  py::detail::array_proxy(out.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return out;
}

// `extra`: capacity reserved beyond the tokens (a prompt grows by its outputs, without a reallocation).
std::vector<TokenId> to_tokens(py::handle obj, const char* what, size_t extra = 0) {
  // Fast path: a C-contiguous int32 array is already in the core's layout.
  if (py::isinstance<py::array_t<int32_t, py::array::c_style>>(obj)) {
    auto arr = py::reinterpret_borrow<py::array_t<int32_t, py::array::c_style>>(obj);
    if (arr.ndim() == 1) {
      std::vector<TokenId> out;
      out.reserve(static_cast<size_t>(arr.size()) + extra);
      out.assign(arr.data(), arr.data() + arr.size());
      return out;
    }
  }
  std::vector<int64_t> wide = to_int_vector(obj, what);
  std::vector<TokenId> out(wide.size());
  for (size_t i = 0; i < wide.size(); ++i) {
    if (wide[i] < INT32_MIN || wide[i] > INT32_MAX) {
      throw InvalidInput(std::string(what) + ": token id " + std::to_string(wide[i]) + " at position " +
                         std::to_string(i) + " is outside the vocabulary");
    }
    out[i] = static_cast<TokenId>(wide[i]);
  }
  return out;
}

py::dict request_info(const Request& r) {
  py::dict d;
  d["id"] = r.id;
  d["state"] = state_name(r.state);
  d["num_prompt_tokens"] = r.num_prompt_tokens;
  d["num_tokens"] = r.num_tokens();
  d["num_computed_tokens"] = r.num_computed;
  d["num_cached_tokens"] = r.num_cached_tokens;
  d["num_preemptions"] = r.num_preemptions;
  d["swapped"] = r.swapped();
  d["blocks"] = r.blocks;
  d["output_token_ids"] = std::vector<TokenId>(r.tokens.begin() + r.num_prompt_tokens, r.tokens.end());
  d["session_id"] = r.session_id;
  d["priority"] = r.priority;
  return d;
}

// A KvEventLog as vLLM-style events: (kind, block_hashes, parent_block_hash or None, token_ids)
// tuples, kind "BlockStored" or "BlockRemoved". Stored records that continue the previous one's
// chain (parent == its hash) join its event, as vLLM stores a request's new full blocks in one
// event; consecutive removals join one event.
py::list kv_events_to_python(const KvEventLog& log, int block_size) {
  py::list out;
  const size_t n = log.records.size();
  size_t token_at = 0;
  for (size_t i = 0; i < n;) {
    const KvEventLog::Record& first = log.records[i];
    std::vector<uint64_t> hashes{first.hash};
    size_t j = i + 1;
    while (j < n && log.records[j].stored == first.stored &&
           (!first.stored || (log.records[j].has_parent && log.records[j].parent == hashes.back()))) {
      hashes.push_back(log.records[j].hash);
      ++j;
    }
    if (first.stored) {
      const size_t num_tokens = hashes.size() * static_cast<size_t>(block_size);
      std::vector<TokenId> tokens(log.tokens.begin() + static_cast<std::ptrdiff_t>(token_at),
                                  log.tokens.begin() + static_cast<std::ptrdiff_t>(token_at + num_tokens));
      token_at += num_tokens;
      out.append(py::make_tuple("BlockStored", hashes,
                                first.has_parent ? py::object(py::int_(first.parent)) : py::object(py::none()),
                                tokens));
    } else {
      out.append(py::make_tuple("BlockRemoved", hashes, py::none(), py::list()));
    }
    i = j;
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "Tandem control plane: request lifecycles, paged KV with a prefix index, batch planning.";
  py::register_exception<InvariantViolation>(m, "InvariantError", PyExc_RuntimeError);
  bind_policies(m);

  py::enum_<RequestState>(m, "RequestState")
      .value("WAITING", RequestState::kWaiting)
      .value("PREFILLING", RequestState::kPrefilling)
      .value("DECODING", RequestState::kDecoding)
      .value("PREEMPTED", RequestState::kPreempted)
      .value("FINISHED", RequestState::kFinished)
      .value("ABORTED", RequestState::kAborted);
  m.def("transition_allowed", &transition_allowed, py::arg("src"), py::arg("dst"),
        "Whether the request lifecycle has an edge src -> dst.");
  m.def(
      "policy_names", [](const std::string& kind) { return registered_names(kind); }, py::arg("kind"),
      "Names registered for a policy kind (ordering, eviction, preemption, router), C++ and Python.");
  m.def(
      "prompt_block_hashes",
      [](py::handle prompt, int block_size, py::object cache_namespace) {
        if (block_size <= 0) throw py::value_error("block_size must be positive");
        const std::vector<TokenId> tokens = to_tokens(prompt, "prompt_token_ids");
        uint64_t parent =
            namespace_hash(cache_namespace.is_none() ? std::string() : py::str(cache_namespace).cast<std::string>());
        std::vector<uint64_t> out;
        for (size_t at = 0; at + static_cast<size_t>(block_size) <= tokens.size(); at += block_size) {
          parent = block_hash(parent, &tokens[at], block_size);
          out.push_back(parent);
        }
        return out;
      },
      py::arg("prompt_token_ids"), py::arg("block_size"), py::arg("cache_namespace") = py::none(),
      "The chained prefix-index hashes of the prompt's full blocks, as the scheduler computes them "
      "(csrc/hashing.h): what a router compares with an engine's KV events.");
  m.def(
      "parse_policy_spec",
      [](const std::string& spec) {
        std::string name;
        PolicyParams params;
        parse_policy_spec(spec, &name, &params);
        return py::make_tuple(name, params);
      },
      py::arg("spec"));

  py::class_<SchedulerConfig>(m, "SchedulerConfig")
      .def(py::init<>())
      .def_readwrite("num_blocks", &SchedulerConfig::num_blocks)
      .def_readwrite("block_size", &SchedulerConfig::block_size)
      .def_readwrite("num_host_blocks", &SchedulerConfig::num_host_blocks)
      .def_readwrite("max_num_seqs", &SchedulerConfig::max_num_seqs)
      .def_readwrite("max_num_batched_tokens", &SchedulerConfig::max_num_batched_tokens)
      .def_readwrite("chunk_size", &SchedulerConfig::chunk_size)
      .def_readwrite("idle_chunk_size", &SchedulerConfig::idle_chunk_size)
      .def_readwrite("max_model_len", &SchedulerConfig::max_model_len)
      .def_readwrite("vocab_size", &SchedulerConfig::vocab_size)
      .def_readwrite("enable_prefix_caching", &SchedulerConfig::enable_prefix_caching)
      .def_readwrite("ordering", &SchedulerConfig::ordering)
      .def_readwrite("eviction", &SchedulerConfig::eviction)
      .def_readwrite("preemption", &SchedulerConfig::preemption)
      .def_readwrite("admission", &SchedulerConfig::admission)
      .def_readwrite("num_lookahead_tokens", &SchedulerConfig::num_lookahead_tokens);

  py::class_<Plan, std::shared_ptr<Plan>>(m, "Plan")
      .def_property_readonly("step_id", [](const Plan& p) { return p.step_id; })
      .def_property_readonly("now", [](const Plan& p) { return p.now; })
      .def_property_readonly("block_size", [](const Plan& p) { return p.block_size; })
      .def_property_readonly("num_reqs", &Plan::num_reqs)
      .def_property_readonly("num_tokens", &Plan::num_tokens)
      .def_property_readonly(
          "has_token_arrays", [](const Plan& p) { return p.token_arrays; },
          "False for the simulator's fast-path plans: input_ids, positions and "
          "slot_mapping are left empty (num_tokens still counts the tokens).")
      .def_property_readonly("num_sampled", &Plan::num_sampled)
      .def_property_readonly("attn_pairs", [](const Plan& p) { return p.attn_pairs; })
      .def_property_readonly("kv_read_tokens", [](const Plan& p) { return p.kv_read_tokens; })
      .def_property_readonly("num_decode_reqs", [](const Plan& p) { return p.num_decode_reqs; })
      .def_property_readonly("decode_kv_tokens", [](const Plan& p) { return p.decode_kv_tokens; })
      .def_property_readonly("follows_decode", [](const Plan& p) { return static_cast<int>(p.follows_decode); })
      .def_property_readonly("continues_decode", [](const Plan& p) { return static_cast<int>(p.continues_decode); })
      .def_property_readonly("num_swap_out_blocks", [](const Plan& p) { return p.num_swap_out_blocks; })
      .def_property_readonly("num_swap_in_blocks", [](const Plan& p) { return p.num_swap_in_blocks; })
      .def_property_readonly("is_empty", [](const Plan& p) { return p.num_reqs() == 0 && p.kv_ops.empty(); })
      .def_property_readonly("req_ids", [](py::object self) { return view(self.cast<Plan&>().req_ids, self); })
      .def_property_readonly("query_lens", [](py::object self) { return view(self.cast<Plan&>().query_lens, self); })
      .def_property_readonly("cached_lens", [](py::object self) { return view(self.cast<Plan&>().cached_lens, self); })
      .def_property_readonly("query_start_loc",
                             [](py::object self) { return view(self.cast<Plan&>().query_start_loc, self); })
      .def_property_readonly("slots", [](py::object self) { return view(self.cast<Plan&>().slots, self); })
      .def_property_readonly("sample",
                             [](py::object self) { return view(self.cast<Plan&>().sample, self, py::dtype("bool")); })
      .def_property_readonly("logits_indices",
                             [](py::object self) { return view(self.cast<Plan&>().logits_indices, self); })
      .def_property_readonly("input_ids", [](py::object self) { return view(self.cast<Plan&>().input_ids, self); })
      .def_property_readonly("positions", [](py::object self) { return view(self.cast<Plan&>().positions, self); })
      .def_property_readonly("slot_mapping",
                             [](py::object self) { return view(self.cast<Plan&>().slot_mapping, self); })
      .def_property_readonly("preempted_ids",
                             [](py::object self) { return view(self.cast<Plan&>().preempted_ids, self); })
      .def_property_readonly("kv_ops",
                             [](py::object self) {
                               const Plan& p = self.cast<Plan&>();
                               py::array out = view(p.kv_ops, self);
                               return out.attr("reshape")(-1, 3);
                             })
      .def_property_readonly("block_table", [](py::object self) {
        const Plan& p = self.cast<Plan&>();
        py::array out(
            py::dtype::of<BlockId>(), {p.block_table_rows, p.block_table_cols},
            {static_cast<py::ssize_t>(sizeof(BlockId)) * p.block_table_cols, static_cast<py::ssize_t>(sizeof(BlockId))},
            p.block_table, self);
        py::detail::array_proxy(out.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
        return out;
      });

  py::class_<FinishedRequest>(m, "FinishedRequest")
      .def_readonly("request_id", &FinishedRequest::id)
      .def_property_readonly("finish_reason", [](const FinishedRequest& f) { return finish_reason_name(f.reason); })
      .def_readonly("num_prompt_tokens", &FinishedRequest::num_prompt_tokens)
      .def_readonly("num_cached_tokens", &FinishedRequest::num_cached_tokens)
      .def_readonly("num_preemptions", &FinishedRequest::num_preemptions)
      .def_readonly("output_token_ids", &FinishedRequest::output_tokens)
      .def_readonly("num_computed_tokens", &FinishedRequest::num_computed_tokens)
      .def_readonly("arrival_time", &FinishedRequest::arrival_time)
      .def_readonly("first_scheduled_time", &FinishedRequest::first_scheduled_time)
      .def_property_readonly("first_token_time", [](const FinishedRequest& f) { return f.token_times.front(); })
      .def_property_readonly("finish_time", [](const FinishedRequest& f) { return f.token_times.back(); })
      .def_property_readonly("num_output_tokens",
                             [](const FinishedRequest& f) { return static_cast<int>(f.output_tokens.size()); })
      .def_property_readonly("output_token_array",
                             [](const FinishedRequest& f) {
                               return py::array_t<int32_t>(static_cast<py::ssize_t>(f.output_tokens.size()),
                                                           f.output_tokens.data());
                             })
      .def_property_readonly("token_times",
                             [](const FinishedRequest& f) {
                               return py::array_t<double>(static_cast<py::ssize_t>(f.token_times.size()),
                                                          f.token_times.data());
                             })
      .def("__repr__", [](const FinishedRequest& f) {
        return "FinishedRequest(id=" + std::to_string(f.id) + ", reason=" + finish_reason_name(f.reason) +
               ", outputs=" + std::to_string(f.output_tokens.size()) + ")";
      });

  // An X-macro list laid out by hand (clang-format does not settle on one layout for it).
  // clang-format off
#define TANDEM_STATS_FIELDS(X)                                                                      \
  X(num_waiting) X(num_running) X(num_preempted) X(num_swapped) X(num_blocks) X(num_free_blocks)    \
  X(num_cached_blocks) X(num_evictable_blocks) X(num_pinned_blocks) X(num_used_blocks)              \
  X(num_host_blocks) X(num_free_host_blocks) X(num_steps) X(num_finished) X(num_aborted)            \
  X(num_preemptions_recompute) X(num_preemptions_swap) X(num_evicted_blocks) X(prompt_tokens)       \
  X(computed_tokens) X(cached_tokens) X(generated_tokens) X(num_admission_cuts) X(num_held_too_long)  \
  X(num_held_waiting)
  // clang-format on
  py::class_<Stats> stats(m, "Stats");
#define TANDEM_READONLY(name) stats.def_readonly(#name, &Stats::name);
  TANDEM_STATS_FIELDS(TANDEM_READONLY)
#undef TANDEM_READONLY
  stats.def("as_dict", [](const Stats& s) {
    py::dict d;
#define TANDEM_ITEM(name) d[#name] = s.name;
    TANDEM_STATS_FIELDS(TANDEM_ITEM)
#undef TANDEM_ITEM
    return d;
  });

  py::class_<Scheduler>(m, "Scheduler")
      .def(py::init<const SchedulerConfig&>(), py::arg("config"))
      .def(
          "add_request",
          [](Scheduler& s, RequestId id, py::handle prompt, int max_new_tokens, py::handle stop_token_ids,
             TokenId eos_token_id, bool ignore_eos, double arrival_time, py::object session_id, int priority,
             py::object cache_namespace) {
            SamplingLimits limits;
            limits.max_new_tokens = max_new_tokens;
            limits.stop_token_ids = to_tokens(stop_token_ids, "stop_token_ids");
            limits.eos_token_id = eos_token_id;
            limits.ignore_eos = ignore_eos;
            std::vector<TokenId> tokens =
                to_tokens(prompt, "prompt_token_ids", static_cast<size_t>(std::max(max_new_tokens, 0)));
            s.add_request(id, std::move(tokens), limits, arrival_time,
                          session_id.is_none() ? std::string() : py::str(session_id).cast<std::string>(), priority,
                          cache_namespace.is_none() ? std::string() : py::str(cache_namespace).cast<std::string>());
          },
          py::arg("request_id"), py::arg("prompt_token_ids"), py::kw_only(), py::arg("max_new_tokens") = 16,
          py::arg("stop_token_ids") = py::tuple(), py::arg("eos_token_id") = -1, py::arg("ignore_eos") = false,
          py::arg("arrival_time") = 0.0, py::arg("session_id") = py::none(), py::arg("priority") = 0,
          py::arg("cache_namespace") = py::none())
      .def(
          "add_continuation",
          [](Scheduler& s, RequestId id, RequestId after, py::handle new_tokens, int max_new_tokens,
             py::handle stop_token_ids, TokenId eos_token_id, bool ignore_eos, double arrival_time,
             const std::string& session_id, int priority, py::object cache_namespace) {
            SamplingLimits limits;
            limits.max_new_tokens = max_new_tokens;
            limits.stop_token_ids = to_tokens(stop_token_ids, "stop_token_ids");
            limits.eos_token_id = eos_token_id;
            limits.ignore_eos = ignore_eos;
            return s.add_continuation(
                id, after, to_tokens(new_tokens, "new_token_ids"), limits, arrival_time, session_id, priority,
                cache_namespace.is_none() ? std::string() : py::str(cache_namespace).cast<std::string>());
          },
          py::arg("request_id"), py::arg("after"), py::arg("new_token_ids"), py::kw_only(),
          py::arg("max_new_tokens") = 16, py::arg("stop_token_ids") = py::tuple(), py::arg("eos_token_id") = -1,
          py::arg("ignore_eos") = false, py::arg("arrival_time") = 0.0, py::arg("session_id"), py::arg("priority") = 0,
          py::arg("cache_namespace") = py::none(),
          "add_request of request `after`'s tokens (prompt + output) + new_token_ids, `after` being the "
          "session's last finished request here; False (nothing changed) when its turn memo is gone: "
          "then add the whole prompt.")
      .def("step", &Scheduler::step, py::arg("now"), py::keep_alive<0, 1>())
      .def(
          "commit",
          [](Scheduler& s, const Plan& plan, py::handle tokens, double now) {
            return s.commit(plan, to_int_vector(tokens, "tokens"), now);
          },
          py::arg("plan"), py::arg("tokens"), py::arg("now"))
      .def("abort", &Scheduler::abort, py::arg("request_id"), py::arg("now"))
      .def("end_session", &Scheduler::end_session, py::arg("session_id"), py::arg("now"))
      .def(
          "cached_prefix_tokens",
          [](const Scheduler& s, py::handle prompt, py::object cache_namespace) {
            return s.cached_prefix_tokens(
                to_tokens(prompt, "prompt_token_ids"),
                cache_namespace.is_none() ? std::string() : py::str(cache_namespace).cast<std::string>());
          },
          py::arg("prompt_token_ids"), py::arg("cache_namespace") = py::none(),
          "Tokens of this prompt a new request would find in the prefix cache now; changes nothing.")
      .def(
          "set_step_cost",
          [](Scheduler& s, py::handle cost) {
            // a sim._native.StepCost (registered by that module: both share this build's type registry)
            if (!py::isinstance<StepCost>(cost)) {
              throw py::type_error("set_step_cost takes a sim._native.StepCost (a cost model's `native`), got " +
                                   std::string(py::str(py::type::of(cost))));
            }
            s.set_step_cost(cost.cast<const StepCost&>());
          },
          py::arg("cost"),
          "The step-cost model the admission policy predicts step times with (a sim._native.StepCost: a cost "
          "model's `native`); the scheduler keeps a copy that counts its own steps.")
      .def_property_readonly("has_step_cost", &Scheduler::has_step_cost)
      .def(
          "snapshot", [](const Scheduler& s) { return std::make_unique<Scheduler>(s.snapshot()); },
          "A copy of the whole state (requests, KV blocks and prefix index, sessions, counters; the policies and "
          "the step cost shared): it plans exactly as this scheduler would from here, and changes nothing here.")
      .def_property_readonly(
          "policies",
          [](const Scheduler& s) {
            const SchedulerConfig& c = s.config();
            return std::map<std::string, std::string>{{"ordering", c.ordering},
                                                      {"eviction", c.eviction},
                                                      {"preemption", c.preemption},
                                                      {"admission", c.admission}};
          },
          "The policy specs in effect, by kind.")
      .def("set_policy", &Scheduler::set_policy, py::arg("kind"), py::arg("spec"),
           "Replaces the ordering, preemption or admission policy by a spec's, between steps.")
      .def("predicted_decode_seconds", &Scheduler::predicted_decode_seconds, py::arg("context"),
           "The decode step of every request here (running or waiting, at its context) and one more of `context` "
           "tokens, by the step cost set (0.0 without one).")
      .def_property_readonly("admission", &Scheduler::admission_name)
      .def("stats", &Scheduler::stats)
      .def("check_invariants", &Scheduler::check_invariants)
      .def("has_unfinished", &Scheduler::has_unfinished)
      .def("has_pending_plan", &Scheduler::has_pending_plan)
      .def_property_readonly("failure", &Scheduler::failure,
                             "The PolicyError message that stopped this scheduler ('' while it runs).")
      .def_property_readonly("num_available_blocks", &Scheduler::num_available_blocks,
                             "Free + evictable device blocks (what a router reads, once per call and replica).")
      .def(
          "request_info", [](const Scheduler& s, RequestId id) { return request_info(s.request(id)); },
          py::arg("request_id"))
      .def(
          "record_kv_events", [](Scheduler& s, bool on) { s.block_pool().record_events(on); }, py::arg("on") = true,
          "Starts (or stops) recording what enters and leaves the prefix index, for drain_kv_events(); "
          "off by default. Changes no decision.")
      .def_property_readonly("recording_kv_events",
                             [](const Scheduler& s) { return s.block_pool().recording_events(); })
      .def(
          "drain_kv_events",
          [](Scheduler& s) { return kv_events_to_python(s.block_pool().take_events(), s.config().block_size); },
          "The KV cache events recorded since the last drain, oldest first, as (kind, block_hashes, "
          "parent_block_hash, token_ids) tuples; kind 'BlockStored' or 'BlockRemoved'.")
      .def(
          "cached_block_hashes",
          [](const Scheduler& s) {
            std::vector<uint64_t> hashes = s.block_pool().cached_hashes();
            std::sort(hashes.begin(), hashes.end());
            return hashes;
          },
          "The block hashes in the prefix index now, sorted.")
      .def_property_readonly("block_size", [](const Scheduler& s) { return s.config().block_size; })
      .def_property_readonly("max_blocks_per_seq", &Scheduler::max_blocks_per_seq)
      .def_property_readonly("ordering", &Scheduler::ordering_name);
}
