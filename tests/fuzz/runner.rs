//! The differential run: the same programs on private direct sessions and through a
//! rolegate, transcripts compared client by client; a shrinker for the programs of a
//! client whose transcripts differ.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use super::client::{self, Target, Transcript};
use super::grammar::{self, describe, End, Program, Step};
use crate::support::{self, Options, Rolegate, TestDb, LOGIN_PASSWORD};

/// How many clients run at once (each with its own table, sequence, channel and keys).
pub const CLIENTS: usize = 8;

/// How rolegate pools: a backend connection per client, or transaction pooling on `size`
/// backend connections.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Session,
    Transaction { size: usize },
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Session => write!(f, "session mode"),
            Mode::Transaction { size } => write!(f, "transaction mode, pool size {size}"),
        }
    }
}

impl Mode {
    /// `session`, `transaction1`, `transaction2`, … (the names ROLEGATE_FUZZ_MODES takes).
    pub fn parse(name: &str) -> Option<Mode> {
        match name.trim() {
            "session" => Some(Mode::Session),
            other => other
                .strip_prefix("transaction")
                .and_then(|n| n.parse().ok())
                .map(|size| Mode::Transaction { size }),
        }
    }

    fn options(self) -> Options {
        match self {
            Mode::Session => Options::default(),
            Mode::Transaction { size } => Options {
                // Waiting for a backend connection is not what is compared: clients wait
                // as long as it takes (a cancel that hangs shows as a hang instead).
                extra: format!(
                    "[pool]\nmode = \"transaction\"\nsize = {size}\ncheckout_timeout = \"120s\"\n"
                ),
                ..Options::default()
            },
        }
    }
}

/// A database with the clients' tables and sequences, made by a migrator through
/// rolegate, and a second login role for the direct sessions (so that they can be told
/// from rolegate's backend connections).
pub struct Env {
    pub db: TestDb,
    direct_login: String,
}

/// Advisory lock keys are new for every run, so a lock a run left behind (a backend
/// still ending) never meets the next run.
static RUNS: AtomicI64 = AtomicI64::new(1);

impl Env {
    pub async fn create(prefix: &str) -> Env {
        let db = TestDb::create(prefix).await;
        let direct_login = format!("{}_direct", db.name);
        support::admin("postgres")
            .await
            .batch_execute(&format!(
                "CREATE ROLE \"{direct_login}\" LOGIN PASSWORD '{}' IN ROLE \"{}\"",
                rolegate::scram::make_verifier(LOGIN_PASSWORD),
                db.owner
            ))
            .await
            .expect("the direct sessions' login role");
        let rg = Rolegate::start(&db).await;
        let migrate = rg.client("migrate", &db).await;
        let mut ddl = String::new();
        for c in 0..CLIENTS {
            ddl.push_str(&format!(
                "CREATE TABLE t{c} (id int PRIMARY KEY, v text NOT NULL, n int NOT NULL CHECK (n >= 0));
                 CREATE SEQUENCE s{c};\n"
            ));
        }
        migrate
            .batch_execute(&ddl)
            .await
            .expect("the migrator makes the clients' tables");
        Env { db, direct_login }
    }

    /// The clients' data as every run starts with it.
    async fn reset(&self) {
        let mut sql = String::new();
        for c in 0..CLIENTS {
            sql.push_str(&format!(
                "TRUNCATE t{c}; INSERT INTO t{c} SELECT g, 'seed' || g, g FROM generate_series(1, 4) g; ALTER SEQUENCE s{c} RESTART;\n"
            ));
        }
        support::admin(&self.db.name)
            .await
            .batch_execute(&sql)
            .await
            .expect("resetting the clients' data");
    }

    /// Waits until `role` has no session left on the server.
    async fn until_gone(&self, role: &str) {
        let admin = support::admin("postgres").await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                    &[&role],
                )
                .await
                .expect("pg_stat_activity")
                .get(0);
            if n == 0 || Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn direct_target(&self) -> Target {
        Target {
            port: support::cluster().port,
            user: self.direct_login.clone(),
            password: LOGIN_PASSWORD.to_owned(),
            database: self.db.name.clone(),
            // As rolegate starts its backend sessions: in the owner role from the start,
            // so that RESET ALL and DISCARD ALL return to it.
            params: vec![("role".to_owned(), self.db.owner.clone())],
        }
    }

