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
//
// Both orders delete lazily (csrc/eviction_order.h). A hit on a long cached
// context takes thousands of blocks out of the eviction order and its release
// puts them back, every turn; an entry costs no node allocation, taking a
// block out is O(1) (its entry just goes stale), and a release's blocks go in
// as one sorted run rather than one heap push each.
//
//   evictable_: runs + singles of entries (key, -depth, block, stamp)
//   where_[block] == kEvictable && stamps_[block] == entry.stamp  <=> valid
//
// A block's stamp changes on every push, so exactly one entry per parked
// block is valid; stale ones are skipped when they reach the top and dropped
// when a heap is compacted. Valid entries have distinct blocks, so they pop in
// exactly the total order a sorted set of them would have.
#pragma once

#include <algorithm>
#include <memory>
#include <new>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"
#include "eviction_order.h"
#include "policies.h"

namespace tandem {

// An allocator of cache-line-aligned arrays: a block's token row (block_size 16 -> 64 bytes)
// then sits in one line instead of straddling two.
template <class T>
struct LineAligned {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  LineAligned() = default;
  template <class U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kAlign); }
  template <class U>
  bool operator==(const LineAligned<U>&) const {
    return true;
  }
  template <class U>
  bool operator!=(const LineAligned<U>&) const {
    return false;
  }
};

// The prefix index: a block's chained hash -> the cached block. Open
// addressing with linear probing and backward-shift deletion (no tombstones)
// over a power-of-two table of at least 2 * num_blocks slots, so it is never
// more than half full and never rehashes.
class PrefixIndex {
 public:
  explicit PrefixIndex(int num_blocks);

  // The block under `hash`, or kNoBlock.
  BlockId find(uint64_t hash) const;
  // False (and nothing changes) if `hash` is already present.
  bool insert(uint64_t hash, BlockId block);
  // Removes `hash` if it maps to `block`.
  void erase(uint64_t hash, BlockId block);
  int size() const { return size_; }
  // Starts loading the slot where a probe for `hash` begins.
  void prefetch(uint64_t hash) const { __builtin_prefetch(&slots_[home(hash)]); }
  // Calls f(hash, block) for every entry (for invariant checks).
  template <class F>
  void for_each(F f) const {
    for (const Slot& s : slots_)
      if (s.block != kNoBlock) f(s.hash, s.block);
  }

 private:
  struct Slot {
    uint64_t hash = 0;
    BlockId block = kNoBlock;  // kNoBlock: empty
  };
  // Fibonacci hashing: the top bits of hash * 2^64/phi.
  size_t home(uint64_t hash) const { return static_cast<size_t>((hash * 0x9E3779B97F4A7C15ull) >> shift_); }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
  int shift_ = 0;
  int size_ = 0;
};

// What entered and left the prefix index, in order, for an engine to publish as KV cache events
// (docs/kv-events.md). One record a block:
//
//   records: [stored h0 (no parent)][stored h1 (parent h0)][removed h7][stored h2 (parent h1)] ...
//   tokens:  [ h0's block_size ids ][ h1's ids            ]            [ h2's ids            ] ...
//
// Recording is off by default; off, it costs one predictable branch per registered or evicted block.
struct KvEventLog {
  struct Record {
    uint64_t hash;
    uint64_t parent;  // the chain's previous block's hash; meaningless when !has_parent
    bool stored;      // false: removed (evicted)
    bool has_parent;  // false: the first block of its sequence (its parent is the namespace root)
  };
  std::vector<Record> records;
  std::vector<TokenId> tokens;  // block_size ids per stored record, in record order
};

class BlockPool {
 public:
  BlockPool(int num_blocks, int block_size, std::shared_ptr<EvictionPolicy> eviction);

  int num_blocks() const { return static_cast<int>(meta_.size()); }
  int block_size() const { return block_size_; }
  int num_free() const { return static_cast<int>(free_.size()); }
  int num_evictable() const { return num_evictable_; }
  int num_pinned() const { return num_pinned_; }
  int num_cached() const { return index_.size(); }
  // Blocks an allocation can take now: free plus evictable.
  int num_available() const { return num_free() + num_evictable(); }
  int64_t num_evicted() const { return num_evicted_; }

  // A remembered prefix match, `blocks[p]` found at chain position p when the pool's eviction
  // count was `since`: the first position whose block was evicted since (a cached block changes
  // generation only by eviction), or `n` if none. Reads the eviction log, so it costs the
  // evictions since rather than n; false (the caller checks generations) when that is longer or
  // the log no longer reaches back so far.
  bool first_evicted(int64_t since, const BlockId* blocks, int n, int* first) const;

