//! The fuzzer's grammar: seeded random programs of protocol steps for one client.
//!
//! Every step is something a client of the `app` class may send, chosen so that its
//! outcome on a connection of its own is deterministic (no syntax errors, which rolegate
//! answers itself; no refused statements; cancels only of a `pg_sleep` that runs). Each
//! client `c` has its own table `t<c>`, sequence `s<c>`, channel `ch<c>` and advisory lock
//! keys (`{K0}`..`{K3}`, filled in per run), so clients meet only through the pool.

use std::fmt;

/// A small seeded generator (SplitMix64): the same seed gives the same programs on every
/// machine, with no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True `percent` times in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// One frontend message, as the client sends it.
#[derive(Clone, Debug, PartialEq)]
pub enum Msg {
    Query(String),
    Parse {
        name: String,
        sql: String,
    },
    Bind {
        portal: String,
        statement: String,
        params: Vec<String>,
    },
    /// `b'S'` (statement) or `b'P'` (portal).
    Describe {
        kind: u8,
        name: String,
    },
    Execute {
        portal: String,
        max_rows: i32,
    },
    Close {
        kind: u8,
        name: String,
    },
    Sync,
    Flush,
    CopyData(String),
    CopyDone,
    CopyFail(String),
}

impl Msg {
    /// How many ReadyForQuery messages this message is sure to get (a Sync sent while a
    /// COPY may still be running is ignored by the server, so COPY steps count it as 0).
    fn ready(&self) -> usize {
        usize::from(matches!(self, Msg::Query(_) | Msg::Sync))
    }
}

fn quoted(name: &str) -> String {
    if name.is_empty() {
        "(unnamed)".to_owned()
    } else {
        name.to_owned()
    }
}

impl fmt::Display for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Msg::Query(sql) => write!(f, "Query {sql:?}"),
            Msg::Parse { name, sql } => write!(f, "Parse {} {sql:?}", quoted(name)),
            Msg::Bind {
                portal,
                statement,
                params,
            } => write!(
                f,
                "Bind portal {} statement {} params {params:?}",
                quoted(portal),
                quoted(statement)
            ),
            Msg::Describe { kind, name } => {
                write!(f, "Describe {} {}", *kind as char, quoted(name))
            }
            Msg::Execute { portal, max_rows } => {
                write!(f, "Execute {} max_rows {max_rows}", quoted(portal))
            }
            Msg::Close { kind, name } => write!(f, "Close {} {}", *kind as char, quoted(name)),
            Msg::Sync => write!(f, "Sync"),
            Msg::Flush => write!(f, "Flush"),
            Msg::CopyData(data) => write!(f, "CopyData {data:?}"),
            Msg::CopyDone => write!(f, "CopyDone"),
            Msg::CopyFail(why) => write!(f, "CopyFail {why:?}"),
        }
    }
}

/// How a program ends.
#[derive(Clone, Debug, PartialEq)]
pub enum End {
    /// Terminate, then wait for the server to close.
    Terminate,
    /// Close the socket without a word (after the answers so far have arrived).
    Drop,
    /// Send these and close the socket without waiting for any answer.
    DropInFlight(Vec<Msg>),
}

