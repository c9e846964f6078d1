#include "hashing.h"

namespace tandem {
namespace {

// splitmix64 finaliser: a cheap bijective mixer with full avalanche.
inline uint64_t mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

}  // namespace

uint64_t namespace_hash(const std::string& cache_namespace) {
  uint64_t h = 0xcbf29ce484222325ULL;  // FNV-1a over the bytes, then mixed
  for (unsigned char c : cache_namespace) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return mix(h ^ 0x7461'6e64'656dULL);
}

// Token ids are non-negative int32, so bit 31 of each is clear; every key below has bits 31
// and 63 set, so no (word ^ key) is ever 0 and no product can cancel its other factor.
// Each 16-byte group is multiplied under its own position's keys, independently of the
// others (so the multiplies overlap), and the sum is mixed with the parent's hash.
//
//   tokens: [t0 t1 t2 t3][t4 t5 t6 t7] ...    group g: words w0 = t0|t1<<32, w1 = t2|t3<<32
//   h = mix(mix(parent + n*K) ^ sum_g fold((w0 ^ key_a(g)) * (w1 ^ key_b(g))))
//
// A short last group is padded with 0xffffffff, which no token id can be.
uint64_t block_hash(uint64_t parent, const TokenId* tokens, int n) {
  constexpr uint64_t kHigh = 0x8000000080000000ULL;
  auto word = [&](int i) -> uint64_t {
    const uint64_t lo = i < n ? static_cast<uint32_t>(tokens[i]) : 0xffffffffULL;
    const uint64_t hi = i + 1 < n ? static_cast<uint32_t>(tokens[i + 1]) : 0xffffffffULL;
    return lo | hi << 32;
  };
  uint64_t acc = 0;
  for (int i = 0, g = 1; i < n; i += 4, ++g) {
    const uint64_t key_a = (0x9e3779b97f4a7c15ULL * (2 * g - 1)) | kHigh;
    const uint64_t key_b = (0xd6e8feb86659fd93ULL * (2 * g)) | kHigh;
    const unsigned __int128 p = static_cast<unsigned __int128>(word(i) ^ key_a) * (word(i + 2) ^ key_b);
    acc += static_cast<uint64_t>(p) ^ static_cast<uint64_t>(p >> 64);
  }
  return mix(mix(parent + 0x9e3779b97f4a7c15ULL * static_cast<uint64_t>(n)) ^ acc);
}

}  // namespace tandem
