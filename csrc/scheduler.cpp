#include "scheduler.h"

#include <algorithm>
#include <cmath>

#include "hashing.h"

namespace tandem {
namespace {

template <typename Policy>
std::shared_ptr<Policy> make_from_spec(PolicyRegistry<Policy>& registry, const std::string& spec) {
  std::string name;
  PolicyParams params;
  parse_policy_spec(spec, &name, &params);
  return registry.make(name, params);
}

std::string str(int64_t v) { return std::to_string(v); }

// Whether any of tokens[0..n) is outside [0, vocab) (vocab > 0). For t in range both t and
// vocab - 1 - t are in [0, 2^31), so their top bits are clear; t < 0 sets the top bit of t,
// t >= vocab that of vocab - 1 - t (as uint32). OR and subtract only, in fixed-size chunks, so
// the compiler's cheap vectorizer takes it (a 50K-token prompt is checked at every turn).
bool any_outside(const TokenId* tokens, size_t n, int vocab) {
  const uint32_t top = static_cast<uint32_t>(vocab) - 1;
  uint32_t acc = 0;
  size_t i = 0;
  constexpr size_t kChunk = 64;
  for (; i + kChunk <= n; i += kChunk) {
    uint32_t a = 0;
    for (size_t k = 0; k < kChunk; ++k) {
      const uint32_t t = static_cast<uint32_t>(tokens[i + k]);
      a |= t | (top - t);
    }
    acc |= a;
  }
  for (; i < n; ++i) {
    const uint32_t t = static_cast<uint32_t>(tokens[i]);
    acc |= t | (top - t);
  }
  return (acc >> 31) != 0;
}

}  // namespace

Scheduler::Scheduler(const SchedulerConfig& config)
    : Scheduler(config, make_from_spec(ordering_registry(), config.ordering),
                make_from_spec(eviction_registry(), config.eviction),
                make_from_spec(preemption_registry(), config.preemption)) {}

Scheduler::Scheduler(const SchedulerConfig& config, std::shared_ptr<OrderingPolicy> ordering,
                     std::shared_ptr<EvictionPolicy> eviction, std::shared_ptr<PreemptionPolicy> preemption)
    : config_(config),
      block_size_(config.block_size),
      ordering_(std::move(ordering)),
      eviction_(std::move(eviction)),
      preemption_(std::move(preemption)),
      admission_(make_from_spec(admission_registry(), config.admission)),
      pool_(config.num_blocks, config.block_size, eviction_),  // validates both
      host_(config.num_host_blocks),
      sessions_(config.block_size) {
  TANDEM_REQUIRE(ordering_ && eviction_ && preemption_, "every policy must be set");
  TANDEM_REQUIRE(config.max_num_seqs > 0, "max_num_seqs must be positive");
  TANDEM_REQUIRE(config.max_num_batched_tokens > 0, "max_num_batched_tokens must be positive");
  TANDEM_REQUIRE(config.chunk_size > 0, "chunk_size must be positive");
  TANDEM_REQUIRE(config.idle_chunk_size >= 0,
                 "idle_chunk_size must be >= 0 (0: chunk_size in every step), got " + str(config.idle_chunk_size));
  TANDEM_REQUIRE(config.max_model_len > 1, "max_model_len must be at least 2");
  TANDEM_REQUIRE(config.vocab_size > 0, "vocab_size must be positive");
  TANDEM_REQUIRE(config.num_lookahead_tokens >= 0 && config.num_lookahead_tokens <= config.block_size,
                 "num_lookahead_tokens must be in [0, block_size]");
  ordering_name_ = ordering_->name();
  admission_name_ = admission_->name();
  ask_admission_ = !admission_->admits_all();
  fixed_order_ = ordering_->key_is_fixed();
  max_blocks_per_seq_ = blocks_for(config.max_model_len);
  block_table_.assign(static_cast<size_t>(config.max_num_seqs) * max_blocks_per_seq_, kNoBlock);
  for (int s = config.max_num_seqs - 1; s >= 0; --s) free_slots_.push_back(s);
  namespaces_.emplace("", 0);
  namespace_roots_.push_back(namespace_hash(""));
}

void Scheduler::check_time(double now, const char* where) const {
  if (!std::isfinite(now)) throw InvalidInput(std::string(where) + ": now must be finite");
  if (now < last_now_) {
    throw InvalidInput(std::string(where) + ": time went backwards (now=" + format_number(now) + " < last " +
                       format_number(last_now_) + ")");
  }
}

// ---------------------------------------------------------------------------
// Requests in

void Scheduler::add_request(RequestId id, std::vector<TokenId> prompt, const SamplingLimits& limits,
                            double arrival_time, const std::string& session_id, int priority,
                            const std::string& cache_namespace) {
  check_request(id, static_cast<int>(prompt.size()), prompt.data(), 0, limits, arrival_time);
  insert_request(id, std::move(prompt), limits, arrival_time, session_id, priority, cache_namespace, nullptr, 0);
}

void Scheduler::check_request(RequestId id, int n, const TokenId* unchecked, int from, const SamplingLimits& limits,
                              double arrival_time) const {
  TANDEM_REQUIRE(!requests_.count(id), "duplicate request id " + str(id));
  TANDEM_REQUIRE(n > 0, "request " + str(id) + ": empty prompt");
  // One branch-free vectorized pass over a ~50K-token prompt; the position only on failure.
  const size_t m = static_cast<size_t>(n - from);
  const bool outside = any_outside(unchecked, m, config_.vocab_size);
  for (size_t i = 0; outside && i < m; ++i) {
    if (unchecked[i] < 0 || unchecked[i] >= config_.vocab_size) {
      throw InvalidInput("request " + str(id) + ": token id " + str(unchecked[i]) + " at position " +
                         str(from + static_cast<int64_t>(i)) + " is outside the vocabulary [0, " +
                         str(config_.vocab_size) + ")");
    }
  }
  TANDEM_REQUIRE(n < config_.max_model_len, "request " + str(id) + ": prompt of " + str(n) +
                                                " tokens does not fit max_model_len " + str(config_.max_model_len) +
                                                " (it must leave room for one output token)");
  TANDEM_REQUIRE(limits.max_new_tokens > 0, "request " + str(id) + ": max_new_tokens must be positive");
  TANDEM_REQUIRE(limits.eos_token_id >= -1 && limits.eos_token_id < config_.vocab_size,
                 "request " + str(id) + ": eos_token_id " + str(limits.eos_token_id) + " is out of range");
  for (TokenId t : limits.stop_token_ids) {
    TANDEM_REQUIRE(t >= 0 && t < config_.vocab_size,
                   "request " + str(id) + ": stop token id " + str(t) + " is outside the vocabulary");
  }
  TANDEM_REQUIRE(std::isfinite(arrival_time), "request " + str(id) + ": arrival_time must be finite");
  // The most KV it can ever hold: every token but the last one sampled.
  const int64_t longest = std::min<int64_t>(static_cast<int64_t>(n) + limits.max_new_tokens, config_.max_model_len);
  const int64_t needed = blocks_for(static_cast<int>(longest - 1));
  TANDEM_REQUIRE(needed <= pool_.num_blocks(),
                 "request " + str(id) + " can never fit in the KV cache: it needs up to " + str(needed) +
                     " blocks of " + str(block_size_) + " tokens and the cache has " + str(pool_.num_blocks()));
}

void Scheduler::insert_request(RequestId id, std::vector<TokenId> prompt, const SamplingLimits& limits,
                               double arrival_time, const std::string& session_id, int priority,
                               const std::string& cache_namespace, TurnMemo* memo, size_t same) {
  const int n = static_cast<int>(prompt.size());
  const int64_t longest = std::min<int64_t>(static_cast<int64_t>(n) + limits.max_new_tokens, config_.max_model_len);
  auto ns_it = namespaces_.find(cache_namespace);
  if (ns_it == namespaces_.end()) {
    ns_it = namespaces_.emplace(cache_namespace, static_cast<uint32_t>(namespace_roots_.size())).first;
    namespace_roots_.push_back(namespace_hash(cache_namespace));
  }
  Request r;
  r.id = id;
  r.seq = next_seq_++;
  r.tokens = std::move(prompt);
  r.tokens.reserve(static_cast<size_t>(longest));
  r.num_prompt_tokens = n;
  r.limits = limits;
  r.session_id = session_id;
  r.ns = ns_it->second;
  r.ns_root = namespace_roots_[r.ns];
  r.priority = priority;
  r.arrival_time = arrival_time;
  if (!session_id.empty()) sessions_.on_arrival(r);
  if (memo != nullptr) {
    sessions_.apply_memo(r, *memo, same);
  } else if (!session_id.empty() && config_.enable_prefix_caching) {
    sessions_.recall_turn(r);
  }
  requests_.emplace(id, std::move(r));
  waiting_.push_back(id);
  ++waiting_version_;
  counters_.prompt_tokens += n;
}

// A session's next request from its memo. The same checks, in the same order, as add_request()
// of the whole prompt: the memo's tokens are a checked prompt and committed (checked) outputs,
// so the first token outside the vocabulary, if any, is a new one, at the same position.
bool Scheduler::add_continuation(RequestId id, RequestId after, const std::vector<TokenId>& new_tokens,
                                 const SamplingLimits& limits, double arrival_time, const std::string& session_id,
                                 int priority, const std::string& cache_namespace) {
  if (session_id.empty() || !config_.enable_prefix_caching) return false;
  const TurnMemo* last = sessions_.memo(session_id);
  if (last == nullptr || last->request != after) return false;
  auto ns = namespaces_.find(cache_namespace);
  if (ns == namespaces_.end() || ns->second != last->ns) return false;
  const size_t same = last->tokens.size();
  const int64_t n = static_cast<int64_t>(same + new_tokens.size());
  TANDEM_REQUIRE(n <= INT32_MAX,
                 "request " + std::to_string(id) + ": prompt of " + std::to_string(n) + " tokens is too long");
  check_request(id, static_cast<int>(n), new_tokens.data(), static_cast<int>(same), limits, arrival_time);
  TurnMemo memo = sessions_.take_memo(session_id);
  std::vector<TokenId> prompt = std::move(memo.tokens);
  // The context grows by a turn's new tokens and outputs every call: reserve geometrically, so
  // that it is copied O(log) times over a session rather than at every call.
  const size_t longest = static_cast<size_t>(std::min<int64_t>(n + limits.max_new_tokens, config_.max_model_len));
  if (prompt.capacity() < longest) prompt.reserve(std::max(longest, 2 * prompt.capacity()));
  prompt.insert(prompt.end(), new_tokens.begin(), new_tokens.end());
  insert_request(id, std::move(prompt), limits, arrival_time, session_id, priority, cache_namespace, &memo, same);
  return true;
}

// ---------------------------------------------------------------------------
// Planning

void Plan::clear() {
  for (auto* v :
       {&query_lens, &cached_lens, &query_start_loc, &slots, &logits_indices, &input_ids, &positions, &kv_ops}) {
    v->clear();
  }
  req_ids.clear();
  sample.clear();
  slot_mapping.clear();
  preempted_ids.clear();
  seqs.clear();
  attn_pairs = kv_read_tokens = decode_kv_tokens = 0;
  num_decode_reqs = num_continuing = 0;
  follows_decode = continues_decode = false;
  num_swap_out_blocks = num_swap_in_blocks = 0;
}

void Plan::reserve(size_t rows) {
  req_ids.reserve(rows);
  seqs.reserve(rows);
  query_lens.reserve(rows);
  cached_lens.reserve(rows);
  slots.reserve(rows);
  sample.reserve(rows);
  logits_indices.reserve(rows);
  query_start_loc.reserve(rows + 1);
  input_ids.reserve(rows);
  positions.reserve(rows);
  slot_mapping.reserve(rows);
}

// A policy that raised (or returned garbage) may have left a decision half applied: the
// scheduler stops, and every later call says why instead of planning from a broken state.
template <typename F>
auto Scheduler::guarded(F&& body) -> decltype(body()) {
  if (!failed_.empty()) throw PolicyError("the scheduler stopped after a policy error: " + failed_);
  try {
    return body();
  } catch (const PolicyError& e) {
    failed_ = e.what();
    throw;
  }
}

void Scheduler::step_into(Plan& plan, double now) {
  guarded([&] { step_impl(plan, now); });
}

void Scheduler::commit(const Plan& plan, const int64_t* tokens, size_t num_tokens, double now,
                       std::vector<FinishedRequest>* finished) {
  guarded([&] { commit_impl(plan, tokens, num_tokens, now, finished); });
}

void Scheduler::abort(RequestId id, double now) {
  guarded([&] { abort_impl(id, now); });
}

int Scheduler::end_session(const std::string& session_id, double now) {
  return guarded([&] { return end_session_impl(session_id, now); });
}

std::shared_ptr<Plan> Scheduler::step(double now) {
  auto plan = std::make_shared<Plan>();
  step_into(*plan, now);
  return plan;
}

// Clears `plan` (keeping its arrays' capacity) and fills it with the next batch.
void Scheduler::step_impl(Plan& plan, double now) {
  check_time(now, "step");
  TANDEM_REQUIRE(pending_step_ == 0,
                 "step(): plan " + str(static_cast<int64_t>(pending_step_)) + " has not been committed");
  TANDEM_REQUIRE(!ask_admission_ || cost_ || !admission_->needs_cost(),
                 policy_label("admission", admission_name_) +
                     " predicts step times: give the scheduler a step cost first (set_step_cost; the simulator "
                     "and the engine give theirs)");
  last_now_ = now;
  pool_.expire_pins(now);

  plan.clear();
  plan.step_id = next_step_++;
  plan.now = now;
  // Room for every request that could run; decodes need one token each, prefills grow the token arrays.
  const size_t rows = std::min(running_.size() + waiting_.size(), static_cast<size_t>(config_.max_num_seqs));
  plan.reserve(rows);
  plan.query_start_loc.push_back(0);
  plan.block_table = block_table_.data();
  plan.block_table_rows = config_.max_num_seqs;
  plan.block_table_cols = max_blocks_per_seq_;
  plan.block_size = block_size_;
  int budget = config_.max_num_batched_tokens;
  step_chunk_ = config_.chunk_size;
  if (config_.idle_chunk_size > config_.chunk_size && !decode_waits()) {
    step_chunk_ = config_.idle_chunk_size;  // nobody's decode stalls: large chunks, and the budget for one
    budget = std::max(budget, config_.idle_chunk_size);
  }
  if (ask_admission_) draft_admission_step();
  bool preempted = false;
  schedule_running(plan, &budget, now, &preempted);
  // A step that preempted admits nothing: swap-outs and swap-ins never share a plan.
  if (!preempted) schedule_waiting(plan, budget, now);
  if (config_.num_lookahead_tokens > 0) grow_lookahead(plan);
  if (plan.num_reqs() > 0) {
    plan.follows_decode = guessed_step_ != 0;
    plan.continues_decode = plan.follows_decode && plan.is_pure_decode() && plan.num_continuing == plan.num_reqs();
  }
  pending_step_ = plan.step_id;
  if (plan.num_reqs() > 0) ++counters_.num_steps;
}

// After every scheduled token has its block: each request this plan samples for also gets the
// blocks of its next num_lookahead_tokens tokens where the pool has them (an allocation as any
// other, so it may evict an unused cached block; it never preempts, and it comes last so that it
// never stands in the way of a scheduled token or an admission).
void Scheduler::grow_lookahead(const Plan& plan) {
  for (int i = 0; i < plan.num_reqs(); ++i) {
    Request& r = requests_.at(plan.req_ids[i]);
    const int end = plan.cached_lens[i] + plan.query_lens[i];
    if (end != r.num_tokens()) continue;  // a prefill chunk short of the prompt's end samples nothing
    grow(r, std::min(end + config_.num_lookahead_tokens, config_.max_model_len));
  }
}

namespace {

// Whether a request's next token is a decode: it has output and all but its last token computed.
bool decode_next(const Request& r) { return r.num_output_tokens() > 0 && r.num_computed + 1 == r.num_tokens(); }

}  // namespace

// Whether a request's next token is a decode while it runs or waits swapped out; a request
// preempted to recompute has its prefill to redo.
bool Scheduler::decode_waits() const {
  for (RequestId id : running_) {
    if (decode_next(requests_.at(id))) return true;
  }
  if (host_.num_free() == host_.num_blocks()) return false;  // nothing is swapped out
  for (RequestId id : waiting_) {
    const Request& r = requests_.at(id);
    if (r.swapped() && decode_next(r)) return true;
  }
  return false;
}

// ---------------------------------------------------------------------------
// Admission (csrc/policies.h AdmissionPolicy): asked only by a policy that does not admit all.

void Scheduler::set_step_cost(const StepCost& cost) {
  cost_ = std::make_shared<const StepCost>(cost.with_own_counts());
}

void Scheduler::set_policy(const std::string& kind, const std::string& spec) {
  TANDEM_REQUIRE(pending_step_ == 0,
                 "set_policy(): plan " + str(static_cast<int64_t>(pending_step_)) + " has not been committed");
  if (kind == "ordering") {
    ordering_ = make_from_spec(ordering_registry(), spec);
    ordering_name_ = ordering_->name();
    fixed_order_ = ordering_->key_is_fixed();
    ordered_version_ = 0;  // the waiting requests are ordered again
    config_.ordering = spec;
  } else if (kind == "preemption") {
    preemption_ = make_from_spec(preemption_registry(), spec);
    config_.preemption = spec;
  } else if (kind == "admission") {
    auto policy = make_from_spec(admission_registry(), spec);
    TANDEM_REQUIRE(cost_ || !policy->needs_cost(), policy_label("admission", policy->name()) +
                                                       " predicts step times: give the scheduler a step cost "
                                                       "first (set_step_cost)");
    admission_ = std::move(policy);
    admission_name_ = admission_->name();
    ask_admission_ = !admission_->admits_all();
    config_.admission = spec;
  } else {
    throw InvalidInput("set_policy(): kind '" + kind +
                       "' is not one of ordering, preemption, admission (the eviction policy orders the cached "
                       "blocks: it is fixed for a scheduler's life)");
  }
}

std::vector<double> Scheduler::arrivals_without_output() const {
  std::vector<double> out;
  for (const auto& [id, r] : requests_) {
    (void)id;
    if (r.num_output_tokens() == 0 && !r.terminal()) out.push_back(r.arrival_time);
  }
  std::sort(out.begin(), out.end());  // an order that does not depend on the hash map's
  return out;
}

Scheduler Scheduler::snapshot() const {
  TANDEM_REQUIRE(pending_step_ == 0, "snapshot(): a plan is in flight; commit it first");
  Scheduler copy(*this);
  // its own step counts: a snapshot may run on another thread than this scheduler (a look-ahead's)
  if (copy.cost_) copy.cost_ = std::make_shared<const StepCost>(copy.cost_->with_own_counts());
  return copy;
}

double Scheduler::predicted_decode_seconds(int context) const {
  TANDEM_REQUIRE(context >= 0, "predicted_decode_seconds: context must be >= 0 tokens");
  if (!cost_) return 0.0;
  StepDraft d;
  d.clear(block_size_, true, true);
  for (RequestId id : running_) d.add(requests_.at(id).num_tokens(), 1, true);
  for (RequestId id : waiting_) d.add(requests_.at(id).num_tokens(), 1, true);
  d.add(context, 1, true);
  return d.seconds(*cost_);
}

// The drafts the policy reads: this step's decodes (each running request whose next token is one;
// schedule_running gives every one of them its token unless KV runs out) and the decode step of
// every running request at its whole context.
void Scheduler::draft_admission_step() {
  draft_.clear(block_size_, guessed_step_ != 0, false);
  steady_.clear(block_size_, true, true);
  for (RequestId id : running_) {
    const Request& r = requests_.at(id);
    if (decode_next(r)) draft_.add(r.num_computed, 1, true);
    steady_.add(r.num_tokens(), 1, true);
  }
}

int Scheduler::admission_chunk(Request& r, int start, int n, bool running, const Plan& plan, double now) {
  if (!ask_admission_ || n <= 0) return n;
  // this plan's copies so far, and the candidate's own swap-in
  draft_.set_swaps(plan.num_swap_out_blocks, plan.num_swap_in_blocks + static_cast<int>(r.host_blocks.size()));
  AdmissionView v;
  v.cost = cost_.get();
  v.now = now;
  v.step = &draft_;
  v.steady = &steady_;
  v.request = view(r);
  v.start = start;
  v.num_tokens = r.num_tokens();
  v.chunk = n;
  v.first = r.first_cached_tokens < 0;
  v.running = running;
  const int k = admission_->chunk(v);
  if (k < 0 || k > n) {
    throw PolicyError(policy_label("admission", admission_name_) + " gave a chunk of " + str(k) +
                      " tokens, outside [0, " + str(n) + "]");
  }
  if (k < n) ++counters_.num_admission_cuts;
  if (k == 0 && !running) {
    r.held = true;
    // strict order: every request still waiting behind it waits on the policy too
    for (RequestId id : waiting_) {
      Request& w = requests_.at(id);
      if (!w.running()) w.held = true;
    }
  }
  return k;
}

// r takes n tokens from `start` in this step; `joins`: it was waiting, so it joins the decodes too.
void Scheduler::admission_took(Request& r, int start, int n, bool joins, double now) {
  if (joins && r.held) {  // (also under "all": a policy switched since may have held it)
    r.held = false;
    const double wait = admission_->max_wait_s();
    if (ask_admission_ && wait > 0 && now - r.arrival_time > wait) ++counters_.num_held_too_long;
  }
  if (!ask_admission_) return;
  draft_.add(start, n, start + n == r.num_tokens());
  if (joins) steady_.add(r.num_tokens(), 1, true);
}

void Scheduler::schedule_running(Plan& plan, int* budget, double now, bool* preempted) {
  if (running_.size() > 1) {
    std::vector<PolicyEntry>& order = running_order_;
    order.clear();
    bool sorted = true;
    for (RequestId id : running_) {
      const Request& r = requests_.at(id);
      order.push_back({checked_key(ordering_->key(view(r)), "ordering", *ordering_), r.seq, id});
      if (order.size() > 1 && policy_before(order[order.size() - 1], order[order.size() - 2])) sorted = false;
    }
    if (!sorted) {
      std::sort(order.begin(), order.end(), policy_before);
      for (size_t i = 0; i < order.size(); ++i) running_[i] = order[i].id;
    }
  }
  size_t i = 0;
  while (i < running_.size() && *budget > 0) {
    Request& r = requests_.at(running_[i]);
    int n = std::min({r.num_tokens() - r.num_computed, *budget, step_chunk_});
    if (ask_admission_ && !decode_next(r)) {
      n = admission_chunk(r, r.num_computed, n, true, plan, now);
      if (n == 0) {  // its prefill waits a step; it keeps its place and its blocks
        ++i;
        continue;
      }
    }
    bool fits = grow(r, r.num_computed + n);
    while (!fits) {
      // Out of KV: preempt the last request in policy order (never one already scheduled).
      Request& victim = requests_.at(running_.back());
      const bool self = &victim == &r;
      preempt(victim, plan, now);
      *preempted = true;
      if (self) break;
      fits = grow(r, r.num_computed + n);
    }
    if (!fits) break;
    if (ask_admission_ && !decode_next(r)) admission_took(r, r.num_computed, n, false, now);
    emit(r, n, plan);
    *budget -= n;
    ++i;
  }
}

void Scheduler::schedule_waiting(Plan& plan, int budget, double now) {
  if (waiting_.empty() || budget <= 0) return;
  // Every admission or resume needs a slot and at least one block.
  if (static_cast<int>(running_.size()) >= config_.max_num_seqs || pool_.num_available() == 0) return;
  const bool match = ordering_->needs_prefix_match() && config_.enable_prefix_caching;
  // Admission goes in policy order and stops at the first request that does not fit. Fixed
  // keys: the waiting requests sorted once per change of the waiting set (a blocked head then
  // costs nothing a step). Other keys: recomputed every step and popped from a heap only as far
  // as admission goes.
  std::vector<PolicyEntry>& order = waiting_order_;
  const bool fixed = fixed_order_ && !match;
  if (!fixed || ordered_version_ != waiting_version_) {
    order.clear();
    for (RequestId id : waiting_) {
      Request& r = requests_.at(id);
      RequestView v = view(r);
      if (match) v.num_cached_tokens = r.swapped() ? r.num_computed : prefix_match(r, nullptr) * block_size_;
      order.push_back({checked_key(ordering_->key(v), "ordering", *ordering_), r.seq, id});
    }
    if (fixed) {
      std::sort(order.begin(), order.end(), policy_before);
      ordered_version_ = waiting_version_;
    } else {
      std::make_heap(order.begin(), order.end(), policy_after);
    }
  }
  size_t admitted = 0;
  while (admitted < order.size()) {
    if (budget <= 0 || static_cast<int>(running_.size()) >= config_.max_num_seqs) break;
    size_t at = admitted;  // fixed: sorted; else the heap's top goes behind it
    if (!fixed) {
      std::pop_heap(order.begin(), order.end() - static_cast<std::ptrdiff_t>(admitted), policy_after);
      at = order.size() - 1 - admitted;
    }
    Request& r = requests_.at(order[at].id);
    const int n = r.swapped() ? (resume_swapped(r, budget, plan, now) ? plan.query_lens.back() : 0)
                              : (admit(r, budget, plan, now) ? plan.query_lens.back() : 0);
    if (n == 0) break;  // strict order: nothing overtakes a request that does not fit
    budget -= n;
    ++admitted;
  }
  if (admitted == 0) return;
  std::vector<RequestId> still;
  still.reserve(waiting_.size() - admitted);
  for (RequestId id : waiting_) {
    if (!requests_.at(id).running()) still.push_back(id);
  }
  waiting_.swap(still);
  ++waiting_version_;
}

// Adds r's next n tokens to the plan.
void Scheduler::emit(Request& r, int n, Plan& plan) {
  const int start = r.num_computed;
  plan.req_ids.push_back(r.id);
  plan.seqs.push_back(r.seq);
  plan.query_lens.push_back(n);
  plan.cached_lens.push_back(start);
  plan.slots.push_back(r.slot);
  const int first = plan.num_tokens();
  if (plan.token_arrays) emit_tokens(r, start, n, plan);
  const bool samples = start + n == r.num_tokens();
  plan.sample.push_back(samples ? 1 : 0);
  if (samples) plan.logits_indices.push_back(first + n - 1);
  plan.query_start_loc.push_back(first + n);
  if (guessed_step_ != 0 && r.last_step == guessed_step_) ++plan.num_continuing;
  r.last_step = plan.step_id;
  r.num_computed_total += n;
  counters_.computed_tokens += n;
  plan.attn_pairs += static_cast<int64_t>(n) * start + static_cast<int64_t>(n) * (n + 1) / 2;
  plan.kv_read_tokens += start + n;
  if (n == 1) {
    ++plan.num_decode_reqs;
    plan.decode_kv_tokens += start + 1;
  }
}

// Appends the token rows of r's tokens [start, start + n) to the plan.
void Scheduler::emit_tokens(const Request& r, int start, int n, Plan& plan) const {
  const size_t first = plan.input_ids.size();
  plan.input_ids.insert(plan.input_ids.end(), r.tokens.begin() + start, r.tokens.begin() + start + n);
  plan.positions.resize(first + n);
  plan.slot_mapping.resize(first + n);
  int32_t* positions = plan.positions.data() + first;
  int64_t* slots = plan.slot_mapping.data() + first;
  for (int k = 0; k < n; ++k) positions[k] = start + k;
  // Slots block by block: block * block_size + offset for each position it covers.
  for (int p = start; p < start + n;) {
    const int end = std::min(start + n, (p / block_size_ + 1) * block_size_);
    const int64_t base =
        static_cast<int64_t>(r.blocks[p / block_size_]) * block_size_ - (p / block_size_) * block_size_;
    for (; p < end; ++p) slots[p - start] = base + p;
  }
}

// ---------------------------------------------------------------------------
// Prefix cache

void Scheduler::extend_hashes(Request& r, int num_full_blocks) {
  while (static_cast<int>(r.block_hashes.size()) < num_full_blocks) {
    const size_t j = r.block_hashes.size();
    const uint64_t parent = j == 0 ? r.ns_root : r.block_hashes[j - 1];
    r.block_hashes.push_back(block_hash(parent, &r.tokens[j * block_size_], block_size_));
  }
}

// Number of leading full blocks of r found in the cache (at least one token is left to compute).
// A waiting request is matched again every step, so the last match is remembered: a
// remembered block still holds the same contents iff its generation is unchanged (a block
// leaves the index only by being reallocated, which bumps the generation); and when no block
// was evicted at all since, there is nothing to re-check.
int Scheduler::prefix_match(Request& r, std::vector<BlockId>* hits) {
  if (!config_.enable_prefix_caching) return 0;
  const int max_blocks = (r.num_tokens() - 1) / block_size_;
  int m = 0;
  const int remembered = std::min(static_cast<int>(r.match_blocks.size()), max_blocks);
  if (r.match_evictions == pool_.num_evicted()) {
    m = remembered;  // nothing was evicted since: every remembered block is still cached
  } else if (!pool_.first_evicted(r.match_evictions, r.match_blocks.data(), remembered, &m)) {
    m = 0;
    while (m < remembered && pool_.generation(r.match_blocks[m]) == r.match_generations[m]) ++m;
  }
  if (m != static_cast<int>(r.match_blocks.size())) r.hits_epoch = 0;  // the match changed
  r.match_blocks.resize(m);
  r.match_generations.resize(m);
  extend_hashes(r, max_blocks);
  for (; m < max_blocks; ++m) {
    const uint64_t parent = m == 0 ? r.ns_root : r.block_hashes[m - 1];
    BlockId b = pool_.lookup(r.block_hashes[m], parent, r.ns, &r.tokens[static_cast<size_t>(m) * block_size_]);
    if (b == kNoBlock) break;
    r.match_blocks.push_back(b);
    r.match_generations.push_back(pool_.generation(b));
    r.hits_epoch = 0;
  }
  r.match_evictions = pool_.num_evicted();
  if (hits) *hits = r.match_blocks;
  return m;
}

int Scheduler::cached_prefix_tokens(const std::vector<TokenId>& prompt, const std::string& cache_namespace) const {
  if (!config_.enable_prefix_caching || prompt.empty()) return 0;
  auto ns = namespaces_.find(cache_namespace);
  if (ns == namespaces_.end()) return 0;  // nothing was ever cached under it
  const int max_blocks = (static_cast<int>(prompt.size()) - 1) / block_size_;
  uint64_t parent = namespace_roots_[ns->second];
  int m = 0;
  for (; m < max_blocks; ++m) {
    const TokenId* tokens = &prompt[static_cast<size_t>(m) * block_size_];
    const uint64_t h = block_hash(parent, tokens, block_size_);
    if (pool_.lookup(h, parent, ns->second, tokens) == kNoBlock) break;
    parent = h;
  }
  return m * block_size_;
}

// Offers r's newly full, computed blocks to the prefix index.
void Scheduler::register_full_blocks(Request& r) {
  const int full = r.num_computed / block_size_;
  if (full <= r.num_registered) return;
  extend_hashes(r, full);
  constexpr int kAhead = 8;  // blocks prefetched ahead (a prefill chunk registers ~128)
  for (int j = r.num_registered; j < full && j < r.num_registered + kAhead; ++j) {
    pool_.prefetch_register(r.blocks[j], r.block_hashes[j]);
  }
  for (int j = r.num_registered; j < full; ++j) {
    if (j + kAhead < full) pool_.prefetch_register(r.blocks[j + kAhead], r.block_hashes[j + kAhead]);
    const uint64_t parent = j == 0 ? r.ns_root : r.block_hashes[j - 1];
    pool_.register_block(r.blocks[j], r.block_hashes[j], parent, r.ns, j,
                         &r.tokens[static_cast<size_t>(j) * block_size_]);
  }
  r.num_registered = full;
}

// ---------------------------------------------------------------------------
// Results in

namespace {

FinishReason stop_reason(const Request& r, TokenId token, int max_model_len) {
  if (!r.limits.ignore_eos && token == r.limits.eos_token_id) return FinishReason::kStop;
  for (TokenId s : r.limits.stop_token_ids) {
    if (s == token) return FinishReason::kStop;
  }
  if (r.num_output_tokens() >= r.limits.max_new_tokens) return FinishReason::kLength;
  if (r.num_tokens() >= max_model_len) return FinishReason::kModelLength;
  return FinishReason::kNone;
}

}  // namespace

std::vector<FinishedRequest> Scheduler::commit(const Plan& plan, const std::vector<int64_t>& tokens, double now) {
  std::vector<FinishedRequest> finished;
  commit(plan, tokens.data(), tokens.size(), now, &finished);
  return finished;
}

void Scheduler::commit_impl(const Plan& plan, const int64_t* tokens, size_t num_tokens, double now,
                            std::vector<FinishedRequest>* finished) {
  TANDEM_REQUIRE(pending_step_ != 0 && plan.step_id == pending_step_,
                 "commit(): plan " + str(static_cast<int64_t>(plan.step_id)) + " is stale (expected plan " +
                     str(static_cast<int64_t>(pending_step_)) + ")");
  check_time(now, "commit");
  TANDEM_REQUIRE(static_cast<int64_t>(num_tokens) == plan.num_sampled(),
                 "commit(): plan " + str(static_cast<int64_t>(plan.step_id)) + " samples " + str(plan.num_sampled()) +
                     " tokens, got " + str(static_cast<int64_t>(num_tokens)));
  for (size_t j = 0; j < num_tokens; ++j) {
    const int64_t t = tokens[j];
    TANDEM_REQUIRE(t >= 0 && t < config_.vocab_size,
                   "commit(): token id " + str(t) + " is outside the vocabulary [0, " + str(config_.vocab_size) + ")");
  }
  last_now_ = now;
  pending_step_ = 0;
  int going_on = 0;  // sampled rows that did not finish here
  size_t k = 0;
  for (int i = 0; i < plan.num_reqs(); ++i) {
    const bool sampled = plan.sample[i] != 0;
    const TokenId token = sampled ? static_cast<TokenId>(tokens[k++]) : -1;
    auto it = requests_.find(plan.req_ids[i]);
    if (it == requests_.end() || it->second.seq != plan.seqs[i]) continue;
    Request& r = it->second;
    if (r.abort_pending) {
      abort_impl(r.id, now);
      continue;
    }
    r.num_computed += plan.query_lens[i];
    if (config_.enable_prefix_caching) register_full_blocks(r);
    if (!sampled) continue;
    r.tokens.push_back(token);
    r.token_times.push_back(now);
    ++counters_.generated_tokens;
    FinishReason reason = stop_reason(r, token, config_.max_model_len);
    if (reason != FinishReason::kNone) {
      finish(r, reason, now, finished);
      continue;
    }
    ++going_on;
    if (r.state == RequestState::kPrefilling) transition(r, RequestState::kDecoding);
  }
  // An engine launched a guess of the next step after this one iff (engine/overlap.py, predict_next)
  // every row decoded and sampled and one goes on; any other non-empty plan drops a guess.
  if (plan.num_reqs() > 0 || !plan.kv_ops.empty()) {
    guessed_step_ = plan.is_pure_decode() && going_on > 0 ? plan.step_id : 0;
  }
}

// ---------------------------------------------------------------------------
// Views

RequestView Scheduler::view(const Request& r) const {
  RequestView v;
  v.id = r.id;
  v.arrival_time = r.arrival_time;
  v.priority = r.priority;
  v.num_prompt_tokens = r.num_prompt_tokens;
  v.num_output_tokens = r.num_output_tokens();
  v.num_computed_tokens = r.num_computed;
  v.num_cached_tokens = r.num_cached_tokens;
  v.num_blocks = static_cast<int>(r.blocks.size());
  v.preempted = r.state == RequestState::kPreempted;
  v.swapped = r.swapped();
  v.session_id = r.session_id;
  v.num_computed_total = r.num_computed_total;
  v.session_turns = r.session_turns;
  v.session_service = r.session_service;
  v.session_last_end = r.session_last_end;
  return v;
}

const Request& Scheduler::request(RequestId id) const {
  auto it = requests_.find(id);
  TANDEM_REQUIRE(it != requests_.end(), "unknown request id " + str(id));
  return it->second;
}

Stats Scheduler::stats() const {
  Stats s = counters_;
  s.num_running = static_cast<int>(running_.size());
  const double max_wait = admission_->max_wait_s();
  for (RequestId id : waiting_) {
    const Request& r = requests_.at(id);
    if (r.state == RequestState::kPreempted) {
      ++s.num_preempted;
      if (r.swapped()) ++s.num_swapped;
    } else {
      ++s.num_waiting;
    }
    if (r.held && max_wait > 0 && last_now_ - r.arrival_time > max_wait) ++s.num_held_waiting;
  }
  s.num_blocks = pool_.num_blocks();
  s.num_free_blocks = pool_.num_free();
  s.num_cached_blocks = pool_.num_cached();
  s.num_evictable_blocks = pool_.num_evictable();
  s.num_pinned_blocks = pool_.num_pinned();
  s.num_used_blocks = pool_.num_blocks() - pool_.num_free() - pool_.num_evictable() - pool_.num_pinned();
  s.num_host_blocks = host_.num_blocks();
  s.num_free_host_blocks = host_.num_free();
  s.num_evicted_blocks = pool_.num_evicted();
  return s;
}

}  // namespace tandem