/// One step: what the client sends and how long it waits before the next step. Every
/// answer is recorded, whichever step is waiting when it arrives.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// One write of `msgs`; then wait for `ready` ReadyForQuery messages.
    Send {
        msgs: Vec<Msg>,
        ready: usize,
    },
    /// One write of `first` (ending in Execute, Flush); wait for that Execute's outcome
    /// (or the error that skipped it); then the same with `rest` as a `Send`.
    FlushThen {
        first: Vec<Msg>,
        rest: Vec<Msg>,
        ready: usize,
    },
    /// COPY FROM STDIN: one write of `head`, wait for CopyInResponse (or an error, or
    /// ReadyForQuery), then one write of `data`; then wait for `ready` ReadyForQuery.
    CopyIn {
        head: Vec<Msg>,
        data: Vec<Msg>,
        ready: usize,
        /// The step sends a Sync that may or may not be answered: after `ready`, the
        /// client also reads until the server is silent.
        settle: bool,
    },
    /// `msgs` start a `pg_sleep`; once the server is silent for a while, the client sends
    /// CancelRequests with its key until an answer comes; then waits for `ready`.
    Cancel {
        msgs: Vec<Msg>,
        ready: usize,
    },
    End(End),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |f: &mut fmt::Formatter<'_>, msgs: &[Msg]| -> fmt::Result {
            for (i, m) in msgs.iter().enumerate() {
                if i > 0 {
                    write!(f, "; ")?;
                }
                write!(f, "{m}")?;
            }
            Ok(())
        };
        match self {
            Step::Send { msgs, .. } => {
                write!(f, "send: ")?;
                list(f, msgs)
            }
            Step::FlushThen { first, rest, .. } => {
                write!(f, "send: ")?;
                list(f, first)?;
                write!(f, " | wait for the Execute's answer | send: ")?;
                list(f, rest)
            }
            Step::CopyIn { head, data, .. } => {
                write!(f, "send: ")?;
                list(f, head)?;
                write!(f, " | wait for CopyInResponse | send: ")?;
                list(f, data)
            }
            Step::Cancel { msgs, .. } => {
                write!(f, "send: ")?;
                list(f, msgs)?;
                write!(f, " | cancel it (CancelRequest) until it answers")
            }
            Step::End(End::Terminate) => write!(f, "Terminate"),
            Step::End(End::Drop) => write!(f, "close the socket"),
            Step::End(End::DropInFlight(msgs)) => {
                write!(f, "send: ")?;
                list(f, msgs)?;
                write!(f, " | close the socket at once")
            }
        }
    }
}

/// A client's program: its steps, the last of which is an `End`.
pub type Program = Vec<Step>;

/// Renders a program as numbered, readable steps.
pub fn describe(program: &[Step]) -> String {
    let mut out = String::new();
    for (i, step) in program.iter().enumerate() {
        out.push_str(&format!("  {i:>3}. {step}\n"));
    }
    out
}

/// The settings the grammar sets and observes, with values that are all valid.
const SETTINGS: &[(&str, &[&str])] = &[
    (
        "DateStyle",
        &["'ISO, MDY'", "'ISO, DMY'", "'SQL, DMY'", "'German'"],
    ),
    (
        "TimeZone",
        &[
            "'UTC'",
            "'Europe/Paris'",
            "'America/New_York'",
            "'Asia/Kolkata'",
        ],
    ),
    (
        "search_path",
        &[
            "pg_catalog",
            "public",
            "'\"$user\", public'",
            "pg_catalog, public",
        ],
    ),
    ("statement_timeout", &["0", "'10s'", "'1min'"]),
    ("extra_float_digits", &["0", "1", "3", "-2"]),
    ("IntervalStyle", &["postgres", "iso_8601", "sql_standard"]),
    ("app.tenant", &["'acme'", "'globex'", "''"]),
];

/// Queries whose answer depends on the settings above.
const OBSERVERS: &[&str] = &[
    "SELECT '01/02/2024'::date::text",
    "SELECT '2024-01-01 00:00'::timestamptz::text",
    "SELECT 0.1::float8::text, pi()::float4",
    "SELECT interval '1 day 2 hours 3 minutes'::text",
    "SELECT current_setting('app.tenant', true)",
    "SELECT current_user",
    "SELECT current_setting('search_path'), current_setting('TimeZone')",
];

/// What one client's statements refer to.
pub struct Names {
    table: String,
    sequence: String,
    channel: String,
}

impl Names {
    pub fn of(client: usize) -> Names {
        Names {
            table: format!("t{client}"),
            sequence: format!("s{client}"),
            channel: format!("ch{client}"),
        }
    }
}

