//! Password hashes, checked the slow way on purpose, and Mosquitto's `password_file`.
//!
//! Formats: Mosquitto's `$7$iterations$salt$hash` (PBKDF2-HMAC-SHA512, base64 salt and 64-byte
//! hash, what `mosquitto_passwd` writes since 2.0) and `$6$salt$hash` (one SHA-512 of password
//! then salt, Mosquitto 1.x), argon2id in the PHC string format (`$argon2id$v=19$...`), and
//! bcrypt (`$2a$`, `$2b$`, `$2y$`). A password is never compared in a way whose time depends on
//! where it differs.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use std::collections::HashMap;
use std::num::NonZeroU32;

/// A stored password hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hash {
    Pbkdf2Sha512 {
        iterations: NonZeroU32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    /// A salted SHA-256 or SHA-512 digest, hex, as EMQX's MongoDB documents keep them
    /// (`password_hash` and `salt`).
    Salted {
        sha512: bool,
        salt: Vec<u8>,
        salt_first: bool,
        hash: Vec<u8>,
    },
    /// A PHC string, checked by the `argon2` crate.
    Argon2(String),
    /// A bcrypt string, checked by the `bcrypt` crate.
    Bcrypt(String),
}

fn b64(field: &str, what: &str) -> Result<Vec<u8>, String> {
    STANDARD
        .decode(field)
        .map_err(|e| format!("{what} is not base64: {e}"))
}

impl Hash {
    /// Reads one stored hash; the error says what is wrong with it (never the hash itself).
    pub fn parse(stored: &str) -> Result<Hash, String> {
        if stored.starts_with("$argon2") {
            argon2::PasswordHash::new(stored).map_err(|e| format!("argon2 hash: {e}"))?;
            return Ok(Hash::Argon2(stored.to_owned()));
        }
        if ["$2a$", "$2b$", "$2y$"]
            .iter()
            .any(|p| stored.starts_with(p))
        {
            if stored.len() != 60 {
                return Err("bcrypt hash is not 60 characters".into());
            }
            return Ok(Hash::Bcrypt(stored.to_owned()));
        }
        let parts: Vec<&str> = stored.split('$').collect();
        match parts.as_slice() {
            ["", "7", iterations, salt, hash] => {
                let iterations: u32 = iterations
                    .parse()
                    .map_err(|_| "PBKDF2 iterations are not a number".to_string())?;
                let iterations = NonZeroU32::new(iterations)
                    .ok_or_else(|| "PBKDF2 iterations are 0".to_string())?;
                let hash = b64(hash, "hash")?;
                if hash.len() != 64 {
                    return Err("PBKDF2-SHA512 hash is not 64 bytes".into());
                }
                Ok(Hash::Pbkdf2Sha512 {
                    iterations,
                    salt: b64(salt, "salt")?,
                    hash,
                })
            }
            ["", "6", salt, hash] => {
                let hash = b64(hash, "hash")?;
                if hash.len() != 64 {
                    return Err("SHA-512 hash is not 64 bytes".into());
                }
                Ok(Hash::Sha512 {
                    salt: b64(salt, "salt")?,
                    hash,
                })
            }
            _ => Err("not a known hash format ($7$, $6$, argon2, bcrypt)".into()),
        }
    }

