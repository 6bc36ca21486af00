//! Client class + classified statements → verdict, with the words the client will read.

use super::classify::{Classification, Effect, StatementInfo};
use crate::config::{Allowance, ClientClass};

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

/// Judges every statement of a string; the first refused one refuses the whole string.
pub fn judge(
    class: ClientClass,
    allow: &[Allowance],
    classification: &Classification,
) -> Result<(), Refusal> {
    match classification {
        Classification::SyntaxError(message) => Err(Refusal {
            code: "42601",
            message: format!("rolegate: {message}"),
            hint: Some("rolegate parses every statement before it reaches the server; this one is not valid PostgreSQL.".into()),
            kind: "syntax error".into(),
            leaves_owner_role: false,
        }),
        Classification::Statements(statements) => statements
            .iter()
            .try_for_each(|s| judge_statement(class, allow, s)),
    }
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

    fn verdict(class: ClientClass, sql: &str) -> Result<(), Refusal> {
        judge(class, &[], &classify(sql, true))
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
    fn syntax_errors_are_refused_as_syntax_errors() {
        assert_eq!(
            verdict(ClientClass::Migrator, "selec 1").unwrap_err().code,
            "42601"
        );
    }
}
