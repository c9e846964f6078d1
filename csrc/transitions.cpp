// The scheduler's transitions: the only places where a request's blocks,
// host blocks and block-table slot change owner (see request.h for the FSM).
//
//   admit           WAITING    -> PREFILLING   takes prefix-cache hits + new blocks + a slot
//   resume_swapped  PREEMPTED  -> PREFILLING | DECODING   host blocks -> new device blocks
//   preempt         running    -> PREEMPTED    device blocks -> host (swap) or dropped (recompute)
//   finish          running    -> FINISHED     blocks -> prefix cache (pinned for a session turn)
//   abort           any live   -> ABORTED      everything released
//   grow            (running, no state change)  takes new blocks for its next tokens
#include <algorithm>
#include <cmath>

#include "scheduler.h"

namespace tandem {
namespace {

void erase_id(std::vector<RequestId>& ids, RequestId id) {
  auto it = std::find(ids.begin(), ids.end(), id);
  if (it != ids.end()) ids.erase(it);
}

}  // namespace

// Gives r blocks for its first `total_tokens` tokens; false (nothing changed) if the pool can't.
bool Scheduler::grow(Request& r, int total_tokens) {
  const int need = blocks_for(total_tokens) - static_cast<int>(r.blocks.size());
  if (need <= 0) return true;
  if (pool_.num_available() < need) return false;
  BlockId* row = &block_table_[static_cast<size_t>(r.slot) * max_blocks_per_seq_];
  const size_t have = r.blocks.size();
  r.blocks.resize(have + need);
  pool_.allocate_n(need, r.blocks.data() + have);
  std::copy(r.blocks.begin() + static_cast<std::ptrdiff_t>(have), r.blocks.end(), row + have);
  return true;
}

bool Scheduler::admit(Request& r, int budget, Plan& plan, double now) {
  if (pool_.num_available() == 0) return false;  // every admission needs at least one new block
  const int matched = prefix_match(r, nullptr);
  const std::vector<BlockId>& hits = r.match_blocks;  // matched blocks, in order
  const int start = matched * block_size_;
  const int n = admission_chunk(r, start, std::min({r.num_tokens() - start, budget, step_chunk_}), false, plan, now);
  if (n == 0) return false;
  const int need = blocks_for(start + n) - matched;
  // Hits that are evictable stop being available once retained. Count them only when the
  // answer depends on it (0 <= evictable hits <= min(hits, evictable blocks)).
  const int available = pool_.num_available();
  if (available < need) return false;
  if (available - std::min(matched, pool_.num_evictable()) < need) {
    // Blocked iff more than `spare` hits are evictable: a count may stop once it says so, and a
    // lower bound above `spare` answers as well as the exact count would.
    const int spare = available - need;
    if (r.hits_epoch != pool_.evictable_epoch() || (!r.hits_complete && r.hits_evictable <= spare)) {
      r.hits_evictable = pool_.count_evictable(hits.data(), hits.size(), spare + 1, &r.hits_complete);
      r.hits_epoch = pool_.evictable_epoch();
    }
    if (r.hits_evictable > spare) return false;
  }
  r.hits_epoch = 0;

  r.slot = take_slot();
  BlockId* row = &block_table_[static_cast<size_t>(r.slot) * max_blocks_per_seq_];
  r.blocks.reserve(static_cast<size_t>(blocks_for(r.num_tokens())));
  pool_.retain_all(hits.data(), hits.size(), now);
  std::copy(hits.begin(), hits.end(), row + r.blocks.size());
  r.blocks.insert(r.blocks.end(), hits.begin(), hits.end());
  r.num_computed = start;
  r.num_registered = matched;
  r.num_cached_tokens = start;
  r.match_blocks.clear();  // running now: its blocks are its own (the capacity is kept for a
  r.match_generations.clear();  // preemption's remember_own_match)
  if (r.first_cached_tokens < 0) {
    r.first_cached_tokens = start;
    r.first_scheduled_time = now;
    counters_.cached_tokens += start;
  }
  grow(r, start + n);
  admission_took(r, start, n, true, now);
  transition(r, RequestState::kPrefilling);
  running_.push_back(r.id);
  emit(r, n, plan);
  return true;
}

bool Scheduler::resume_swapped(Request& r, int budget, Plan& plan, double now) {
  const int start = r.num_computed;
  const int n = admission_chunk(r, start, std::min({r.num_tokens() - start, budget, step_chunk_}), false, plan, now);
  if (n == 0) return false;
  const int held = static_cast<int>(r.host_blocks.size());
  if (pool_.num_available() < blocks_for(start + n)) return false;

  r.slot = take_slot();
  BlockId* row = &block_table_[static_cast<size_t>(r.slot) * max_blocks_per_seq_];
  for (int k = 0; k < held; ++k) {
    BlockId b = pool_.allocate();
    plan.kv_ops.insert(plan.kv_ops.end(), {1, r.host_blocks[k], b});
    ++plan.num_swap_in_blocks;
    host_.release(r.host_blocks[k]);
    row[r.blocks.size()] = b;
    r.blocks.push_back(b);
  }
  r.host_blocks.clear();
  r.num_registered = 0;  // fresh device copies: offered to the index again at commit
  grow(r, start + n);
  admission_took(r, start, n, true, now);
  const bool decoding = start + 1 == r.num_tokens() && r.num_output_tokens() > 0;
  transition(r, decoding ? RequestState::kDecoding : RequestState::kPrefilling);
  running_.push_back(r.id);
  emit(r, n, plan);
  return true;
}

void Scheduler::preempt(Request& r, Plan& plan, double now) {
  // the blocks holding its computed tokens (not those held ahead of its next tokens: nothing is in them)
  const int held = std::min(static_cast<int>(r.blocks.size()), blocks_for(r.num_computed));
  PreemptMode mode = preemption_->mode(view(r), host_.num_free(), held);
  if (mode == PreemptMode::kSwap && held > 0 && host_.num_free() >= held) {
    for (int k = 0; k < held; ++k) {
      const BlockId b = r.blocks[k];
      int h = host_.allocate();
      plan.kv_ops.insert(plan.kv_ops.end(), {0, b, h});
      ++plan.num_swap_out_blocks;
      r.host_blocks.push_back(h);
    }
    ++counters_.num_preemptions_swap;
  } else {
    r.num_computed = 0;  // recompute: the KV is dropped, the tokens (and their hashes) are kept
    ++counters_.num_preemptions_recompute;
    remember_own_match(r);
  }
  release_device(r, now);
  r.num_registered = 0;
  r.num_preemptions += 1;
  transition(r, RequestState::kPreempted);
  erase_id(running_, r.id);
  waiting_.push_back(r.id);
  ++waiting_version_;
  plan.preempted_ids.push_back(r.id);
}

// A request preempted to recompute remembers its leading cached blocks as its prefix match (as
// a turn memo does), so re-admitting it re-checks them instead of looking each one up again:
// the same match, since a remembered block is kept only while it has not been evicted.
void Scheduler::remember_own_match(Request& r) {
  if (!config_.enable_prefix_caching) return;
  const int n = std::min(r.num_registered, static_cast<int>(r.blocks.size()));
  r.match_blocks.clear();
  r.match_generations.clear();
  r.match_blocks.reserve(static_cast<size_t>(n));
  r.match_generations.reserve(static_cast<size_t>(n));
  for (int j = 0; j < n && pool_.is_cached(r.blocks[j]); ++j) {
    if (j + 8 < n) pool_.prefetch(r.blocks[j + 8]);
    r.match_blocks.push_back(r.blocks[j]);
    r.match_generations.push_back(pool_.generation(r.blocks[j]));
  }
  r.match_evictions = pool_.num_evicted();
}

void Scheduler::release_device(Request& r, double now) {
  BlockId* row = &block_table_[static_cast<size_t>(r.slot) * max_blocks_per_seq_];
  pool_.release_all(r.blocks.data(), r.blocks.size(), now, r.priority);  // tail first
  std::fill(row, row + r.blocks.size(), kNoBlock);
  r.blocks.clear();
  free_slot(r);
}

void Scheduler::finish(Request& r, FinishReason reason, double now, std::vector<FinishedRequest>* out) {
  transition(r, RequestState::kFinished);
  r.finish_reason = reason;
  const bool memo = !r.session_id.empty() && config_.enable_prefix_caching;
  if (memo) sessions_.pin_turn(r, now, pool_, *eviction_);
  if (!r.session_id.empty()) sessions_.on_turn_end(r, now);
  std::vector<BlockId> cached;  // its leading blocks in the prefix index, for the session's next turn
  if (memo) {
    const int n = std::min(r.num_registered, static_cast<int>(r.blocks.size()));
    cached.reserve(static_cast<size_t>(n));
    for (int j = 0; j < n && pool_.is_cached(r.blocks[j]); ++j) {
      if (j + 8 < n) pool_.prefetch(r.blocks[j + 8]);
      cached.push_back(r.blocks[j]);
    }
  }
  release_device(r, now);
  erase_id(running_, r.id);
  FinishedRequest f;
  f.id = r.id;
  f.reason = reason;
  f.num_prompt_tokens = r.num_prompt_tokens;
  f.num_cached_tokens = std::max(0, r.first_cached_tokens);
  f.num_computed_tokens = r.num_computed_total;
  f.arrival_time = r.arrival_time;
  f.first_scheduled_time = r.first_scheduled_time;
  f.token_times = std::move(r.token_times);
  f.num_preemptions = r.num_preemptions;
  f.output_tokens.assign(r.tokens.begin() + r.num_prompt_tokens, r.tokens.end());
  out->push_back(std::move(f));
  if (memo) sessions_.remember_turn(r, std::move(cached), pool_);
  ++counters_.num_finished;
  requests_.erase(r.id);
}

int Scheduler::take_slot() {
  TANDEM_CHECK(!free_slots_.empty(), "no free slot although running < max_num_seqs");
  int s = free_slots_.back();
  free_slots_.pop_back();
  return s;
}

void Scheduler::free_slot(Request& r) {
  if (r.slot < 0) return;
  free_slots_.push_back(r.slot);
  r.slot = -1;
}

void Scheduler::abort_impl(RequestId id, double now) {
  check_time(now, "abort");
  auto it = requests_.find(id);
  TANDEM_REQUIRE(it != requests_.end(),
                 "abort(): unknown request id " + std::to_string(id) + " (never added, or already finished)");
  Request& r = it->second;
  if (pending_step_ != 0 && r.last_step == pending_step_ && r.running()) {
    r.abort_pending = true;  // its blocks are being written by the plan in flight
    return;
  }
  if (r.running()) {
    release_device(r, now);
    erase_id(running_, id);
  } else {
    for (int h : r.host_blocks) host_.release(h);
    r.host_blocks.clear();
    erase_id(waiting_, id);
    ++waiting_version_;
  }
  transition(r, RequestState::kAborted);
  r.finish_reason = FinishReason::kAbort;
  if (!r.session_id.empty()) sessions_.on_abort(r);
  ++counters_.num_aborted;
  requests_.erase(it);
}

int Scheduler::end_session_impl(const std::string& session_id, double now) {
  check_time(now, "end_session");
  return sessions_.end_session(session_id, now, pool_);
}

}  // namespace tandem
