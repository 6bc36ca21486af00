//! Functions that run SQL text they are given as an argument (`query_to_xml('SELECT …')`):
//! which of their arguments is SQL. PostgreSQL's own are built in; functions of installed
//! extensions (dblink's) come from `[policy] sql_text_functions`.

use serde::Deserialize;

/// Which arguments of a function are SQL text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqlArguments {
    /// The argument at this position (0-based), when the call has `arity` arguments
    /// (`None`: any number). Named arguments called one of `names` too.
    At {
        position: usize,
        arity: Option<usize>,
        names: &'static [&'static str],
    },
    /// Every argument may be: each string literal that parses as SQL is judged as SQL,
    /// and any computed argument makes the call unjudgeable. For functions whose SQL
    /// argument moves with their overloads (dblink's `dblink(sql)` and
    /// `dblink(connname, sql)`): a literal that does not parse cannot run as SQL either.
    Any,
}

/// One entry of `[policy] sql_text_functions`: `"name"` (every argument may be SQL) or
/// `"name:N"` (the N-th argument, from 1).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct SqlTextFunction {
    /// The function's name, without schema (a call in any schema matches).
    pub name: String,
    /// `None`: every argument may be SQL.
    pub position: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
#[error("[policy] sql_text_functions: {0:?} is not \"function\" or \"function:N\" (N from 1: which argument is SQL)")]
pub struct InvalidSqlTextFunction(String);

impl TryFrom<String> for SqlTextFunction {
    type Error = InvalidSqlTextFunction;

    fn try_from(entry: String) -> Result<Self, Self::Error> {
        let (name, position) = match entry.split_once(':') {
            Some((name, n)) => match n.trim().parse::<usize>() {
                Ok(n) if n >= 1 => (name.trim(), Some(n - 1)),
                _ => return Err(InvalidSqlTextFunction(entry)),
            },
            None => (entry.trim(), None),
        };
        if name.is_empty() || name.contains(['.', '(', ')', ' ']) {
            return Err(InvalidSqlTextFunction(entry));
        }
        Ok(SqlTextFunction {
            name: name.to_owned(),
            position,
        })
    }
}

/// PostgreSQL's functions that run a text argument as a query. `cursor_to_xml` and
/// `cursor_to_xmlschema` take a cursor's name (its query was judged when it was
/// declared); `table_to_xml` and the other `table_`/`schema_`/`database_to_xml…`
/// functions take a regclass or a name and read what the session could read anyway.
const BUILT_IN: [(&str, SqlArguments); 5] = [
    (
        "query_to_xml",
        SqlArguments::At {
            position: 0,
            arity: None,
            names: &["query"],
        },
    ),
    (
        "query_to_xmlschema",
        SqlArguments::At {
            position: 0,
            arity: None,
            names: &["query"],
        },
    ),
    (
        "query_to_xml_and_xmlschema",
        SqlArguments::At {
            position: 0,
            arity: None,
            names: &["query"],
        },
    ),
    (
        "ts_stat",
        SqlArguments::At {
            position: 0,
            arity: None,
            names: &["query"],
        },
    ),
    // ts_rewrite(query tsquery, select text); the three-argument form takes tsqueries.
    (
        "ts_rewrite",
        SqlArguments::At {
            position: 1,
            arity: Some(2),
            names: &[],
        },
    ),
];

/// Which arguments of a call of `name` (the last part of its name, any schema) are SQL.
pub fn sql_arguments(name: &str, configured: &[SqlTextFunction]) -> Option<SqlArguments> {
    if let Some((_, arguments)) = BUILT_IN
        .iter()
        .find(|(built_in, _)| built_in.eq_ignore_ascii_case(name))
    {
        return Some(arguments.clone());
    }
    let configured = configured
        .iter()
        .find(|f| f.name.eq_ignore_ascii_case(name))?;
    Some(match configured.position {
        Some(position) => SqlArguments::At {
            position,
            arity: None,
            names: &[],
        },
        None => SqlArguments::Any,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_entries_name_a_function_and_maybe_an_argument() {
        let entry = |s: &str| SqlTextFunction::try_from(s.to_owned());
        assert_eq!(
            entry("dblink").unwrap(),
            SqlTextFunction {
                name: "dblink".into(),
                position: None
            }
        );
        assert_eq!(entry("dblink_exec:2").unwrap().position, Some(1));
        for bad in ["", "dblink:0", "dblink:x", "public.dblink", "f()"] {
            assert!(entry(bad).is_err(), "{bad}");
        }
        let configured = [entry("dblink").unwrap()];
        assert_eq!(
            sql_arguments("DBLINK", &configured),
            Some(SqlArguments::Any)
        );
        assert!(sql_arguments("query_to_xml", &[]).is_some());
        assert!(sql_arguments("table_to_xml", &configured).is_none());
    }

    #[test]
    fn the_policy_section_reads_them() {
        let policy: crate::config::PolicyConfig =
            toml::from_str(r#"sql_text_functions = ["dblink", "dblink_exec:2"]"#).unwrap();
        assert_eq!(policy.sql_text_functions.len(), 2);
        assert_eq!(policy.sql_text_functions[1].position, Some(1));
        let bad = toml::from_str::<crate::config::PolicyConfig>(r#"sql_text_functions = ["x:0"]"#)
            .unwrap_err()
            .to_string();
        assert!(bad.contains("\"function:N\""), "{bad}");
    }
}