fn setting_value(rng: &mut Rng) -> (&'static str, &'static str) {
    let (name, values) = *rng.pick(SETTINGS);
    (name, *rng.pick(values))
}

fn unquoted(value: &str) -> String {
    value.trim_matches('\'').replace("\"$user\"", "$user")
}

/// One SQL statement (no parameters) an app client may run.
pub fn statement(rng: &mut Rng, n: &Names) -> String {
    let t = &n.table;
    let s = &n.sequence;
    let ch = &n.channel;
    let id = 1 + rng.below(12);
    let k = rng.below(4);
    match rng.below(34) {
        0 => format!("SELECT id, v, n FROM {t} ORDER BY id"),
        1 => format!("SELECT count(*), sum(n) FROM {t}"),
        2 => format!(
            "SELECT g, g * g FROM generate_series(1, {}) g",
            1 + rng.below(6)
        ),
        3 => rng
            .pick(&["SELECT 1 / 0", "SELECT * FROM no_such_table"])
            .to_string(),
        4 => format!("SELECT id / (n - n) FROM {t} ORDER BY id"),
        5 | 6 => {
            // n = -1 breaks the CHECK (n >= 0); an id already there breaks the key.
            let value = rng.below(6) as i64 - 1;
            format!("INSERT INTO {t} (id, v, n) VALUES ({id}, 'v{id}', {value})")
        }
        7 => format!("UPDATE {t} SET n = n + 1 WHERE id = {id} RETURNING id, n"),
        8 => format!("DELETE FROM {t} WHERE id = {id}"),
        9 | 10 => rng
            .pick(&[
                "BEGIN",
                "BEGIN",
                "COMMIT",
                "ROLLBACK",
                "SAVEPOINT sp",
                "ROLLBACK TO SAVEPOINT sp",
                "RELEASE SAVEPOINT sp",
                "BEGIN ISOLATION LEVEL REPEATABLE READ",
                "END",
            ])
            .to_string(),
        11 | 12 => {
            let (name, value) = setting_value(rng);
            if rng.chance(30) {
                format!("SET LOCAL {name} = {value}")
            } else {
                format!("SET {name} = {value}")
            }
        }
        13 => {
            let (name, value) = setting_value(rng);
            let local = rng.chance(30);
            format!(
                "SELECT set_config('{name}', '{}', {local})",
                unquoted(value).replace('\'', "''")
            )
        }
        14 => {
            if rng.chance(25) {
                "RESET ALL".to_owned()
            } else {
                format!("RESET {}", rng.pick(SETTINGS).0)
            }
        }
        15 => format!("SHOW {}", rng.pick(SETTINGS).0),
        16 | 17 => rng.pick(OBSERVERS).to_string(),
        18 => match rng.below(4) {
            0 => format!("PREPARE q{k} AS SELECT n FROM {t} WHERE id = {id}"),
            1 => format!("EXECUTE q{k}"),
            2 => format!("DEALLOCATE q{k}"),
            _ => "DEALLOCATE ALL".to_owned(),
        },
        19 => rng
            .pick(&["DISCARD ALL", "DISCARD PLANS", "DISCARD SEQUENCES"])
            .to_string(),
        20 => match rng.below(5) {
            0 => format!("LISTEN {ch}"),
            1 => format!("UNLISTEN {ch}"),
            2 => "UNLISTEN *".to_owned(),
            3 => format!("NOTIFY {ch}, 'p{k}'"),
            _ => format!("SELECT pg_notify('{ch}', 'q{k}')"),
        },
        21 | 22 => {
            let f = rng.pick(&[
                "pg_try_advisory_lock",
                "pg_advisory_lock",
                "pg_advisory_unlock",
                "pg_advisory_xact_lock",
                "pg_try_advisory_xact_lock",
            ]);
            if rng.chance(15) {
                "SELECT pg_advisory_unlock_all()".to_owned()
            } else {
                format!("SELECT {f}({{K{k}}})")
            }
        }
        23 | 24 => match rng.below(3) {
            0 => format!("SELECT nextval('{s}')"),
            1 => format!("SELECT currval('{s}')"),
            _ => "SELECT lastval()".to_owned(),
        },
        25 => format!("SELECT nextval('{s}'), currval('{s}'), lastval()"),
        26 => match rng.below(5) {
            0 => format!("DECLARE c{k} CURSOR FOR SELECT g FROM generate_series(1, 5) g"),
            1 => format!("DECLARE c{k} CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 5) g"),
            2 => format!("FETCH 2 FROM c{k}"),
            3 => format!("CLOSE c{k}"),
            _ => "CLOSE ALL".to_owned(),
        },
        27 => format!("SELECT pg_sleep(0.0{})", rng.below(5)),
        28 => format!("COPY {t} TO STDOUT"),
        29 => "COPY (SELECT g, 'x' || g FROM generate_series(1, 3) g) TO STDOUT".to_owned(),
        30 => format!("SELECT current_setting('{}')", rng.pick(SETTINGS).0),
        31 => format!("UPDATE {t} SET n = n - 10 WHERE id = {id}"),
        32 => format!("SELECT v FROM {t} WHERE id = {id} FOR UPDATE"),
        _ => format!("SELECT id FROM {t} WHERE n > {} ORDER BY id", rng.below(5)),
    }
}

