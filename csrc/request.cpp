#include "request.h"

namespace tandem {

const char* state_name(RequestState state) {
  switch (state) {
    case RequestState::kWaiting:
      return "WAITING";
    case RequestState::kPrefilling:
      return "PREFILLING";
    case RequestState::kDecoding:
      return "DECODING";
    case RequestState::kPreempted:
      return "PREEMPTED";
    case RequestState::kFinished:
      return "FINISHED";
    case RequestState::kAborted:
      return "ABORTED";
  }
  return "?";
}

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone:
      return "";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kModelLength:
      return "model_length";
    case FinishReason::kAbort:
      return "abort";
  }
  return "?";
}

bool transition_allowed(RequestState from, RequestState to) {
  using S = RequestState;
  if (to == S::kAborted) return from != S::kFinished && from != S::kAborted;
  switch (from) {
    case S::kWaiting:
      return to == S::kPrefilling;
    case S::kPrefilling:
      return to == S::kDecoding || to == S::kPreempted || to == S::kFinished;
    case S::kDecoding:
      return to == S::kFinished || to == S::kPreempted;
    case S::kPreempted:
      return to == S::kPrefilling || to == S::kDecoding;
    case S::kFinished:
    case S::kAborted:
      return false;
  }
  return false;
}

void transition(Request& request, RequestState to) {
  if (!transition_allowed(request.state, to)) {
    throw InvariantViolation(std::string("illegal transition ") + state_name(request.state) + " -> " + state_name(to) +
                             " for request " + std::to_string(request.id));
  }
  request.state = to;
}

}  // namespace tandem
