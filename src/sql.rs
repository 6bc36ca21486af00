//! Quoting for the SQL rolegate composes itself (role names, passwords as verifiers).

/// Quotes an identifier the way PostgreSQL's `quote_ident` does, always: `a"b` → `"a""b"`.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal for a server with `standard_conforming_strings = on` (the
/// default since PostgreSQL 9.1), using the `E''` form so it is right either way.
pub fn quote_literal(value: &str) -> String {
    format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_cannot_break_out() {
        assert_eq!(quote_ident("bookstore_owner"), "\"bookstore_owner\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("drop table x"), "\"drop table x\"");
    }

    #[test]
    fn literals_cannot_break_out() {
        assert_eq!(quote_literal("it's"), "E'it''s'");
        assert_eq!(quote_literal("a\\'"), "E'a\\\\'''");
    }
}