/// A statement with parameters and values for them (text format).
fn parameterised(rng: &mut Rng, n: &Names) -> (String, Vec<String>) {
    let t = &n.table;
    let id = 1 + rng.below(12);
    match rng.below(6) {
        0 => (
            "SELECT $1::int * 2".to_owned(),
            vec![rng.below(100).to_string()],
        ),
        1 => (
            "SELECT $1::int / $2::int".to_owned(),
            vec![rng.below(10).to_string(), rng.below(2).to_string()],
        ),
        2 => (
            format!("INSERT INTO {t} (id, v, n) VALUES ($1, $2, $3)"),
            vec![
                id.to_string(),
                format!("p{id}"),
                (rng.below(5) as i64 - 1).to_string(),
            ],
        ),
        3 => (
            "SELECT $1::date::text".to_owned(),
            vec!["01/02/2024".to_owned()],
        ),
        4 => (
            "SELECT set_config('app.tenant', $1, false)".to_owned(),
            vec![rng.pick(&["acme", "globex"]).to_string()],
        ),
        _ => (
            format!("SELECT id, v FROM {t} WHERE id >= $1 ORDER BY id"),
            vec![rng.below(8).to_string()],
        ),
    }
}

/// Several statements in one simple Query. `DISCARD ALL` comes only alone: in a string
/// with others rolegate answers 25001 for the whole string before anything runs
/// (README, "Staying in the role"), where PostgreSQL would first answer the statements
/// before it.
fn simple_query(rng: &mut Rng, n: &Names) -> String {
    let count = 1 + rng.below(3) * rng.below(2);
    let mut statements: Vec<String> = (0..count).map(|_| statement(rng, n)).collect();
    if count > 1 {
        for sql in &mut statements {
            if sql == "DISCARD ALL" {
                *sql = "DISCARD PLANS".to_owned();
            }
        }
    }
    statements.join("; ")
}

/// Builds extended-protocol pipelines, remembering which named statements it parsed (and
/// with how many parameters), so most Binds are well-formed.
struct Pipeline<'a> {
    names: &'a Names,
    /// Parameter counts of named statements, by name (the last Parse of each).
    statements: &'a mut Vec<(String, usize)>,
    /// Named statements parsed in this pipeline: each is parsed at most once per
    /// pipeline (a second Parse of a name whose first failed in the same pipeline is one
    /// of transaction pooling's documented differences).
    parsed_here: Vec<String>,
}

