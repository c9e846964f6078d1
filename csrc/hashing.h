// Chained block hashes over token ids.
//
//   root = namespace_hash(cache_salt)
//   h[0] = block_hash(root, tokens[0:B])
//   h[i] = block_hash(h[i-1], tokens[i*B:(i+1)*B])
//
// Two full blocks share a hash only if the whole prefix up to and including
// them is equal and they live in the same namespace. The prefix index still
// compares parent hash and tokens on every hit, so a 64-bit collision can
// never make one request read another's different KV.
#pragma once

#include <cstdint>
#include <string>

#include "common.h"

namespace tandem {

uint64_t namespace_hash(const std::string& cache_namespace);
uint64_t block_hash(uint64_t parent, const TokenId* tokens, int n);

}  // namespace tandem