    /// Whether `password` hashes to this. Slow by design (PBKDF2, argon2, bcrypt): call it off
    /// the threads that move messages.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => ring::pbkdf2::verify(
                ring::pbkdf2::PBKDF2_HMAC_SHA512,
                *iterations,
                salt,
                password,
                hash,
            )
            .is_ok(),
            Hash::Sha512 { salt, hash } => {
                let mut context = ring::digest::Context::new(&ring::digest::SHA512);
                context.update(password);
                context.update(salt);
                constant_time_eq(context.finish().as_ref(), hash)
            }
            Hash::Argon2(phc) => {
                use argon2::password_hash::PasswordVerifier;
                match argon2::PasswordHash::new(phc) {
                    Ok(parsed) => argon2::Argon2::default()
                        .verify_password(password, &parsed)
                        .is_ok(),
                    Err(_) => false,
                }
            }
            // Not cut to bcrypt's 72 bytes: a longer password is not the one hashed.
            Hash::Bcrypt(stored) => {
                password.len() <= BCRYPT_MAX_PASSWORD
                    && bcrypt::verify(password, stored).unwrap_or(false)
            }
            Hash::Salted {
                sha512,
                salt,
                salt_first,
                hash,
            } => {
                let algorithm = if *sha512 {
                    &ring::digest::SHA512
                } else {
                    &ring::digest::SHA256
                };
                let mut context = ring::digest::Context::new(algorithm);
                if *salt_first {
                    context.update(salt);
                    context.update(password);
                } else {
                    context.update(password);
                    context.update(salt);
                }
                constant_time_eq(context.finish().as_ref(), hash)
            }
        }
    }

    /// A user document's hash: one of the formats [`Hash::parse`] reads, or a hex SHA-256 or
    /// SHA-512 digest of the password with the salt after it (`salt_first`: before it), as
    /// EMQX keeps them. Plain text is refused.
    pub fn from_document(
        stored: &str,
        salt: Option<&str>,
        salt_first: bool,
    ) -> Result<Hash, String> {
        if stored.starts_with('$') {
            return Hash::parse(stored);
        }
        let hex = |s: &str| -> Option<Vec<u8>> {
            (s.len() % 2 == 0)
                .then(|| {
                    (0..s.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
                        .collect::<Option<Vec<u8>>>()
                })
                .flatten()
        };
        match (stored.len(), hex(stored)) {
            (64 | 128, Some(hash)) => Ok(Hash::Salted {
                sha512: stored.len() == 128,
                salt: salt.unwrap_or_default().as_bytes().to_vec(),
                salt_first,
                hash,
            }),
            _ => Err("not a known hash format ($7$, $6$, argon2, bcrypt, hex SHA-256/512)".into()),
        }
    }
}

/// The iterations `wharf-passwd` uses for PBKDF2-SHA512 unless told otherwise: ten times
/// Mosquitto's 101, about 1 ms a check here. A reconnect storm after a restart (when the
/// cache of successful checks is empty) pays it for every device, one check at a time.
pub const DEFAULT_PBKDF2_ITERATIONS: u32 = 1_000;

fn salt(len: usize) -> Result<Vec<u8>, String> {
    let mut salt = vec![0u8; len];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| "no system randomness".to_string())?;
    Ok(salt)
}

impl Hash {
    /// A new PBKDF2-SHA512 hash in Mosquitto's `$7$` format (12-byte salt, as
    /// `mosquitto_passwd` makes).
    pub fn new_pbkdf2(password: &[u8], iterations: NonZeroU32) -> Result<Hash, String> {
        let salt = salt(12)?;
        let mut hash = vec![0u8; 64];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA512,
            iterations,
            &salt,
            password,
            &mut hash,
        );
        Ok(Hash::Pbkdf2Sha512 {
            iterations,
            salt,
            hash,
        })
    }

    /// A new argon2id hash with the crate's default (OWASP) parameters.
    pub fn new_argon2id(password: &[u8]) -> Result<Hash, String> {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::encode_b64(&salt(16)?).map_err(|e| e.to_string())?;
        let phc = argon2::Argon2::default()
            .hash_password(password, &salt)
            .map_err(|e| e.to_string())?;
        Ok(Hash::Argon2(phc.to_string()))
    }

    /// A new bcrypt hash (`$2b$`) of the given cost.
    pub fn new_bcrypt(password: &[u8], cost: u32) -> Result<Hash, String> {
        if password.len() > BCRYPT_MAX_PASSWORD {
            return Err(format!(
                "bcrypt reads only the first {BCRYPT_MAX_PASSWORD} bytes of a password: use a \
                 shorter one, or pbkdf2 or argon2id"
            ));
        }
        bcrypt::hash(password, cost)
            .map(Hash::Bcrypt)
            .map_err(|e| e.to_string())
    }
}

impl std::fmt::Display for Hash {
    /// The stored form, as `parse` reads it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => write!(
                f,
                "$7${iterations}${}${}",
                STANDARD.encode(salt),
                STANDARD.encode(hash)
            ),
            Hash::Sha512 { salt, hash } => {
                write!(f, "$6${}${}", STANDARD.encode(salt), STANDARD.encode(hash))
            }
            Hash::Argon2(s) | Hash::Bcrypt(s) => f.write_str(s),
            Hash::Salted { hash, .. } => hash.iter().try_for_each(|b| write!(f, "{b:02x}")),
        }
    }
}

