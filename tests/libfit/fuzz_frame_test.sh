#!/usr/bin/env bash
# Guards decode_frame() against hostile bytes: builds libfit/fuzz_frame.cc with clang's
# libFuzzer + ASan + UBSan and fuzzes it for FUZZ_SECONDS (default 20). Fails on any
# crash, sanitizer report or contract violation the target checks.
set -euo pipefail
src_root=$(dirname "$(readlink -f "$0")")/../..
[ -f "$src_root/libfit/frame.cc" ] || src_root=${TEST_SRCDIR:-.}/lego
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Warnings are errors here too, as in the Bazel build (.bazelrc).
clang++ -std=c++20 -O1 -g -Wall -Wextra -Werror -fsanitize=fuzzer,address,undefined \
  -fno-sanitize-recover=all \
  -I"$src_root/include" -I"$src_root" \
  "$src_root/libfit/frame.cc" "$src_root/libfit/fuzz_frame.cc" -o "$work/fuzz_frame"
mkdir -p "$work/corpus"
# Seeds: a valid empty request and a valid 4-byte reply, so mutations start near valid.
printf 'LFIT\x01\x01\x05\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00' > "$work/corpus/req"
printf 'LFIT\x01\x02\x05\x00\x04\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00abcd' > "$work/corpus/rep"
"$work/fuzz_frame" -max_total_time="${FUZZ_SECONDS:-20}" -print_final_stats=1 "$work/corpus" 2>&1 | tail -5
echo "fuzz_frame: no crash in ${FUZZ_SECONDS:-20} s"