    /// Runs every non-empty program at once against `target`.
    async fn phase(&self, target: &Target, programs: &[Program]) -> Vec<Transcript> {
        let run = RUNS.fetch_add(1, Ordering::SeqCst);
        let mut tasks = Vec::new();
        for (c, program) in programs.iter().enumerate() {
            let target = target.clone();
            let program = program.clone();
            let base = run * 1000 + c as i64 * 10;
            let keys = [base, base + 1, base + 2, base + 3];
            tasks.push(tokio::spawn(async move {
                if program.is_empty() {
                    Transcript::default()
                } else {
                    client::run(&target, &program, keys).await
                }
            }));
        }
        let mut transcripts = Vec::new();
        for task in tasks {
            transcripts.push(task.await.expect("a client task panicked"));
        }
        transcripts
    }

    /// The programs on direct sessions, then through a new rolegate in `mode`; the
    /// transcripts of each client (direct, through rolegate).
    pub async fn run(
        &self,
        mode: Mode,
        programs: &[Program],
    ) -> (Vec<Transcript>, Vec<Transcript>) {
        let started = Instant::now();
        self.reset().await;
        let direct = self.phase(&self.direct_target(), programs).await;
        let direct_done = started.elapsed();
        self.until_gone(&self.direct_login).await;
        self.reset().await;
        let rg = Rolegate::start_with(&self.db, mode.options()).await;
        let rolegate_started = started.elapsed();
        let target = Target {
            port: rg.port,
            user: "web".to_owned(),
            password: support::password_of("web").to_owned(),
            database: self.db.name.clone(),
            params: Vec::new(),
        };
        let through = self.phase(&target, programs).await;
        let rolegate_done = started.elapsed();
        drop(rg);
        self.until_gone(&self.db.login).await;
        if env_var("ROLEGATE_FUZZ_VERBOSE").is_some() {
            eprintln!(
                "fuzz: direct {direct_done:?}, rolegate started {rolegate_started:?}, done {rolegate_done:?}, all {:?}",
                started.elapsed()
            );
        }
        (direct, through)
    }
}

/// A transcript as compared: notifications apart (as a sorted list: when one arrives
/// is timing), each run of ParameterStatus messages sorted (their order is not).
struct Normalised {
    lines: Vec<(usize, String)>,
    notifications: Vec<String>,
}

fn normalise(transcript: &Transcript) -> Normalised {
    let mut lines: Vec<(usize, String)> = Vec::new();
    let mut notifications = Vec::new();
    let mut run_start = None;
    for (step, line) in &transcript.lines {
        if line.starts_with("Notification ") {
            notifications.push(line.clone());
            continue;
        }
        if line.starts_with("ParameterStatus ") {
            let start = *run_start.get_or_insert(lines.len());
            lines.push((*step, line.clone()));
            lines[start..].sort_by(|a, b| a.1.cmp(&b.1));
        } else {
            run_start = None;
            lines.push((*step, line.clone()));
        }
    }
    notifications.sort();
    Normalised {
        lines,
        notifications,
    }
}

/// Where one client's transcripts part.
pub struct Divergence {
    pub client: usize,
    /// The step running when the first differing message arrived.
    pub step: usize,
    /// The first pair of messages that differ: what the shrinker keeps, so that a
    /// reproducer shows the same hole as the run it came from.
    pub signature: String,
    pub report: String,
}

/// Compares one client's transcripts; None when equal.
fn compare(client: usize, direct: &Transcript, through: &Transcript) -> Option<Divergence> {
    let a = normalise(direct);
    let b = normalise(through);
    let first = (0..a.lines.len().max(b.lines.len()))
        .find(|&i| a.lines.get(i).map(|l| &l.1) != b.lines.get(i).map(|l| &l.1));
    if first.is_none() && a.notifications == b.notifications {
        return None;
    }
    let mut report = String::new();
    let signature = match first {
        Some(i) => format!(
            "{:?} / {:?}",
            a.lines.get(i).map(|l| &l.1),
            b.lines.get(i).map(|l| &l.1)
        ),
        None => "notifications".to_owned(),
    };
    let step = match first {
        Some(i) => {
            let step = a
                .lines
                .get(i)
                .or(b.lines.get(i))
                .map_or(0, |(step, _)| *step);
            let window = |lines: &[(usize, String)]| {
                let from = i.saturating_sub(4);
                let mut out = String::new();
                for (j, (step, line)) in lines.iter().enumerate().skip(from).take(12) {
                    let mark = if j == i { ">>" } else { "  " };
                    out.push_str(&format!("    {mark} [step {step:>2}] {line}\n"));
                }
                if lines.len() <= i {
                    out.push_str("    >> (nothing more)\n");
                }
                out
            };
            report.push_str(&format!(
                "  first difference: message #{i}\n  on its own session:\n{}  through rolegate:\n{}",
                window(&a.lines),
                window(&b.lines)
            ));
            step
        }
        None => 0,
    };
    if a.notifications != b.notifications {
        report.push_str(&format!(
            "  notifications on its own session: {:?}\n  notifications through rolegate: {:?}\n",
            a.notifications, b.notifications
        ));
    }
    Some(Divergence {
        client,
        step,
        signature,
        report,
    })
}

