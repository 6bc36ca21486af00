#!/usr/bin/env bash
# The sizes, in the release build, of the futures a client holds in transaction mode: the
# one each client keeps while connected (`serve_pooled`) and the one boxed per transaction
# (`one_lease`). The boxed one is allocated and freed on every transaction: at 1,032 bytes or
# less glibc's per-thread cache serves it (~20 instructions each way), above that malloc's
# slow path does (~250). Exits 1 when it is above.
# Uses rustc's -Zprint-type-sizes on the stable compiler (RUSTC_BOOTSTRAP), in a target
# directory of its own (the first run builds every dependency again: a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${FUTURE_SIZES_TARGET:-target/future-sizes}"
touch src/lib.rs
RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$target" cargo rustc --quiet --release --lib -- \
    -Zprint-type-sizes > "$target/type-sizes.txt"
# The largest instance of an async fn's future, or of the async block at file:line.
size_of() {
    { grep -E "^print-type-size type: \`\{async (fn body of $1[<(]|block@$1:)" "$target/type-sizes.txt" || true; } |
        sed -E 's/.*: ([0-9]+) bytes, alignment.*/\1/' | sort -n | tail -1
}
# `one_lease` returns an async block (see its comment): found by its line.
one_lease="src/relay/pooled.rs:$(awk '/^fn one_lease/ { found = 1 } found && /async move \{/ { print NR; exit }' src/relay/pooled.rs)"
status=0
for future in session::serve_pooled "$one_lease" relay::pooled::take_lease \
    relay::pooled::relay_while_pinned relay::pooled::finish_lease relay::pooled::relay_lease; do
    bytes="$(size_of "$future")"
    name="$future"
    [[ "$future" == "$one_lease" ]] && name="relay::pooled::one_lease ($future)"
    printf '%-50s %6s bytes\n' "$name" "${bytes:-?}"
    if [[ "$future" == "$one_lease" && "${bytes:-99999}" -gt 1032 ]]; then
        echo "one_lease is above 1,032 bytes: its box per transaction misses malloc's cache" >&2
        status=1
    fi
done
exit "$status"
