// The scheduler: request lifecycles, KV ownership and batch planning.
//
//   plan = step(now); tokens = executor.run(plan); commit(plan, tokens, now)
//
// Deterministic: the same calls with the same arguments give the same plans.
#pragma once

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "block_pool.h"
#include "common.h"
#include "policies.h"
#include "request.h"
#include "session_store.h"

namespace tandem {

struct SchedulerConfig {
  int num_blocks = 1024;              // device KV blocks
  int block_size = 16;                // tokens per block
  int num_host_blocks = 0;            // host tier for swap; 0 disables swapping
  int max_num_seqs = 256;             // cap on running requests
  int max_num_batched_tokens = 8192;  // token budget per step
  int chunk_size = 2048;              // largest prefill chunk of one request per step
  // Chunked prefill by what else runs: in a step where no decode waits (no running request, and no
  // request swapped out, whose next token is a decode: it has output and all but its last token
  // computed) a request's prefill chunk may be up to idle_chunk_size tokens, and the step's budget
  // is max(max_num_batched_tokens, idle_chunk_size); chunk_size and max_num_batched_tokens bound
  // every step a decode waits in (its stall). 0, or anything <= chunk_size: chunk_size always.
  int idle_chunk_size = 0;
  int max_model_len = 131072;         // prompt + output
  int vocab_size = 128256;
  bool enable_prefix_caching = true;
  std::string ordering = "fcfs";      // "name" or "name:key=value,..."
  std::string eviction = "lru";
  std::string preemption = "recompute";
  // How much of each prefill chunk, and which new requests, a step takes ("all": everything that
  // fits, as ever; "tps_floor:tok_s=70": what keeps the step-cost model's predicted decode step
  // within a per-user speed floor; csrc/policies.h AdmissionPolicy, docs/policies.md).
  std::string admission = "all";
  // Blocks a decoding request holds ahead of its next token: with 1, a decode step also gives each
  // request the block of the token after the one it samples, so an executor can launch the next
  // decode step before this one's token is back (engine/overlap.py). Taken only when free; 0: none.
  int num_lookahead_tokens = 0;
};

// One step's batch, as flat arrays (see controlplane/_core.pyi for the picture).
struct Plan {
  uint64_t step_id = 0;
  double now = 0.0;
  // per scheduled request (R rows, in batch order)
  std::vector<int64_t> req_ids;
  std::vector<int32_t> query_lens;       // tokens computed this step
  std::vector<int32_t> cached_lens;      // tokens already in the KV cache before this step
  std::vector<int32_t> query_start_loc;  // R + 1 offsets into the token arrays
  std::vector<int32_t> slots;            // row of each request in the persistent block table
  std::vector<uint8_t> sample;           // 1 if this step ends with a sampled token for it
  std::vector<int32_t> logits_indices;   // token index whose logits are sampled, S rows
  // per token (T entries); filled only if `token_arrays` (a simulated executor has no model to
  // feed: the fast path's plans carry the per-request rows and features only, T included)
  bool token_arrays = true;
  std::vector<int32_t> input_ids;
  std::vector<int32_t> positions;
  std::vector<int64_t> slot_mapping;     // block * block_size + offset where its KV goes
  // KV copies to run before the forward pass, in order: (op, src, dst), op 0 = device->host
  // (swap out), 1 = host->device (swap in). A plan never holds both kinds.
  std::vector<int32_t> kv_ops;
  std::vector<int64_t> preempted_ids;    // requests preempted while building this plan
  std::vector<uint64_t> seqs;            // internal: admission numbers, for commit
  // Features for step-cost models and profiles (see sim/cost.py): attention work of the batch.
  int64_t attn_pairs = 0;      // sum of causal (query, key) pairs: q*c + q*(q+1)/2 per request
  int64_t kv_read_tokens = 0;  // sum of c + q: KV tokens attention reads
  int num_decode_reqs = 0;       // requests with q == 1 (the engine's decode rows)
  int64_t decode_kv_tokens = 0;  // sum of c + 1 over those rows (their share of kv_read_tokens)
  int num_swap_out_blocks = 0;
  int num_swap_in_blocks = 0;
  // Where the plan sits in the sequence (an engine with overlapped decode runs a guess of the next
  // pure-decode step while the host commits, engine/overlap.py):
  //   follows_decode:   the last non-empty plan committed was a pure decode (T == R == S) with a
  //                     request that went on after it (the engine launched a guess of this step);
  //   continues_decode: that, and this plan is a pure decode of requests all in that plan (the
  //                     engine's guess is this step).
  bool follows_decode = false;
  bool continues_decode = false;
  int num_continuing = 0;        // internal: rows that were in the plan of follows_decode
  // The scheduler's persistent block table (rows = slots): valid from step() until this plan
  // is committed (commit frees the rows of finished requests).
  const BlockId* block_table = nullptr;
  int block_table_rows = 0;
  int block_table_cols = 0;
  int block_size = 0;