/// Every client whose transcripts differ.
pub fn divergences(direct: &[Transcript], through: &[Transcript]) -> Vec<Divergence> {
    direct
        .iter()
        .zip(through)
        .enumerate()
        .filter_map(|(c, (a, b))| compare(c, a, b))
        .collect()
}

pub fn programs(seed: u64, clients: usize, mode: Mode) -> Vec<Program> {
    let default_without = match mode {
        Mode::Session => grammar::SESSION_MODE_DEFAULT_WITHOUT,
        Mode::Transaction { .. } => grammar::TRANSACTION_MODE_DEFAULT_WITHOUT,
    };
    (0..clients)
        .map(|c| grammar::program(seed, c, default_without))
        .collect()
}

/// Runs `seed` once in `mode`; the report of every divergence (empty when none).
pub async fn check_seed(env: &Env, mode: Mode, seed: u64) -> Vec<(Divergence, Program)> {
    let programs = programs(seed, CLIENTS, mode);
    let (direct, through) = env.run(mode, &programs).await;
    divergences(&direct, &through)
        .into_iter()
        .map(|d| {
            let program = programs[d.client].clone();
            (d, program)
        })
        .collect()
}

/// Whether `client`'s transcripts still differ with these programs, in the same way
/// (`signature`); two tries when other clients run: what differs under concurrency may
/// not differ every time.
async fn still_diverges(
    env: &Env,
    mode: Mode,
    programs: &[Program],
    client: usize,
    signature: &str,
) -> bool {
    let alone = programs.iter().filter(|p| !p.is_empty()).count() == 1;
    for _ in 0..if alone { 1 } else { 2 } {
        let (direct, through) = env.run(mode, programs).await;
        if compare(client, &direct[client], &through[client])
            .is_some_and(|d| d.signature == signature)
        {
            return true;
        }
    }
    false
}

/// Shrinks the programs while `client` still diverges: first without the other clients,
/// then by dropping chunks of its steps, halving the chunk size down to single steps,
/// until `deadline`. Returns the smallest programs found.
pub async fn shrink(
    env: &Env,
    mode: Mode,
    mut programs: Vec<Program>,
    client: usize,
    signature: &str,
    deadline: Instant,
) -> Vec<Program> {
    // Without the others, or with fewer of them.
    let alone: Vec<Program> = (0..programs.len())
        .map(|c| {
            if c == client {
                programs[c].clone()
            } else {
                Vec::new()
            }
        })
        .collect();
    if still_diverges(env, mode, &alone, client, signature).await {
        programs = alone;
    } else {
        for other in 0..programs.len() {
            if other == client || programs[other].is_empty() || Instant::now() > deadline {
                continue;
            }
            let mut fewer = programs.clone();
            fewer[other] = Vec::new();
            if still_diverges(env, mode, &fewer, client, signature).await {
                programs = fewer;
            }
        }
    }
    // Its own steps, in chunks from half of them down to one at a time.
    let mut chunk = (programs[client].len() / 2).max(1);
    while Instant::now() < deadline {
        let mut at = 0;
        let mut removed_any = false;
        while at < programs[client].len() && Instant::now() < deadline {
            let mut candidate = programs.clone();
            let end = (at + chunk).min(candidate[client].len());
            candidate[client].drain(at..end);
            if !candidate[client].is_empty()
                && grammar::well_formed(&candidate[client])
                && still_diverges(env, mode, &candidate, client, signature).await
            {
                programs = candidate;
                removed_any = true;
            } else {
                at = end;
            }
        }
        if chunk == 1 && !removed_any {
            break;
        }
        chunk = (chunk / 2).max(1);
    }
    // A plain Terminate instead of an abrupt end, if the difference stays.
    if let Some(Step::End(end)) = programs[client].last() {
        if *end != End::Terminate && Instant::now() < deadline {
            let mut candidate = programs.clone();
            if let Some(last) = candidate[client].last_mut() {
                *last = Step::End(End::Terminate);
            }
            if still_diverges(env, mode, &candidate, client, signature).await {
                programs = candidate;
            }
        }
    }
    programs
}