impl Pipeline<'_> {
    fn statement_with_params(&self, rng: &mut Rng) -> (String, Vec<String>) {
        if rng.chance(35) {
            parameterised(rng, self.names)
        } else {
            (statement(rng, self.names), Vec::new())
        }
    }

    fn execute(rng: &mut Rng, portal: &str, out: &mut Vec<Msg>) {
        let max_rows = if rng.chance(30) { 2 } else { 0 };
        out.push(Msg::Execute {
            portal: portal.to_owned(),
            max_rows,
        });
        if max_rows > 0 && rng.chance(50) {
            out.push(Msg::Execute {
                portal: portal.to_owned(),
                max_rows: 0,
            });
        }
    }

    /// Parse, Bind, (Describe), Execute of the unnamed statement.
    fn unnamed(&mut self, rng: &mut Rng, out: &mut Vec<Msg>) {
        let (sql, params) = self.statement_with_params(rng);
        out.push(Msg::Parse {
            name: String::new(),
            sql,
        });
        if rng.chance(20) {
            out.push(Msg::Describe {
                kind: b'S',
                name: String::new(),
            });
        }
        let portal = if rng.chance(25) { "P1" } else { "" };
        out.push(Msg::Bind {
            portal: portal.to_owned(),
            statement: String::new(),
            params,
        });
        if rng.chance(30) {
            out.push(Msg::Describe {
                kind: b'P',
                name: portal.to_owned(),
            });
        }
        Self::execute(rng, portal, out);
    }

    fn params_for(&self, rng: &mut Rng, name: &str) -> Vec<String> {
        let count = self
            .statements
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| *c)
            .unwrap_or(0);
        // Now and then the wrong number: the server's 08P01 for the Bind (left out with
        // ROLEGATE_FUZZ_WITHOUT=bindcount).
        let wrong = rng.chance(5) && !without("").iter().any(|w| w == "bindcount");
        let count = if wrong { count + 1 } else { count };
        (0..count).map(|i| (i + 1).to_string()).collect()
    }

    fn unit(&mut self, rng: &mut Rng, out: &mut Vec<Msg>) {
        let name = format!("S{}", 1 + rng.below(3));
        match rng.below(10) {
            0..=3 => self.unnamed(rng, out),
            4 | 5 => {
                if self.parsed_here.contains(&name) {
                    return self.unnamed(rng, out);
                }
                let (sql, params) = self.statement_with_params(rng);
                self.parsed_here.push(name.clone());
                match self.statements.iter_mut().find(|(n, _)| *n == name) {
                    Some(slot) => slot.1 = params.len(),
                    None => self.statements.push((name.clone(), params.len())),
                }
                out.push(Msg::Parse {
                    name: name.clone(),
                    sql,
                });
                if rng.chance(60) {
                    let portal = if rng.chance(30) { "P2" } else { "" };
                    out.push(Msg::Bind {
                        portal: portal.to_owned(),
                        statement: name,
                        params,
                    });
                    Self::execute(rng, portal, out);
                }
            }
            6 | 7 => {
                let portal = if rng.chance(30) { "P2" } else { "" };
                let params = self.params_for(rng, &name);
                out.push(Msg::Bind {
                    portal: portal.to_owned(),
                    statement: name,
                    params,
                });
                Self::execute(rng, portal, out);
            }
            8 => {
                if rng.chance(50) {
                    out.push(Msg::Describe { kind: b'S', name });
                } else {
                    // A named portal of an earlier Bind: suspended, gone, or never made.
                    let portal = *rng.pick(&["P1", "P2"]);
                    Self::execute(rng, portal, out);
                }
            }
            _ => {
                if rng.chance(70) {
                    out.push(Msg::Close { kind: b'S', name });
                } else {
                    out.push(Msg::Close {
                        kind: b'P',
                        name: rng.pick(&["P1", "P2", ""]).to_string(),
                    });
                }
            }
        }
    }
}

