// A request and its lifecycle.
//
//   WAITING --admit--> PREFILLING --prefill_done--> DECODING --finish--> FINISHED
//                        |    ^                        |
//                        |    +------resume------+     |
//                        +--preempt--> PREEMPTED <-----+
//                                        |  (recompute: KV dropped, tokens kept;
//                                        |   swap: KV copied to the host tier)
//   any live state --abort--> ABORTED    +--resume--> PREFILLING or DECODING
//
// PREFILLING may also go straight to FINISHED when its first sampled token
// already stops it. Every transition goes through `transition()`, which throws
// on an illegal edge; blocks and slots change owner only inside the
// Scheduler's transition functions (admit, resume, preempt, finish, abort).
#pragma once

#include <string>
#include <vector>

#include "common.h"

namespace tandem {

enum class RequestState : uint8_t { kWaiting, kPrefilling, kDecoding, kPreempted, kFinished, kAborted };
enum class FinishReason : uint8_t { kNone, kStop, kLength, kModelLength, kAbort };

const char* state_name(RequestState state);
const char* finish_reason_name(FinishReason reason);
bool transition_allowed(RequestState from, RequestState to);

struct SamplingLimits {
  int max_new_tokens = 16;
  std::vector<TokenId> stop_token_ids;
  TokenId eos_token_id = -1;  // -1: the model has none
  bool ignore_eos = false;
};

struct Request {
  RequestId id = 0;
  uint64_t seq = 0;                 // unique admission number: ties and stale-plan checks
  std::vector<TokenId> tokens;      // prompt followed by output
  int num_prompt_tokens = 0;
  SamplingLimits limits;
  std::string session_id;           // empty: no session
  uint32_t ns = 0;                  // interned cache namespace
  uint64_t ns_root = 0;             // hash chain root of that namespace
  int priority = 0;
  double arrival_time = 0.0;
  // Its session's history when it arrived (what policies read as session_*).
  int session_turns = 0;
  int64_t session_service = 0;
  double session_last_end = -1e300;  // kNever

  RequestState state = RequestState::kWaiting;
  FinishReason finish_reason = FinishReason::kNone;
  int num_computed = 0;             // tokens whose KV is written
  int num_cached_tokens = 0;        // prefix hit at the last admission
  int first_cached_tokens = -1;     // prefix hit at the first admission
  int64_t num_computed_total = 0;   // tokens computed over its life, recomputation included
  double first_scheduled_time = -1; // `now` of the step that first scheduled it
  std::vector<double> token_times;  // `now` of the commit that appended each output token
  int num_preemptions = 0;
  std::vector<BlockId> blocks;      // device blocks, in sequence order
  std::vector<int> host_blocks;     // host blocks while swapped out
  std::vector<uint64_t> block_hashes;  // chained hashes of full blocks, computed lazily
  int num_registered = 0;           // blocks [0, num_registered) were offered to the index
  // While waiting: the prefix hit found last time, with each block's generation, so the
  // next step only re-checks generations instead of looking every block up again.
  std::vector<BlockId> match_blocks;
  std::vector<uint32_t> match_generations;
  int64_t match_evictions = -1;     // the pool's eviction count when they were remembered
  // How many of match_blocks were evictable at the pool's evictable epoch `hits_epoch` (0: not
  // counted since match_blocks last changed); a blocked admission re-checks it every step.
  int hits_evictable = 0;
  bool hits_complete = false;       // hits_evictable counted all of match_blocks (else a lower bound)
  uint64_t hits_epoch = 0;
  int slot = -1;                    // row of the persistent block table while running
  uint64_t last_step = 0;           // last plan that scheduled it
  bool abort_pending = false;       // aborted while in the plan in flight: applied at commit
  bool held = false;                // the admission policy held it back since it last waited

  int num_tokens() const { return static_cast<int>(tokens.size()); }
  int num_output_tokens() const { return num_tokens() - num_prompt_tokens; }
  bool swapped() const { return !host_blocks.empty(); }
  bool running() const { return state == RequestState::kPrefilling || state == RequestState::kDecoding; }
  bool terminal() const { return state == RequestState::kFinished || state == RequestState::kAborted; }
};

// Moves `request` to `to`, or throws InvariantViolation naming both states.
void transition(Request& request, RequestState to);

}  // namespace tandem
