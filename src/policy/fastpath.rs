//! The FunctionCall protocol message ("fast path"): a function called by OID, outside
//! any statement. Drivers use it for large objects only (libpq's `lo_*`, pgjdbc's
//! Blob/Clob, psycopg2's `lobject`), so only PostgreSQL's own large-object functions pass,
//! recognised by the OIDs the server reports for them, never by a name a client sends.

use std::collections::HashMap;

use super::Refusal;
use crate::config::ClientClass;

/// The query that finds the large-object functions' OIDs (the set libpq looks up).
pub const LOOKUP_SQL: &str = "SELECT p.oid::int8::text, p.proname::text FROM pg_catalog.pg_proc p \
     WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname IN \
     ('lo_open', 'lo_close', 'lo_creat', 'lo_create', 'lo_unlink', 'lo_lseek', 'lo_lseek64', \
      'lo_tell', 'lo_tell64', 'lo_truncate', 'lo_truncate64', 'loread', 'lowrite')";

/// `lo_open`'s mode bit for writing (libpq's INV_WRITE).
const INV_WRITE: i32 = 0x0002_0000;

/// The large-object functions of one server, by OID.
#[derive(Debug, Default, Clone)]
pub struct LargeObjectFunctions {
    by_oid: HashMap<u32, &'static str>,
}

impl LargeObjectFunctions {
    /// From the rows of [`LOOKUP_SQL`] (OID, name); names outside the set are ignored.
    pub fn from_rows<'a>(rows: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let known = [
            "lo_open",
            "lo_close",
            "lo_creat",
            "lo_create",
            "lo_unlink",
            "lo_lseek",
            "lo_lseek64",
            "lo_tell",
            "lo_tell64",
            "lo_truncate",
            "lo_truncate64",
            "loread",
            "lowrite",
        ];
        let by_oid = rows
            .into_iter()
            .filter_map(|(oid, name)| {
                let name = known.iter().find(|k| **k == name)?;
                Some((oid.parse().ok()?, *name))
            })
            .collect();
        LargeObjectFunctions { by_oid }
    }

    pub fn len(&self) -> usize {
        self.by_oid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_oid.is_empty()
    }
}

/// Judges a FunctionCall body (after tag and length).
pub fn judge(
    class: ClientClass,
    functions: &LargeObjectFunctions,
    body: &[u8],
) -> Result<(), Refusal> {
    let call = FunctionCall::parse(body).ok_or_else(|| Refusal {
        code: "08P01",
        message: "rolegate: malformed FunctionCall".into(),
        hint: None,
        kind: "malformed message".into(),
        leaves_owner_role: false,
    })?;
    let Some(&name) = functions.by_oid.get(&call.oid) else {
        return Err(Refusal {
            code: "42501",
            message: "rolegate: the FunctionCall protocol message is allowed for large-object functions only".into(),
            hint: Some("Call the function in a SELECT instead.".into()),
            kind: "FunctionCall".into(),
            // A function called this way is not seen by the statement policy at all, so
            // this holds in report mode too.
            leaves_owner_role: true,
        });
    };
    let reads_only = match name {
        "lo_open" => call.int_arg(1).is_some_and(|mode| mode & INV_WRITE == 0),
        "lo_close" | "loread" | "lo_lseek" | "lo_lseek64" | "lo_tell" | "lo_tell64" => true,
        _ => false,
    };
    if class == ClientClass::Readonly && !reads_only {
        return Err(Refusal {
            code: "42501",
            message: format!(
                "rolegate: writing large objects is not allowed for readonly clients ({name})"
            ),
            hint: Some("readonly clients only read; open large objects for reading.".into()),
            kind: format!("FunctionCall {name}"),
            leaves_owner_role: false,
        });
    }
    Ok(())
}

/// The parts of a FunctionCall rolegate reads.
struct FunctionCall<'a> {
    oid: u32,
    /// One format code for all arguments, one per argument, or none (text).
    formats: Vec<i16>,
    args: Vec<Option<&'a [u8]>>,
}