  int num_reqs() const { return static_cast<int>(req_ids.size()); }
  void clear();               // empty arrays (capacity kept), features and ids reset
  void reserve(size_t rows);  // room for `rows` requests of one token each
  int num_tokens() const { return query_start_loc.empty() ? 0 : query_start_loc.back(); }
  int num_sampled() const { return static_cast<int>(logits_indices.size()); }
  // Every row computes one token and samples it (the engine's decode graphs run these).
  bool is_pure_decode() const { return num_reqs() > 0 && num_tokens() == num_reqs() && num_sampled() == num_reqs(); }
};

struct FinishedRequest {
  RequestId id = 0;
  FinishReason reason = FinishReason::kNone;
  int num_prompt_tokens = 0;
  int num_cached_tokens = 0;  // prefix-cache hit at first admission
  int num_preemptions = 0;
  int64_t num_computed_tokens = 0;  // recomputation included
  std::vector<TokenId> output_tokens;
  // Lifecycle times, all `now` values the caller passed in.
  double arrival_time = 0.0;
  double first_scheduled_time = 0.0;
  std::vector<double> token_times;  // one per output token: its commit time
};

struct Stats {
  int num_waiting = 0, num_running = 0, num_preempted = 0, num_swapped = 0;
  int num_blocks = 0, num_free_blocks = 0, num_cached_blocks = 0, num_evictable_blocks = 0, num_pinned_blocks = 0,
      num_used_blocks = 0;
  int num_host_blocks = 0, num_free_host_blocks = 0;
  int64_t num_steps = 0, num_finished = 0, num_aborted = 0;
  int64_t num_preemptions_recompute = 0, num_preemptions_swap = 0, num_evicted_blocks = 0;
  int64_t prompt_tokens = 0, computed_tokens = 0, cached_tokens = 0, generated_tokens = 0;
  // The admission policy: chunks it cut or refused; requests it held that were admitted more than
  // its max_wait_s after arriving; and requests it holds that have waited that long (at the last step).
  int64_t num_admission_cuts = 0, num_held_too_long = 0;
  int num_held_waiting = 0;
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& config);
  Scheduler(const SchedulerConfig& config, std::shared_ptr<OrderingPolicy> ordering,
            std::shared_ptr<EvictionPolicy> eviction, std::shared_ptr<PreemptionPolicy> preemption);

  void add_request(RequestId id, std::vector<TokenId> prompt, const SamplingLimits& limits, double arrival_time,
                   const std::string& session_id, int priority, const std::string& cache_namespace);
  // add_request() of the prompt `after`'s tokens (its prompt, then its output) + `new_tokens`,
  // where `after` is the session's last finished request here: an agent's next call without its
  // whole context sent again. The tokens come from the session's turn memo; false (and nothing
  // changes) when that memo is not `after`'s (gone, or never taken): then send the whole prompt.
  bool add_continuation(RequestId id, RequestId after, const std::vector<TokenId>& new_tokens,
                        const SamplingLimits& limits, double arrival_time, const std::string& session_id, int priority,
                        const std::string& cache_namespace);
  std::shared_ptr<Plan> step(double now);
  // step() into a caller's plan, reusing its arrays (the simulator's fast path, csrc/sim/cluster_forward.h).
  void step_into(Plan& plan, double now);
  std::vector<FinishedRequest> commit(const Plan& plan, const std::vector<int64_t>& tokens, double now);
  // commit() appending what finished to `finished`.
  void commit(const Plan& plan, const int64_t* tokens, size_t num_tokens, double now,
              std::vector<FinishedRequest>* finished);
  void abort(RequestId id, double now);
  int end_session(const std::string& session_id, double now);