/// A password file's text with `user`'s line set to `hash` (replaced where it was, added at
/// the end otherwise); other lines, comments included, stay as they are.
pub fn set_user(text: &str, user: &str, hash: &Hash) -> String {
    let line = format!("{user}:{hash}");
    let mut found = false;
    let mut out: Vec<String> = text
        .lines()
        .map(|l| {
            if l.split_once(':').is_some_and(|(u, _)| u == user) {
                found = true;
                line.clone()
            } else {
                l.to_owned()
            }
        })
        .collect();
    if !found {
        out.push(line);
    }
    out.join("\n") + "\n"
}

/// A password file's text without `user`'s line, or `None` if it has none.
pub fn remove_user(text: &str, user: &str) -> Option<String> {
    let before = text.lines().count();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| l.split_once(':').is_none_or(|(u, _)| u != user))
        .collect();
    (kept.len() < before).then(|| kept.join("\n") + "\n")
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A line of a password file that cannot be used: the file is refused at start, never read as
/// "allow everything".
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("line {line}: {reason}")]
pub struct FileError {
    pub line: usize,
    pub reason: String,
}

/// Mosquitto's `password_file`: `user:hash` per line; empty lines and `#` comments skipped.
#[derive(Debug, Default)]
pub struct PasswordFile {
    users: HashMap<String, Hash>,
    /// What an unknown user's password is checked against: a hash of the algorithm and cost
    /// most of the users have (one of theirs; the result is ignored), so that a wrong user name
    /// costs what a wrong password does.
    decoy: Option<Hash>,
}

/// bcrypt reads at most this many bytes of a password and ignores the rest: longer passwords
/// are refused (by `wharf-passwd`, and at login against a bcrypt hash) rather than cut.
pub const BCRYPT_MAX_PASSWORD: usize = 72;

/// The algorithm and cost of a hash: what its verification costs.
fn cost_class(hash: &Hash) -> String {
    match hash {
        Hash::Pbkdf2Sha512 { iterations, .. } => format!("pbkdf2:{iterations}"),
        Hash::Sha512 { .. } => "sha512".into(),
        // `$argon2id$v=19$m=..,t=..,p=..$salt$hash`: the parameters are the fourth field.
        Hash::Argon2(phc) => format!("argon2:{}", phc.split('$').nth(3).unwrap_or("")),
        // `$2b$10$...`: the cost is the third field.
        Hash::Bcrypt(stored) => format!("bcrypt:{}", stored.split('$').nth(2).unwrap_or("")),
        Hash::Salted { sha512, .. } => format!("salted:{sha512}"),
    }
}

/// The hash of the most common cost class (the first such user's, in name order).
fn decoy_of(users: &HashMap<String, Hash>) -> Option<Hash> {
    let mut names: Vec<&String> = users.keys().collect();
    names.sort();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for name in &names {
        *counts.entry(cost_class(&users[*name])).or_default() += 1;
    }
    let most = counts.values().copied().max()?;
    names
        .into_iter()
        .map(|name| &users[name])
        .find(|hash| counts[&cost_class(hash)] == most)
        .cloned()
}