/// Whether these messages parse `DISCARD ALL`.
fn discards_all(msgs: &[Msg]) -> bool {
    msgs.iter()
        .any(|m| matches!(m, Msg::Parse { sql, .. } if sql == "DISCARD ALL"))
}

fn ready(msgs: &[Msg]) -> usize {
    msgs.iter().map(Msg::ready).sum()
}

/// Rows for `COPY t (id, v, n) FROM STDIN`: good, or ones the server rejects.
fn copy_rows(rng: &mut Rng) -> Vec<Msg> {
    let mut rows = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let id = 1 + rng.below(40);
        let row = match rng.below(8) {
            0 => "x\ty\tz\n".to_owned(),                     // 22P02: not an integer
            1 => format!("{id}\tonly two\n"),                // 22P04: missing data
            2 => format!("{id}\tneg\t-5\n"),                 // 23514: the CHECK
            _ => format!("{id}\tc{id}\t{}\n", rng.below(9)), // 23505 when the id is taken
        };
        rows.push(Msg::CopyData(row));
    }
    rows
}

fn copy_in(rng: &mut Rng, n: &Names) -> Step {
    let sql = format!("COPY {} (id, v, n) FROM STDIN", n.table);
    let extended = rng.chance(35);
    let mut head = if extended {
        vec![
            Msg::Parse {
                name: String::new(),
                sql,
            },
            Msg::Bind {
                portal: String::new(),
                statement: String::new(),
                params: Vec::new(),
            },
            Msg::Execute {
                portal: String::new(),
                max_rows: 0,
            },
        ]
    } else {
        vec![Msg::Query(sql)]
    };
    let mut data = copy_rows(rng);
    data.push(if rng.chance(20) {
        Msg::CopyFail("the client gave up".to_owned())
    } else {
        Msg::CopyDone
    });
    // A Sync before the end of the data (issue 20's first hole): the server ignores it
    // inside a COPY and answers it once an error ended the COPY, so how many
    // ReadyForQuery come back depends on where the server stopped reading.
    let settle = rng.chance(15);
    if settle {
        data.insert(data.len() - 1, Msg::Sync);
    }
    if extended {
        data.push(Msg::Sync);
    }
    // Out-of-turn messages after the COPY: a stray Sync (answered) or CopyDone
    // (dropped), then a query of its own.
    if rng.chance(30) {
        data.push(rng.pick(&[Msg::Sync, Msg::CopyDone]).clone());
        data.push(Msg::Query("SELECT current_user".to_owned()));
    }
    let ready = ready(&head) + ready(&data) - usize::from(settle);
    if rng.chance(30) {
        // Pipelined: the data goes without waiting for CopyInResponse.
        head.append(&mut data);
    }
    Step::CopyIn {
        head,
        data,
        ready,
        settle,
    }
}

fn end(rng: &mut Rng, n: &Names) -> Step {
    Step::End(match rng.below(5) {
        0 | 1 => End::Terminate,
        2 => End::Drop,
        3 => End::DropInFlight(vec![Msg::Query(statement(rng, n))]),
        _ => End::DropInFlight(vec![
            Msg::Query(format!("COPY {} (id, v, n) FROM STDIN", n.table)),
            Msg::CopyData("90\thalf\t1\n".to_owned()),
        ]),
    })
}

/// Parts of the grammar that can be left out (ROLEGATE_FUZZ_WITHOUT, comma-separated),
/// so that a known hole does not hide the others: each name and the texts that mark
/// a step as using it.
pub const FEATURES: &[(&str, &[&str])] = &[
    ("seed", &["setseed", "random()"]),
    ("sequences", &["currval", "lastval"]),
    ("tenant", &["app.tenant"]),
    ("cancel", &["pg_sleep(5)"]),
    ("copy", &["COPY"]),
    // A Sync among CopyData: after it rolegate cannot know what the server owes, so it
    // fails closed (the backend connection stays with the client; DISCARD ALL is refused).
    (
        "copysync",
        &["Sync; CopyData", "Sync; CopyDone", "Sync; CopyFail"],
    ),
    ("notify", &["LISTEN", "NOTIFY", "pg_notify"]),
    ("locks", &["advisory"]),
    ("settings", &["SET ", "set_config", "RESET", "DISCARD ALL"]),
    (
        "named",
        &["statement S", "Parse S", "Describe S S", "Close S S"],
    ),
    ("cursors", &["CURSOR", "FETCH", "CLOSE "]),
    ("prepare", &["PREPARE", "EXECUTE", "DEALLOCATE"]),
];