  // Tokens of `prompt` a new request would find in the prefix cache now (read-only; routers use it).
  int cached_prefix_tokens(const std::vector<TokenId>& prompt, const std::string& cache_namespace) const;

  // The step-cost model an admission policy predicts with (the one the plane prices or measures its
  // steps by); a policy that needs one refuses to step without it. Kept as a copy with its own counts.
  void set_step_cost(const StepCost& cost);
  bool has_step_cost() const { return cost_ != nullptr; }
  // The decode step of every request here (running or waiting, each at its context) and one more of
  // `context` tokens, by the step cost (0 without one): what a floor-aware router asks (RouterPolicy).
  double predicted_decode_seconds(int context) const;
  const std::string& admission_name() const { return admission_name_; }
  // Replaces the `kind` policy ("ordering", "preemption" or "admission") by `spec`'s, between steps (a
  // look-ahead controller's choice; the eviction policy orders the cached blocks and stays for life).
  // A copy of the scheduler (its copy constructor: a deterministic snapshot of the whole state, the
  // policies shared) may be given other policies and run forward without touching this one.
  void set_policy(const std::string& kind, const std::string& spec);
  // The copy described above, with a step cost of its own counts (no state shared with this one but the
  // immutable policies and cost coefficients); refused while a plan is in flight.
  Scheduler snapshot() const;
  // Arrival times of the requests here that have no output token yet (waiting, or prefilling).
  std::vector<double> arrivals_without_output() const;

  Stats stats() const;
  void check_invariants() const;
  bool has_unfinished() const { return !requests_.empty(); }
  bool has_pending_plan() const { return pending_step_ != 0; }
  // The PolicyError that stopped this scheduler ("" while it runs).
  const std::string& failure() const { return failed_; }
  int num_available_blocks() const { return pool_.num_available(); }
  const Request& request(RequestId id) const;

  const SchedulerConfig& config() const { return config_; }
  const std::string& ordering_name() const { return ordering_name_; }
  int max_blocks_per_seq() const { return max_blocks_per_seq_; }
  // The persistent block table: max_num_seqs rows of max_blocks_per_seq entries, -1 = none.
  const std::vector<BlockId>& block_table() const { return block_table_; }
  // The device block pool, for its KV event recorder (block_pool.h KvEventLog) and read-only queries.
  BlockPool& block_pool() { return pool_; }
  const BlockPool& block_pool() const { return pool_; }

 private:
  // --- transitions: the only places where blocks and slots change owner ---
  bool admit(Request& r, int budget, Plan& plan, double now);
  bool resume_swapped(Request& r, int budget, Plan& plan, double now);
  void preempt(Request& r, Plan& plan, double now);
  void finish(Request& r, FinishReason reason, double now, std::vector<FinishedRequest>* out);
  void release_device(Request& r, double now);
  void remember_own_match(Request& r);  // at a recompute preemption (csrc/transitions.cpp)
  void step_impl(Plan& plan, double now);
  void commit_impl(const Plan& plan, const int64_t* tokens, size_t num_tokens, double now,
                   std::vector<FinishedRequest>* finished);
  void abort_impl(RequestId id, double now);
  int end_session_impl(const std::string& session_id, double now);

  // --- requests in (csrc/scheduler.cpp) ---
  // add_request()'s checks of a prompt of n tokens, whose tokens from position `from` on are
  // unchecked[0..n - from) (the ones before are known to be in the vocabulary).
  void check_request(RequestId id, int n, const TokenId* unchecked, int from, const SamplingLimits& limits,
                     double arrival_time) const;
  // Enters a checked request; `memo` (the session's taken memo, its first `same` tokens those of
  // the prompt) or, if null, the session's memo if any, starts its hashes and prefix match.
  void insert_request(RequestId id, std::vector<TokenId> prompt, const SamplingLimits& limits, double arrival_time,
                      const std::string& session_id, int priority, const std::string& cache_namespace, TurnMemo* memo,
                      size_t same);

