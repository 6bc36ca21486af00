//! Client class + classified statements → verdict, with the words the client will read.

use super::classify::{
    Classification, Effect, RoleStatement, SessionEffects, StatementInfo, MAX_SQL_TEXT_DEPTH,
    RESERVED_STATEMENT_PREFIX,
};
use crate::config::{Allowance, ClientClass};
use crate::sql::quote_ident;

/// Why a statement string was refused: what the client sees in its ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// SQLSTATE: 42501 (insufficient privilege) for the policy, 42601 for a syntax error.
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
    /// The statement kind that was refused ("CREATE TABLE"), for logs and metrics.
    pub kind: String,
    /// It would leave the owner role: refused even in report mode.
    pub leaves_owner_role: bool,
}

/// How an allowed statement string goes to the server.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// Statements sent in place of the client's, by their byte span in its text: the
    /// forms of SET ROLE / SESSION AUTHORIZATION that keep the session in its role.
    pub replacements: Vec<((usize, usize), String)>,
    /// The string is `DISCARD ALL`: the session's role is set again right after it.
    pub discard_all: bool,
    /// `set_config` takes its setting name from these parameters: judged at Bind.
    pub bound_setting_names: Vec<u16>,
    /// `set_config('client_encoding', …)` takes the encoding from these: judged at Bind.
    pub bound_encodings: Vec<u16>,
    /// What the string leaves in the backend session (for transaction pooling).
    pub session_effects: SessionEffects,
}

impl Allowed {
    /// Forwarded as the client sent it, nothing to do later.
    pub fn is_plain(&self) -> bool {
        self.replacements.is_empty()
            && !self.discard_all
            && self.bound_setting_names.is_empty()
            && self.bound_encodings.is_empty()
            && !self.session_effects.any()
    }
}

/// Judges every statement of a string; the first refused one refuses the whole string.
/// `role` is the role the session is kept in (the owner, or `app_role`).
pub fn judge(
    class: ClientClass,
    allow: &[Allowance],
    role: &str,
    classification: &Classification,
) -> Result<Allowed, Refusal> {
    let statements = match classification {
        Classification::SyntaxError(message) => return Err(Refusal {
            code: "42601",
            message: format!("rolegate: {message}"),
            hint: Some("rolegate parses every statement before it reaches the server; this one is not valid PostgreSQL.".into()),
            kind: "syntax error".into(),
            leaves_owner_role: false,
        }),
        Classification::Statements(statements) => statements,
    };
    let mut allowed = Allowed::default();
    for s in statements {
        if let Some(role_statement) = &s.role_statement {
            match keep_role(role_statement, role, statements.len(), s)? {
                Keep::Forward => {}
                Keep::Replace(sql) => allowed.replacements.push((s.span, sql)),
                Keep::DiscardAll => allowed.discard_all = true,
            }
        }
        if s.reserved_name {
            return Err(reserved_name_refusal(s));
        }
        judge_statement(class, allow, s)?;
        judge_sql_text(class, allow, role, s)?;
        allowed.session_effects.add(s.session_effects);
        allowed
            .bound_setting_names
            .extend_from_slice(&s.bound_setting_names);
        allowed
            .bound_encodings
            .extend_from_slice(&s.bound_encodings);
    }
    Ok(allowed)
}

fn reserved_name_refusal(s: &StatementInfo) -> Refusal {
    Refusal {
        code: "42501",
        message: format!(
            "rolegate: prepared statement names beginning with \"{RESERVED_STATEMENT_PREFIX}\" are rolegate's own ({})",
            s.label
        ),
        hint: Some("Choose another name for the prepared statement.".into()),
        kind: "reserved statement name".into(),
        leaves_owner_role: true,
    }
}

