//! Statement text → what each statement in it does, using PostgreSQL's own grammar
//! (pg_query). This knows nothing of client classes; `rules` turns it into a verdict.

use std::borrow::Cow;

use pg_query::protobuf::{a_const, DiscardMode, ObjectType, TransactionStmtKind, VariableSetKind};
use pg_query::{NodeEnum, ParserOptions};
use serde_json::Value;

use super::builtins::is_side_effect_free;
use super::sql_text::{sql_arguments, SqlArguments, SqlTextFunction};

/// How deep SQL text inside SQL text (`query_to_xml('SELECT query_to_xml(''…'')')`) is
/// followed; deeper text is refused, for every class, as it cannot be judged.
pub const MAX_SQL_TEXT_DEPTH: usize = 4;

/// The kind of work a statement does, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Effect {
    /// Reads rows: SELECT, VALUES, TABLE, SHOW, FETCH, COPY TO STDOUT, EXPLAIN of a read.
    Read,
    /// Changes rows: INSERT, UPDATE, DELETE, MERGE, COPY FROM STDIN.
    Write,
    /// BEGIN, COMMIT, ROLLBACK, SAVEPOINT…
    Transaction,
    /// Session state that changes no data: SET, RESET, LISTEN, NOTIFY, DEALLOCATE, CLOSE…
    Session,
    /// CREATE TEMPORARY TABLE and its SELECT INTO / CREATE TABLE AS forms.
    TempTable,
    /// Schema and privilege changes: CREATE/ALTER/DROP, GRANT/REVOKE, TRUNCATE, COMMENT…
    Schema,
    /// Code run on the server from text: DO, CALL.
    Code,
    /// COPY to or from a file or program on the server.
    ServerFile,
    /// VACUUM, ANALYZE, CLUSTER, REINDEX, CHECKPOINT.
    Maintenance,
    /// Anything else (LOCK, LOAD, …): allowed for migrators only.
    Other,
}

/// One statement of a query string, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementInfo {
    /// What the user would call it: "CREATE TABLE", "SET ROLE", "SELECT INTO"…
    pub label: Cow<'static, str>,
    pub effect: Effect,
    /// It changes rows somewhere, possibly in a CTE or a nested statement.
    pub modifies_data: bool,
    /// It would change `current_user` or the session authorization.
    pub changes_role: bool,
    /// It would turn read-only mode off (or reset it).
    pub leaves_read_only: bool,
    /// A statement about the session's role that may keep it where it is; the rules
    /// decide, knowing which role the session is in.
    pub role_statement: Option<RoleStatement>,
    /// `set_config`'s setting name is these bound parameters (`$n`): judged at Bind.
    pub bound_setting_names: Vec<u16>,
    /// `set_config('client_encoding', $n, …)`: the new encoding is these bound
    /// parameters, judged at Bind.
    pub bound_encodings: Vec<u16>,
    /// It sets `client_encoding` (SET, SET NAMES, `set_config`): to this value, or to
    /// one computed on the server (`None`).
    pub sets_client_encoding: Option<Option<String>>,
    /// What it leaves behind in the backend session (matters when sessions are shared).
    pub session_effects: SessionEffects,
    /// It names a prepared statement `rolegate_…`: those names are rolegate's own.
    pub reserved_name: bool,
    /// Where the statement is in the text (byte offsets, end exclusive).
    pub span: (usize, usize),
    /// Statements that a function runs from a string literal it is given
    /// (`query_to_xml('SELECT …')`): judged as the client's own. Their session effects
    /// are in `session_effects` already.
    pub embedded: Vec<StatementInfo>,
    /// A function that runs SQL text is given one computed when the statement runs (a
    /// column, a parameter, an expression): that function's name. Nobody can judge it.
    pub computed_sql_text: Option<String>,
    /// SQL text inside SQL text deeper than [`MAX_SQL_TEXT_DEPTH`].
    pub sql_text_too_deep: bool,
    /// SQL text in a function's SQL argument that rolegate's grammar rejects (with the
    /// parser's message): an older server's grammar may still run it (PostgreSQL 13's
    /// postfix operators), so it cannot be judged.
    pub sql_text_syntax_error: Option<String>,
}

/// What a statement leaves in the backend session beyond its result. Transaction
/// pooling hands a backend session to another client after each transaction, so it has
/// to know: settings follow the client to its next backend, and what only exists in one
/// backend session pins the client to it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionEffects {
    /// Session-level settings may change (SET, RESET, `set_config(…, false)`).
    pub settings: bool,
    /// Something that lives only in this backend session: LISTEN, a session advisory
    /// lock, a temporary table, a WITH HOLD cursor, a SQL-level PREPARE.
    pub pins: bool,
    /// Every prepared statement of the session is dropped (DEALLOCATE ALL, DISCARD ALL).
    pub drops_prepared: bool,
    /// DISCARD ALL: everything above is undone.
    pub discards_all: bool,
    /// It may undo what pins (UNLISTEN, an advisory unlock, CLOSE, DEALLOCATE, DISCARD):
    /// the server is asked whether anything is left.
    pub unpins: bool,
    /// It calls a function whose body rolegate cannot see (anything not on the list of
    /// built-ins without session side effects): it may have changed settings, taken a
    /// session advisory lock, LISTENed, used sequences or the random seed. After such a
    /// transaction the relay asks the server what the session holds.
    pub unseen: bool,
    /// It calls a sequence function (`nextval`, `currval`, `setval`, `lastval`): the
    /// session remembers values (`currval`, `lastval`) another client must not see.
    pub sequences: bool,
    /// It sets the random seed (`setseed`, `SET seed`, `set_config('seed', …)`).
    pub seed: bool,
}

impl SessionEffects {
    pub fn any(&self) -> bool {
        self.settings
            || self.pins
            || self.drops_prepared
            || self.discards_all
            || self.unpins
            || self.unseen
            || self.sequences
            || self.seed
    }

    pub fn add(&mut self, other: SessionEffects) {
        self.settings |= other.settings;
        self.pins |= other.pins;
        self.drops_prepared |= other.drops_prepared;
        self.discards_all |= other.discards_all;
        self.unpins |= other.unpins;
        self.unseen |= other.unseen;
        self.sequences |= other.sequences;
        self.seed |= other.seed;
    }
}

/// Prepared statement names that transaction pooling uses on the server.
pub const RESERVED_STATEMENT_PREFIX: &str = "rolegate_";

fn is_reserved_name(name: &str) -> bool {
    name.get(..RESERVED_STATEMENT_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(RESERVED_STATEMENT_PREFIX))
}

/// Statements that name the session's role, whose effect depends on which role the
/// session is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleStatement {
    /// `SET [LOCAL] ROLE name` (`none`: SET ROLE NONE).
    SetRole { target: String, local: bool },
    /// `RESET ROLE`, `SET ROLE TO DEFAULT`: back to the session's start value.
    ResetRole,
    /// `SET [LOCAL] SESSION AUTHORIZATION name` (`None`: DEFAULT).
    SetSessionAuthorization { target: Option<String>, local: bool },
    /// `RESET SESSION AUTHORIZATION`.
    ResetSessionAuthorization,
    /// `DISCARD ALL`: a reset that includes SET SESSION AUTHORIZATION DEFAULT.
    DiscardAll,
}

/// A whole query string, classified, or why it could not be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classification {
    Statements(Vec<StatementInfo>),
    /// The grammar rejected it; the parser's message.
    SyntaxError(String),
}

/// Parses `sql` as the server would, given the server's `standard_conforming_strings`.
pub fn classify(sql: &str, standard_conforming_strings: bool) -> Classification {
    classify_with(sql, standard_conforming_strings, &[])
}

