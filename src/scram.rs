//! SCRAM-SHA-256 verifiers: parsing the ones in the config, making new ones, and the mock
//! verifier that lets an unknown user go through the same exchange as a known one.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use pgwire::api::auth::sasl::scram::ScramSecret;
use sha2::Sha256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifierError {
    #[error("it does not start with SCRAM-SHA-256$")]
    Scheme,
    #[error("it is not of the form SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>")]
    Shape,
    #[error("its iteration count is not a positive number")]
    Iterations,
    #[error("a part of it is not valid base64")]
    Base64,
    #[error("its keys are not 32 bytes long")]
    KeyLength,
}

/// A parsed `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` string, as PostgreSQL
/// stores it in `pg_authid.rolpassword`.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: usize,
    pub salt: Vec<u8>,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys let anyone who has them impersonate the server to a client.
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl ScramVerifier {
    pub fn parse(text: &str) -> Result<ScramVerifier, VerifierError> {
        let rest = text
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(VerifierError::Scheme)?;
        let (params, keys) = rest.split_once('$').ok_or(VerifierError::Shape)?;
        let (iterations, salt) = params.split_once(':').ok_or(VerifierError::Shape)?;
        let (stored_key, server_key) = keys.split_once(':').ok_or(VerifierError::Shape)?;
        let iterations: usize = iterations
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or(VerifierError::Iterations)?;
        let decode = |s: &str| BASE64.decode(s).map_err(|_| VerifierError::Base64);
        let verifier = ScramVerifier {
            iterations,
            salt: decode(salt)?,
            stored_key: decode(stored_key)?,
            server_key: decode(server_key)?,
        };
        if verifier.stored_key.len() != 32 || verifier.server_key.len() != 32 {
            return Err(VerifierError::KeyLength);
        }
        Ok(verifier)
    }

    /// A verifier no password matches, the same for the same user name on this instance,
    /// so that probing names cannot tell known users from unknown ones.
    pub fn mock(instance_secret: &[u8; 32], user: &str) -> ScramVerifier {
        let derive = |label: &[u8]| {
            let mut mac = Hmac::<Sha256>::new_from_slice(instance_secret)
                .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
            mac.update(label);
            mac.update(user.as_bytes());
            mac.finalize().into_bytes().to_vec()
        };
        ScramVerifier {
            iterations: 4096,
            salt: derive(b"salt")[..16].to_vec(),
            stored_key: derive(b"stored"),
            server_key: derive(b"server"),
        }
    }

    pub fn to_secret(&self) -> ScramSecret {
        ScramSecret::Verifier {
            salt: self.salt.clone(),
            iterations: self.iterations,
            stored_key: self.stored_key.clone(),
            server_key: self.server_key.clone(),
        }
    }
}

/// The verifier PostgreSQL itself would store for this password (random salt, 4096
/// iterations).
pub fn make_verifier(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_verifiers_parse() {
        let v = ScramVerifier::parse(&make_verifier("s3cret")).unwrap();
        assert_eq!(v.iterations, 4096);
        assert_eq!(v.salt.len(), 16);
    }

    /// A full exchange: postgres-protocol's client against pgwire's server with our verifier.
    fn exchange(verifier: &ScramVerifier, password: &str) -> bool {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let server = pgwire::api::auth::sasl::scram::ScramServerAuth::new();
        let (server_first, waiting) = server
            .on_client_first_message_with_secret(client.message(), verifier.to_secret())
            .unwrap();
        client.update(server_first.as_bytes()).unwrap();
        match waiting.on_client_final_message(client.message()) {
            Ok(server_final) => client.finish(server_final.as_bytes()).is_ok(),
            Err(_) => false,
        }
    }

    #[test]
    fn made_verifiers_verify_exactly_their_password() {
        let verifier = ScramVerifier::parse(&make_verifier("s3cret")).unwrap();
        assert!(exchange(&verifier, "s3cret"));
        assert!(!exchange(&verifier, "s3cret "));
        assert!(!exchange(&ScramVerifier::mock(&[1; 32], "web"), "s3cret"));
    }

    #[test]
    fn malformed_verifiers_are_refused() {
        assert_eq!(ScramVerifier::parse("md5abc"), Err(VerifierError::Scheme));
        assert_eq!(
            ScramVerifier::parse("SCRAM-SHA-256$x:AAAA$AAAA:AAAA"),
            Err(VerifierError::Iterations)
        );
        assert_eq!(
            ScramVerifier::parse("SCRAM-SHA-256$4096:AAAA$AAAA:AAAA"),
            Err(VerifierError::KeyLength)
        );
        assert_eq!(
            ScramVerifier::parse("SCRAM-SHA-256$4096:AAAA"),
            Err(VerifierError::Shape)
        );
    }

    #[test]
    fn mock_verifier_is_stable_per_user() {
        let secret = [7u8; 32];
        assert_eq!(
            ScramVerifier::mock(&secret, "a").salt,
            ScramVerifier::mock(&secret, "a").salt
        );
        assert_ne!(
            ScramVerifier::mock(&secret, "a").salt,
            ScramVerifier::mock(&secret, "b").salt
        );
    }
}