  // Moves cached blocks whose pin has expired by `now` into the evictable set.
  void expire_pins(double now);

  // Takes a block from the free list, else evicts the first evictable one.
  // The caller checks num_available() first. The block comes back with ref 1.
  BlockId allocate();
  // allocate() n times, into out[0..n).
  void allocate_n(int n, BlockId* out);
  // Prefix-cache hits (an admission's, in order): one more holder of each cached block.
  void retain_all(const BlockId* blocks, size_t n, double now);
  // One holder fewer; at ref 0 the block goes to the cache (if indexed) or the free list.
  void release(BlockId block, double now, int priority);
  // release() of blocks[n-1], ..., blocks[0] in that order (a sequence's tail first, so that on
  // equal keys its later blocks are reused before its head); the blocks that become evictable
  // enter the eviction order as one run.
  void release_all(const BlockId* blocks, size_t n, double now, int priority);

  // The cached block holding `tokens` after `parent` in namespace `ns`, or kNoBlock.
  BlockId lookup(uint64_t hash, uint64_t parent, uint32_t ns, const TokenId* tokens) const;
  // Enters a held, full block into the index. False (and nothing changes) if
  // a block with the same content is already cached: this one stays private.
  bool register_block(BlockId block, uint64_t hash, uint64_t parent, uint32_t ns, int depth, const TokenId* tokens);
  bool is_cached(BlockId block) const { return tags_[block].cached; }
  bool is_evictable(BlockId block) const { return where_[block] == Where::kEvictable; }
  int ref_count(BlockId block) const { return meta_[block].ref_count; }
  uint32_t generation(BlockId block) const { return generations_[block]; }
  // How many of `blocks` are evictable (read from the compact tags, not the block metadata);
  // it may stop early once the count reaches `enough`, leaving *complete false (the count is
  // then a lower bound, at least `enough`).
  int count_evictable(const BlockId* blocks, size_t n, int enough, bool* complete) const;
  // Counts blocks becoming or ceasing to be evictable, evictions excepted. A count of evictable
  // blocks among cached blocks taken at some epoch still holds at the same epoch while none of
  // them was evicted (an eviction is seen as the block's generation changing).
  uint64_t evictable_epoch() const { return evictable_epoch_; }
  // Starts loading a block's metadata line (loops over a request's ~3,000 blocks are memory bound).
  void prefetch(BlockId block) const { __builtin_prefetch(&meta_[block]); }
  // Starts loading what register_block(block, hash, ...) touches: the block's metadata, its
  // token row and the prefix-index slot of `hash`.
  void prefetch_register(BlockId block, uint64_t hash) const {
    prefetch(block);
    __builtin_prefetch(&content_[block], 1);
    __builtin_prefetch(&tokens_[static_cast<size_t>(block) * block_size_], 1);
    index_.prefetch(hash);
  }

  // Retention pins, one per (session, block): `new_pin` counts one more pinning
  // session; either way `until` extends the block's pin.
  void pin(BlockId block, double until, double now, bool new_pin);
  // Drops one pin if the block still holds the same contents (`generation`).
  void unpin(BlockId block, uint32_t generation, double now);

  // KV cache events: record_events(true) starts logging what enters and leaves the prefix index;
  // take_events() hands the log over and starts an empty one. Recording changes no decision.
  void record_events(bool on) { recording_ = on; }
  bool recording_events() const { return recording_; }
  KvEventLog take_events() { return std::exchange(events_, KvEventLog{}); }
  // The hashes in the prefix index now (unordered): what a consumer of the events should hold.
  std::vector<uint64_t> cached_hashes() const {
    std::vector<uint64_t> out;
    out.reserve(static_cast<size_t>(index_.size()));
    index_.for_each([&](uint64_t hash, BlockId) { out.push_back(hash); });
    return out;
  }

  // Throws InvariantViolation with a description if the pool is inconsistent.
  // `holders[b]` is how many requests list block b (computed by the scheduler).
  void check_invariants(const std::vector<int>& holders, double now) const;

