// Orders with lazy deletion for the block pool (csrc/block_pool.h): a plain min-heap, and the
// eviction order, which also takes whole sorted runs of entries.
//
// A request's release parks thousands of blocks at once (a 50K-token context is ~3,000
// blocks). Pushing each into one big heap costs a sift through a heap of ~10^5 entries, and
// every eviction pays the same again. Instead one release's entries become one run, sorted
// once (already sorted for keys that are equal over the release, as LRU's are: then the
// order is by depth, and a release goes tail first), and a small heap of run heads merges
// the runs:
//
//   run 0:  [e e e e e e e e]      next ->     heads: min-heap of runs by their next entry
//   run 1:      [e e e e e]                    pop  = the smaller of heads.top's next entry
//   run 2:  [e e]                                     and singles.top (entries pushed alone)
//   singles: heap of entries pushed one by one
//
// Every entry sits in exactly one of these until it is popped, so the smallest valid entry
// is the smallest of the run heads and the singles' top, once stale entries met on the way
// are dropped: pops come out in exactly the order one heap of all entries would give
// (valid entries are of distinct blocks, so their order is total). Stale entries are
// dropped when they reach a front and when the whole order is compacted.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace tandem {

// A min-heap over a vector, for entries deleted lazily.
template <class Entry>
class LazyHeap {
 public:
  bool empty() const { return entries_.empty(); }
  size_t size() const { return entries_.size(); }
  const Entry& top() const { return entries_.front(); }
  const std::vector<Entry>& entries() const { return entries_; }
  void push(const Entry& e) {
    entries_.push_back(e);
    std::push_heap(entries_.begin(), entries_.end(), later);
  }
  void pop() {
    std::pop_heap(entries_.begin(), entries_.end(), later);
    entries_.pop_back();
  }
  // Rebuilds from the valid entries once the stale ones outnumber
  // max(kMinStale, 2 * valid): O(1) amortized per push, memory bounded.
  template <class Valid>
  void compact_if_stale(size_t valid, Valid is_valid) {
    if (entries_.size() - valid <= std::max(kMinStale, 2 * valid)) return;
    compact(is_valid);
  }
  template <class Valid>
  void compact(Valid is_valid) {
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(), [&](const Entry& e) { return !is_valid(e); }),
                   entries_.end());
    std::make_heap(entries_.begin(), entries_.end(), later);
  }
  bool is_heap() const { return std::is_heap(entries_.begin(), entries_.end(), later); }
  // The most entries an order of `max_valid` valid ones may hold.
  static size_t bound(size_t max_valid) { return max_valid + std::max(kMinStale, 2 * max_valid); }

  static constexpr size_t kMinStale = 1024;

 private:
  // std::greater on the order: a min-heap (a functor, so the heap calls inline).
  struct Later {
    bool operator()(const Entry& a, const Entry& b) const { return b.order() < a.order(); }
  };
  static constexpr Later later{};
  std::vector<Entry> entries_;
};

// The eviction order: single entries in a LazyHeap, and sorted runs merged by a heap of heads.
template <class Entry>
class RunOrder {
 public:
  bool empty() const { return singles_.empty() && heads_.empty(); }
  // Entries not yet popped, stale ones included.
  size_t size() const { return singles_.size() + run_entries_; }
  void push(const Entry& e) { singles_.push(e); }
  // Takes `entries` (any order; sorted here) as one run, leaving `entries` empty.
  void push_run(std::vector<Entry>& entries) {
    if (entries.empty()) return;
    if (entries.size() == 1) {
      push(entries.front());
      entries.clear();
      return;
    }
    if (!std::is_sorted(entries.begin(), entries.end(), before)) std::sort(entries.begin(), entries.end(), before);
    uint32_t r;
    if (free_runs_.empty()) {
      r = static_cast<uint32_t>(runs_.size());
      runs_.emplace_back();
    } else {
      r = free_runs_.back();
      free_runs_.pop_back();
    }
    runs_[r].entries.swap(entries);
    runs_[r].next = 0;
    entries.clear();
    if (!spares_.empty()) {  // a drained run's storage, for the caller's next run
      entries.swap(spares_.back());
      spares_.pop_back();
    }
    run_entries_ += runs_[r].entries.size();
    heads_.push_back(r);
    std::push_heap(heads_.begin(), heads_.end(), HeadLater{this});
  }
  // Pops entries until a valid one, which it returns in *out; false if the order ran out.
  template <class Valid>
  bool pop_valid(Valid valid, Entry* out) {
    for (;;) {
      const bool singles = !singles_.empty();
      if (heads_.empty()) {
        if (!singles) return false;
        *out = singles_.top();
        singles_.pop();
      } else if (singles && singles_.top().order() < head(heads_.front()).order()) {
        *out = singles_.top();
        singles_.pop();
      } else {
        *out = take_head(valid);
      }
      if (valid(*out)) return true;
    }
  }
  // The next entry pop_valid() would look at first, or null (to prefetch what it reads).
  const Entry* peek() const {
    const Entry* best = singles_.empty() ? nullptr : &singles_.top();
    if (!heads_.empty()) {
      const Entry& h = head(heads_.front());
      if (!best || !(best->order() < h.order())) best = &h;
    }
    return best;
  }
  // Keeps only valid entries once the stale ones outnumber max(kMinStale, 2 * valid).
  template <class Valid>
  void compact_if_stale(size_t valid, Valid is_valid) {
    if (size() - valid <= std::max(LazyHeap<Entry>::kMinStale, 2 * valid)) return;
    singles_.compact(is_valid);
    heads_.clear();
    run_entries_ = 0;
    for (uint32_t r = 0; r < runs_.size(); ++r) {
      Run& run = runs_[r];
      if (run.entries.empty()) continue;  // a free slot
      auto first = run.entries.begin() + static_cast<std::ptrdiff_t>(run.next);
      auto last = std::remove_if(first, run.entries.end(), [&](const Entry& e) { return !is_valid(e); });
      run.entries.erase(last, run.entries.end());
      run.entries.erase(run.entries.begin(), first);
      run.next = 0;
      if (run.entries.empty()) {
        free_run(r);
        continue;
      }
      run_entries_ += run.entries.size();
      heads_.push_back(r);
    }
    std::make_heap(heads_.begin(), heads_.end(), HeadLater{this});
  }
  // Calls f(entry) for every entry not yet popped.
  template <class F>
  void for_each(F f) const {
    for (const Entry& e : singles_.entries()) f(e);
    for (uint32_t r : heads_) {
      const Run& run = runs_[r];
      for (size_t k = run.next; k < run.entries.size(); ++k) f(run.entries[k]);
    }
  }
  // The structure itself: singles a heap, each live run sorted and non-empty from its next
  // entry, the heads a heap of distinct live runs, the entry count right, free slots empty.
  bool well_formed() const {
    if (!singles_.is_heap()) return false;
    if (!std::is_heap(heads_.begin(), heads_.end(), HeadLater{this})) return false;
    std::vector<uint8_t> live(runs_.size(), 0);
    size_t count = 0;
    for (uint32_t r : heads_) {
      if (r >= runs_.size() || live[r]) return false;
      live[r] = 1;
      const Run& run = runs_[r];
      if (run.next >= run.entries.size()) return false;
      if (!std::is_sorted(run.entries.begin() + static_cast<std::ptrdiff_t>(run.next), run.entries.end(), before))
        return false;
      count += run.entries.size() - run.next;
    }
    for (uint32_t r : free_runs_) {
      if (r >= runs_.size() || live[r] || !runs_[r].entries.empty()) return false;
      live[r] = 2;
    }
    for (uint8_t l : live) {
      if (l == 0) return false;  // a run slot neither live nor free
    }
    return count == run_entries_;
  }