/// Left out in transaction mode when ROLEGATE_FUZZ_WITHOUT is not set (the fixed seeds
/// `cargo test` runs): what transaction mode differs in by design, as the README says (a
/// seed, `currval` and `lastval` hold only within a transaction; a custom setting another
/// client used reads as '' rather than unknown), a Sync among CopyData (rolegate fails
/// closed), and cancels (timing). tests/fuzz/run.sh sets it, empty by default.
pub const TRANSACTION_MODE_DEFAULT_WITHOUT: &str = "seed,sequences,tenant,copysync,cancel";

/// Left out in session mode when ROLEGATE_FUZZ_WITHOUT is not set: where rolegate fails
/// closed on purpose, and cancels (a cancel re-sent until its statement answers can
/// reach the next statement when the machine is slow, through rolegate or not: a fixed
/// seed must not depend on timing; tests/isolation.rs checks cancels).
pub const SESSION_MODE_DEFAULT_WITHOUT: &str = "copysync,cancel";

fn without(default: &str) -> Vec<String> {
    std::env::var("ROLEGATE_FUZZ_WITHOUT")
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|w| w.trim().to_owned())
        .collect()
}

/// The texts that mark a step as using a feature left out in this process.
pub fn left_out(default: &str) -> Vec<&'static str> {
    let wanted = without(default);
    FEATURES
        .iter()
        .filter(|(name, _)| wanted.iter().any(|w| w == name))
        .flat_map(|(_, marks)| marks.iter().copied())
        .collect()
}

/// The program of client `client` for `seed`: 8 to 40 steps and an end, without the
/// steps that use a left-out feature.
pub fn program(seed: u64, client: usize, default_without: &str) -> Program {
    let left_out = left_out(default_without);
    let uses_left_out = |step: &Step| {
        let text = step.to_string();
        left_out.iter().any(|mark| text.contains(mark))
    };
    let full = full_program(seed, client);
    if left_out.is_empty() {
        return full;
    }
    let mut steps: Program = full
        .into_iter()
        .filter(|step| !uses_left_out(step))
        .collect();
    if !matches!(steps.last(), Some(Step::End(_))) {
        steps.push(Step::End(End::Terminate));
    }
    steps
}