 private:
  enum class Where : uint8_t { kFree, kHeld, kPinned, kEvictable };
  // What loops over a request's ~3,000 blocks read, kept apart from the block's Meta in small
  // arrays that stay in cache: where_ and tags_ (1 and 2 bytes a block), generations_.
  struct Tag {
    bool cached = false;
    bool pinned = false;  // false: the block's Pin is the default one (no pin since allocation)
  };
  // What retain, release, keying and allocation touch: half a cache line a block (they each
  // touch ~3,000 blocks of a long context per request, memory-latency bound, so the whole
  // array's size is what decides how much of it stays in cache).
  struct alignas(32) Meta {
    int32_t ref_count = 0;
    int32_t depth = 0;
    int32_t priority = 0;
    double last_access = 0.0;
    int64_t hits = 0;
  };
  static_assert(sizeof(Meta) == 32, "a block's metadata is half a cache line");
  // Retention pins: touched only where pins are made, dropped or expire (tags_[b].pinned says
  // whether to look).
  struct Pin {
    double until = kNever;
    int32_t count = 0;
  };
  // What only the prefix index's users read (register, lookup, uncache): apart from Meta.
  struct Content {
    uint64_t hash = 0;
    uint64_t parent = 0;
    uint32_t ns = 0;
  };
  // Ordered by (policy key, -depth, block): deterministic, children before parents on ties.
  struct EvictEntry {
    double primary, secondary;
    int32_t neg_depth;
    BlockId block;
    uint64_t stamp;
    auto order() const { return std::tie(primary, secondary, neg_depth, block); }
  };
  // Ordered by (pinned until, block).
  struct PinEntry {
    double until;
    BlockId block;
    uint64_t stamp;
    auto order() const { return std::tie(until, block); }
  };

  void set_where(BlockId block, Where where);  // keeps num_evictable_ / num_pinned_ exact
  void park(BlockId block, double now);    // ref 0 and cached: into pinned_ or evictable_
  void unpark(BlockId block);              // out of pinned_ / evictable_ (its entry goes stale)
  // The policy's key for the block as it is now (checked: never NaN).
  OrderKey eviction_key(BlockId block) const;
  // The block's entry under `key`, with a new stamp (the caller marks it evictable and puts the
  // entry in the order). Inline: release_all makes one per block.
  EvictEntry evictable_entry(BlockId block, const OrderKey& key) {
    if (!uniform_key_) keys_[block] = key;
    const uint64_t stamp = stamps_[block] = ++next_stamp_;
    return {key.primary, key.secondary, -meta_[block].depth, block, stamp};
  }
  // What the eviction policy is shown of a block.
  CachedBlockView view_of(BlockId block) const;
  void make_evictable(BlockId block);
  void compact_orders();                   // drops stale entries once they outnumber the valid ones
  void push_pin(BlockId block);            // where is kPinned; the block's old entry goes stale
  void uncache(BlockId block);
  void log_eviction(BlockId block);
  bool valid(const EvictEntry& e) const { return where_[e.block] == Where::kEvictable && stamps_[e.block] == e.stamp; }
  bool valid(const PinEntry& e) const { return where_[e.block] == Where::kPinned && stamps_[e.block] == e.stamp; }
  void check_orders() const;

  int block_size_;
  std::shared_ptr<EvictionPolicy> eviction_;
  std::vector<Meta> meta_;                 // 32-byte aligned (C++17 aligned new)
  std::vector<Pin> pins_;
  // The policy's key is a function of last_access and priority (one key a release; the checks
  // recompute it), else keys_ holds each evictable block's key for the checks.
  bool uniform_key_;
  std::vector<OrderKey> keys_;
  std::vector<Content> content_;
  std::vector<Tag> tags_;
  std::vector<uint32_t> generations_;      // bumped when a block is reallocated (its contents change)
  std::vector<Where> where_;
  // Each parked block's stamp: that of its one valid order entry. Apart from Meta, so that checking
  // an entry (evictions skip stale ones, compaction scans them all) reads no block's metadata line.
  std::vector<uint64_t> stamps_;
  std::vector<TokenId, LineAligned<TokenId>> tokens_;  // num_blocks * block_size; valid for cached blocks
  std::vector<BlockId> free_;              // stack; popped from the back
  PrefixIndex index_;
  RunOrder<EvictEntry> evictable_;
  std::vector<EvictEntry> run_;            // release_all()'s run being built
  LazyHeap<PinEntry> pinned_;
  int num_evictable_ = 0;                  // blocks tagged kEvictable
  int num_pinned_ = 0;                     // blocks tagged kPinned
  uint64_t next_stamp_ = 0;
  uint64_t evictable_epoch_ = 1;
  int64_t num_evicted_ = 0;
  // (block, its chain position) of the latest evictions: eviction k is eviction_log_[k - log_base_].
  std::vector<std::pair<BlockId, int>> eviction_log_;
  int64_t log_base_ = 0;
  bool recording_ = false;                 // record_events()
  KvEventLog events_;
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
