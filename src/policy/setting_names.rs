//! Which custom settings (`app.tenant`, the usual way to feed row-level security) a
//! statement may set. PostgreSQL lists placeholder settings nowhere (`pg_settings` and
//! `SHOW ALL` leave them out), so transaction pooling reads a client's custom settings
//! back by name; the names come from here.

use pg_query::ParserOptions;
use serde_json::Value;

use super::classify::{constant_string, string_node};

/// Custom setting names a statement sets, and whether that is all it may set.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SettingNames {
    /// Lower-case names with a dot (`SET app.tenant`, `set_config('app.tenant', …)`).
    pub names: Vec<String>,
    /// False when it may set settings whose names cannot be read off the text: a
    /// computed `set_config` name, or a function given text that may be SQL.
    pub complete: bool,
}

/// The custom settings `sql` may set (parsed as the server would, given its
/// `standard_conforming_strings`).
pub fn custom_setting_names(sql: &str, standard_conforming_strings: bool) -> SettingNames {
    let options = if standard_conforming_strings {
        ParserOptions::DEFAULT
    } else {
        ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS
    };
    let mut found = SettingNames {
        names: Vec::new(),
        complete: true,
    };
    let Ok(parsed) = pg_query::parse(sql, options) else {
        found.complete = false;
        return found;
    };
    for raw in &parsed.protobuf.stmts {
        match raw.stmt.as_deref().map(serde_json::to_value) {
            Some(Ok(tree)) => walk(&tree, &mut found),
            _ => found.complete = false,
        }
    }
    found.names.sort();
    found.names.dedup();
    found
}

fn walk(value: &Value, found: &mut SettingNames) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                match key.as_str() {
                    "VariableSetStmt" => {
                        if let Some(name) = child.get("name").and_then(Value::as_str) {
                            add(name, found);
                        }
                    }
                    "FuncCall" => func_call(child, found),
                    _ => {}
                }
                walk(child, found);
            }
        }
        Value::Array(items) => items.iter().for_each(|item| walk(item, found)),
        _ => {}
    }
}

fn add(name: &str, found: &mut SettingNames) {
    let name = name.trim().to_ascii_lowercase();
    if name.contains('.') && !found.names.contains(&name) {
        found.names.push(name);
    }
}

fn func_call(call: &Value, found: &mut SettingNames) {
    let name = call
        .get("funcname")
        .and_then(Value::as_array)
        .and_then(|parts| parts.last())
        .and_then(string_node);
    let args = call.get("args").and_then(Value::as_array);
    if name == Some("set_config") {
        match args.and_then(|args| args.first()).and_then(constant_string) {
            Some(setting) => add(setting, found),
            None => found.complete = false,
        }
    } else if args.is_some_and(|args| args.iter().any(|arg| constant_string(arg).is_some())) {
        // (query_to_xml('SELECT set_config(…)'), a function of the client's own…)
        found.complete = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(sql: &str) -> (Vec<String>, bool) {
        let found = custom_setting_names(sql, true);
        (found.names, found.complete)
    }

    #[test]
    fn reads_names_off_set_and_set_config() {
        assert_eq!(
            names("SET app.tenant = 'acme'"),
            (vec!["app.tenant".into()], true)
        );
        assert_eq!(
            names("SET \"App\".Tenant TO 'x'"),
            (vec!["app.tenant".into()], true)
        );
        assert_eq!(names("RESET app.tenant"), (vec!["app.tenant".into()], true));
        assert_eq!(
            names("SELECT set_config('app.user'::text, $1, false), set_config('search_path', 'x', false)"),
            (vec!["app.user".into()], true)
        );
        assert_eq!(names("SET search_path = x"), (vec![], true));
    }

    #[test]
    fn says_when_names_cannot_be_known() {
        assert!(!names("SELECT set_config($1, 'x', false)").1);
        assert!(!names("SELECT query_to_xml('SELECT set_config(''app.t'', ''x'', false)', true, false, '')").1);
        assert!(!names("not sql at all (").1);
    }
}
