#include "block_pool.h"

#include <algorithm>
#include <cstring>

#include "hashing.h"

namespace tandem {

BlockPool::BlockPool(int num_blocks, int block_size, std::shared_ptr<EvictionPolicy> eviction)
    : block_size_(block_size), eviction_(std::move(eviction)) {
  TANDEM_REQUIRE(num_blocks > 0, "num_blocks must be positive");
  TANDEM_REQUIRE(block_size > 0, "block_size must be positive");
  meta_.resize(num_blocks);
  tokens_.assign(static_cast<size_t>(num_blocks) * block_size, 0);
  free_.reserve(num_blocks);
  for (int b = num_blocks - 1; b >= 0; --b) free_.push_back(b);  // block 0 is handed out first
}

BlockPool::EvictEntry BlockPool::evict_entry(BlockId block) const {
  const Meta& m = meta_[block];
  return {m.key.primary, m.key.secondary, -m.depth, block};
}

void BlockPool::make_evictable(BlockId block) {
  Meta& m = meta_[block];
  CachedBlockView view;
  view.block = block;
  view.last_access = m.last_access;
  view.depth = m.depth;
  view.priority = m.priority;
  view.hits = m.hits;
  m.key = eviction_->key(view);
  m.where = Where::kEvictable;
  evictable_.insert(evict_entry(block));
}

void BlockPool::park(BlockId block, double now) {
  Meta& m = meta_[block];
  if (m.pinned_until > now) {
    m.where = Where::kPinned;
    pinned_.insert({m.pinned_until, block});
  } else {
    make_evictable(block);
  }
}

void BlockPool::unpark(BlockId block) {
  Meta& m = meta_[block];
  if (m.where == Where::kEvictable) {
    evictable_.erase(evict_entry(block));
  } else if (m.where == Where::kPinned) {
    pinned_.erase({m.pinned_until, block});
  }
  m.where = Where::kHeld;
}

void BlockPool::expire_pins(double now) {
  while (!pinned_.empty() && pinned_.begin()->first <= now) {
    BlockId block = pinned_.begin()->second;
    pinned_.erase(pinned_.begin());
    make_evictable(block);
  }
}

void BlockPool::uncache(BlockId block) {
  Meta& m = meta_[block];
  auto it = index_.find(m.hash);
  if (it != index_.end() && it->second == block) index_.erase(it);
  m.cached = false;
}

BlockId BlockPool::allocate() {
  BlockId block;
  if (!free_.empty()) {
    block = free_.back();
    free_.pop_back();
  } else {
    TANDEM_CHECK(!evictable_.empty(), "allocate() with no free or evictable block");
    block = std::get<3>(*evictable_.begin());
    evictable_.erase(evictable_.begin());
    uncache(block);
    ++num_evicted_;
  }
  Meta& m = meta_[block];
  m.ref_count = 1;
  m.where = Where::kHeld;
  m.cached = false;
  m.pin_count = 0;
  m.pinned_until = kNever;
  m.hits = 0;
  m.generation += 1;
  return block;
}

void BlockPool::retain(BlockId block, double now) {
  Meta& m = meta_[block];
  TANDEM_CHECK(m.cached, "retain() of a block that is not in the prefix cache");
  if (m.ref_count == 0) unpark(block);
  m.ref_count += 1;
  m.where = Where::kHeld;
  m.hits += 1;
  m.last_access = now;
}

void BlockPool::release(BlockId block, double now, int priority) {
  Meta& m = meta_[block];
  TANDEM_CHECK(m.ref_count > 0, "release() of a block nobody holds");
  m.ref_count -= 1;
  m.last_access = std::max(m.last_access, now);
  m.priority = priority;
  if (m.ref_count > 0) return;
  if (m.cached) {
    park(block, now);
  } else {
    m.where = Where::kFree;
    free_.push_back(block);
  }
}

BlockId BlockPool::lookup(uint64_t hash, uint64_t parent, uint32_t ns, const TokenId* tokens) const {
  auto it = index_.find(hash);
  if (it == index_.end()) return kNoBlock;
  const Meta& m = meta_[it->second];
  if (m.parent != parent || m.ns != ns) return kNoBlock;
  const TokenId* held = &tokens_[static_cast<size_t>(it->second) * block_size_];
  if (std::memcmp(held, tokens, sizeof(TokenId) * block_size_) != 0) return kNoBlock;
  return it->second;
}

bool BlockPool::register_block(BlockId block, uint64_t hash, uint64_t parent, uint32_t ns,
                               int depth, const TokenId* tokens) {
  Meta& m = meta_[block];
  TANDEM_CHECK(m.ref_count > 0 && !m.cached, "register_block() of a block not privately held");
  if (index_.count(hash)) return false;
  index_.emplace(hash, block);
  m.cached = true;
  m.hash = hash;
  m.parent = parent;
  m.ns = ns;
  m.depth = depth;
  std::memcpy(&tokens_[static_cast<size_t>(block) * block_size_], tokens,
              sizeof(TokenId) * block_size_);
  return true;
}

void BlockPool::pin(BlockId block, double until, double now, bool new_pin) {
  Meta& m = meta_[block];
  TANDEM_CHECK(m.cached, "pin() of a block that is not in the prefix cache");
  bool parked_pinned = m.where == Where::kPinned;
  if (parked_pinned) pinned_.erase({m.pinned_until, block});
  if (new_pin) m.pin_count += 1;
  m.pinned_until = std::max(m.pinned_until, until);
  if (parked_pinned) pinned_.insert({m.pinned_until, block});
  // An evictable block being pinned again goes back to the pinned set.
  if (m.where == Where::kEvictable && m.pinned_until > now) {
    unpark(block);
    m.where = Where::kPinned;
    pinned_.insert({m.pinned_until, block});
  }
}

void BlockPool::unpin(BlockId block, uint32_t generation, double now) {
  Meta& m = meta_[block];
  if (m.generation != generation || !m.cached || m.pin_count == 0) return;  // contents changed since
  m.pin_count -= 1;
  if (m.pin_count > 0) return;
  bool was_pinned = m.where == Where::kPinned;
  if (was_pinned) pinned_.erase({m.pinned_until, block});
  m.pinned_until = kNever;
  if (was_pinned) park(block, now);
}

void BlockPool::check_invariants(const std::vector<int>& holders, double now) const {
  (void)now;
  auto fail = [](const std::string& what, BlockId b) {
    throw InvariantViolation("block pool invariant: " + what + " (block " + std::to_string(b) + ")");
  };
  const int n = num_blocks();
  TANDEM_CHECK(static_cast<int>(holders.size()) == n, "holders has the wrong size");
  std::vector<uint8_t> on_free_list(n, 0);
  for (BlockId b : free_) {
    if (b < 0 || b >= n) fail("free list holds an id out of range", b);
    if (on_free_list[b]) fail("block twice on the free list", b);
    on_free_list[b] = 1;
  }
  int held = 0, cached_unheld = 0, free_count = 0, num_cached_blocks = 0;
  for (BlockId b = 0; b < n; ++b) {
    const Meta& m = meta_[b];
    if (m.ref_count != holders[b]) fail("reference count differs from the number of holders", b);
    if (m.ref_count > 1 && !m.cached) fail("shared block is not an immutable cached block", b);
    if (m.cached) ++num_cached_blocks;
    if (m.ref_count > 0) {
      ++held;
      if (m.where != Where::kHeld) fail("held block is parked", b);
      if (on_free_list[b]) fail("block is both free and held", b);
    } else if (m.cached) {
      ++cached_unheld;
      if (m.where != Where::kPinned && m.where != Where::kEvictable) fail("cached block is lost", b);
      if (m.where == Where::kEvictable && !evictable_.count(evict_entry(b)))
        fail("evictable block missing from the eviction order", b);
      if (m.where == Where::kPinned && !pinned_.count({m.pinned_until, b}))
        fail("pinned block missing from the pin order", b);
      if (on_free_list[b]) fail("cached block is on the free list", b);
    } else {
      ++free_count;
      if (m.where != Where::kFree || !on_free_list[b]) fail("unowned block is not on the free list", b);
    }
    if (m.cached) {
      auto it = index_.find(m.hash);
      if (it == index_.end() || it->second != b) fail("cached block is not in the prefix index", b);
      const TokenId* held_tokens = &tokens_[static_cast<size_t>(b) * block_size_];
      if (block_hash(m.parent, held_tokens, block_size_) != m.hash)
        fail("cached block does not hash to the tokens it holds", b);
    }
  }
  if (free_count != num_free()) fail("free list size differs from unowned blocks", -1);
  if (held + cached_unheld + free_count != n) fail("blocks are not conserved", -1);
  if (static_cast<int>(evictable_.size() + pinned_.size()) != cached_unheld)
    fail("evictable + pinned count differs from what the index can evict", -1);
  if (static_cast<int>(index_.size()) != num_cached_blocks)
    fail("prefix index size differs from the cached blocks", -1);
}

HostPool::HostPool(int num_blocks) {
  TANDEM_REQUIRE(num_blocks >= 0, "num_host_blocks must be >= 0");
  used_.assign(num_blocks, 0);
  for (int b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

int HostPool::allocate() {
  TANDEM_CHECK(!free_.empty(), "host pool exhausted");
  int b = free_.back();
  free_.pop_back();
  used_[b] = 1;
  return b;
}

void HostPool::release(int block) {
  TANDEM_CHECK(used_[block], "host block released twice");
  used_[block] = 0;
  free_.push_back(block);
}

void HostPool::check_invariants(const std::vector<int>& holders) const {
  int used = 0;
  for (size_t b = 0; b < used_.size(); ++b) {
    TANDEM_CHECK(holders[b] <= 1, "host block held by two requests");
    TANDEM_CHECK(holders[b] == used_[b], "host block ownership differs from its holders");
    used += used_[b];
  }
  TANDEM_CHECK(used + num_free() == num_blocks(), "host blocks are not conserved");
}

}  // namespace tandem