/// [`classify`], knowing which installed extensions' functions run SQL text
/// (`[policy] sql_text_functions`).
pub fn classify_with(
    sql: &str,
    standard_conforming_strings: bool,
    sql_text_functions: &[SqlTextFunction],
) -> Classification {
    classify_in(
        sql,
        Context {
            scs: standard_conforming_strings,
            sql_text_functions,
            depth: 0,
        },
    )
}

/// What classifying a text needs besides the text.
#[derive(Clone, Copy)]
struct Context<'a> {
    /// `standard_conforming_strings`: SQL text inside a literal is parsed by the server
    /// under the same value as the statement around it.
    scs: bool,
    sql_text_functions: &'a [SqlTextFunction],
    /// How many SQL-text arguments deep this text is (0: the client's own).
    depth: usize,
}

fn classify_in(sql: &str, ctx: Context<'_>) -> Classification {
    let options = if ctx.scs {
        ParserOptions::DEFAULT
    } else {
        ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS
    };
    let parsed = match pg_query::parse(sql, options) {
        Ok(parsed) => parsed,
        Err(e) => return Classification::SyntaxError(parse_error_message(e)),
    };
    let walk_needed = may_hide_effects(sql);
    let statements = parsed
        .protobuf
        .stmts
        .iter()
        .filter_map(|raw| {
            let start = usize::try_from(raw.stmt_location).ok()?.min(sql.len());
            let end = match usize::try_from(raw.stmt_len) {
                Ok(0) | Err(_) => sql.len(),
                Ok(len) => (start + len).min(sql.len()),
            };
            let mut info = classify_statement(raw.stmt.as_deref()?, walk_needed, ctx);
            info.span = (start, end);
            Some(info)
        })
        .collect();
    Classification::Statements(statements)
}

/// Whether the tree walk can find anything in this text. Every node the walk looks for
/// needs one of these words in the source: INSERT/UPDATE/DELETE/MERGE for nested writes
/// (and UPDATE for `UPDATE pg_settings`), INTO for SELECT INTO, and a parenthesis for
/// any function call. Keywords cannot be escaped or split, so a text without any of them
/// needs no walk; this only saves time, the verdict still comes from the tree.
fn may_hide_effects(sql: &str) -> bool {
    if sql.contains('(') {
        return true;
    }
    const WORDS: [&[u8]; 8] = [
        b"advisory",
        b"insert",
        b"update",
        b"delete",
        b"merge",
        b"into",
        b"set_config",
        b"u&",
    ];
    WORDS.iter().any(|word| contains_word(sql, word))
}

fn contains_word(sql: &str, word: &[u8]) -> bool {
    sql.as_bytes()
        .windows(word.len())
        .any(|w| w.eq_ignore_ascii_case(word))
}

fn parse_error_message(e: pg_query::Error) -> String {
    match e {
        pg_query::Error::Parse(message) => message,
        // CString::new failed: the text holds a NUL byte, which PostgreSQL never accepts.
        pg_query::Error::Conversion(_) => "the statement contains a NUL byte".into(),
        other => other.to_string(),
    }
}

fn classify_statement(
    node: &pg_query::protobuf::Node,
    walk_needed: bool,
    ctx: Context<'_>,
) -> StatementInfo {
    let mut info = match node.node.as_ref() {
        Some(inner) => top_level(inner),
        None => StatementInfo::new("(empty)", Effect::Read),
    };
    // The typed match above judged the statement itself; nested parts (CTEs, subqueries,
    // function calls in any expression) are found by walking the whole tree.
    let mut findings = Findings::default();
    if walk_needed {
        match serde_json::to_value(node) {
            Ok(tree) => walk(&tree, &mut findings, ctx),
            // Cannot happen for prost types; fail closed if it ever does.
            Err(_) => findings.unknown_set_config = true,
        }
    }
    info.modifies_data |= findings.modifies_data || findings.writes_large_objects;
    if findings.writes_large_objects && info.effect == Effect::Read {
        info.label = format!("{} writing a large object", info.label).into();
    }
    info.session_effects.settings |= findings.sets_session_setting;
    info.session_effects.pins |= findings.session_lock;
    info.session_effects.unpins |= findings.session_unlock;
    info.session_effects.settings |= findings.updates_pg_settings;
    info.session_effects.sequences |= findings.sequences;
    // A write may call nextval where no text shows it (a serial or identity column's
    // default), and currval/lastval then remember the value.
    info.session_effects.sequences |= info.modifies_data;
    info.session_effects.seed |= findings.seed;
    // SQL computed at run time may do anything a function body may.
    info.session_effects.unseen |= findings.unseen || findings.computed_sql_text.is_some();
    for embedded in &findings.embedded {
        info.session_effects.add(embedded.session_effects);
    }
    info.embedded = findings.embedded;
    info.computed_sql_text = findings.computed_sql_text;
    info.sql_text_too_deep = findings.sql_text_too_deep;
    info.sql_text_syntax_error = findings.sql_text_syntax_error;
    // A parameter is bound at the protocol's Bind, where rolegate judges it; a SQL-level
    // PREPARE takes its values from EXECUTE, which rolegate does not look into.
    let prepared_in_sql = matches!(node.node.as_ref(), Some(NodeEnum::PrepareStmt(_)));
    if prepared_in_sql && !findings.bound_setting_names.is_empty() {
        findings.unknown_set_config = true;
    } else {
        info.bound_setting_names = findings.bound_setting_names;
    }
    if prepared_in_sql && !findings.bound_encodings.is_empty() {
        findings.sets_client_encoding = Some(None);
    } else {
        info.bound_encodings = findings.bound_encodings;
    }
    if findings.sets_client_encoding.is_some() {
        info.sets_client_encoding = findings.sets_client_encoding;
    }
    if findings.select_into && !matches!(info.effect, Effect::TempTable | Effect::Schema) {
        info.label = "SELECT INTO".into();
        info.effect = Effect::Schema;
    }
    if findings.changes_role || findings.unknown_set_config {
        info.changes_role = true;
        info.label = if findings.unknown_set_config {
            "set_config with a computed setting name".into()
        } else {
            "set_config('role')".into()
        };
    }
    if findings.leaves_read_only && !info.changes_role {
        info.leaves_read_only = true;
        info.label = "set_config('transaction_read_only')".into();
    }
    info
}

impl StatementInfo {
    fn new(label: impl Into<Cow<'static, str>>, effect: Effect) -> StatementInfo {
        StatementInfo {
            label: label.into(),
            effect,
            modifies_data: effect == Effect::Write,
            changes_role: false,
            leaves_read_only: false,
            role_statement: None,
            bound_setting_names: Vec::new(),
            bound_encodings: Vec::new(),
            sets_client_encoding: None,
            session_effects: SessionEffects::default(),
            reserved_name: false,
            span: (0, 0),
            embedded: Vec::new(),
            computed_sql_text: None,
            sql_text_too_deep: false,
            sql_text_syntax_error: None,
        }
    }

    /// Runs code rolegate cannot see (a procedure, a DO block, a prepared statement).
    fn unseen(mut self) -> StatementInfo {
        self.session_effects.unseen = true;
        self
    }

    fn pinning(mut self) -> StatementInfo {
        self.session_effects.pins = true;
        self
    }

    fn unpinning(mut self) -> StatementInfo {
        self.session_effects.unpins = true;
        self
    }
}