/// The SQL text a statement hands to functions that run it (`query_to_xml('…')`): each
/// statement in a literal is judged as if the client had sent it, and text computed at
/// run time is refused to the classes whose limits it could step over.
fn judge_sql_text(
    class: ClientClass,
    allow: &[Allowance],
    role: &str,
    s: &StatementInfo,
) -> Result<(), Refusal> {
    if s.sql_text_too_deep {
        return Err(Refusal {
            code: "42501",
            message: format!(
                "rolegate: SQL text inside SQL text more than {MAX_SQL_TEXT_DEPTH} levels deep cannot be judged ({})",
                s.label
            ),
            hint: Some("Send the innermost statement on its own.".into()),
            kind: "SQL text nested too deeply".into(),
            leaves_owner_role: true,
        });
    }
    if let Some(message) = &s.sql_text_syntax_error {
        return Err(Refusal {
            code: "42601",
            message: format!("rolegate: {message}"),
            hint: Some("rolegate parses SQL handed to functions as text before it reaches the server; this text is not valid PostgreSQL.".into()),
            kind: "syntax error in SQL text".into(),
            leaves_owner_role: true,
        });
    }
    if let Some(function) = &s.computed_sql_text {
        if class != ClientClass::Migrator {
            return Err(Refusal {
                code: "42501",
                message: format!(
                    "rolegate: {function} is given SQL text computed when the statement runs (a column, a parameter or an expression), which rolegate cannot judge, so it is not allowed for {} clients ({})",
                    class.as_str(),
                    s.label
                ),
                hint: Some(format!(
                    "Write the SQL that {function} runs as a string literal, so that rolegate can judge it; a migrator client may compute it."
                )),
                kind: format!("computed SQL text for {function}"),
                leaves_owner_role: false,
            });
        }
    }
    for embedded in &s.embedded {
        // The text cannot be rewritten inside a literal: only a role statement that
        // leaves the session where it is may pass.
        if let Some(role_statement) = &embedded.role_statement {
            if !matches!(keep_role(role_statement, role, 1, embedded)?, Keep::Forward) {
                return Err(role_refusal(embedded));
            }
        }
        if embedded.reserved_name {
            return Err(reserved_name_refusal(embedded));
        }
        judge_statement(class, allow, embedded)?;
        judge_sql_text(class, allow, role, embedded)?;
    }
    Ok(())
}

fn role_refusal(s: &StatementInfo) -> Refusal {
    Refusal {
        code: "42501",
        message: format!(
            "rolegate: changing the session role is not allowed ({})",
            s.label
        ),
        hint: Some("rolegate keeps every session in the owner role, so that everything created belongs to it.".into()),
        kind: s.label.to_string(),
        leaves_owner_role: true,
    }
}

enum Keep {
    Forward,
    Replace(String),
    DiscardAll,
}

/// A statement about the session's role: carried out so that the role stays, or
/// refused when it names another role.
fn keep_role(
    statement: &RoleStatement,
    role: &str,
    statements_in_string: usize,
    s: &StatementInfo,
) -> Result<Keep, Refusal> {
    let set_role = |local: bool| {
        let scope = if local { "LOCAL " } else { "" };
        Keep::Replace(format!("SET {scope}ROLE {}", quote_ident(role)))
    };
    match statement {
        // `none` is how the grammar spells SET ROLE NONE (no role can be called that).
        RoleStatement::SetRole { target, local } if target == "none" => Ok(set_role(*local)),
        RoleStatement::SetRole { target, .. } if target == role => Ok(Keep::Forward),
        // The backend session starts with `role` as a startup setting, so a reset
        // returns to it.
        RoleStatement::ResetRole => Ok(Keep::Forward),
        RoleStatement::SetSessionAuthorization { target, local }
            if target.as_deref().is_none_or(|t| t == role) =>
        {
            Ok(set_role(*local))
        }
        RoleStatement::ResetSessionAuthorization => Ok(Keep::Replace("RESET ROLE".into())),
        RoleStatement::DiscardAll if statements_in_string == 1 => Ok(Keep::DiscardAll),
        // PostgreSQL runs a multi-statement string as one transaction, where DISCARD ALL
        // fails; rolegate answers as it would, without sending it.
        RoleStatement::DiscardAll => Err(Refusal {
            code: "25001",
            message: "DISCARD ALL cannot run inside a transaction block".into(),
            hint: None,
            kind: "DISCARD ALL".into(),
            leaves_owner_role: true,
        }),
        _ => Err(role_refusal(s)),
    }
}

