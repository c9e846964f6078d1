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

uint64_t block_hash(uint64_t parent, const TokenId* tokens, int n) {
  uint64_t h = mix(parent + 0x9e3779b97f4a7c15ULL);
  for (int i = 0; i < n; ++i) {
    h = mix(h ^ (static_cast<uint64_t>(static_cast<uint32_t>(tokens[i])) + 0x9e3779b97f4a7c15ULL * (i + 1)));
  }
  return h;
}

}  // namespace tandem