fn top_level(node: &NodeEnum) -> StatementInfo {
    use StatementInfo as S;
    match node {
        NodeEnum::SelectStmt(s) => match &s.into_clause {
            Some(into) if is_temp(into.rel.as_ref()) => {
                S::new("SELECT INTO TEMPORARY", Effect::TempTable).pinning()
            }
            Some(_) => S::new("SELECT INTO", Effect::Schema),
            None if !s.values_lists.is_empty() => S::new("VALUES", Effect::Read),
            None => S::new("SELECT", Effect::Read),
        },
        NodeEnum::InsertStmt(_) => S::new("INSERT", Effect::Write),
        NodeEnum::UpdateStmt(_) => S::new("UPDATE", Effect::Write),
        NodeEnum::DeleteStmt(_) => S::new("DELETE", Effect::Write),
        NodeEnum::MergeStmt(_) => S::new("MERGE", Effect::Write),
        NodeEnum::CopyStmt(c) if c.filename.is_empty() && !c.is_program => {
            if c.is_from {
                S::new("COPY FROM STDIN", Effect::Write)
            } else {
                S::new("COPY TO STDOUT", Effect::Read)
            }
        }
        NodeEnum::CopyStmt(c) => S::new(
            if c.is_program {
                "COPY with a server program"
            } else {
                "COPY with a server file"
            },
            Effect::ServerFile,
        ),
        NodeEnum::TransactionStmt(t) => transaction(t),
        NodeEnum::VariableSetStmt(v) => variable_set(v),
        NodeEnum::VariableShowStmt(_) => S::new("SHOW", Effect::Read),
        NodeEnum::DiscardStmt(d) => {
            if d.target == DiscardMode::DiscardAll as i32 {
                // DISCARD ALL includes SET SESSION AUTHORIZATION DEFAULT and RESET ALL.
                let mut info = S::new("DISCARD ALL", Effect::Session);
                info.role_statement = Some(RoleStatement::DiscardAll);
                info.session_effects = SessionEffects {
                    settings: true,
                    pins: false,
                    drops_prepared: true,
                    discards_all: true,
                    unpins: true,
                    unseen: false,
                    sequences: true,
                    seed: false,
                };
                info
            } else {
                S::new("DISCARD", Effect::Session).unpinning()
            }
        }
        NodeEnum::DeclareCursorStmt(d) => {
            let info = nested("DECLARE CURSOR", d.query.as_deref());
            // CURSOR_OPT_HOLD: the cursor outlives its transaction.
            if d.options & 0x0020 != 0 {
                info.pinning()
            } else {
                info
            }
        }
        NodeEnum::FetchStmt(f) => S::new(if f.ismove { "MOVE" } else { "FETCH" }, Effect::Read),
        NodeEnum::ClosePortalStmt(_) => S::new("CLOSE", Effect::Session).unpinning(),
        NodeEnum::PrepareStmt(p) => {
            let mut info = nested("PREPARE", p.query.as_deref()).pinning();
            info.reserved_name = is_reserved_name(&p.name);
            info
        }
        NodeEnum::ExecuteStmt(e) => {
            let mut info = S::new("EXECUTE", Effect::Read).unseen();
            info.reserved_name = is_reserved_name(&e.name);
            info
        }
        NodeEnum::DeallocateStmt(d) => {
            let mut info = S::new("DEALLOCATE", Effect::Session);
            info.reserved_name = is_reserved_name(&d.name);
            info.session_effects.drops_prepared = d.isall || d.name.is_empty();
            info.session_effects.unpins = true;
            info
        }
        NodeEnum::ExplainStmt(e) => nested("EXPLAIN", e.query.as_deref()),
        NodeEnum::ListenStmt(_) => S::new("LISTEN", Effect::Session).pinning(),
        NodeEnum::UnlistenStmt(_) => S::new("UNLISTEN", Effect::Session).unpinning(),
        NodeEnum::NotifyStmt(_) => S::new("NOTIFY", Effect::Session),
        NodeEnum::CreateStmt(c) if is_temp(c.relation.as_ref()) => {
            S::new("CREATE TEMPORARY TABLE", Effect::TempTable).pinning()
        }
        NodeEnum::CreateStmt(_) => S::new("CREATE TABLE", Effect::Schema),
        NodeEnum::CreateTableAsStmt(c) => {
            let mut info = create_table_as(c);
            // `CREATE TABLE … AS EXECUTE name`
            if let Some(NodeEnum::ExecuteStmt(e)) = c.query.as_ref().and_then(|q| q.node.as_ref()) {
                info.reserved_name = is_reserved_name(&e.name);
            }
            info
        }
        NodeEnum::DoStmt(_) => S::new("DO", Effect::Code).unseen(),
        NodeEnum::CallStmt(_) => S::new("CALL", Effect::Code).unseen(),
        NodeEnum::VacuumStmt(v) => S::new(
            if v.is_vacuumcmd { "VACUUM" } else { "ANALYZE" },
            Effect::Maintenance,
        ),
        NodeEnum::ClusterStmt(_) => S::new("CLUSTER", Effect::Maintenance),
        NodeEnum::ReindexStmt(_) => S::new("REINDEX", Effect::Maintenance),
        NodeEnum::CheckPointStmt(_) => S::new("CHECKPOINT", Effect::Maintenance),
        NodeEnum::TruncateStmt(_) => S::new("TRUNCATE", Effect::Schema),
        NodeEnum::GrantStmt(g) => {
            S::new(if g.is_grant { "GRANT" } else { "REVOKE" }, Effect::Schema)
        }
        NodeEnum::GrantRoleStmt(g) => S::new(
            if g.is_grant {
                "GRANT role"
            } else {
                "REVOKE role"
            },
            Effect::Schema,
        ),
        NodeEnum::IndexStmt(_) => S::new("CREATE INDEX", Effect::Schema),
        NodeEnum::ViewStmt(_) => S::new("CREATE VIEW", Effect::Schema),
        NodeEnum::CreateFunctionStmt(f) => S::new(
            if f.is_procedure {
                "CREATE PROCEDURE"
            } else {
                "CREATE FUNCTION"
            },
            Effect::Schema,
        ),
        NodeEnum::DropStmt(d) => S::new(
            format!("DROP {}", object_type_words(d.remove_type)),
            Effect::Schema,
        ),
        NodeEnum::AlterTableStmt(a) => S::new(
            format!("ALTER {}", object_type_words(a.objtype)),
            Effect::Schema,
        ),
        NodeEnum::CommentStmt(_) => S::new("COMMENT", Effect::Schema),
        NodeEnum::SecLabelStmt(_) => S::new("SECURITY LABEL", Effect::Schema),
        NodeEnum::LockStmt(_) => S::new("LOCK", Effect::Other),
        // Deferrable constraints are checked at the end of the transaction by default;
        // this only moves the check, within the transaction.
        NodeEnum::ConstraintsSetStmt(_) => S::new("SET CONSTRAINTS", Effect::Transaction),
        NodeEnum::LoadStmt(_) => S::new("LOAD", Effect::Other),
        other => S::new(fallback_label(other), Effect::Schema),
    }
}

/// A statement that wraps another (EXPLAIN, PREPARE, DECLARE CURSOR) has the wrapped
/// statement's effect.
fn create_table_as(c: &pg_query::protobuf::CreateTableAsStmt) -> StatementInfo {
    use StatementInfo as S;
    if c.objtype == ObjectType::ObjectMatview as i32 {
        S::new("CREATE MATERIALIZED VIEW", Effect::Schema)
    } else if is_temp(c.into.as_ref().and_then(|i| i.rel.as_ref())) {
        S::new("CREATE TEMPORARY TABLE AS", Effect::TempTable).pinning()
    } else if c.is_select_into {
        S::new("SELECT INTO", Effect::Schema)
    } else {
        S::new("CREATE TABLE AS", Effect::Schema)
    }
}

fn nested(prefix: &'static str, query: Option<&pg_query::protobuf::Node>) -> StatementInfo {
    match query.and_then(|q| q.node.as_ref()) {
        Some(inner) => {
            let mut info = top_level(inner);
            if info.effect != Effect::Read {
                info.label = format!("{prefix} {}", info.label).into();
            } else {
                info.label = prefix.into();
            }
            info
        }
        None => StatementInfo::new(prefix, Effect::Read),
    }
}

