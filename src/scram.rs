//! SCRAM-SHA-256: parsing the verifiers in the config, making new ones, the mock verifier
//! that lets an unknown user go through the same exchange as a known one, and the client
//! side rolegate uses to log in to PostgreSQL.

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
        let derive = |label: &[u8]| hmac(instance_secret, &[label, user.as_bytes()]).to_vec();
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

/// The client side of SCRAM-SHA-256 (RFC 5802/7677, no channel binding), for rolegate's
/// own backend logins. It differs from postgres-protocol's client in one way: the salted
/// password (PBKDF2, 4096 rounds by default: ~1 ms of CPU) is kept in a
/// [`SaltedPasswordCache`], since every connection of a login meets the same salt and
/// iteration count. That halves the CPU a new client connection costs rolegate.
pub struct ScramClient {
    nonce: String,
    state: ClientState,
}

enum ClientState {
    First,
    Final {
        salted_password: [u8; 32],
        auth_message: String,
    },
    Done,
}

/// The salted password of the last exchange, keyed by a digest of the password, the salt
/// and the iteration count. One entry: there is one current login (two during a drain).
#[derive(Default)]
pub struct SaltedPasswordCache(std::sync::Mutex<Option<SaltedEntry>>);

struct SaltedEntry {
    password_digest: [u8; 32],
    salt: Vec<u8>,
    iterations: u32,
    salted_password: [u8; 32],
}

/// The most PBKDF2 rounds a server may ask of rolegate (PostgreSQL's default is 4096):
/// more would be an unreasonable CPU cost per login.
const MAX_ITERATIONS: u32 = 1 << 20;

fn scram_error(message: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message.to_owned())
}

/// HMAC-SHA-256 of the concatenated `parts`.
fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

impl SaltedPasswordCache {
    fn salted_password(&self, password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
        use sha2::Digest;
        let password_digest: [u8; 32] = Sha256::digest(password.as_bytes()).into();
        let slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = slot.as_ref() {
            if entry.password_digest == password_digest
                && entry.salt == salt
                && entry.iterations == iterations
            {
                return entry.salted_password;
            }
        }
        drop(slot);
        // SASLprep as PostgreSQL applies it: a password it cannot prepare is used as is.
        let prepared = stringprep::saslprep(password)
            .map(|p| p.into_owned())
            .unwrap_or_else(|_| password.to_owned());
        let mut block = hmac(prepared.as_bytes(), &[salt, &1u32.to_be_bytes()]);
        let mut salted_password = block;
        for _ in 1..iterations {
            block = hmac(prepared.as_bytes(), &[&block]);
            for (acc, b) in salted_password.iter_mut().zip(block) {
                *acc ^= b;
            }
        }
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(SaltedEntry {
            password_digest,
            salt: salt.to_vec(),
            iterations,
            salted_password,
        });
        salted_password
    }
}

impl ScramClient {
    pub fn new() -> ScramClient {
        use rand::Rng;
        let nonce: [u8; 18] = rand::thread_rng().gen();
        ScramClient {
            nonce: BASE64.encode(nonce),
            state: ClientState::First,
        }
    }

    /// The client-first message (the body of the SASLInitialResponse).
    pub fn first_message(&self) -> String {
        format!("n,,n=,r={}", self.nonce)
    }