/// A `client_encoding` that rolegate cannot judge statements in: one whose multi-byte
/// characters may contain ASCII bytes (a backslash, a quote), so that the server would
/// split a string where rolegate does not. Every other encoding PostgreSQL offers
/// keeps ASCII bytes for ASCII characters, which is all the statement structure
/// depends on. Names are compared as PostgreSQL does: letters and digits only, any case.
pub fn unsupported_client_encoding(name: &str) -> Option<Refusal> {
    let clean: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    const NOT_ASCII_SAFE: [&str; 17] = [
        "sjis",
        "mskanji",
        "shiftjis",
        "win932",
        "windows932",
        "shiftjis2004",
        "big5",
        "win950",
        "windows950",
        "gbk",
        "win936",
        "windows936",
        "uhc",
        "win949",
        "windows949",
        "gb18030",
        "johab",
    ];
    NOT_ASCII_SAFE.contains(&clean.as_str()).then(|| Refusal {
        code: "0A000",
        message: format!(
            "rolegate: client_encoding \"{name}\" is not supported: its multi-byte characters can contain ASCII bytes such as a backslash, so rolegate could not judge statements the way the server reads them"
        ),
        hint: Some("Use UTF8 (or another encoding that keeps ASCII bytes for ASCII only, such as EUC_JP or EUC_KR).".into()),
        kind: "client_encoding".into(),
        leaves_owner_role: true,
    })
}

