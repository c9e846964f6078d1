// pybind11 face of the simulator's native code: `sim._native`.
// Step costs (step_cost.h) and the fast path that runs the replicas' steps in C++ (cluster_forward.h). They drive the
// control plane's Scheduler, whose Python types (Scheduler, Plan, FinishedRequest) controlplane._core registers: the
// two modules share pybind11's type registry (one build, one compiler, no module-local types), so a Scheduler made in
// controlplane is passed here as it is.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cluster_forward.h"
#include "lookahead.h"
#include "py_arrays.h"
#include "scheduler.h"
#include "step_cost.h"

namespace py = pybind11;
using namespace tandem;

namespace {

// A copy of `v` as a 1-D numpy array (a run's per-step arrays: one memcpy, no Python object per step).
template <typename T>
py::array_t<T> to_array(const std::vector<T>& v) {
  return py::array_t<T>(static_cast<py::ssize_t>(v.size()), v.data());
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "Tandem simulator: step costs and the fast path over the control plane's scheduler.";
  // The types this module takes and returns from the control plane are registered there.
  py::module_::import("controlplane._core");

  py::class_<StepCost>(m, "StepCost")
      .def_static(
          "roofline",
          [](double overhead_s, double swap_token_s, std::vector<double> breaks,
             std::vector<std::pair<double, double>> pieces, double head_flop_s, double head_weight_s, double head_act_s,
             double attn_pair_s, double attn_kv_s) {
            RooflineCoefficients c;
            c.overhead_s = overhead_s;
            c.swap_token_s = swap_token_s;
            c.breaks = std::move(breaks);
            for (const auto& [intercept, slope] : pieces) {
              c.intercepts.push_back(intercept);
              c.slopes.push_back(slope);
            }
            c.head_flop_s = head_flop_s;
            c.head_weight_s = head_weight_s;
            c.head_act_s = head_act_s;
            c.attn_pair_s = attn_pair_s;
            c.attn_kv_s = attn_kv_s;
            return StepCost::roofline(std::move(c));
          },
          py::arg("overhead_s"), py::arg("swap_token_s"), py::arg("breaks"), py::arg("pieces"), py::arg("head_flop_s"),
          py::arg("head_weight_s"), py::arg("head_act_s"), py::arg("attn_pair_s"), py::arg("attn_kv_s"))
      .def_static(
          "profile",
          [](const std::vector<std::tuple<std::string, double, double>>& graph_terms,
             const std::vector<std::tuple<std::string, double, double>>& eager_terms,
             const std::vector<std::pair<std::string, double>>& graph_limits,
             const std::vector<std::pair<std::string, double>>& eager_limits, bool graph_observed, bool eager_observed,
             int max_graph_batch) {
            auto path = [](const auto& terms, const auto& limits, bool observed) {
              ProfilePath p;
              for (const auto& [name, knot, coef] : terms) p.terms.push_back({basis_named(name), knot, coef});
              for (const auto& [name, limit] : limits) p.limits.emplace_back(basis_named(name), limit);
              p.observed = observed;
              return p;
            };
            ProfileCoefficients c;
            c.graph = path(graph_terms, graph_limits, graph_observed);
            c.eager = path(eager_terms, eager_limits, eager_observed);
            c.max_graph_batch = max_graph_batch;
            return StepCost::profile(std::move(c));
          },
          py::arg("graph_terms"), py::arg("eager_terms"), py::arg("graph_limits"), py::arg("eager_limits"),
          py::arg("graph_observed"), py::arg("eager_observed"), py::arg("max_graph_batch"))
      .def(
          "seconds",
          [](const StepCost& c, double num_tokens, double num_reqs, double num_sampled, double attn_pairs,
             double kv_read_tokens, double num_swap_out_blocks, double num_swap_in_blocks, double block_size,
             double num_decode_reqs, double decode_kv_tokens, double follows_decode, double continues_decode,
             std::vector<int32_t> query_lens, std::vector<int32_t> cached_lens) {
            TANDEM_REQUIRE(query_lens.size() == cached_lens.size(),
                           "StepCost.seconds: query_lens and cached_lens must have one entry per request");
            StepFeatures f{num_tokens,          num_reqs,          num_sampled, attn_pairs, kv_read_tokens,
                           num_swap_out_blocks, num_swap_in_blocks};
            f.num_decode_reqs = num_decode_reqs;
            f.decode_kv_tokens = decode_kv_tokens;
            f.follows_decode = follows_decode;
            f.continues_decode = continues_decode;
            f.block_size = block_size;
            f.query_lens = query_lens.data();
            f.cached_lens = cached_lens.data();
            f.rows = static_cast<int64_t>(query_lens.size());
            return c.seconds(f);
          },
          py::arg("num_tokens"), py::arg("num_reqs"), py::arg("num_sampled"), py::arg("attn_pairs"),
          py::arg("kv_read_tokens"), py::arg("num_swap_out_blocks"), py::arg("num_swap_in_blocks"),
          py::arg("block_size"), py::arg("num_decode_reqs") = 0.0, py::arg("decode_kv_tokens") = 0.0,
          py::arg("follows_decode") = 0.0, py::arg("continues_decode") = 0.0,
          py::arg("query_lens") = std::vector<int32_t>{}, py::arg("cached_lens") = std::vector<int32_t>{})
      .def_property_readonly(
          "num_steps", [](const StepCost& c) { return c.counts().steps; },
          "Steps priced so far, by this cost and every copy of it (the fast path's).")
      .def_property_readonly(
          "num_extrapolated", [](const StepCost& c) { return c.counts().extrapolated; },
          "Of those, steps outside what the profile covered (profile costs only).")
      .def("reset_counts", &StepCost::reset_counts)
      .def("with_own_counts", &StepCost::with_own_counts,
           "A copy whose steps are counted apart (a look-ahead's runs stay out of a run's counts).")
      .def("plan_seconds", [](const StepCost& c, const Plan& plan) { return c.seconds(plan); }, py::arg("plan"));

  py::class_<LookaheadResult>(m, "LookaheadResult")
      .def_readonly("steps", &LookaheadResult::steps)
      .def_readonly("tokens", &LookaheadResult::tokens)
      .def_readonly("floor_tokens", &LookaheadResult::floor_tokens)
      .def_readonly("first_tokens", &LookaheadResult::first_tokens)
      .def_readonly("ttft_sum", &LookaheadResult::ttft_sum)
      .def_readonly("waiting", &LookaheadResult::waiting)
      .def_readonly("waiting_age_sum", &LookaheadResult::waiting_age_sum)
      .def_readonly("finished", &LookaheadResult::finished)
      .def_readonly("preemptions", &LookaheadResult::preemptions)
      .def_readonly("end", &LookaheadResult::end);
  m.def(
      "run_lookahead",
      [](Scheduler& scheduler, const StepCost& cost, double now, double horizon_s, double floor_s, double idle_s) {
        py::gil_scoped_release free;  // a look-ahead may run on another thread than the plane's loop
        return run_lookahead(scheduler, cost, now, horizon_s, floor_s, idle_s);
      },
      py::arg("scheduler"), py::arg("cost"), py::arg("now"), py::arg("horizon_s"), py::arg("floor_s"),
      py::arg("idle_s") = 0.005,
      "Steps `scheduler` (a snapshot: it is changed) from `now` for `horizon_s` on `cost`, no request arriving, "
      "and says what it delivered (sim/lookahead.py scores candidate policies by it).");

  py::class_<ClusterResult>(m, "ClusterResult")
      .def_property_readonly("starts", [](const ClusterResult& r) { return to_array(r.starts); })
      .def_property_readonly("seconds", [](const ClusterResult& r) { return to_array(r.seconds); })
      .def_property_readonly("num_tokens", [](const ClusterResult& r) { return to_array(r.num_tokens); })
      .def_property_readonly("num_reqs", [](const ClusterResult& r) { return to_array(r.num_reqs); })
      .def_readonly("samples", &ClusterResult::samples)
      .def_property_readonly("num_steps", [](const ClusterResult& r) { return r.starts.size(); })
      .def_readonly("stopped", &ClusterResult::stopped)
      .def_readonly("idle", &ClusterResult::idle)
      .def_readonly("finished", &ClusterResult::finished)
      .def_readonly("stop_time", &ClusterResult::stop_time)
      .def_readonly("stop_eid", &ClusterResult::stop_eid)
      .def_readonly("next_eid", &ClusterResult::next_eid);

  py::class_<ClusterForward>(m, "ClusterForward")
      .def(py::init([](const StepCost& cost, std::vector<Scheduler*> schedulers, py::list token_pools,
                       std::vector<double> sample_at, double sample_interval) {
             std::vector<std::vector<int64_t>> pools;
             for (py::handle pool : token_pools) pools.push_back(to_int_vector(pool, "token_pools"));
             return ClusterForward(cost, std::move(schedulers), std::move(pools), std::move(sample_at),
                                   sample_interval);
           }),
           py::arg("cost"), py::arg("schedulers"), py::arg("token_pools"), py::arg("sample_at"),
           py::arg("sample_interval"), py::keep_alive<1, 3>())
      .def("start", &ClusterForward::start, py::arg("replica"), py::arg("now"), py::arg("eid"),
           "Makes the replica's next plan at `now`; False if it was empty (committed; the replica waits).")
      .def("advance", &ClusterForward::advance, py::arg("h_time"), py::arg("h_priority"), py::arg("h_eid"),
           py::arg("next_eid"), "Commits busy replicas' steps in SimPy queue order before the horizon entry.")
      .def("next", &ClusterForward::next, "(end, eid) of the earliest busy replica's step end; eid -1 if none.");
}
