// Scheduler::check_invariants (and the SessionStore's): the ownership rules of ARCHITECTURE.md as code.
#include <algorithm>

#include "hashing.h"
#include "scheduler.h"

namespace tandem {
namespace {

[[noreturn]] void violated(const std::string& what, RequestId id) {
  throw InvariantViolation("scheduler invariant: " + what + " (request " + std::to_string(id) + ")");
}

// hashes[j] is block j's chained hash over `tokens`.
bool hashes_chain(uint64_t root, const std::vector<TokenId>& tokens, const std::vector<uint64_t>& hashes,
                  int block_size) {
  if (hashes.size() * block_size > tokens.size()) return false;
  uint64_t parent = root;
  for (size_t j = 0; j < hashes.size(); ++j) {
    if (block_hash(parent, &tokens[j * block_size], block_size) != hashes[j]) return false;
    parent = hashes[j];
  }
  return true;
}

}  // namespace

// Turn memos: hashes of their own tokens, blocks within them, the token count kept exact.
void SessionStore::check_invariants(const std::vector<uint64_t>& namespace_roots) const {
  int64_t tokens = 0;
  for (const auto& [session, memo] : turn_memos_) {
    tokens += static_cast<int64_t>(memo.tokens.size());
    if (!hashes_chain(namespace_roots[memo.ns], memo.tokens, memo.block_hashes, block_size_) ||
        memo.blocks.size() > memo.block_hashes.size() || memo.generations.size() != memo.blocks.size())
      throw InvariantViolation("scheduler invariant: turn memo of session '" + session + "' is inconsistent");
  }
  if (tokens != memo_tokens_) throw InvariantViolation("scheduler invariant: turn memo token count is off");
}

void Scheduler::check_invariants() const {
  std::vector<int> holders(pool_.num_blocks(), 0);
  std::vector<int> host_holders(host_.num_blocks(), 0);
  std::vector<uint8_t> slot_used(config_.max_num_seqs, 0);
  size_t n_running = 0, n_waiting = 0;

  for (const auto& [id, r] : requests_) {
    if (r.id != id) violated("stored under the wrong id", id);
    if (!hashes_chain(r.ns_root, r.tokens, r.block_hashes, block_size_))
      violated("block hashes differ from its tokens'", id);
    if (r.terminal()) violated("terminal request still stored", id);
    if (r.num_computed < 0 || r.num_computed >= r.num_tokens()) violated("computed tokens out of [0, num_tokens)", id);
    if (r.num_tokens() > config_.max_model_len) violated("longer than max_model_len", id);
    if (r.num_output_tokens() > r.limits.max_new_tokens) violated("more outputs than max_new_tokens", id);
    for (BlockId b : r.blocks) {
      if (b < 0 || b >= pool_.num_blocks()) violated("block id out of range", id);
      holders[b] += 1;
    }
    for (int h : r.host_blocks) host_holders[h] += 1;

    if (r.running()) {
      ++n_running;
      if (std::count(running_.begin(), running_.end(), id) != 1) violated("running but not listed once", id);
      if (r.slot < 0 || r.slot >= config_.max_num_seqs || slot_used[r.slot]) violated("bad or shared slot", id);
      slot_used[r.slot] = 1;
      if (!r.host_blocks.empty()) violated("running while holding host blocks", id);
      const int want = blocks_for(r.num_computed);
      const int have = static_cast<int>(r.blocks.size());
      // Between step and commit a request also holds the blocks its scheduled tokens go to.
      if (have < want || have > max_blocks_per_seq_) violated("holds too few or too many blocks", id);
      // ... and, with lookahead, the blocks of its next few tokens
      const int ahead = blocks_for(std::min(r.num_computed + config_.num_lookahead_tokens, config_.max_model_len));
      if (pending_step_ == 0 && (have < want || have > ahead)) violated("holds blocks it has not written", id);
      const BlockId* row = &block_table_[static_cast<size_t>(r.slot) * max_blocks_per_seq_];
      for (int j = 0; j < have; ++j) {
        if (row[j] != r.blocks[j]) violated("block table row differs from the block list", id);
      }
      if (have < max_blocks_per_seq_ && row[have] != kNoBlock) violated("block table row has a stale tail", id);
      // Cached blocks it holds must hold its own tokens (and so hash to them).
      uint64_t parent = r.ns_root;
      for (int j = 0; j < have && (j + 1) * block_size_ <= r.num_computed; ++j) {
        const TokenId* t = &r.tokens[static_cast<size_t>(j) * block_size_];
        const uint64_t h = block_hash(parent, t, block_size_);
        if (pool_.is_cached(r.blocks[j]) && pool_.lookup(h, parent, r.ns, t) != r.blocks[j])
          violated("holds a cached block whose tokens are not its own", id);
        parent = h;
      }
    } else {
      ++n_waiting;
      if (std::count(waiting_.begin(), waiting_.end(), id) != 1) violated("waiting but not listed once", id);
      if (!r.blocks.empty() || r.slot != -1) violated("holds device KV while not running", id);
      if (r.state == RequestState::kWaiting && (r.num_computed != 0 || r.swapped()))
        violated("fresh request with KV state", id);
      if (r.swapped() && static_cast<int>(r.host_blocks.size()) != blocks_for(r.num_computed))
        violated("swapped KV does not cover its computed tokens", id);
      if (!r.swapped() && r.num_computed != 0) violated("computed tokens without KV", id);
    }
  }
  if (n_running != running_.size() || n_waiting != waiting_.size())
    throw InvariantViolation("scheduler invariant: queue holds an unknown request");
  if (static_cast<int>(running_.size()) > config_.max_num_seqs)
    throw InvariantViolation("scheduler invariant: more running requests than max_num_seqs");
  if (fixed_order_ && ordered_version_ == waiting_version_) {
    // The remembered order of a fixed-key policy: the waiting set, sorted by keys the policy still gives.
    if (waiting_order_.size() != waiting_.size())
      throw InvariantViolation("scheduler invariant: the waiting order misses a waiting request");
    for (size_t i = 0; i < waiting_order_.size(); ++i) {
      const PolicyEntry& e = waiting_order_[i];
      auto it = requests_.find(e.id);
      if (it == requests_.end() || it->second.running() || it->second.seq != e.seq)
        violated("in the waiting order but not waiting", e.id);
      const OrderKey key = ordering_->key(view(it->second));
      if (key < e.key || e.key < key) violated("ordering key changed although the policy says it is fixed", e.id);
      if (i > 0 && policy_before(e, waiting_order_[i - 1])) violated("the waiting order is not sorted", e.id);
    }
  }

  // No block writable by two requests: a block not yet fully computed has one
  // holder and is not in the prefix cache.
  for (const auto& [id, r] : requests_) {
    for (size_t j = 0; j < r.blocks.size(); ++j) {
      if (static_cast<int>((j + 1) * block_size_) <= r.num_computed) continue;
      const BlockId b = r.blocks[j];
      if (holders[b] != 1 || pool_.is_cached(b)) violated("writable block is shared or cached", id);
    }
  }

  std::vector<uint8_t> slot_free(config_.max_num_seqs, 0);
  for (int s : free_slots_) {
    if (s < 0 || s >= config_.max_num_seqs || slot_free[s] || slot_used[s])
      throw InvariantViolation("scheduler invariant: free slot list is corrupt");
    slot_free[s] = 1;
  }
  if (free_slots_.size() + running_.size() != static_cast<size_t>(config_.max_num_seqs))
    throw InvariantViolation("scheduler invariant: slots are not conserved");

  pool_.check_invariants(holders, last_now_);
  host_.check_invariants(host_holders);
  sessions_.check_invariants(namespace_roots_);
}

}  // namespace tandem
