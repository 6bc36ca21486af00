#!/bin/sh
# The differential fuzzer with random seeds, for as long as asked; prints each
# divergence with its seed, its client and a minimized reproducer.
#
#   tests/fuzz/run.sh                 # 600 s, every mode
#   SECONDS_TO_RUN=3600 MODES=transaction1 tests/fuzz/run.sh
#   SEEDS=17,42 MODES=transaction2 tests/fuzz/run.sh     # replay seeds
#   SEEDS=2 CLIENT=3 MODES=transaction1 tests/fuzz/run.sh  # shrink that client's divergence
#
# MODES: session, transaction1, transaction2 (transaction<N>: pool size N), comma-separated.
# WITHOUT leaves parts of the grammar out (seed,sequences,tenant,cancel,copy,notify,locks,
# settings,named,cursors,prepare, bindcount: Binds with a wrong parameter count), so that a known hole does not hide the others.
# SHRINK_SECONDS bounds the shrinking of each divergence (default 300).
set -eu
cd "$(dirname "$0")/../.."
export ROLEGATE_FUZZ_SECONDS="${SECONDS_TO_RUN:-600}"
export ROLEGATE_FUZZ_MODES="${MODES:-session,transaction1,transaction2}"
export ROLEGATE_FUZZ_SHRINK_SECONDS="${SHRINK_SECONDS:-300}"
export ROLEGATE_FUZZ_SEEDS="${SEEDS:-}"
export ROLEGATE_FUZZ_CLIENT="${CLIENT:-}"
export ROLEGATE_FUZZ_WITHOUT="${WITHOUT:-}"
exec cargo test --test fuzz_transcripts random_seeds_for_as_long_as_asked -- --ignored --nocapture