impl PasswordFile {
    pub fn parse(text: &str) -> Result<PasswordFile, FileError> {
        let mut users = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let error = |reason: String| FileError {
                line: i + 1,
                reason,
            };
            let (user, stored) = line
                .split_once(':')
                .ok_or_else(|| error("no ':' between user name and hash".into()))?;
            if user.is_empty() {
                return Err(error("empty user name".into()));
            }
            let hash = Hash::parse(stored).map_err(error)?;
            if users.insert(user.to_owned(), hash).is_some() {
                return Err(error(format!("user {user} appears twice")));
            }
        }
        if users.is_empty() {
            return Err(FileError {
                line: 0,
                reason: "no users".into(),
            });
        }
        let decoy = decoy_of(&users);
        Ok(PasswordFile { users, decoy })
    }

    /// The users of the store's user documents; a document whose hash cannot be read is
    /// skipped (and said), never taken as "any password".
    pub fn from_documents(users: &[wharf_shared::StoredUser], salt_first: bool) -> PasswordFile {
        let mut out = HashMap::new();
        for u in users {
            match Hash::from_document(&u.password_hash, u.salt.as_deref(), salt_first) {
                Ok(hash) => {
                    out.insert(u.username.clone(), hash);
                }
                Err(e) => {
                    tracing::warn!(username = %u.username, error = %e, "user document skipped")
                }
            }
        }
        let decoy = decoy_of(&out);
        PasswordFile { users: out, decoy }
    }

    /// Whether `user` exists with this password (an unknown user costs a hash too, so that
    /// timing does not tell which user names exist).
    pub fn check(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(hash) => hash.verify(password),
            None => {
                if let Some(decoy) = &self.decoy {
                    let _ = decoy.verify(password);
                }
                false
            }
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// The stored hash of `user`.
    pub fn hash_of(&self, user: &str) -> Option<&Hash> {
        self.users.get(user)
    }

    /// Whether both hold the same users with the same hashes.
    pub fn same_users(&self, other: &PasswordFile) -> bool {
        self.users == other.users
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by `mosquitto_passwd` 2.0.11 (`-b`, and `-H sha512`), by Python's bcrypt 4 and
    /// argon2-cffi: hashes made by the tools fleets use, not by this module.
    const FILE: &str = "\
# made by mosquitto_passwd
alice:$7$101$9SxDip8djZKGTLvg$tOSJ1CiYtN9MpL8T++AY7AfJYsn3TV3mKEu0jYxhwhPyqMcLtgUbd3zgZGIwEOQeoV2CI+MARlgoaSZdeFwvPQ==
bob:$6$9uYweu1GIc+pfy1m$3zyHR2j4mLTKi90PwQOUNYUuErwTDpEW8E0/ILvj2HgzNwqqTV54UlFOhqB4YGW/n1FyXCuWiWHIeOW5we9Imw==

carol:$2b$04$EjUOidkaARJSY6pPGFMEoOxG8HGl4Sesyf2lHKLrDXqVqEZt32tJS
dave:$argon2id$v=19$m=1024,t=1,p=1$scEcvKzmLizFKW91ulnFJw$51cSMh1xkWCu/DMqRt1GM5haBSR3xkf8qkBZX3PZRbw
";

    #[test]
    fn hashes_written_by_other_tools_verify() {
        let file = PasswordFile::parse(FILE).expect("parse");
        assert_eq!(file.len(), 4);
        for (user, password) in [
            ("alice", "s3cret"),
            ("bob", "hunter2"),
            ("carol", "opensesame"),
            ("dave", "opensesame"),
        ] {
            assert!(file.check(user, password.as_bytes()), "{user}");
            assert!(!file.check(user, b"wrong"), "{user} with a wrong password");
            assert!(!file.check(user, b""), "{user} with an empty password");
        }
        assert!(!file.check("mallory", b"s3cret"));
    }

    /// An unknown user is checked against a hash of the algorithm and cost most users have
    /// (a PBKDF2 of 101 iterations took 0.1 ms where a bcrypt user took 60 ms: a timing oracle).
    #[test]
    fn an_unknown_user_costs_what_the_users_cost() {
        let bcrypt = |cost| Hash::new_bcrypt(b"pw", cost).expect("bcrypt");
        let mut text = String::new();
        for (user, hash) in [("a", bcrypt(5)), ("b", bcrypt(5)), ("c", bcrypt(4))] {
            text = set_user(&text, user, &hash);
        }
        let pbkdf2 = Hash::new_pbkdf2(b"pw", NonZeroU32::MIN.saturating_add(100)).expect("pbkdf2");
        text = set_user(&text, "d", &pbkdf2);
        let file = PasswordFile::parse(&text).expect("parse");
        let decoy = file.decoy.as_ref().expect("a decoy");
        assert_eq!(cost_class(decoy), "bcrypt:05");
        assert!(
            !file.check("mallory", b"pw"),
            "an unknown user never logs in"
        );
    }

    /// bcrypt ignores what follows byte 72: such passwords are neither hashed nor accepted.
    #[test]
    fn bcrypt_refuses_passwords_it_would_cut() {
        let long = [b'x'; 93];
        assert!(Hash::new_bcrypt(&long, 4).is_err());
        assert!(Hash::new_bcrypt(&long[..72], 4).is_ok());
        // A hash made elsewhere of the first 72 bytes: the 93-byte password is not it.
        let cut = Hash::Bcrypt(bcrypt::hash(&long[..72], 4).expect("bcrypt"));
        assert!(cut.verify(&long[..72]));
        assert!(!cut.verify(&long));
    }

    #[test]
    fn hashes_made_here_verify_and_read_back() {
        let iterations = NonZeroU32::new(50).expect("non-zero");
        for hash in [
            Hash::new_pbkdf2(b"pw", iterations).expect("pbkdf2"),
            Hash::new_argon2id(b"pw").expect("argon2"),
            Hash::new_bcrypt(b"pw", 4).expect("bcrypt"),
        ] {
            let stored = hash.to_string();
            let parsed = Hash::parse(&stored).expect(&stored);
            assert_eq!(parsed, hash);
            assert!(parsed.verify(b"pw"), "{stored}");
            assert!(!parsed.verify(b"pW"), "{stored}");
        }
    }

    /// EMQX's documented example: password "public", salt "slat_foo123", sha256, suffix.
    #[test]
    fn emqx_salted_digests_verify() {
        let hash = Hash::from_document(
            "44edc2d57cde8d79c98145003e105b90a14f1460b79186ea9cfe83942fc5abb5",
            Some("slat_foo123"),
            false,
        )
        .expect("sha256");
        assert!(hash.verify(b"public"));
        assert!(!hash.verify(b"secret"));
        let prefixed = Hash::from_document(
            "ae45b69fb70eaf222721b8b748eab19255d37b246eff0906eea8a7fed51b3000",
            Some("slat_foo123"),
            true,
        )
        .expect("sha256");
        assert!(prefixed.verify(b"public"));
        assert!(
            Hash::from_document("public", None, false).is_err(),
            "plain text"
        );
        assert!(Hash::from_document(&"zz".repeat(32), None, false).is_err());
        let bcrypt = "$2b$04$EjUOidkaARJSY6pPGFMEoOxG8HGl4Sesyf2lHKLrDXqVqEZt32tJS";
        assert!(Hash::from_document(bcrypt, None, false)
            .expect("bcrypt")
            .verify(b"opensesame"));
    }

    #[test]
    fn users_are_set_and_removed_keeping_the_rest() {
        let hash = Hash::parse("$2b$04$EjUOidkaARJSY6pPGFMEoOxG8HGl4Sesyf2lHKLrDXqVqEZt32tJS")
            .expect("hash");
        let text = set_user(FILE, "erin", &hash);
        let file = PasswordFile::parse(&text).expect("parse");
        assert_eq!(file.len(), 5);
        assert!(file.check("erin", b"opensesame"));
        assert!(text.starts_with("# made by mosquitto_passwd\n"));
        let changed = set_user(&text, "alice", &hash);
        let file = PasswordFile::parse(&changed).expect("parse");
        assert_eq!(file.len(), 5);
        assert!(file.check("alice", b"opensesame"));
        let removed = remove_user(&changed, "alice").expect("alice was there");
        assert_eq!(PasswordFile::parse(&removed).expect("parse").len(), 4);
        assert!(remove_user(&removed, "alice").is_none());
    }

    #[test]
    fn unusable_files_are_refused_with_the_line() {
        for (text, line) in [
            ("", 0),
            ("# only a comment\n", 0),
            ("alice\n", 1),
            ("alice:plain\n", 1),
            ("ok:$6$YWJj$AAAA\n", 1),
            (
                ":$2b$04$EjUOidkaARJSY6pPGFMEoOxG8HGl4Sesyf2lHKLrDXqVqEZt32tJS\n",
                1,
            ),
            ("a:$7$0$YWJj$AAAA\n", 1),
            ("a:$7$x$YWJj$AAAA\n", 1),
        ] {
            let err = PasswordFile::parse(text).expect_err(text);
            assert_eq!(err.line, line, "{text:?}: {err}");
        }
        let twice = format!(
            "{}\nalice:$2b$04$EjUOidkaARJSY6pPGFMEoOxG8HGl4Sesyf2lHKLrDXqVqEZt32tJS\n",
            FILE
        );
        assert!(PasswordFile::parse(&twice)
            .expect_err("twice")
            .reason
            .contains("twice"));
    }
}
