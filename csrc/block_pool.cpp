#include "block_pool.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "hashing.h"

namespace tandem {

PrefixIndex::PrefixIndex(int num_blocks) {
  size_t capacity = 2;
  shift_ = 63;
  while (capacity < 2 * static_cast<size_t>(num_blocks)) {
    capacity <<= 1;
    --shift_;
  }
  slots_.resize(capacity);
  mask_ = capacity - 1;
}

BlockId PrefixIndex::find(uint64_t hash) const {
  for (size_t i = home(hash);; i = (i + 1) & mask_) {
    const Slot& s = slots_[i];
    if (s.block == kNoBlock) return kNoBlock;
    if (s.hash == hash) return s.block;
  }
}

bool PrefixIndex::insert(uint64_t hash, BlockId block) {
  size_t i = home(hash);
  for (; slots_[i].block != kNoBlock; i = (i + 1) & mask_) {
    if (slots_[i].hash == hash) return false;
  }
  slots_[i] = {hash, block};
  ++size_;
  return true;
}

// Backward-shift deletion: after emptying slot i, every later entry of the
// probe run that may legally sit at i (its home is not cyclically in (i, j])
// moves back into it, so lookups never need tombstones.
//
//   home:   h  h  h+1 .            (slot i emptied, then refilled from j)
//   slots: [a][x][b ][c][ ]  ->  [a][b][c][ ][ ]
void PrefixIndex::erase(uint64_t hash, BlockId block) {
  size_t i = home(hash);
  for (;; i = (i + 1) & mask_) {
    if (slots_[i].block == kNoBlock) return;
    if (slots_[i].hash == hash) break;
  }
  if (slots_[i].block != block) return;
  for (size_t j = (i + 1) & mask_; slots_[j].block != kNoBlock; j = (j + 1) & mask_) {
    const size_t k = home(slots_[j].hash);
    if (((j - k) & mask_) >= ((j - i) & mask_)) {
      slots_[i] = slots_[j];
      i = j;
    }
  }
  slots_[i].block = kNoBlock;
  --size_;
}

BlockPool::BlockPool(int num_blocks, int block_size, std::shared_ptr<EvictionPolicy> eviction)
    : block_size_(block_size), eviction_(std::move(eviction)), index_(std::max(num_blocks, 1)) {
  TANDEM_REQUIRE(num_blocks > 0, "num_blocks must be positive");
  TANDEM_REQUIRE(block_size > 0, "block_size must be positive");
  uniform_key_ = eviction_->key_reads_only_time_and_priority();
  meta_.resize(num_blocks);
  pins_.resize(num_blocks);
  if (!uniform_key_) keys_.resize(num_blocks);
  content_.resize(num_blocks);
  tags_.resize(num_blocks);
  generations_.assign(num_blocks, 0);
  where_.assign(num_blocks, Where::kFree);
  stamps_.assign(num_blocks, 0);
  tokens_.assign(static_cast<size_t>(num_blocks) * block_size, 0);
  free_.reserve(num_blocks);
  for (int b = num_blocks - 1; b >= 0; --b) free_.push_back(b);  // block 0 is handed out first
}

void BlockPool::set_where(BlockId block, Where where) {
  Where& w = where_[block];
  evictable_epoch_ += (where == Where::kEvictable) != (w == Where::kEvictable);
  num_evictable_ += (where == Where::kEvictable) - (w == Where::kEvictable);
  num_pinned_ += (where == Where::kPinned) - (w == Where::kPinned);
  w = where;
}

int BlockPool::count_evictable(const BlockId* blocks, size_t n, int enough, bool* complete) const {
  constexpr size_t kChunk = 64;  // the count is compared with `enough` once a chunk
  int count = 0;
  size_t k = 0;
  while (k < n && count < enough) {
    const size_t end = std::min(n, k + kChunk);
    for (; k < end; ++k) count += where_[blocks[k]] == Where::kEvictable;
  }
  *complete = k == n;
  return count;
}

CachedBlockView BlockPool::view_of(BlockId block) const {
  const Meta& m = meta_[block];
  CachedBlockView view;
  view.block = block;
  view.last_access = m.last_access;
  view.depth = m.depth;
  view.priority = m.priority;
  view.hits = m.hits;
  return view;
}

OrderKey BlockPool::eviction_key(BlockId block) const {
  return checked_key(eviction_->key(view_of(block)), "eviction", *eviction_);
}

void BlockPool::make_evictable(BlockId block) {
  const EvictEntry entry = evictable_entry(block, eviction_key(block));
  set_where(block, Where::kEvictable);
  evictable_.push(entry);
  compact_orders();
}

void BlockPool::compact_orders() {
  evictable_.compact_if_stale(num_evictable_, [this](const EvictEntry& e) { return valid(e); });
}

void BlockPool::push_pin(BlockId block) {
  stamps_[block] = ++next_stamp_;
  pinned_.push({pins_[block].until, block, stamps_[block]});
  pinned_.compact_if_stale(num_pinned_, [this](const PinEntry& e) { return valid(e); });
}

void BlockPool::park(BlockId block, double now) {
  if (tags_[block].pinned && pins_[block].until > now) {
    set_where(block, Where::kPinned);
    push_pin(block);
  } else {
    make_evictable(block);
  }
}

void BlockPool::unpark(BlockId block) { set_where(block, Where::kHeld); }

void BlockPool::expire_pins(double now) {
  while (!pinned_.empty()) {
    const PinEntry top = pinned_.top();
    if (valid(top) && top.until > now) break;
    pinned_.pop();
    if (valid(top)) make_evictable(top.block);
  }
}

void BlockPool::uncache(BlockId block) {
  index_.erase(content_[block].hash, block);
  tags_[block].cached = false;
}

void BlockPool::log_eviction(BlockId block) {
  if (eviction_log_.size() >= 2 * meta_.size() + 1024) {  // keep the latest half
    const size_t drop = eviction_log_.size() / 2;
    eviction_log_.erase(eviction_log_.begin(), eviction_log_.begin() + static_cast<std::ptrdiff_t>(drop));
    log_base_ += static_cast<int64_t>(drop);
  }
  eviction_log_.emplace_back(block, meta_[block].depth);
}

bool BlockPool::first_evicted(int64_t since, const BlockId* blocks, int n, int* first) const {
  if (since < log_base_ || num_evicted_ - since > n) return false;
  int m = n;
  for (size_t k = static_cast<size_t>(since - log_base_); k < eviction_log_.size(); ++k) {
    const auto [block, depth] = eviction_log_[k];
    if (depth < m && blocks[depth] == block) m = depth;
  }
  *first = m;
  return true;
}

BlockId BlockPool::allocate() {
  BlockId block;
  allocate_n(1, &block);
  return block;
}

// The free list first, then evictions, exactly as n allocate() calls. Evictions go in two
// passes so that the block metadata and prefix-index slots they touch load in parallel:
// victims are popped (and marked held, so no stale entry of theirs pops again), then each is
// logged and uncached, while the next ones' loads are in flight.
void BlockPool::allocate_n(int n, BlockId* out) {
  int k = 0;
  for (; k < n && !free_.empty(); ++k) {
    out[k] = free_.back();
    free_.pop_back();
    set_where(out[k], Where::kHeld);
  }
  const int first_victim = k;
  for (; k < n; ++k) {
    TANDEM_CHECK(num_evictable_ > 0, "allocate() with no free or evictable block");
    EvictEntry victim;
    const bool found = evictable_.pop_valid([this](const EvictEntry& e) { return valid(e); }, &victim);
    TANDEM_CHECK(found, "evictable count exceeds the eviction order");
    out[k] = victim.block;
    where_[victim.block] = Where::kHeld;  // an eviction: evictable_epoch_ stays (see block_pool.h)
    --num_evictable_;
    prefetch(victim.block);
    __builtin_prefetch(&content_[victim.block]);  // its hash locates the index slot to free
  }
  constexpr int kAhead = 4;
  for (int j = first_victim; j < n && j < first_victim + kAhead; ++j) index_.prefetch(content_[out[j]].hash);
  for (int j = first_victim; j < n; ++j) {
    if (j + kAhead < n) index_.prefetch(content_[out[j + kAhead]].hash);
    log_eviction(out[j]);
    if (recording_) events_.records.push_back({content_[out[j]].hash, 0, false, false});
    uncache(out[j]);
    ++num_evicted_;
  }
  for (int j = 0; j < n; ++j) {
    Meta& m = meta_[out[j]];
    m.ref_count = 1;
    Tag& t = tags_[out[j]];
    t.cached = false;
    generations_[out[j]] += 1;
    if (t.pinned) {
      pins_[out[j]] = Pin{};
      t.pinned = false;
    }
    m.hits = 0;
  }
}

void BlockPool::retain_all(const BlockId* blocks, size_t n, double now) {
  constexpr size_t kAhead = 8;  // blocks prefetched ahead
  // What set_where(block, kHeld) does to the counts, summed over the blocks: the loop's stores to
  // where_ (bytes, which may alias anything) would otherwise reload and store each count every block.
  int evictable = 0, pinned = 0;
  struct Flush {
    BlockPool* pool;
    const int& evictable;
    const int& pinned;
    ~Flush() {
      pool->evictable_epoch_ += static_cast<uint64_t>(evictable);
      pool->num_evictable_ -= evictable;
      pool->num_pinned_ -= pinned;
    }
  } flush{this, evictable, pinned};  // also when a check throws: the counts match the blocks retained
  for (size_t k = 0; k < n; ++k) {
    if (k + kAhead < n) prefetch(blocks[k + kAhead]);
    const BlockId block = blocks[k];
    TANDEM_CHECK(tags_[block].cached, "retain_all() of a block that is not in the prefix cache");
    Meta& m = meta_[block];
    m.ref_count += 1;
    m.hits += 1;
    m.last_access = now;
    const Where w = where_[block];
    evictable += w == Where::kEvictable;
    pinned += w == Where::kPinned;
    where_[block] = Where::kHeld;
  }
}

void BlockPool::release(BlockId block, double now, int priority) {
  Meta& m = meta_[block];
  TANDEM_CHECK(m.ref_count > 0, "release() of a block nobody holds");
  m.ref_count -= 1;
  m.last_access = std::max(m.last_access, now);
  m.priority = priority;
  if (m.ref_count > 0) return;
  if (tags_[block].cached) {
    park(block, now);
  } else {
    set_where(block, Where::kFree);
    free_.push_back(block);
  }
}

void BlockPool::release_all(const BlockId* blocks, size_t n, double now, int priority) {
  constexpr size_t kAhead = 8;  // blocks prefetched ahead
  run_.clear();
  run_.reserve(n);
  // Blocks made evictable here: their where_ is set in the loop, what set_where would add to the
  // counts is added once at the end (the loop's byte stores to where_ may alias anything, so the
  // counts would be reloaded and stored every block). A policy's key() may throw (a Python
  // policy's error): the blocks parked so far still enter the order and the counts, leaving the
  // pool as n release() calls would have.
  int parked = 0;
  struct PushRun {
    BlockPool* pool;
    const int& parked;
    ~PushRun() {
      pool->evictable_epoch_ += static_cast<uint64_t>(parked);
      pool->num_evictable_ += parked;
      pool->evictable_.push_run(pool->run_);
      pool->compact_orders();
    }
  } push_run{this, parked};
  double key_time = std::numeric_limits<double>::quiet_NaN();  // the last_access `key` is for
  OrderKey key{};
  for (size_t k = n; k-- > 0;) {
    if (k >= kAhead) prefetch(blocks[k - kAhead]);
    const BlockId block = blocks[k];
    Meta& m = meta_[block];
    TANDEM_CHECK(m.ref_count > 0, "release() of a block nobody holds");
    m.ref_count -= 1;
    m.last_access = std::max(m.last_access, now);
    m.priority = priority;
    if (m.ref_count > 0) continue;
    const Tag& t = tags_[block];
    if (!t.cached) {
      where_[block] = Where::kFree;  // from kHeld: no count changes
      free_.push_back(block);
    } else if (t.pinned && pins_[block].until > now) {
      set_where(block, Where::kPinned);
      push_pin(block);
    } else {
      // A uniform key is asked once for every block released at this last_access (all of them,
      // time being monotonic; this priority is the release's), any other key once a block.
      if (!uniform_key_ || !(m.last_access == key_time)) {
        key = eviction_key(block);
        key_time = m.last_access;
      }
      run_.push_back(evictable_entry(block, key));
      where_[block] = Where::kEvictable;  // from kHeld: counted in `parked`
      ++parked;
    }
  }
}

BlockId BlockPool::lookup(uint64_t hash, uint64_t parent, uint32_t ns, const TokenId* tokens) const {
  const BlockId block = index_.find(hash);
  if (block == kNoBlock) return kNoBlock;
  const Content& c = content_[block];
  if (c.parent != parent || c.ns != ns) return kNoBlock;  // (a hash collision)
  const TokenId* held = &tokens_[static_cast<size_t>(block) * block_size_];
  if (std::memcmp(held, tokens, sizeof(TokenId) * block_size_) != 0) return kNoBlock;
  return block;
}

bool BlockPool::register_block(BlockId block, uint64_t hash, uint64_t parent, uint32_t ns, int depth,
                               const TokenId* tokens) {
  Meta& m = meta_[block];
  TANDEM_CHECK(m.ref_count > 0 && !tags_[block].cached, "register_block() of a block not privately held");
  if (!index_.insert(hash, block)) return false;
  tags_[block].cached = true;
  Content& c = content_[block];
  c.hash = hash;
  c.parent = parent;
  c.ns = ns;
  m.depth = depth;
  std::memcpy(&tokens_[static_cast<size_t>(block) * block_size_], tokens, sizeof(TokenId) * block_size_);
  if (recording_) {
    events_.records.push_back({hash, parent, true, depth > 0});
    events_.tokens.insert(events_.tokens.end(), tokens, tokens + block_size_);
  }
  return true;
}

void BlockPool::pin(BlockId block, double until, double now, bool new_pin) {
  TANDEM_CHECK(tags_[block].cached, "pin() of a block that is not in the prefix cache");
  Pin& p = pins_[block];
  tags_[block].pinned = true;
  if (new_pin) p.count += 1;
  const double before = p.until;
  p.until = std::max(p.until, until);
  const Where where = where_[block];
  if (where == Where::kPinned) {
    // A later `until` re-keys the pin: a new entry, the old one goes stale.
    if (p.until != before) push_pin(block);
  } else if (where == Where::kEvictable && p.until > now) {
    // An evictable block being pinned again goes back to the pinned set.
    set_where(block, Where::kPinned);
    push_pin(block);
  }
}

void BlockPool::unpin(BlockId block, uint32_t generation, double now) {
  const Tag& t = tags_[block];
  Pin& p = pins_[block];
  if (generations_[block] != generation || !t.cached || !t.pinned || p.count == 0) return;  // contents changed since
  p.count -= 1;
  if (p.count > 0) return;
  p.until = kNever;
  if (where_[block] == Where::kPinned) park(block, now);  // kNever: into the eviction order
}

// The eviction and pin heaps: heap-ordered, bounded, exactly one valid entry
// per parked block, each valid entry keyed by its block's current key.
void BlockPool::check_orders() const {
  auto fail = [](const std::string& what, BlockId b) {
    throw InvariantViolation("block pool invariant: " + what + " (block " + std::to_string(b) + ")");
  };
  const int n = num_blocks();
  if (!evictable_.well_formed()) fail("eviction order is malformed (a run unsorted, or the heaps broken)", -1);
  if (!pinned_.is_heap()) fail("pin order is not a heap", -1);
  if (evictable_.size() > LazyHeap<EvictEntry>::bound(n) || pinned_.size() > LazyHeap<PinEntry>::bound(n))
    fail("stale entries are never compacted away", -1);
  std::vector<uint8_t> entries(n, 0);
  evictable_.for_each([&](const EvictEntry& e) {
    if (e.block < 0 || e.block >= n) fail("eviction order holds an id out of range", e.block);
    if (e.stamp > next_stamp_) fail("eviction entry from the future", e.block);
    if (!valid(e)) return;
    const Meta& m = meta_[e.block];
    // A uniform key is recomputed from what the block holds now (unchanged while it is parked).
    const OrderKey key = uniform_key_ ? eviction_->key(view_of(e.block)) : keys_[e.block];
    if (entries[e.block]++) fail("block twice in the eviction order", e.block);
    if (e.primary != key.primary || e.secondary != key.secondary || e.neg_depth != -m.depth)
      fail("eviction entry does not carry the block's key", e.block);
  });
  for (const PinEntry& e : pinned_.entries()) {
    if (e.block < 0 || e.block >= n) fail("pin order holds an id out of range", e.block);
    if (e.stamp > next_stamp_) fail("pin entry from the future", e.block);
    if (!valid(e)) continue;
    if (entries[e.block]++) fail("block twice in the pin order", e.block);
    if (e.until != pins_[e.block].until) fail("pin entry does not carry the block's pin time", e.block);
  }
  int evictable = 0, pinned = 0;
  for (BlockId b = 0; b < n; ++b) {
    const Where where = where_[b];
    if (where == Where::kEvictable) ++evictable;
    if (where == Where::kPinned) ++pinned;
    const bool parked = where == Where::kEvictable || where == Where::kPinned;
    if (parked && !entries[b])
      fail(where == Where::kEvictable ? "evictable block missing from the eviction order"
                                      : "pinned block missing from the pin order",
           b);
  }
  if (evictable != num_evictable_) fail("evictable count differs from the evictable blocks", -1);
  if (pinned != num_pinned_) fail("pinned count differs from the pinned blocks", -1);
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
    const Tag& t = tags_[b];
    if (m.ref_count != holders[b]) fail("reference count differs from the number of holders", b);
    if (m.ref_count > 1 && !t.cached) fail("shared block is not an immutable cached block", b);
    if (!t.pinned && (pins_[b].count != 0 || pins_[b].until != kNever)) fail("a pin the tags do not show", b);
    if (t.cached) ++num_cached_blocks;
    if (m.ref_count > 0) {
      ++held;
      if (where_[b] != Where::kHeld) fail("held block is parked", b);
      if (on_free_list[b]) fail("block is both free and held", b);
    } else if (t.cached) {
      ++cached_unheld;
      if (where_[b] != Where::kPinned && where_[b] != Where::kEvictable) fail("cached block is lost", b);
      if (on_free_list[b]) fail("cached block is on the free list", b);
    } else {
      ++free_count;
      if (where_[b] != Where::kFree || !on_free_list[b]) fail("unowned block is not on the free list", b);
    }
    if (t.cached) {
      const Content& c = content_[b];
      if (index_.find(c.hash) != b) fail("cached block is not in the prefix index", b);
      const TokenId* held_tokens = &tokens_[static_cast<size_t>(b) * block_size_];
      if (block_hash(c.parent, held_tokens, block_size_) != c.hash)
        fail("cached block does not hash to the tokens it holds", b);
    }
  }
  if (free_count != num_free()) fail("free list size differs from unowned blocks", -1);
  if (held + cached_unheld + free_count != n) fail("blocks are not conserved", -1);
  check_orders();
  if (num_evictable_ + num_pinned_ != cached_unheld)
    fail("evictable + pinned count differs from what the index can evict", -1);
  int indexed = 0;
  index_.for_each([&](uint64_t hash, BlockId b) {
    ++indexed;
    if (b < 0 || b >= n || !tags_[b].cached || content_[b].hash != hash)
      fail("prefix index entry is not a cached block under its own hash", b);
  });
  if (index_.size() != num_cached_blocks || indexed != num_cached_blocks)
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
