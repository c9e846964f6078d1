// SessionStore: session histories and pins (turn memos: csrc/turn_memo.cpp).
#include "session_store.h"

#include <algorithm>
#include <cmath>

namespace tandem {

void SessionStore::on_arrival(Request& r) {
  SessionHistory& h = histories_[r.session_id];
  if (h.last_end != kNever) {
    if (static_cast<int>(h.pauses.size()) == kMaxPauseHistory) h.pauses.pop_front();
    h.pauses.push_back(std::max(0.0, r.arrival_time - h.last_end));
  }
  r.session_turns = h.turns;
  r.session_service = h.service;
  r.session_last_end = h.last_end;
}

void SessionStore::on_turn_end(const Request& r, double now) {
  SessionHistory& h = histories_[r.session_id];
  h.turns += 1;
  h.service += r.num_computed_total;
  h.last_end = now;
}

void SessionStore::on_abort(const Request& r) {
  auto h = histories_.find(r.session_id);
  if (h != histories_.end()) h->second.service += r.num_computed_total;
}

void SessionStore::pin_turn(const Request& r, double now, BlockPool& pool, const EvictionPolicy& eviction) {
  TurnView turn;
  turn.session_id = r.session_id;
  turn.request_id = r.id;
  turn.now = now;
  turn.num_tokens = r.num_tokens();
  turn.num_blocks = r.num_registered;
  turn.priority = r.priority;
  turn.cache_blocks = pool.num_blocks();
  auto h = histories_.find(r.session_id);
  if (h != histories_.end()) {
    turn.turn_index = h->second.turns;
    turn.session_service = h->second.service;
    turn.pauses.assign(h->second.pauses.begin(), h->second.pauses.end());
  }
  turn.session_service += r.num_computed_total;
  const double seconds = eviction.pin_seconds(turn);
  if (!(std::isfinite(seconds) && seconds >= 0)) {
    throw PolicyError(policy_label("eviction", eviction.name()) + " returned an invalid pin time " +
                      format_number(seconds) + " (seconds must be finite and >= 0)");
  }
  if (seconds <= 0) return;
  auto& pins = session_pins_[r.session_id];
  for (BlockId b : r.blocks) {
    if (!pool.is_cached(b)) continue;
    const uint32_t gen = pool.generation(b);
    auto it = pins.find(b);
    const bool new_pin = it == pins.end() || it->second != gen;
    if (new_pin) pins[b] = gen;
    pool.pin(b, now + seconds, now, new_pin);
  }
}

int SessionStore::end_session(const std::string& session_id, double now, BlockPool& pool) {
  forget_turn(session_id);
  histories_.erase(session_id);
  auto it = session_pins_.find(session_id);
  if (it == session_pins_.end()) return 0;
  int released = 0;
  for (const auto& [block, gen] : it->second) {
    if (pool.generation(block) == gen) ++released;
    pool.unpin(block, gen, now);
  }
  session_pins_.erase(it);
  return released;
}

}  // namespace tandem
