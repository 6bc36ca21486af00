//! The differential fuzzer (see tests/fuzz/mod.rs): fixed seeds in each pool mode, and
//! random seeds for as long as asked (tests/fuzz/run.sh).

mod fuzz;
mod support;

use fuzz::runner::{fixed_seeds, random_seeds, Mode};

/// The seeds `cargo test` runs in each mode.
const SEEDS: &[u64] = &[1, 2, 3];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_transcripts_equal_direct_sessions() {
    fixed_seeds("fuzz_session", Mode::Session, SEEDS).await;
}

// Known failures: transaction mode diverges from a session of its own on these seeds
// (issue 20; the report lists the minimized reproducers). Remove the `#[ignore]` when
// the pooled relay is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known divergences in transaction mode (issue 20)"]
async fn transaction_mode_pool_of_1_transcripts_equal_direct_sessions() {
    fixed_seeds("fuzz_pool1", Mode::Transaction { size: 1 }, SEEDS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known divergences in transaction mode (issue 20)"]
async fn transaction_mode_pool_of_2_transcripts_equal_direct_sessions() {
    fixed_seeds("fuzz_pool2", Mode::Transaction { size: 2 }, SEEDS).await;
}

/// Random seeds for ROLEGATE_FUZZ_SECONDS, with minimized reproducers: run by
/// tests/fuzz/run.sh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs for as long as asked: tests/fuzz/run.sh"]
async fn random_seeds_for_as_long_as_asked() {
    random_seeds().await;
}

/// Prints the programs of ROLEGATE_FUZZ_SEEDS (debugging aid).
#[test]
#[ignore = "prints programs"]
fn print_programs() {
    let seeds = std::env::var("ROLEGATE_FUZZ_SEEDS").unwrap_or_else(|_| "1".into());
    for seed in seeds.split(',') {
        let seed: u64 = seed.trim().parse().unwrap_or(1);
        for (c, program) in fuzz::runner::programs(seed, fuzz::runner::CLIENTS)
            .iter()
            .enumerate()
        {
            println!(
                "seed {seed} client {c}:\n{}",
                fuzz::grammar::describe(program)
            );
        }
    }
}