  // --- planning helpers ---
  bool decode_waits() const;  // a decode is running or swapped out (see SchedulerConfig::idle_chunk_size)
  // The admission policy's share of r's next chunk of n tokens from `start` (n when it admits all);
  // admission_took() then enters what the step took into the drafts the policy reads.
  void draft_admission_step();
  int admission_chunk(Request& r, int start, int n, bool running, const Plan& plan, double now);
  void admission_took(Request& r, int start, int n, bool joins, double now);
  void schedule_running(Plan& plan, int* budget, double now, bool* preempted);
  void schedule_waiting(Plan& plan, int budget, double now);
  void grow_lookahead(const Plan& plan);
  void emit(Request& r, int n, Plan& plan);
  void emit_tokens(const Request& r, int start, int n, Plan& plan) const;
  bool grow(Request& r, int new_total_tokens);
  int blocks_for(int tokens) const { return (tokens + block_size_ - 1) / block_size_; }
  int prefix_match(Request& r, std::vector<BlockId>* hits);
  void extend_hashes(Request& r, int num_full_blocks);
  void register_full_blocks(Request& r);
  RequestView view(const Request& r) const;
  int take_slot();
  void free_slot(Request& r);
  void check_time(double now, const char* where) const;
  // Runs a public mutator; a PolicyError stops the scheduler (later calls rethrow it).
  template <typename F>
  auto guarded(F&& body) -> decltype(body());

  SchedulerConfig config_;
  int block_size_;
  int step_chunk_ = 0;  // this step's largest prefill chunk of one request (set by step_impl)
  int max_blocks_per_seq_;
  std::string ordering_name_;
  std::shared_ptr<OrderingPolicy> ordering_;
  std::shared_ptr<EvictionPolicy> eviction_;
  std::shared_ptr<PreemptionPolicy> preemption_;
  std::shared_ptr<AdmissionPolicy> admission_;
  std::string admission_name_;
  bool ask_admission_ = false;                // !admission_->admits_all()
  std::shared_ptr<const StepCost> cost_;      // set_step_cost's copy
  StepDraft draft_, steady_;                  // AdmissionView::step and ::steady of the step being planned
  BlockPool pool_;
  HostPool host_;

  std::unordered_map<RequestId, Request> requests_;
  std::vector<RequestId> waiting_;  // WAITING and PREEMPTED, unordered; sorted by policy per step
  // A request in policy order: (key, seq), seq unique.
  struct PolicyEntry {
    OrderKey key;
    uint64_t seq;
    RequestId id;  // (not a pointer: a copied Scheduler keeps a valid order)
  };
  static bool policy_before(const PolicyEntry& a, const PolicyEntry& b) {
    if (a.key < b.key) return true;
    if (b.key < a.key) return false;
    return a.seq < b.seq;
  }
  static bool policy_after(const PolicyEntry& a, const PolicyEntry& b) { return policy_before(b, a); }
  // schedule_waiting's order of the waiting requests: with a fixed-key ordering policy, sorted
  // and valid while ordered_version_ == waiting_version_ (bumped by every change of waiting_).
  std::vector<PolicyEntry> waiting_order_;
  bool fixed_order_ = false;  // ordering_->key_is_fixed()
  uint64_t waiting_version_ = 1;
  uint64_t ordered_version_ = 0;
  std::vector<PolicyEntry> running_order_;  // schedule_running's scratch
  std::vector<RequestId> running_;  // PREFILLING and DECODING
  std::vector<BlockId> block_table_;
  std::vector<int> free_slots_;     // stack; lowest slot on top
  std::unordered_map<std::string, uint32_t> namespaces_;
  std::vector<uint64_t> namespace_roots_;
  SessionStore sessions_;  // pins, turn memos and histories of sessions
  std::string failed_;  // the PolicyError that stopped this scheduler, if any

  uint64_t next_seq_ = 1;
  uint64_t next_step_ = 1;
  uint64_t pending_step_ = 0;
  uint64_t guessed_step_ = 0;  // the committed pure-decode plan an engine would guess a successor of (0: none)
  double last_now_ = kNever;
  Stats counters_;
};

}  // namespace tandem