    /// Takes the server-first message, returns the client-final message.
    pub fn final_message(
        &mut self,
        server_first: &[u8],
        password: &str,
        cache: &SaltedPasswordCache,
    ) -> std::io::Result<String> {
        if !matches!(self.state, ClientState::First) {
            return Err(scram_error("SCRAM message out of order"));
        }
        let server_first = std::str::from_utf8(server_first)
            .map_err(|_| scram_error("server-first message is not UTF-8"))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attribute in server_first.split(',') {
            match attribute.split_once('=') {
                Some(("r", value)) => nonce = Some(value),
                Some(("s", value)) => salt = Some(value),
                Some(("i", value)) => iterations = value.parse::<u32>().ok(),
                _ => {}
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err(scram_error("malformed server-first message"));
        };
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(scram_error("the server's nonce does not extend ours"));
        }
        if iterations == 0 || iterations > MAX_ITERATIONS {
            return Err(scram_error("unreasonable SCRAM iteration count"));
        }
        let salt = BASE64
            .decode(salt)
            .map_err(|_| scram_error("malformed SCRAM salt"))?;
        let salted_password = cache.salted_password(password, &salt, iterations);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("n=,r={},{server_first},{without_proof}", self.nonce);
        let client_key = hmac(&salted_password, &[b"Client Key"]);
        let stored_key: [u8; 32] = {
            use sha2::Digest;
            Sha256::digest(client_key).into()
        };
        let signature = hmac(&stored_key, &[auth_message.as_bytes()]);
        let mut proof = client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        self.state = ClientState::Final {
            salted_password,
            auth_message,
        };
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)))
    }

    /// Checks the server-final message: the server proves it knows the verifier too.
    pub fn verify_server_final(&mut self, server_final: &[u8]) -> std::io::Result<()> {
        let ClientState::Final {
            salted_password,
            auth_message,
        } = std::mem::replace(&mut self.state, ClientState::Done)
        else {
            return Err(scram_error("SCRAM message out of order"));
        };
        let server_final = std::str::from_utf8(server_final)
            .map_err(|_| scram_error("server-final message is not UTF-8"))?;
        if let Some(error) = server_final.strip_prefix("e=") {
            return Err(scram_error(&format!(
                "the server reports SCRAM error {error}"
            )));
        }
        let signature = server_final
            .split(',')
            .find_map(|a| a.strip_prefix("v="))
            .and_then(|v| BASE64.decode(v).ok())
            .ok_or_else(|| scram_error("malformed server-final message"))?;
        let server_key = hmac(&salted_password, &[b"Server Key"]);
        let mut mac = Hmac::<Sha256>::new_from_slice(&server_key)
            .map_err(|_| scram_error("bad server key"))?;
        mac.update(auth_message.as_bytes());
        mac.verify_slice(&signature)
            .map_err(|_| scram_error("the server's SCRAM signature is wrong"))
    }
}

impl Default for ScramClient {
    fn default() -> Self {
        ScramClient::new()
    }
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

    /// One exchange of our client against pgwire's server, with the given cache.
    fn client_exchange(
        verifier: &ScramVerifier,
        password: &str,
        cache: &SaltedPasswordCache,
    ) -> bool {
        let mut client = ScramClient::new();
        let server = pgwire::api::auth::sasl::scram::ScramServerAuth::new();
        let (server_first, waiting) = server
            .on_client_first_message_with_secret(
                client.first_message().as_bytes(),
                verifier.to_secret(),
            )
            .unwrap();
        let Ok(client_final) = client.final_message(server_first.as_bytes(), password, cache)
        else {
            return false;
        };
        match waiting.on_client_final_message(client_final.as_bytes()) {
            Ok(server_final) => client.verify_server_final(server_final.as_bytes()).is_ok(),
            Err(_) => false,
        }
    }

    #[test]
    fn scram_client_logs_in_with_and_without_its_cache() {
        let verifier = ScramVerifier::parse(&make_verifier("s3cret")).unwrap();
        let cache = SaltedPasswordCache::default();
        assert!(client_exchange(&verifier, "s3cret", &cache));
        assert!(client_exchange(&verifier, "s3cret", &cache));
        // A cached entry never answers for another password or salt.
        assert!(!client_exchange(&verifier, "s3cret2", &cache));
        let other = ScramVerifier::parse(&make_verifier("s3cret")).unwrap();
        assert!(client_exchange(&other, "s3cret", &cache));
        assert!(client_exchange(&verifier, "s3cret", &cache));
    }

    #[test]
    fn scram_client_refuses_a_bad_server() {
        let cache = SaltedPasswordCache::default();
        let mut client = ScramClient::new();
        let nonce = client.nonce.clone();
        for bad in [
            "r=someone-else,s=c2FsdA==,i=4096".to_owned(),
            format!("r={nonce},s=c2FsdA==,i=4096"),
            format!("r={nonce}x,s=c2FsdA==,i=0"),
            format!("r={nonce}x,s=!!!,i=4096"),
            format!("r={nonce}x,i=4096"),
        ] {
            assert!(
                client.final_message(bad.as_bytes(), "pw", &cache).is_err(),
                "{bad}"
            );
        }
        let server_first = format!("r={nonce}x,s=c2FsdA==,i=16");
        client
            .final_message(server_first.as_bytes(), "pw", &cache)
            .unwrap();
        assert!(client.verify_server_final(b"v=AAAA").is_err());
        assert!(
            client.verify_server_final(b"v=AAAA").is_err(),
            "out of order"
        );
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