 private:
  struct Run {
    std::vector<Entry> entries;
    size_t next = 0;  // entries before it were popped
  };
  struct Before {
    bool operator()(const Entry& a, const Entry& b) const { return a.order() < b.order(); }
  };
  static constexpr Before before{};
  // A min-heap of run indices by their next entry.
  struct HeadLater {
    const RunOrder* order;
    bool operator()(uint32_t a, uint32_t b) const { return order->head(b).order() < order->head(a).order(); }
  };
  const Entry& head(uint32_t r) const { return runs_[r].entries[runs_[r].next]; }
  // Takes the first run's head. Stale entries right behind it are dropped with it (an entry
  // never turns valid again, and dropping one early moves no valid entry), so a streak of them
  // costs one pass through the heads heap rather than one each.
  template <class Valid>
  Entry take_head(Valid valid) {
    const uint32_t r = heads_.front();
    Run& run = runs_[r];
    const Entry e = run.entries[run.next++];
    const size_t first = run.next;
    while (run.next < run.entries.size() && !valid(run.entries[run.next])) ++run.next;
    run_entries_ -= 1 + (run.next - first);
    if (run.next == run.entries.size()) {
      std::pop_heap(heads_.begin(), heads_.end(), HeadLater{this});
      heads_.pop_back();
      free_run(r);
    } else {
      sift_down_top();  // the run stays, with a later head: usually still the first or near it
    }
    return e;
  }
  // Restores the heads heap after its top run's head moved on to a later entry: one sift-down
  // from the top (pop_heap + push_heap would take two passes), two compares when the run stays
  // first. Which of two tied heads is on top can differ, but tied entries are of one block, so
  // at most one is valid: the valid entries still come out in the same order.
  void sift_down_top() {
    const HeadLater later{this};
    const size_t n = heads_.size();
    size_t i = 0;
    const uint32_t moving = heads_[0];
    for (;;) {
      size_t child = 2 * i + 1;
      if (child >= n) break;
      if (child + 1 < n && later(heads_[child], heads_[child + 1])) ++child;
      if (!later(moving, heads_[child])) break;
      heads_[i] = heads_[child];
      i = child;
    }
    heads_[i] = moving;
  }
  // A drained run's storage is kept for a later push_run (a few: a release of a long context
  // writes a ~100 KB run, whose fresh allocation would cost more than filling it).
  void free_run(uint32_t r) {
    std::vector<Entry>& entries = runs_[r].entries;
    entries.clear();
    if (spares_.size() < kMaxSpares) spares_.push_back(std::move(entries));
    std::vector<Entry>().swap(entries);
    runs_[r].next = 0;
    free_runs_.push_back(r);
  }
  static constexpr size_t kMaxSpares = 4;

  LazyHeap<Entry> singles_;
  std::vector<Run> runs_;
  std::vector<uint32_t> heads_;
  std::vector<uint32_t> free_runs_;
  std::vector<std::vector<Entry>> spares_;  // empty, with capacity (free_run)
  size_t run_entries_ = 0;  // entries of live runs not yet popped
};

}  // namespace tandem