impl<'a> FunctionCall<'a> {
    fn parse(body: &'a [u8]) -> Option<FunctionCall<'a>> {
        let mut rest = body;
        let mut take = |n: usize| -> Option<&'a [u8]> {
            let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
            rest = tail;
            Some(head)
        };
        let oid = u32::from_be_bytes(take(4)?.try_into().ok()?);
        let format_count = i16::from_be_bytes(take(2)?.try_into().ok()?);
        let formats = (0..format_count.max(0))
            .map(|_| Some(i16::from_be_bytes(take(2)?.try_into().ok()?)))
            .collect::<Option<Vec<_>>>()?;
        let arg_count = i16::from_be_bytes(take(2)?.try_into().ok()?);
        let mut args = Vec::with_capacity(arg_count.max(0) as usize);
        for _ in 0..arg_count.max(0) {
            let len = i32::from_be_bytes(take(4)?.try_into().ok()?);
            args.push(if len < 0 {
                None
            } else {
                Some(take(len as usize)?)
            });
        }
        // The result format code.
        take(2)?;
        (format_count >= 0 && arg_count >= 0 && rest.is_empty()).then_some(FunctionCall {
            oid,
            formats,
            args,
        })
    }

    /// Argument `i` as an integer, in whichever format it was sent.
    fn int_arg(&self, i: usize) -> Option<i32> {
        let value = (*self.args.get(i)?)?;
        let format = match self.formats.as_slice() {
            [] => 0,
            [one] => *one,
            many => *many.get(i)?,
        };
        match format {
            1 => Some(i32::from_be_bytes(value.try_into().ok()?)),
            0 => std::str::from_utf8(value).ok()?.trim().parse().ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(oid: u32, formats: &[i16], args: &[&[u8]]) -> Vec<u8> {
        let mut body = oid.to_be_bytes().to_vec();
        body.extend((formats.len() as i16).to_be_bytes());
        formats.iter().for_each(|f| body.extend(f.to_be_bytes()));
        body.extend((args.len() as i16).to_be_bytes());
        for arg in args {
            body.extend((arg.len() as i32).to_be_bytes());
            body.extend_from_slice(arg);
        }
        body.extend(1i16.to_be_bytes());
        body
    }

    fn functions() -> LargeObjectFunctions {
        LargeObjectFunctions::from_rows([
            ("952", "lo_open"),
            ("954", "loread"),
            ("955", "lowrite"),
            ("957", "lo_creat"),
            ("2171", "pg_cancel_backend"),
        ])
    }

    #[test]
    fn only_large_object_functions_pass_and_readonly_only_reads() {
        let f = functions();
        assert_eq!(f.len(), 4, "names outside the set are ignored");
        let read = 0x40000i32.to_be_bytes();
        let write = 0x60000i32.to_be_bytes();
        let oid = 16400u32.to_be_bytes();
        for class in [
            ClientClass::App,
            ClientClass::Migrator,
            ClientClass::Readonly,
        ] {
            assert!(judge(class, &f, &call(952, &[1], &[&oid, &read])).is_ok());
            assert!(judge(class, &f, &call(954, &[1], &[&[0, 0, 0, 0], &[0, 0, 1, 0]])).is_ok());
            let other = judge(class, &f, &call(2171, &[1], &[&1i32.to_be_bytes()])).unwrap_err();
            assert!(other.leaves_owner_role);
        }
        assert!(judge(ClientClass::App, &f, &call(955, &[1], &[&[0; 4], b"x"])).is_ok());
        assert!(judge(
            ClientClass::Readonly,
            &f,
            &call(955, &[1], &[&[0; 4], b"x"])
        )
        .is_err());
        assert!(judge(ClientClass::Readonly, &f, &call(957, &[1], &[&write])).is_err());
        assert!(judge(ClientClass::Readonly, &f, &call(952, &[1], &[&oid, &write])).is_err());
        // The mode in text format.
        assert!(judge(
            ClientClass::Readonly,
            &f,
            &call(952, &[], &[b"16400", b"262144"])
        )
        .is_ok());
        assert!(judge(
            ClientClass::Readonly,
            &f,
            &call(952, &[], &[b"16400", b"393216"])
        )
        .is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_body_is_judged_without_panicking(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = judge(ClientClass::Readonly, &functions(), &body);
        }
    }
}