fn judge_statement(
    class: ClientClass,
    allow: &[Allowance],
    s: &StatementInfo,
) -> Result<(), Refusal> {
    let refuse = |why: &str, hint: &str| {
        Err(Refusal {
            code: "42501",
            message: format!("rolegate: {why} ({})", s.label),
            hint: Some(hint.to_owned()),
            kind: s.label.to_string(),
            leaves_owner_role: s.changes_role,
        })
    };
    if s.changes_role {
        return refuse(
            "changing the session role is not allowed",
            "rolegate keeps every session in the owner role, so that everything created belongs to it.",
        );
    }
    match &s.sets_client_encoding {
        Some(Some(name)) => {
            if let Some(refusal) = unsupported_client_encoding(name) {
                return Err(refusal);
            }
        }
        Some(None) => {
            return Err(Refusal {
                leaves_owner_role: true,
                ..refuse(
                    "a client_encoding computed on the server is not allowed",
                    "Set client_encoding to a constant: SET client_encoding = 'UTF8'.",
                )
                .unwrap_err()
            })
        }
        None => {}
    }
    match class {
        ClientClass::Migrator => Ok(()),
        ClientClass::App => match s.effect {
            Effect::Read | Effect::Write | Effect::Transaction | Effect::Session => Ok(()),
            Effect::TempTable if allow.contains(&Allowance::TempTables) => Ok(()),
            Effect::TempTable => refuse(
                "temporary tables are not allowed for app clients",
                "Give this client allow = [\"temp_tables\"] in the rolegate config, or use a migrator client.",
            ),
            Effect::Schema => refuse(
                "DDL is not allowed for app clients",
                "Schema changes are for migrator clients: run them from your migration tool's identity.",
            ),
            Effect::Code => refuse(
                "server-side code blocks and procedures are not allowed for app clients",
                "A migrator client may run it.",
            ),
            Effect::ServerFile => refuse(
                "COPY to or from the server's files or programs is not allowed for app clients",
                "Use COPY ... FROM STDIN or TO STDOUT; a migrator client may use server files.",
            ),
            Effect::Maintenance | Effect::Other => refuse(
                "this command is not allowed for app clients",
                "A migrator client may run it.",
            ),
        },
        ClientClass::Readonly => {
            if s.leaves_read_only {
                return refuse(
                    "readonly sessions cannot leave read-only mode",
                    "readonly clients only read; use an app client to change data.",
                );
            }
            match s.effect {
                Effect::Read | Effect::Transaction | Effect::Session if !s.modifies_data => Ok(()),
                Effect::Read | Effect::Write | Effect::Transaction | Effect::Session => refuse(
                    "writes are not allowed for readonly clients",
                    "readonly clients only read; use an app client to change data.",
                ),
                Effect::Schema | Effect::TempTable => refuse(
                    "DDL is not allowed for readonly clients",
                    "Schema changes are for migrator clients.",
                ),
                _ => refuse(
                    "this command is not allowed for readonly clients",
                    "readonly clients only read; a migrator client may run it.",
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::classify::classify;

    fn verdict(class: ClientClass, sql: &str) -> Result<Allowed, Refusal> {
        judge(class, &[], "owner", &classify(sql, true))
    }

    #[test]
    fn app_may_do_data_work_only() {
        assert!(verdict(ClientClass::App, "insert into t values (1)").is_ok());
        let refusal = verdict(ClientClass::App, "create table t (id int)").unwrap_err();
        assert_eq!(refusal.code, "42501");
        assert_eq!(
            refusal.message,
            "rolegate: DDL is not allowed for app clients (CREATE TABLE)"
        );
        assert!(refusal.hint.unwrap().contains("migrator"));
    }

    #[test]
    fn one_refused_statement_refuses_the_string() {
        assert!(verdict(ClientClass::App, "select 1; drop table t; select 2").is_err());
    }

    #[test]
    fn temp_tables_need_an_allowance() {
        let sql = "create temp table t (id int)";
        assert!(verdict(ClientClass::App, sql).is_err());
        assert!(judge(
            ClientClass::App,
            &[Allowance::TempTables],
            "owner",
            &classify(sql, true)
        )
        .is_ok());
    }

    #[test]
    fn nobody_changes_role() {
        for class in [
            ClientClass::App,
            ClientClass::Readonly,
            ClientClass::Migrator,
        ] {
            assert!(verdict(class, "set role postgres").is_err());
            assert!(verdict(class, "select set_config('role','x',false)").is_err());
        }
        assert!(verdict(ClientClass::Migrator, "create table t (id int)").is_ok());
    }

    #[test]
    fn readonly_only_reads() {
        assert!(verdict(ClientClass::Readonly, "select * from t").is_ok());
        assert!(verdict(ClientClass::Readonly, "begin read only").is_ok());
        assert!(verdict(ClientClass::Readonly, "update t set x = 1").is_err());
        assert!(verdict(
            ClientClass::Readonly,
            "with d as (delete from t returning 1) select * from d"
        )
        .is_err());
        assert!(verdict(ClientClass::Readonly, "begin read write").is_err());
        assert!(verdict(
            ClientClass::Readonly,
            "set default_transaction_read_only = off"
        )
        .is_err());
    }

    #[test]
    fn sql_text_is_judged_as_the_clients_own() {
        let role =
            "SELECT query_to_xml('SELECT set_config(''role'', ''none'', false)', true, false, '')";
        let plain_role = "SELECT set_config('role', 'none', false)";
        for class in [
            ClientClass::App,
            ClientClass::Readonly,
            ClientClass::Migrator,
        ] {
            let refusal = verdict(class, role).unwrap_err();
            assert_eq!(refusal.code, "42501");
            assert!(refusal.leaves_owner_role);
            assert_eq!(
                refusal.message,
                "rolegate: changing the session role is not allowed (set_config('role') in query_to_xml's SQL text)"
            );
            assert_eq!(verdict(class, plain_role).unwrap_err().code, refusal.code);
            assert!(verdict(class, "SELECT query_to_xml('SELECT 1', true, false, '')").is_ok());
        }
        let lock = verdict(
            ClientClass::App,
            "SELECT query_to_xml('SELECT pg_advisory_lock(1)', true, false, '')",
        )
        .unwrap();
        assert_eq!(
            lock.session_effects,
            verdict(ClientClass::App, "SELECT pg_advisory_lock(1)")
                .unwrap()
                .session_effects
        );
        assert!(verdict(
            ClientClass::Readonly,
            "SELECT query_to_xml('SELECT set_config(''default_transaction_read_only'', ''off'', false)', true, false, '')"
        )
        .is_err());
        assert!(verdict(
            ClientClass::Readonly,
            "SELECT query_to_xml('WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d', true, false, '')"
        )
        .is_err());
        assert!(verdict(ClientClass::App, "SELECT ts_stat('DROP TABLE t')").is_err());
        assert!(verdict(ClientClass::Migrator, "SELECT ts_stat('DROP TABLE t')").is_ok());
    }

    #[test]
    fn computed_sql_text_is_for_migrators_only() {
        let sql = "SELECT query_to_xml(q, true, false, '') FROM queries";
        for class in [ClientClass::App, ClientClass::Readonly] {
            let refusal = verdict(class, sql).unwrap_err();
            assert_eq!(refusal.code, "42501");
            assert!(
                refusal
                    .message
                    .contains("query_to_xml is given SQL text computed when the statement runs"),
                "{}",
                refusal.message
            );
            assert!(refusal.hint.unwrap().contains("string literal"));
        }
        let migrator = verdict(ClientClass::Migrator, sql).unwrap();
        assert!(migrator.session_effects.unseen);
    }

    #[test]
    fn syntax_errors_are_refused_as_syntax_errors() {
        assert_eq!(
            verdict(ClientClass::Migrator, "selec 1").unwrap_err().code,
            "42601"
        );
    }
}
