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
            Hash::Bcrypt(stored) => bcrypt::verify(password, stored).unwrap_or(false),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
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
        Ok(PasswordFile { users })
    }

    /// Whether `user` exists with this password (an unknown user costs a hash too, so that
    /// timing does not tell which user names exist).
    pub fn check(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(hash) => hash.verify(password),
            None => {
                let decoy = Hash::Pbkdf2Sha512 {
                    iterations: NonZeroU32::MIN.saturating_add(100),
                    salt: vec![0; 12],
                    hash: vec![0; 64],
                };
                let _ = decoy.verify(password);
                false
            }
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
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