fn is_temp(rel: Option<&pg_query::protobuf::RangeVar>) -> bool {
    rel.is_some_and(|r| r.relpersistence == "t")
}

fn transaction(t: &pg_query::protobuf::TransactionStmt) -> StatementInfo {
    let kind = TransactionStmtKind::try_from(t.kind).unwrap_or(TransactionStmtKind::Undefined);
    let label = match kind {
        TransactionStmtKind::TransStmtBegin => "BEGIN",
        TransactionStmtKind::TransStmtStart => "START TRANSACTION",
        TransactionStmtKind::TransStmtCommit => "COMMIT",
        TransactionStmtKind::TransStmtRollback => "ROLLBACK",
        TransactionStmtKind::TransStmtSavepoint => "SAVEPOINT",
        TransactionStmtKind::TransStmtRelease => "RELEASE SAVEPOINT",
        TransactionStmtKind::TransStmtRollbackTo => "ROLLBACK TO SAVEPOINT",
        TransactionStmtKind::TransStmtPrepare => "PREPARE TRANSACTION",
        TransactionStmtKind::TransStmtCommitPrepared => "COMMIT PREPARED",
        TransactionStmtKind::TransStmtRollbackPrepared => "ROLLBACK PREPARED",
        TransactionStmtKind::Undefined => "transaction control",
    };
    let mut info = StatementInfo::new(label, Effect::Transaction);
    if t.options.iter().any(sets_read_write) {
        info.label = format!("{label} READ WRITE").into();
        info.leaves_read_only = true;
    }
    info
}

/// A `transaction_read_only`/`default_transaction_read_only` option that is not a plain
/// "on" (BEGIN READ WRITE, SET TRANSACTION READ WRITE, SET SESSION CHARACTERISTICS…).
fn sets_read_write(option: &pg_query::protobuf::Node) -> bool {
    let Some(NodeEnum::DefElem(d)) = option.node.as_ref() else {
        return false;
    };
    if !is_read_only_setting(&d.defname) {
        return false;
    }
    !matches!(
        d.arg.as_deref().and_then(|a| a.node.as_ref()),
        Some(NodeEnum::AConst(c)) if matches!(&c.val, Some(a_const::Val::Ival(i)) if i.ival != 0)
            || matches!(&c.val, Some(a_const::Val::Boolval(b)) if b.boolval)
    )
}

pub(crate) fn is_read_only_setting(name: &str) -> bool {
    name.eq_ignore_ascii_case("transaction_read_only")
        || name.eq_ignore_ascii_case("default_transaction_read_only")
}

pub(crate) fn is_role_setting(name: &str) -> bool {
    name.eq_ignore_ascii_case("role") || name.eq_ignore_ascii_case("session_authorization")
}

fn variable_set(v: &pg_query::protobuf::VariableSetStmt) -> StatementInfo {
    let kind = VariableSetKind::try_from(v.kind).unwrap_or(VariableSetKind::Undefined);
    let verb = match kind {
        VariableSetKind::VarReset | VariableSetKind::VarResetAll => "RESET",
        _ => "SET",
    };
    let name = v.name.to_ascii_lowercase();
    let mut info = match kind {
        VariableSetKind::VarResetAll => StatementInfo::new("RESET ALL", Effect::Session),
        _ => StatementInfo::new(
            format!("{verb} {}", name.replace('_', " ").to_uppercase()),
            Effect::Session,
        ),
    };
    if is_role_setting(&name) {
        info.role_statement = role_statement(&name, kind, v);
        info.changes_role = info.role_statement.is_none();
    }
    // RESET ALL returns default_transaction_read_only to the value the backend session
    // started with, which rolegate sets for readonly sessions; a RESET of the setting
    // itself is refused all the same (it is never needed).
    if is_read_only_setting(&name) {
        info.leaves_read_only = true;
    }
    if kind == VariableSetKind::VarSetMulti && v.args.iter().any(sets_read_write) {
        info.leaves_read_only = true;
    }
    // SET LOCAL and SET TRANSACTION [SNAPSHOT] end with the transaction.
    info.session_effects.settings =
        !v.is_local && !matches!(name.as_str(), "transaction" | "transaction snapshot");
    // Setting the seed reseeds random(), and a reseeded generator stays reseeded after
    // SET LOCAL's transaction.
    info.session_effects.seed = name == "seed";
    if name == "client_encoding" && kind == VariableSetKind::VarSetValue {
        let value = match v.args.as_slice() {
            [arg] => constant_node_string(arg),
            _ => None,
        };
        info.sets_client_encoding = Some(value);
    }
    info
}

/// `SET ROLE`, `RESET ROLE`, `SET SESSION AUTHORIZATION`… in the forms that can keep
/// the session in its role; `None` for the rest (FROM CURRENT, several values).
fn role_statement(
    name: &str,
    kind: VariableSetKind,
    v: &pg_query::protobuf::VariableSetStmt,
) -> Option<RoleStatement> {
    let target = match v.args.as_slice() {
        [arg] => constant_node_string(arg),
        _ => None,
    };
    let local = v.is_local;
    match (name, kind) {
        ("role", VariableSetKind::VarSetValue) => Some(RoleStatement::SetRole {
            target: target?,
            local,
        }),
        ("role", VariableSetKind::VarReset | VariableSetKind::VarSetDefault) => {
            Some(RoleStatement::ResetRole)
        }
        ("session_authorization", VariableSetKind::VarSetValue) => {
            Some(RoleStatement::SetSessionAuthorization {
                target: Some(target?),
                local,
            })
        }
        ("session_authorization", VariableSetKind::VarSetDefault) => {
            Some(RoleStatement::SetSessionAuthorization {
                target: None,
                local,
            })
        }
        ("session_authorization", VariableSetKind::VarReset) => {
            Some(RoleStatement::ResetSessionAuthorization)
        }
        _ => None,
    }
}

/// A string constant node of the typed tree (`'x'`, or an identifier the grammar made
/// into one, as in `SET ROLE x`).
fn constant_node_string(node: &pg_query::protobuf::Node) -> Option<String> {
    match node.node.as_ref()? {
        NodeEnum::AConst(c) => match &c.val {
            Some(a_const::Val::Sval(s)) => Some(s.sval.clone()),
            _ => None,
        },
        NodeEnum::TypeCast(t) => constant_node_string(t.arg.as_deref()?),
        _ => None,
    }
}

fn object_type_words(objtype: i32) -> String {
    let name = ObjectType::try_from(objtype)
        .map(|t| t.as_str_name())
        .unwrap_or("OBJECT_UNKNOWN");
    name.trim_start_matches("OBJECT_").replace('_', " ")
}

/// "AlterSeqStmt" → "ALTER SEQ": good enough for statements without a hand-written label.
fn fallback_label(node: &NodeEnum) -> String {
    let name = match serde_json::to_value(node) {
        Ok(Value::Object(map)) => map.keys().next().cloned().unwrap_or_default(),
        _ => String::new(),
    };
    let name = name.trim_end_matches("Stmt");
    let mut label = String::new();
    for (i, ch) in name.chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            label.push(' ');
        }
        label.push(ch.to_ascii_uppercase());
    }
    if label.is_empty() {
        "utility statement".into()
    } else {
        label
    }
}

