// The session store: what a session's finished turns leave behind, apart from batch planning.
//
//   session "a" -> pins     (block, generation) of its finished turns kept in the prefix cache
//               -> memo     its last finished turn: tokens, chained hashes, cached leading blocks
//               -> history  turns, service and pauses, for policies (RequestView / TurnView)
//
// The scheduler calls it at a request's arrival, finish and abort and at end_session; nothing
// here plans a batch. It holds no pointer to the pool (a copied Scheduler stays valid): the pool
// and the eviction policy are passed in.
#pragma once

#include <deque>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

#include "block_pool.h"
#include "common.h"
#include "policies.h"
#include "request.h"

namespace tandem {

// What a session's finished turns did, for policies (RequestView / TurnView session fields).
struct SessionHistory {
  int turns = 0;               // finished turns
  int64_t service = 0;         // tokens computed by its finished and aborted requests
  double last_end = kNever;    // `now` when its latest turn finished
  std::deque<double> pauses;   // last-turn-end -> next arrival, the latest kMaxPauseHistory
};

// What a session's last finished turn leaves behind for its next one (csrc/turn_memo.cpp):
// its tokens and their chained block hashes, and the leading blocks that were in the prefix
// cache when it finished, with their generations. An agent's next prompt starts with exactly
// those tokens, so its hashes and its prefix match need not be computed again; the
// generations (and the pool's eviction count) say which blocks are still cached.
struct TurnMemo {
  RequestId request = 0;  // the finished request it remembers
  uint32_t ns = 0;
  std::vector<TokenId> tokens;
  std::vector<uint64_t> block_hashes;
  std::vector<BlockId> blocks;
  std::vector<uint32_t> generations;
  int64_t evictions = 0;  // the pool's eviction count when it was taken
  uint64_t order = 0;     // insertion number (oldest memos are dropped first)
};

class SessionStore {
 public:
  explicit SessionStore(int block_size) : block_size_(block_size) {}

  // --- histories (csrc/session_store.cpp) ---
  // At add_request of r (with a session): records the pause since its last turn and gives r
  // the session's history as it stands (r.session_*).
  void on_arrival(Request& r);
  // At finish of r (with a session), after pin_turn: one more turn, its service, its end.
  void on_turn_end(const Request& r, double now);
  // At abort of r (with a session): its computed tokens count as the session's service.
  void on_abort(const Request& r);

  // --- pins (csrc/session_store.cpp) ---
  // At finish, before r's blocks are released: pins its cached blocks for as long as the
  // eviction policy's pin_seconds says (a PolicyError if that is not a time).
  void pin_turn(const Request& r, double now, BlockPool& pool, const EvictionPolicy& eviction);
  // Forgets the session (memo, history, pins) and unpins its blocks; returns how many of them
  // still held what was pinned.
  int end_session(const std::string& session_id, double now, BlockPool& pool);

  // --- turn memos (csrc/turn_memo.cpp) ---
  // At finish, before the blocks are released: `cached_blocks` are r's leading blocks that are
  // in the prefix index (each under r's own hash for it). Takes r's tokens and hashes.
  void remember_turn(Request& r, std::vector<BlockId> cached_blocks, const BlockPool& pool);
  // At add_request: takes the session's memo into r (its hashes and remembered match).
  void recall_turn(Request& r);
  // The session's memo, or null.
  const TurnMemo* memo(const std::string& session_id) const;
  // Removes the session's memo (which must exist) and returns it.
  TurnMemo take_memo(const std::string& session_id);
  // r's first `same` tokens are the memo's: r starts with its hashes and remembered blocks.
  void apply_memo(Request& r, TurnMemo& memo, size_t same) const;

  // Memos hash their own tokens (from `namespace_roots`), hold blocks within them, and the
  // token count is exact (csrc/invariants.cpp).
  void check_invariants(const std::vector<uint64_t>& namespace_roots) const;

 private:
  TurnMemo take_memo(std::unordered_map<std::string, TurnMemo>::iterator it);
  void forget_turn(const std::string& session_id);

  int block_size_;
  // session -> pinned (block, generation)
  std::map<std::string, std::unordered_map<BlockId, uint32_t>> session_pins_;
  // session -> its last finished turn, at most kMemoCaches KV caches' worth of tokens in all
  std::unordered_map<std::string, TurnMemo> turn_memos_;
  std::unordered_map<std::string, SessionHistory> histories_;  // erased by end_session
  std::deque<std::pair<uint64_t, std::string>> memo_order_;  // (order, session), oldest first; may be stale
  int64_t memo_tokens_ = 0;
  uint64_t next_memo_ = 1;
};

}  // namespace tandem