/// A divergence as printed: where, what the client ran, and how the transcripts part.
pub fn report(mode: Mode, seed: u64, divergence: &Divergence, program: &[Step]) -> String {
    let without = env_var("ROLEGATE_FUZZ_WITHOUT")
        .map(|w| format!(" (ROLEGATE_FUZZ_WITHOUT={w})"))
        .unwrap_or_default();
    format!(
        "DIVERGENCE in {mode}, seed {seed}{without}, client {} (step {}):\n{}  its program:\n{}",
        divergence.client,
        divergence.step,
        divergence.report,
        describe(program)
    )
}

/// The minimized reproducer, as printed.
pub fn reproducer(programs: &[Program], client: usize) -> String {
    let mut out = format!("  client {client}:\n{}", describe(&programs[client]));
    for (c, program) in programs.iter().enumerate() {
        if c != client && !program.is_empty() {
            out.push_str(&format!(
                "  (running at the same time) client {c}: {} steps (seed program)\n",
                program.len()
            ));
        }
    }
    out
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Runs `seeds` in `mode` and fails with every divergence found (each shrunk when
/// ROLEGATE_FUZZ_SHRINK_SECONDS is set).
pub async fn fixed_seeds(prefix: &str, mode: Mode, seeds: &[u64]) {
    let env = Env::create(prefix).await;
    let shrink_for = env_var("ROLEGATE_FUZZ_SHRINK_SECONDS").and_then(|s| s.parse().ok());
    let mut reports = Vec::new();
    for &seed in seeds {
        reports.extend(check_and_report(&env, mode, seed, shrink_for).await);
    }
    assert!(
        reports.is_empty(),
        "{} divergence(s) (reports above):\n{}",
        reports.len(),
        reports.join("\n")
    );
}

/// Checks one seed; prints and returns a report (with a shrunk reproducer if asked) for
/// each client whose transcripts differ.
async fn check_and_report(
    env: &Env,
    mode: Mode,
    seed: u64,
    shrink_for: Option<u64>,
) -> Vec<String> {
    let mut reports = Vec::new();
    let only: Option<usize> = env_var("ROLEGATE_FUZZ_CLIENT").and_then(|c| c.parse().ok());
    for (divergence, program) in check_seed(env, mode, seed).await {
        if only.is_some_and(|c| c != divergence.client) {
            continue;
        }
        let mut text = report(mode, seed, &divergence, &program);
        if let Some(seconds) = shrink_for {
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let shrunk = shrink(
                env,
                mode,
                programs(seed, CLIENTS, mode),
                divergence.client,
                &divergence.signature,
                deadline,
            )
            .await;
            text.push_str(&format!(
                "  minimized reproducer (seed {seed}, {mode}):\n{}",
                reproducer(&shrunk, divergence.client)
            ));
            let (direct, through) = env.run(mode, &shrunk).await;
            let client = divergence.client;
            match compare(client, &direct[client], &through[client]) {
                Some(d) => text.push_str(&format!("  its transcripts:\n{}", d.report)),
                None => text.push_str("  (the minimized run did not diverge this time)\n"),
            }
        }
        eprintln!("{text}");
        reports.push(format!(
            "{mode}, seed {seed}, client {} (step {})",
            divergence.client, divergence.step
        ));
        // One shrunk reproducer per seed and mode is enough: the others are often the
        // same hole seen by another client.
        if shrink_for.is_some() {
            break;
        }
    }
    reports
}

/// Random seeds for ROLEGATE_FUZZ_SECONDS (or the seeds in ROLEGATE_FUZZ_SEEDS), in the
/// modes of ROLEGATE_FUZZ_MODES (default `session,transaction1,transaction2`); shrinks
/// each divergence for ROLEGATE_FUZZ_SHRINK_SECONDS (default 300) and fails at the end
/// if any was found.
pub async fn random_seeds() {
    let modes: Vec<Mode> = env_var("ROLEGATE_FUZZ_MODES")
        .unwrap_or_else(|| "session,transaction1,transaction2".to_owned())
        .split(',')
        .map(|m| Mode::parse(m).unwrap_or_else(|| panic!("unknown mode {m:?}")))
        .collect();
    let seconds: u64 = env_var("ROLEGATE_FUZZ_SECONDS")
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let shrink_for = env_var("ROLEGATE_FUZZ_SHRINK_SECONDS")
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let fixed: Option<Vec<u64>> = env_var("ROLEGATE_FUZZ_SEEDS").map(|s| {
        s.split(',')
            .map(|n| n.trim().parse().expect("ROLEGATE_FUZZ_SEEDS: numbers"))
            .collect()
    });
    let env = Env::create("fuzz_random").await;
    let started = Instant::now();
    let mut clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut seeds = fixed.clone().unwrap_or_default().into_iter();
    let mut reports = Vec::new();
    let mut runs = 0;
    loop {
        let seed = match &fixed {
            Some(_) => match seeds.next() {
                Some(seed) => seed,
                None => break,
            },
            None => {
                if started.elapsed() > Duration::from_secs(seconds) {
                    break;
                }
                clock = grammar::Rng::new(clock).next_u64();
                clock % 1_000_000_000
            }
        };
        for &mode in &modes {
            eprintln!("fuzz: seed {seed}, {mode}");
            runs += 1;
            reports.extend(check_and_report(&env, mode, seed, Some(shrink_for)).await);
        }
    }
    eprintln!(
        "fuzz: {runs} runs in {} s, {} divergence(s)",
        started.elapsed().as_secs(),
        reports.len()
    );
    assert!(
        reports.is_empty(),
        "{} divergence(s) (reports above):\n{}",
        reports.len(),
        reports.join("\n")
    );
}

/// Runs one client's `program` alone (the other clients idle) in `mode`; panics with
/// both transcripts if they differ. For the minimized reproducers kept as tests.
pub async fn replay_alone(prefix: &str, mode: Mode, program: Program) {
    let env = Env::create(prefix).await;
    let mut programs = vec![Vec::new(); CLIENTS];
    programs[0] = program;
    let (direct, through) = env.run(mode, &programs).await;
    if let Some(d) = compare(0, &direct[0], &through[0]) {
        panic!(
            "{mode}: the transcripts differ:\n{}  the program:\n{}",
            d.report,
            describe(&programs[0])
        );
    }
}

/// Replays steps of one client's program alone: ROLEGATE_FUZZ_SEEDS (the first),
/// ROLEGATE_FUZZ_CLIENT, ROLEGATE_FUZZ_STEPS (`3,7-9`), ROLEGATE_FUZZ_MODES (the first).
pub async fn replay_steps() {
    let seed: u64 = env_var("ROLEGATE_FUZZ_SEEDS")
        .and_then(|s| s.split(',').next().and_then(|n| n.trim().parse().ok()))
        .expect("ROLEGATE_FUZZ_SEEDS");
    let client: usize = env_var("ROLEGATE_FUZZ_CLIENT")
        .and_then(|c| c.parse().ok())
        .expect("ROLEGATE_FUZZ_CLIENT");
    let mode = env_var("ROLEGATE_FUZZ_MODES")
        .and_then(|m| m.split(',').next().and_then(Mode::parse))
        .expect("ROLEGATE_FUZZ_MODES");
    let full = programs(seed, client + 1, mode).swap_remove(client);
    let mut wanted = Vec::new();
    for part in env_var("ROLEGATE_FUZZ_STEPS")
        .unwrap_or_default()
        .split(',')
    {
        let (from, to) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(from), Ok(to)) = (from.trim().parse::<usize>(), to.trim().parse::<usize>()) {
            wanted.extend(from..=to);
        }
    }
    let mut program: Program = full
        .iter()
        .enumerate()
        .filter(|(i, step)| wanted.is_empty() || wanted.contains(i) || matches!(step, Step::End(_)))
        .map(|(_, step)| step.clone())
        .collect();
    if !matches!(program.last(), Some(Step::End(_))) {
        program.push(Step::End(End::Terminate));
    }
    // Alone, and shrunk (ROLEGATE_FUZZ_SHRINK_SECONDS, default 120) if it differs.
    let env = Env::create("fuzz_replay").await;
    let mut programs = vec![Vec::new(); CLIENTS];
    programs[client] = program;
    let (direct, through) = env.run(mode, &programs).await;
    let Some(d) = compare(client, &direct[client], &through[client]) else {
        return;
    };
    let seconds = env_var("ROLEGATE_FUZZ_SHRINK_SECONDS")
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let shrunk = shrink(&env, mode, programs, client, &d.signature, deadline).await;
    let (direct, through) = env.run(mode, &shrunk).await;
    let shown = compare(client, &direct[client], &through[client]).map_or_else(
        || "(the shrunk program did not differ this time)".to_owned(),
        |d| d.report,
    );
    panic!(
        "{mode}: the transcripts differ:\n{}  shrunk (alone) to:\n{}  its transcripts:\n{shown}",
        d.report,
        describe(&shrunk[client]),
    );
}
