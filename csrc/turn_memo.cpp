// Turn memos: a session's next request reuses its last turn's block hashes and prefix match.
//
//   turn k (finished):  [ prompt_k ........................ | output_k ]
//   turn k+1 (added):   [ prompt_k ........................ | output_k | new tokens ]
//                        \___ same tokens: same chained hashes, same cached blocks ___/
//
// A memo only saves work: the hashes are those block_hash would compute (the tokens are
// compared first), and a remembered block is offered to prefix_match, which keeps it only
// while its generation is unchanged, exactly as for a waiting request's own remembered
// match. So plans are the same with or without memos. Scheduler::add_continuation() also
// takes the memo's tokens as the prompt's start (the caller vouches that the prompt is exactly
// them + new tokens), so that an agent's ~50K-token context is neither sent nor compared again.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "session_store.h"

namespace tandem {
namespace {
constexpr int64_t kMemoCaches = 8;  // memos hold at most 8 KV caches' worth of tokens
}  // namespace

// At finish, before the blocks are released: `cached_blocks` are r's leading blocks that are
// in the prefix index (each under r's own hash for it).
void SessionStore::remember_turn(Request& r, std::vector<BlockId> cached_blocks, const BlockPool& pool) {
  forget_turn(r.session_id);
  const int64_t limit = kMemoCaches * pool.num_blocks() * block_size_;
  if (r.num_tokens() > limit) return;
  TurnMemo memo;
  memo.request = r.id;
  memo.ns = r.ns;
  memo.tokens = std::move(r.tokens);
  memo.block_hashes = std::move(r.block_hashes);
  memo.blocks = std::move(cached_blocks);
  memo.generations.reserve(memo.blocks.size());
  for (BlockId b : memo.blocks) memo.generations.push_back(pool.generation(b));
  memo.evictions = pool.num_evicted();
  memo.order = next_memo_++;
  memo_tokens_ += static_cast<int64_t>(memo.tokens.size());
  memo_order_.emplace_back(memo.order, r.session_id);
  turn_memos_.emplace(r.session_id, std::move(memo));
  while (memo_tokens_ > limit && !memo_order_.empty()) {  // drop the oldest
    auto [order, session] = memo_order_.front();
    memo_order_.pop_front();
    auto it = turn_memos_.find(session);
    if (it != turn_memos_.end() && it->second.order == order) forget_turn(session);
  }
  if (memo_order_.size() > 2 * turn_memos_.size() + 64) {  // drop stale order entries
    std::deque<std::pair<uint64_t, std::string>> live;
    for (auto& entry : memo_order_) {
      auto it = turn_memos_.find(entry.second);
      if (it != turn_memos_.end() && it->second.order == entry.first) live.push_back(std::move(entry));
    }
    memo_order_.swap(live);
  }
}

// At add_request: takes the session's memo; r starts with the hashes of the full blocks it
// shares with the memo's tokens and with the memo's blocks as its remembered prefix match.
void SessionStore::recall_turn(Request& r) {
  auto it = turn_memos_.find(r.session_id);
  if (it == turn_memos_.end()) return;
  TurnMemo memo = take_memo(it);
  if (memo.ns != r.ns) return;
  const size_t n = std::min(memo.tokens.size(), r.tokens.size());
  // memcmp over chunks (libc's vector compare), then the first differing token within one.
  constexpr size_t kChunk = 1024;
  size_t same = 0;
  while (same + kChunk <= n && std::memcmp(&r.tokens[same], &memo.tokens[same], kChunk * sizeof(TokenId)) == 0) {
    same += kChunk;
  }
  same =
      std::mismatch(r.tokens.begin() + same, r.tokens.begin() + n, memo.tokens.begin() + same).first - r.tokens.begin();
  apply_memo(r, memo, same);
}

const TurnMemo* SessionStore::memo(const std::string& session_id) const {
  auto it = turn_memos_.find(session_id);
  return it == turn_memos_.end() ? nullptr : &it->second;
}

TurnMemo SessionStore::take_memo(const std::string& session_id) {
  auto it = turn_memos_.find(session_id);
  TANDEM_CHECK(it != turn_memos_.end(), "take_memo() of a session without a memo");
  return take_memo(it);
}

TurnMemo SessionStore::take_memo(std::unordered_map<std::string, TurnMemo>::iterator it) {
  TurnMemo memo = std::move(it->second);
  memo_tokens_ -= static_cast<int64_t>(memo.tokens.size());
  turn_memos_.erase(it);
  return memo;
}

// r's first `same` tokens are the memo's (add_continuation: all of them, without comparing).
void SessionStore::apply_memo(Request& r, TurnMemo& memo, size_t same) const {
  const size_t full = std::min(same / block_size_, memo.block_hashes.size());
  r.block_hashes = std::move(memo.block_hashes);
  r.block_hashes.resize(full);
  const size_t remembered = std::min(full, memo.blocks.size());
  r.match_blocks.assign(memo.blocks.begin(), memo.blocks.begin() + remembered);
  r.match_generations.assign(memo.generations.begin(), memo.generations.begin() + remembered);
  r.match_evictions = memo.evictions;
}

void SessionStore::forget_turn(const std::string& session_id) {
  auto it = turn_memos_.find(session_id);
  if (it == turn_memos_.end()) return;
  memo_tokens_ -= static_cast<int64_t>(it->second.tokens.size());
  turn_memos_.erase(it);
}

}  // namespace tandem