fn full_program(seed: u64, client: usize) -> Program {
    let mut rng = Rng::new(seed ^ (client as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F));
    let names = Names::of(client);
    let mut statements = Vec::new();
    let mut steps = Vec::new();
    let mut seeded = false;
    for _ in 0..8 + rng.below(33) {
        let step = match rng.below(100) {
            0..=32 => {
                let msgs = vec![Msg::Query(simple_query(&mut rng, &names))];
                Step::Send { ready: 1, msgs }
            }
            33..=62 => {
                let mut pipeline = Pipeline {
                    names: &names,
                    statements: &mut statements,
                    parsed_here: Vec::new(),
                };
                let mut msgs = Vec::new();
                for _ in 0..1 + rng.below(4) {
                    let from = msgs.len();
                    pipeline.unit(&mut rng, &mut msgs);
                    // DISCARD ALL with more before the Sync is refused by rolegate on
                    // purpose (README, "What still cannot work"): a Sync right after.
                    if rng.chance(20) || discards_all(&msgs[from..]) {
                        msgs.push(Msg::Sync);
                    }
                }
                if msgs.last() != Some(&Msg::Sync) {
                    msgs.push(Msg::Sync);
                }
                Step::Send {
                    ready: ready(&msgs),
                    msgs,
                }
            }
            63..=72 => {
                let mut pipeline = Pipeline {
                    names: &names,
                    statements: &mut statements,
                    parsed_here: Vec::new(),
                };
                let mut first = Vec::new();
                pipeline.unnamed(&mut rng, &mut first);
                if discards_all(&first) {
                    first.clear();
                    pipeline.unnamed(&mut rng, &mut first);
                }
                if discards_all(&first) {
                    first.retain(|m| !matches!(m, Msg::Parse { .. }));
                    first.insert(
                        0,
                        Msg::Parse {
                            name: String::new(),
                            sql: "DISCARD PLANS".to_owned(),
                        },
                    );
                }
                first.push(Msg::Flush);
                let mut rest = Vec::new();
                pipeline.unit(&mut rng, &mut rest);
                rest.push(Msg::Sync);
                Step::FlushThen {
                    ready: ready(&rest),
                    first,
                    rest,
                }
            }
            73..=84 => copy_in(&mut rng, &names),
            85..=87 => {
                let msgs = if rng.chance(50) {
                    vec![Msg::Query("SELECT pg_sleep(5)".to_owned())]
                } else {
                    vec![
                        Msg::Parse {
                            name: String::new(),
                            sql: "SELECT pg_sleep(5)".to_owned(),
                        },
                        Msg::Bind {
                            portal: String::new(),
                            statement: String::new(),
                            params: Vec::new(),
                        },
                        Msg::Execute {
                            portal: String::new(),
                            max_rows: 0,
                        },
                        Msg::Sync,
                    ]
                };
                Step::Cancel { ready: 1, msgs }
            }
            88..=90 => {
                // Out of turn: a lone Sync (answered with ReadyForQuery), CopyData or
                // CopyDone outside any COPY (dropped by the server).
                let msg = rng
                    .pick(&[
                        Msg::Sync,
                        Msg::CopyDone,
                        Msg::CopyData("1\tx\t1\n".to_owned()),
                    ])
                    .clone();
                Step::Send {
                    ready: msg.ready(),
                    msgs: vec![msg],
                }
            }
            91..=93 => {
                // random() only once this session set its seed (setseed after a ROLLBACK,
                // so that no failed transaction refuses it): before that, its answer is
                // the server's own chance.
                if seeded {
                    Step::Send {
                        msgs: vec![Msg::Query("SELECT random()".to_owned())],
                        ready: 1,
                    }
                } else {
                    seeded = true;
                    let seed = format!("SELECT setseed(0.{})", 1 + rng.below(9));
                    Step::Send {
                        msgs: vec![Msg::Query("ROLLBACK".to_owned()), Msg::Query(seed)],
                        ready: 2,
                    }
                }
            }
            _ => {
                // A transaction with an error inside and what follows it.
                let mut sqls = vec!["BEGIN".to_owned(), statement(&mut rng, &names)];
                sqls.push("SELECT 1 / 0".to_owned());
                sqls.push(statement(&mut rng, &names));
                sqls.push(rng.pick(&["COMMIT", "ROLLBACK"]).to_string());
                let msgs: Vec<Msg> = sqls.into_iter().map(Msg::Query).collect();
                Step::Send {
                    ready: msgs.len(),
                    msgs,
                }
            }
        };
        steps.push(step);
    }
    steps.push(end(&mut rng, &names));
    steps
}

/// Whether a (shrunk) program still means the same on a session of its own: every
/// `random()` comes after a `setseed`.
pub fn well_formed(program: &[Step]) -> bool {
    let text = |step: &Step| step.to_string();
    match program.iter().position(|s| text(s).contains("random()")) {
        Some(first) => program[..first]
            .iter()
            .any(|s| text(s).contains("setseed(")),
        None => true,
    }
}