#[derive(Default)]
struct Findings {
    modifies_data: bool,
    select_into: bool,
    changes_role: bool,
    leaves_read_only: bool,
    unknown_set_config: bool,
    bound_setting_names: Vec<u16>,
    bound_encodings: Vec<u16>,
    sets_client_encoding: Option<Option<String>>,
    /// `set_config(…)` not literally local to the transaction.
    sets_session_setting: bool,
    /// `pg_advisory_lock` and the other session-level advisory locks.
    session_lock: bool,
    /// `pg_advisory_unlock`, `pg_advisory_unlock_all` and the like.
    session_unlock: bool,
    /// `UPDATE pg_settings`: a SET in disguise.
    updates_pg_settings: bool,
    /// A function whose body rolegate cannot see.
    unseen: bool,
    /// `nextval`, `currval`, `setval`, `lastval`.
    sequences: bool,
    /// `setseed`, `set_config('seed', …)`.
    seed: bool,
    /// `lo_create`, `lowrite`, `lo_open`…: PostgreSQL lets these write in a
    /// read-only transaction, so only the parser stops readonly clients.
    writes_large_objects: bool,
    /// Statements run from SQL-text literals.
    embedded: Vec<StatementInfo>,
    /// The function given computed SQL text.
    computed_sql_text: Option<String>,
    sql_text_too_deep: bool,
    sql_text_syntax_error: Option<String>,
}

/// Walks every node of a parse tree (as serde sees it, so no node type is skipped).
fn walk(value: &Value, findings: &mut Findings, ctx: Context<'_>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                match key.as_str() {
                    "UpdateStmt" => {
                        findings.modifies_data = true;
                        // However it is spelled (quoted, U&"…", schema-qualified), the
                        // tree has the name the server resolves.
                        if child.pointer("/relation/relname").and_then(Value::as_str)
                            == Some("pg_settings")
                        {
                            findings.updates_pg_settings = true;
                        }
                    }
                    "InsertStmt" | "DeleteStmt" | "MergeStmt" => findings.modifies_data = true,
                    "SelectStmt" if child.get("into_clause").is_some_and(|i| !i.is_null()) => {
                        findings.select_into = true;
                    }
                    "FuncCall" => func_call(child, findings, ctx),
                    _ => {}
                }
                walk(child, findings, ctx);
            }
        }
        Value::Array(items) => items.iter().for_each(|item| walk(item, findings, ctx)),
        _ => {}
    }
}

/// Functions whose session effects rolegate knows by name (judged below).
const SESSION_LOCKS: [&str; 4] = [
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];
const SEQUENCE_FUNCTIONS: [&str; 4] = ["nextval", "currval", "setval", "lastval"];

/// What calling `schema.name` leaves in the session, beyond `set_config` (below).
fn call_effects(schema: Option<&str>, name: &str, findings: &mut Findings) {
    // Matched in any schema: a look-alike elsewhere counts as the real one, and as
    // unseen (it is not PostgreSQL's).
    let known = if SESSION_LOCKS.contains(&name) {
        findings.session_lock = true;
        true
    } else if name.starts_with("pg_advisory_unlock") {
        findings.session_unlock = true;
        true
    } else if SEQUENCE_FUNCTIONS.contains(&name) {
        findings.sequences = true;
        true
    } else if name == "setseed" {
        findings.seed = true;
        true
    } else {
        name == "set_config"
    };
    let built_in_schema = schema.is_none_or(|s| s == "pg_catalog");
    let seen = (known && built_in_schema) || is_side_effect_free(schema, name);
    findings.unseen |= !seen;
}

/// A function call: `set_config(name, value, is_local)` can change any setting from
/// inside any expression, some functions run SQL text, and any function rolegate does
/// not know may leave anything in the session.
fn func_call(call: &Value, findings: &mut Findings, ctx: Context<'_>) {
    let parts: Vec<Option<&str>> = call
        .get("funcname")
        .and_then(Value::as_array)
        .map(|parts| parts.iter().map(string_node).collect())
        .unwrap_or_default();
    let (schema, name) = match parts.as_slice() {
        [Some(name)] => (None, *name),
        [Some(schema), Some(name)] => (Some(*schema), *name),
        // database.schema.function, or a name the walk cannot read: unknown.
        _ => {
            findings.unseen = true;
            match parts.last() {
                Some(Some(name)) => (Some(""), *name),
                _ => return,
            }
        }
    };
    call_effects(schema, name, findings);
    let args = call.get("args").and_then(Value::as_array);
    if writes_large_objects(name) {
        findings.writes_large_objects = true;
    }
    if let Some(arguments) = sql_arguments(name, ctx.sql_text_functions) {
        sql_text_call(
            name,
            &arguments,
            args.map_or(&[][..], Vec::as_slice),
            findings,
            ctx,
        );
    }
    if name != "set_config" {
        return;
    }
    let arg = |i: usize| args.and_then(|args| args.get(i));
    // Local only when the third argument is literally `true`.
    findings.sets_session_setting |= !arg(2).is_some_and(constant_true);
    let Some(first) = arg(0) else {
        findings.unknown_set_config = true;
        return;
    };
    if let Some(n) = param_number(first) {
        findings.bound_setting_names.push(n);
        // It may be the seed: what the name is is only known at Bind.
        findings.seed = true;
        return;
    }
    match constant_string(first).map(str::trim) {
        Some(s) if s.eq_ignore_ascii_case("seed") => findings.seed = true,
        Some(s) if is_role_setting(s) => findings.changes_role = true,
        Some(s) if is_read_only_setting(s) => findings.leaves_read_only = true,
        Some(s) if s.eq_ignore_ascii_case("client_encoding") => {
            match arg(1).and_then(param_number) {
                Some(n) => findings.bound_encodings.push(n),
                None => {
                    findings.sets_client_encoding =
                        Some(arg(1).and_then(constant_string).map(str::to_owned));
                }
            }
        }
        Some(_) => {}
        None => findings.unknown_set_config = true,
    }
}

/// Large-object functions that write. PostgreSQL runs every one of them in a read-only
/// transaction (large objects are not data a read-only transaction protects). `lo_open`
/// counts whatever its mode: texts that differ only in numbers share a verdict (see
/// `numeric_literal_key`), so no verdict may depend on a number such as INV_WRITE. SQL
/// reads large objects with `lo_get`; the FunctionCall message's `lo_open` is judged by
/// its mode in `fastpath`.
fn writes_large_objects(name: &str) -> bool {
    const WRITERS: [&str; 11] = [
        "lo_open",
        "lo_create",
        "lo_creat",
        "lo_from_bytea",
        "lo_put",
        "lo_unlink",
        "lo_import",
        "lo_export",
        "lowrite",
        "lo_truncate",
        "lo_truncate64",
    ];
    WRITERS.contains(&name)
}

/// The arguments of a function that runs SQL text: a string literal is parsed and its
/// statements are judged as the client's own; a computed one cannot be judged.
fn sql_text_call(
    function: &str,
    arguments: &SqlArguments,
    args: &[Value],
    findings: &mut Findings,
    ctx: Context<'_>,
) {
    for (position, arg) in args.iter().enumerate() {
        let named = arg.get("node").and_then(|n| n.get("NamedArgExpr"));
        let (name, value) = match named {
            Some(named) => (
                Some(named.get("name").and_then(Value::as_str).unwrap_or("")),
                named.get("arg"),
            ),
            None => (None, Some(arg)),
        };
        let is_sql = match arguments {
            SqlArguments::Any => true,
            SqlArguments::At {
                position: sql_position,
                arity,
                names,
            } => match name {
                // Names rolegate does not know the function's parameters by: any of them
                // may be the SQL.
                Some(name) => {
                    names.is_empty() || names.iter().any(|n| n.eq_ignore_ascii_case(name))
                }
                None => position == *sql_position && arity.is_none_or(|a| a == args.len()),
            },
        };
        let Some(value) = value.filter(|_| is_sql) else {
            continue;
        };
        // Where the argument is known to be SQL, text that does not parse is refused; where
        // any argument may be (a connection string, a name), it is taken for one of those.
        let must_parse = matches!(arguments, SqlArguments::At { .. });
        match literal(value) {
            Literal::Text(text) => embed(function, text, must_parse, findings, ctx),
            Literal::Other => {}
            Literal::Computed => {
                findings
                    .computed_sql_text
                    .get_or_insert_with(|| function.to_owned());
            }
        }
    }
}

