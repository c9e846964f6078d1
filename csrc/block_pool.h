// The device KV block pool, its prefix index, and the host tier.
//
// Every device block has exactly one owner at a time:
//
//   free list  <--allocate/evict--  prefix cache (ref 0: pinned | evictable)
//       |                                   ^   |
//       | allocate                  release |   | hit (retain)
//       v                                   |   v
//   held by running requests (ref >= 1) ----+---+
//
// A block enters the prefix index only when it is full and its KV has been
// computed (at commit); from then on it is immutable and may be shared. A
// block that is being written is held by exactly one request and is never in
// the index. Ref-0 cached blocks sit either in `pinned_` (a retention policy
// keeps them until a time) or in `evictable_` (ordered by the eviction
// policy's key, then deepest first so children go before their parents).
#pragma once

#include <memory>
#include <set>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "common.h"
#include "policies.h"

namespace tandem {

class BlockPool {
 public:
  BlockPool(int num_blocks, int block_size, std::shared_ptr<EvictionPolicy> eviction);

  int num_blocks() const { return static_cast<int>(meta_.size()); }
  int block_size() const { return block_size_; }
  int num_free() const { return static_cast<int>(free_.size()); }
  int num_evictable() const { return static_cast<int>(evictable_.size()); }
  int num_pinned() const { return static_cast<int>(pinned_.size()); }
  int num_cached() const { return static_cast<int>(index_.size()); }
  // Blocks an allocation can take now: free plus evictable.
  int num_available() const { return num_free() + num_evictable(); }
  int64_t num_evicted() const { return num_evicted_; }

  // Moves cached blocks whose pin has expired by `now` into the evictable set.
  void expire_pins(double now);

  // Takes a block from the free list, else evicts the first evictable one.
  // The caller checks num_available() first. The block comes back with ref 1.
  BlockId allocate();
  // A prefix-cache hit: one more holder of a cached block.
  void retain(BlockId block, double now);
  // One holder fewer; at ref 0 the block goes to the cache (if indexed) or the free list.
  void release(BlockId block, double now, int priority);

  // The cached block holding `tokens` after `parent` in namespace `ns`, or kNoBlock.
  BlockId lookup(uint64_t hash, uint64_t parent, uint32_t ns, const TokenId* tokens) const;
  // Enters a held, full block into the index. False (and nothing changes) if
  // a block with the same content is already cached: this one stays private.
  bool register_block(BlockId block, uint64_t hash, uint64_t parent, uint32_t ns, int depth,
                      const TokenId* tokens);
  bool is_cached(BlockId block) const { return meta_[block].cached; }
  bool is_evictable(BlockId block) const { return meta_[block].where == Where::kEvictable; }
  int ref_count(BlockId block) const { return meta_[block].ref_count; }
  uint32_t generation(BlockId block) const { return meta_[block].generation; }

  // Retention pins, one per (session, block): `new_pin` counts one more pinning
  // session; either way `until` extends the block's pin.
  void pin(BlockId block, double until, double now, bool new_pin);
  // Drops one pin if the block still holds the same contents (`generation`).
  void unpin(BlockId block, uint32_t generation, double now);

  // Throws InvariantViolation with a description if the pool is inconsistent.
  // `holders[b]` is how many requests list block b (computed by the scheduler).
  void check_invariants(const std::vector<int>& holders, double now) const;

 private:
  enum class Where : uint8_t { kFree, kHeld, kPinned, kEvictable };
  struct Meta {
    int32_t ref_count = 0;
    Where where = Where::kFree;
    bool cached = false;
    int32_t depth = 0;
    int32_t priority = 0;
    int32_t pin_count = 0;
    uint32_t ns = 0;
    uint32_t generation = 0;
    uint64_t hash = 0;
    uint64_t parent = 0;
    double last_access = 0.0;
    double pinned_until = kNever;
    int64_t hits = 0;
    OrderKey key;  // eviction key while in evictable_
  };
  // (policy key, -depth, block): deterministic, children before parents on ties.
  using EvictEntry = std::tuple<double, double, int32_t, BlockId>;
  using PinEntry = std::pair<double, BlockId>;

  void park(BlockId block, double now);    // ref 0 and cached: into pinned_ or evictable_
  void unpark(BlockId block);              // out of pinned_ / evictable_
  void make_evictable(BlockId block);
  void uncache(BlockId block);
  EvictEntry evict_entry(BlockId block) const;

  int block_size_;
  std::shared_ptr<EvictionPolicy> eviction_;
  std::vector<Meta> meta_;
  std::vector<TokenId> tokens_;            // num_blocks * block_size; valid for cached blocks
  std::vector<BlockId> free_;              // stack; popped from the back
  std::unordered_map<uint64_t, BlockId> index_;
  std::set<EvictEntry> evictable_;
  std::set<PinEntry> pinned_;
  int64_t num_evicted_ = 0;
};

// The host tier for swapped-out KV: a fixed number of blocks, a free list.
class HostPool {
 public:
  explicit HostPool(int num_blocks);
  int num_blocks() const { return static_cast<int>(used_.size()); }
  int num_free() const { return static_cast<int>(free_.size()); }
  int allocate();
  void release(int block);
  void check_invariants(const std::vector<int>& holders) const;

 private:
  std::vector<int> free_;
  std::vector<uint8_t> used_;
};

}  // namespace tandem
