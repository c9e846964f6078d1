// Shared types of the control plane. No Python, torch or clock in csrc/:
// every function that depends on time takes `now` (seconds) as an argument.
#pragma once

#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace tandem {

using RequestId = int64_t;
using BlockId = int32_t;
using TokenId = int32_t;

constexpr BlockId kNoBlock = -1;
constexpr double kNever = -1e300;  // "pinned until" value of an unpinned block

// Bad input from the caller: surfaces in Python as ValueError, state unchanged.
struct InvalidInput : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// A broken internal invariant or an illegal state transition: RuntimeError.
struct InvariantViolation : std::logic_error {
  using std::logic_error::logic_error;
};

// Messages are built with std::string and snprintf, never iostreams: an extension
// linked against a static libstdc++ may find its iostream locale uninitialised
// (seen on the GPU image: formatting a double through std::ostringstream crashed).
inline std::string format_number(double value) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", value);
  return buf;
}

#define TANDEM_REQUIRE(cond, msg)                   \
  do {                                              \
    if (!(cond)) throw ::tandem::InvalidInput(msg); \
  } while (0)

#define TANDEM_CHECK(cond, msg)                           \
  do {                                                    \
    if (!(cond)) throw ::tandem::InvariantViolation(msg); \
  } while (0)

}  // namespace tandem