/// SQL text from a literal: its statements, judged later as the client's own.
fn embed(function: &str, text: &str, must_parse: bool, findings: &mut Findings, ctx: Context<'_>) {
    if ctx.depth >= MAX_SQL_TEXT_DEPTH {
        findings.sql_text_too_deep = true;
        return;
    }
    let inner = Context {
        depth: ctx.depth + 1,
        ..ctx
    };
    let statements = match classify_in(text, inner) {
        Classification::Statements(statements) => statements,
        Classification::SyntaxError(message) => {
            if must_parse {
                findings
                    .sql_text_syntax_error
                    .get_or_insert_with(|| format!("{function}'s SQL text: {message}"));
            }
            return;
        }
    };
    for mut statement in statements {
        statement.label = format!("{} in {function}'s SQL text", statement.label).into();
        statement.span = (0, 0);
        // Parameters of the client's statement are not those of the text: `$1` there
        // names nothing rolegate could judge at Bind.
        if !statement.bound_setting_names.is_empty() {
            statement.bound_setting_names.clear();
            statement.changes_role = true;
            statement.label =
                format!("set_config with a computed setting name in {function}'s SQL text").into();
        }
        if !statement.bound_encodings.is_empty() {
            statement.bound_encodings.clear();
            statement.sets_client_encoding = Some(None);
        }
        findings.embedded.push(statement);
    }
}

enum Literal<'a> {
    /// A string constant (also `E''`, `U&''`, dollar quotes, under casts).
    Text(&'a str),
    /// NULL, a number, a boolean: not text.
    Other,
    /// Anything computed: a column, a parameter, an operator, a subquery, a call…
    Computed,
}

fn literal(node: &Value) -> Literal<'_> {
    let Some(inner) = node.get("node") else {
        return Literal::Computed;
    };
    if let Some(cast) = inner.get("TypeCast") {
        if !keeps_text(cast) {
            return Literal::Computed;
        }
        return cast.get("arg").map_or(Literal::Computed, literal);
    }
    let Some(constant) = inner.get("AConst") else {
        return Literal::Computed;
    };
    match constant.pointer("/val/Sval/sval").and_then(Value::as_str) {
        Some(text) => Literal::Text(text),
        None => Literal::Other,
    }
}

/// A cast that leaves a string as it is: to `text` or `varchar` without a length. Any
/// other computes a new value: `'rolexyz'::varchar(4)` is `role`, `'role  '::bpchar::text`
/// is `role`, `'16406'::oid::regclass::text` is a table's name.
fn keeps_text(cast: &Value) -> bool {
    let Some(type_name) = cast.get("type_name") else {
        return false;
    };
    let none = |key: &str| {
        type_name
            .get(key)
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
    };
    if !none("typmods") || !none("array_bounds") {
        return false;
    }
    let names: Vec<Option<&str>> = type_name
        .get("names")
        .and_then(Value::as_array)
        .map(|names| names.iter().map(string_node).collect())
        .unwrap_or_default();
    matches!(
        names.as_slice(),
        [Some("text" | "varchar")] | [Some("pg_catalog"), Some("text" | "varchar")]
    )
}

/// `$n`, possibly under type casts (`$1::text`).
fn param_number(node: &Value) -> Option<u16> {
    let inner = node.get("node")?;
    if let Some(cast) = inner.get("TypeCast") {
        return param_number(cast.get("arg")?);
    }
    let number = inner.get("ParamRef")?.get("number")?.as_u64()?;
    u16::try_from(number).ok().filter(|&n| n > 0)
}

/// A literal `true` (possibly cast).
fn constant_true(node: &Value) -> bool {
    let Some(inner) = node.get("node") else {
        return false;
    };
    if let Some(cast) = inner.get("TypeCast") {
        return cast.get("arg").is_some_and(constant_true);
    }
    inner
        .pointer("/AConst/val/Boolval/boolval")
        .and_then(Value::as_bool)
        == Some(true)
}

/// `{"node": {"String": {"sval": "x"}}}` → "x".
pub(crate) fn string_node(node: &Value) -> Option<&str> {
    node.get("node")?.get("String")?.get("sval")?.as_str()
}

/// A string constant, possibly under casts that keep it as it is (`'role'::text`).
pub(crate) fn constant_string(node: &Value) -> Option<&str> {
    let inner = node.get("node")?;
    if let Some(cast) = inner.get("TypeCast") {
        return constant_string(cast.get("arg")?).filter(|_| keeps_text(cast));
    }
    inner
        .get("AConst")?
        .get("val")?
        .get("Sval")?
        .get("sval")?
        .as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> StatementInfo {
        match classify(sql, true) {
            Classification::Statements(mut s) => {
                assert_eq!(s.len(), 1, "{sql}");
                s.remove(0)
            }
            Classification::SyntaxError(e) => panic!("{sql}: {e}"),
        }
    }

    #[test]
    fn labels_and_effects() {
        assert_eq!(one("select 1").effect, Effect::Read);
        assert_eq!(one("create table t (id int)").label, "CREATE TABLE");
        assert_eq!(one("drop table t").label, "DROP TABLE");
        assert_eq!(one("alter table t add column x int").label, "ALTER TABLE");
        assert_eq!(
            one("create temp table t (id int)").effect,
            Effect::TempTable
        );
        assert_eq!(one("select 1 into t").label, "SELECT INTO");
        assert_eq!(
            one("explain analyze create table t as select 1").effect,
            Effect::Schema
        );
        assert_eq!(one("copy t from '/etc/passwd'").effect, Effect::ServerFile);
        assert_eq!(one("copy t from stdin").effect, Effect::Write);
        assert_eq!(one("create sequence s").label, "CREATE SEQ");
    }

    #[test]
    fn session_effects_are_found() {
        let effects = |sql| one(sql).session_effects;
        assert!(effects("set search_path = x").settings);
        assert!(effects("reset all").settings);
        assert!(!effects("set local search_path = x").settings);
        assert!(!effects("set transaction isolation level serializable").settings);
        assert!(effects("set session characteristics as transaction read only").settings);
        assert!(effects("select set_config('a.b', 'c', false)").settings);
        assert!(effects("select set_config('a.b', 'c', $1)").settings);
        assert!(!effects("select set_config('a.b', 'c', true)").settings);
        assert!(effects("select set_config('a.b', 'c', not true)").settings);
        assert!(effects("set transaction_timeout = '1ms'").settings);
        assert!(effects("update pg_settings set setting = '1' where name = 'x'").settings);
        assert!(one("create temp table t as execute rolegate_s1").reserved_name);
        assert!(one("explain execute rolegate_s1").reserved_name);
        assert!(effects("select pg_advisory_lock(1)").pins);
        assert!(effects("select pg_try_advisory_lock_shared(1, 2)").pins);
        assert!(!effects("select pg_advisory_xact_lock(1)").pins);
        assert!(effects("listen x").pins);
        assert!(effects("declare c cursor with hold for select 1").pins);
        assert!(!effects("declare c cursor for select 1").pins);
        assert!(effects("prepare p as select 1").pins);
        assert!(effects("create temp table t (a int)").pins);
        assert!(effects("deallocate all").drops_prepared);
        assert!(!effects("deallocate p").drops_prepared);
        assert!(effects("discard all").discards_all);
        assert!(effects("unlisten *").unpins);
        assert!(effects("select pg_advisory_unlock_all()").unpins);
        assert!(effects("close c").unpins);
        assert!(!effects("select 1").any());
        assert!(one("execute rolegate_s1").reserved_name);
        assert!(one("deallocate \"ROLEGATE_s1\"").reserved_name);
        assert!(!one("execute p").reserved_name);
    }

    #[test]
    fn nested_writes_and_role_changes_are_found() {
        assert!(one("with x as (delete from t returning *) select * from x").modifies_data);
        assert!(one("select set_config('role', 'postgres', false)").changes_role);
        assert!(one("select pg_catalog.set_config('ROLE'::text, 'x', false)::text").changes_role);
        assert!(one("select coalesce(set_config('session_authorization','x',false))").changes_role);
        assert!(one("select set_config(current_setting('x'), 'y', false)").changes_role);
        assert!(!one("select set_config('search_path', 'x', false)").changes_role);
        assert!(
            one("select set_config('default_transaction_read_only','off',false)").leaves_read_only
        );
        assert_eq!(
            one("set role \"Postgres\"").role_statement,
            Some(RoleStatement::SetRole {
                target: "Postgres".into(),
                local: false
            })
        );
        assert_eq!(
            one("SET LOCAL SESSION AUTHORIZATION DEFAULT").role_statement,
            Some(RoleStatement::SetSessionAuthorization {
                target: None,
                local: true
            })
        );
        assert_eq!(
            one("reset session authorization").role_statement,
            Some(RoleStatement::ResetSessionAuthorization)
        );
        assert_eq!(
            one("discard all").role_statement,
            Some(RoleStatement::DiscardAll)
        );
        assert!(one("set role from current").changes_role);
        assert_eq!(
            one("SET CONSTRAINTS ALL IMMEDIATE").effect,
            Effect::Transaction
        );
    }

    #[test]
    fn unicode_escaped_function_names_are_still_found() {
        assert!(one(r#"select U&"set\005fconfig"('role', 'x', false)"#).changes_role);
        assert!(one(r#"select pg_catalog."set_config"('role', 'x', false)"#).changes_role);
        assert!(!one("select abalance from pgbench_accounts where aid = $1").changes_role);
    }

    #[test]
    fn read_write_switches_are_found() {
        assert!(one("begin read write").leaves_read_only);
        assert!(!one("begin read only").leaves_read_only);
        assert!(one("set transaction read write").leaves_read_only);
        assert!(one("set session characteristics as transaction read write").leaves_read_only);
        assert!(one("set default_transaction_read_only = off").leaves_read_only);
        // The backend session starts read-only for readonly clients: RESET ALL keeps it.
        assert!(!one("reset all").leaves_read_only);
        assert!(one("reset default_transaction_read_only").leaves_read_only);
        assert!(!one("set statement_timeout = 5").leaves_read_only);
    }

    #[test]
    fn statements_know_where_they_are() {
        let sql = "SELECT 1; /* c */ SET ROLE NONE;RESET ALL";
        let Classification::Statements(s) = classify(sql, true) else {
            panic!()
        };
        let spans: Vec<&str> = s.iter().map(|s| &sql[s.span.0..s.span.1]).collect();
        assert_eq!(spans, ["SELECT 1", "SET ROLE NONE", "RESET ALL"]);
    }

    #[test]
    fn string_rules_follow_standard_conforming_strings() {
        // With standard_conforming_strings off, \' does not end the literal, so this is
        // one SELECT; with it on, it is a SELECT followed by a DROP.
        let sql = r"select 'a\'; drop table t; --'";
        match classify(sql, false) {
            Classification::Statements(s) => assert_eq!(s.len(), 1),
            other => panic!("{other:?}"),
        }
        match classify(sql, true) {
            Classification::Statements(s) => assert_eq!(s[1].label, "DROP TABLE"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unseen_is_any_function_not_known_to_leave_nothing() {
        let unseen = |sql| one(sql).session_effects.unseen;
        for seen in [
            "select count(*), coalesce(max(id), 0), now() from t",
            "select lower(name), length(name), round(1.5) from t",
            "select pg_catalog.lower('X'), extract(year from now()), trim(both from ' a ')",
            "select jsonb_build_object('a', 1), substring('abc' from 2)",
            "select set_config('search_path', 'x', false)",
            "select pg_advisory_lock(1)",
            "select nextval('s')",
            "select setseed(0.5)",
            "select 1",
            "select current_user",
        ] {
            assert!(!unseen(seen), "{seen}");
        }
        for not_seen in [
            "select add_one(1)",
            "select public.lower('x')",
            "select \"LOWER\"('x')",
            "select x.pg_catalog.lower('x')",
            "select * from t where id = my_func(2)",
            "select pg_catalog.pg_create_logical_replication_slot('s', 'p', true)",
            "insert into t values (my_default())",
            "call p()",
            "do $$ begin end $$",
            "execute p",
            "select 1 from generate_series(1, 2) g, my_srf() f",
        ] {
            assert!(unseen(not_seen), "{not_seen}");
        }
    }

    #[test]
    fn sequences_and_seed_are_found() {
        let effects = |sql| one(sql).session_effects;
        for sql in [
            "select nextval('s')",
            "select currval('s')",
            "select pg_catalog.setval('s', 5)",
            "select lastval()",
            "insert into t values (nextval('s'))",
        ] {
            assert!(effects(sql).sequences, "{sql}");
            assert!(effects(sql).any(), "{sql}");
        }
        assert!(!effects("select 1").sequences);
        for sql in [
            "select setseed(0.5)",
            "set seed = 0.5",
            "set local seed to 0.5",
            "select set_config('seed', '0.5', true)",
            "select set_config($1, '0.5', false)",
        ] {
            assert!(effects(sql).seed, "{sql}");
        }
        assert!(!effects("select random()").seed);
        assert!(!effects("set search_path = x").seed);
        let mut sum = SessionEffects::default();
        sum.add(effects("select lastval()"));
        sum.add(effects("select setseed(0)"));
        sum.add(effects("select add_one(1)"));
        assert!(sum.sequences && sum.seed && sum.unseen && sum.any());
    }

    #[test]
    fn settings_changes_are_found_however_spelled() {
        let settings = |sql| one(sql).session_effects.settings;
        for sql in [
            "update pg_settings set setting = 'x' where name = 'search_path'",
            r#"UPDATE U&"pg\005fsettings" SET setting = 'x' WHERE name = 'search_path'"#,
            r#"update pg_catalog."pg_settings" set setting = 'x'"#,
            "with u as (update pg_settings set setting = 'x' returning 1) select * from u",
            "select set_config('app.tenant', 'acme', false)",
            "SET app.tenant = 'acme'",
            "set session app.tenant to 'acme'",
            "reset app.tenant",
            "select query_to_xml('select set_config(''app.tenant'', ''acme'', false)', true, false, '')",
        ] {
            assert!(settings(sql), "{sql}");
        }
        assert!(!settings("select * from pg_settings"));
        assert!(!settings("update t set a = 1"));
        assert!(!settings("set local app.tenant = 'acme'"));
    }

    fn embedded(sql: &str) -> StatementInfo {
        let info = one(sql);
        assert!(!info.embedded.is_empty(), "{sql}: nothing embedded");
        info
    }

    fn innermost(info: &StatementInfo) -> &StatementInfo {
        match info.embedded.first() {
            Some(inner) => innermost(inner),
            None => info,
        }
    }

    #[test]
    fn sql_text_literals_are_classified_as_statements() {
        let role =
            r"select query_to_xml('SELECT set_config(''role'', ''none'', false)', true, false, '')";
        let info = embedded(role);
        assert!(info.embedded[0].changes_role);
        assert_eq!(
            info.embedded[0].label,
            "set_config('role') in query_to_xml's SQL text"
        );
        // Every way of writing a literal that pg_query turns into a string.
        for sql in [
            r"select query_to_xml(E'select set_config(\'role\', \'none\', false)', true, false, '')",
            r"select query_to_xml(U&'select set_config(\0027role\0027, \0027none\0027, false)', true, false, '')",
            r"select query_to_xml($q$select set_config('role', 'none', false)$q$, true, false, '')",
            r"select query_to_xml('select set_config(''role'', ''none'', false)'::text, true, false, '')",
            r"select pg_catalog.query_to_xmlschema($$select set_config('role','none',false)$$, true, false, '')",
            r"select query_to_xml_and_xmlschema($$select set_config('role','none',false)$$, true, false, '')",
            r"select * from ts_stat($$select set_config('role','none',false)::tsvector$$)",
            r"select ts_rewrite('a'::tsquery, $$select set_config('role','none',false)::tsquery, 'b'::tsquery$$)",
            r"select query_to_xml(query => $$select set_config('role','none',false)$$, nulls => true, tableforest => false, targetns => '')",
            // Nested: query_to_xml inside query_to_xml's literal.
            r"select query_to_xml('select query_to_xml(''select set_config(''''role'''', ''''none'''', false)'', true, false, '''')', true, false, '')",
        ] {
            assert!(innermost(&embedded(sql)).changes_role, "{sql}");
        }
        // A read stays a read; its effects count for the statement around it.
        let read = embedded("select query_to_xml('select 1', true, false, '')");
        assert_eq!(read.embedded[0].effect, Effect::Read);
        assert!(!read.session_effects.any());
        let lock = embedded("select query_to_xml('select pg_advisory_lock(1)', true, false, '')");
        assert!(lock.session_effects.pins);
        let write = embedded(
            "select query_to_xml('with d as (delete from t returning 1) select * from d', true, false, '')",
        );
        assert!(write.embedded[0].modifies_data);
        // ts_rewrite's three-argument form takes no SQL; text that is not SQL is left alone.
        assert!(
            one("select ts_rewrite('a'::tsquery, 'a'::tsquery, 'b'::tsquery)")
                .embedded
                .is_empty()
        );
        // Text in the SQL argument that does not parse cannot be judged (an older server's
        // grammar may run it).
        let postfix = one("select query_to_xml('select set_config(''role'', ''none'', false), 5 !', true, false, '')");
        assert!(postfix.embedded.is_empty());
        assert!(postfix
            .sql_text_syntax_error
            .is_some_and(|e| e.starts_with("query_to_xml's SQL text: ")));
        // `$1` in the text is not the client's parameter.
        let bound =
            embedded("select query_to_xml('select set_config($1, ''x'', false)', true, false, '')");
        assert!(bound.embedded[0].changes_role);
        assert!(bound.bound_setting_names.is_empty());
    }

    #[test]
    fn computed_sql_text_is_marked() {
        for sql in [
            "select query_to_xml($1, true, false, '')",
            "select query_to_xml('select ' || 'set_config(1)', true, false, '')",
            "select query_to_xml(q, true, false, '') from queries",
            "select query_to_xml((select q from queries), true, false, '')",
            "select ts_stat(format('select %s', 1))",
            "select query_to_xml(query => $1, nulls => true, tableforest => false, targetns => '')",
        ] {
            let info = one(sql);
            assert!(info.computed_sql_text.is_some(), "{sql}");
            assert!(info.session_effects.unseen, "{sql}");
        }
        // Computed arguments that are not the SQL are fine.
        assert!(one("select query_to_xml('select 1', $1, false, $2)")
            .computed_sql_text
            .is_none());
    }

    #[test]
    fn sql_text_is_followed_only_so_deep() {
        // Distinct dollar tags, so that the nesting needs no quote doubling.
        let nested = |levels: usize| {
            let mut sql = "select set_config('role', 'none', false)".to_string();
            for level in 0..levels {
                sql = format!("select query_to_xml($t{level}${sql}$t{level}$, true, false, '')");
            }
            sql
        };
        let deepest_followed = one(&nested(MAX_SQL_TEXT_DEPTH));
        assert!(innermost(&deepest_followed).changes_role);
        let too_deep = one(&nested(MAX_SQL_TEXT_DEPTH + 1));
        assert!(innermost(&too_deep).sql_text_too_deep);
    }

    #[test]
    fn configured_functions_run_sql_text() {
        let functions = [
            SqlTextFunction::try_from("dblink".to_string()).unwrap(),
            SqlTextFunction::try_from("dblink_exec:2".to_string()).unwrap(),
        ];
        let classify_one = |sql: &str| match classify_with(sql, true, &functions) {
            Classification::Statements(mut s) => s.remove(0),
            Classification::SyntaxError(e) => panic!("{sql}: {e}"),
        };
        let info = classify_one(
            "select * from dblink('dbname=x', 'select set_config(''role'', ''none'', false)') as t(a text)",
        );
        assert_eq!(info.embedded.len(), 1, "the connection string is not SQL");
        assert!(info.sql_text_syntax_error.is_none());
        assert!(info.embedded[0].changes_role);
        let info = classify_one("select dblink_exec('conn', 'drop table t')");
        assert_eq!(info.embedded[0].effect, Effect::Schema);
        assert!(classify_one("select dblink_exec($1, 'select 1')")
            .computed_sql_text
            .is_none());
        assert!(classify_one("select dblink('c', $1)")
            .computed_sql_text
            .is_some());
        // Without the configuration, dblink is just a function rolegate cannot see into.
        let plain = one("select dblink_exec('conn', 'drop table t')");
        assert!(plain.embedded.is_empty() && plain.session_effects.unseen);
    }

    #[test]
    fn casts_that_compute_a_new_string_are_not_literals() {
        for computed in [
            "select set_config('16406'::oid::regclass::text, 'none', false)",
            "select set_config('rolexyz'::varchar(4), 'none', false)",
            "select set_config('role  '::bpchar::text, 'none', false)",
            "select set_config('rolexyz'::char(4)::text, 'none', false)",
        ] {
            let info = one(computed);
            assert!(info.changes_role, "{computed}");
            assert_eq!(info.label, "set_config with a computed setting name");
        }
        for literal in [
            "select set_config('role'::text, 'none', false)",
            "select set_config('role'::varchar, 'none', false)",
            "select set_config('role'::pg_catalog.text::character varying, 'none', false)",
        ] {
            assert_eq!(one(literal).label, "set_config('role')", "{literal}");
        }
        assert!(
            one("select set_config('search_path'::text, 'x', false)")
                .session_effects
                .settings
        );
        assert!(!one("select set_config('search_path'::text, 'x', false)").changes_role);
        let computed = one("select query_to_xml('select 1'::varchar(3), true, false, '')");
        assert!(computed.computed_sql_text.is_some());
        let kept = one("select query_to_xml('select 1'::varchar, true, false, '')");
        assert!(kept.computed_sql_text.is_none() && kept.embedded.len() == 1);
    }

    #[test]
    fn large_object_writes_are_writes() {
        for sql in [
            "select lo_create(0)",
            "select lo_from_bytea(0, 'x')",
            "select lo_unlink(42)",
            "select lo_put(42, 0, 'x')",
            "select lo_open(42, 131072)",
            // Even for reading: its verdict would be shared with the writing mode's.
            "select lo_open(42, 262144)",
            "select lo_open(42, $1)",
            "select lowrite(0, 'x')",
        ] {
            let info = one(sql);
            assert!(info.modifies_data, "{sql}");
            assert_eq!(info.label, "SELECT writing a large object", "{sql}");
        }
        for sql in ["select lo_get(42)", "select loread(0, 10)"] {
            assert!(!one(sql).modifies_data, "{sql}");
        }
    }

    #[test]
    fn nul_bytes_and_garbage_do_not_parse() {
        assert!(matches!(
            classify("select 1\0; drop table t", true),
            Classification::SyntaxError(_)
        ));
        assert!(matches!(
            classify("selec 1", true),
            Classification::SyntaxError(_)
        ));
    }
}
