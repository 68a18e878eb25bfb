//! `wharf-passwd`: adds, changes and removes users in a password file (Mosquitto's format,
//! which `mosquitto_passwd` also edits and Mosquitto also reads with the default hash).

use clap::Parser;
use std::io::{BufRead, IsTerminal, Write};
use std::num::NonZeroU32;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use wharf_edge::auth::password::{self, Hash, PasswordFile, DEFAULT_PBKDF2_ITERATIONS};

/// Manage a Wharf (and Mosquitto) password file. Without -b the password is read from the
/// terminal (twice, not shown) or as one line from standard input.
#[derive(Parser, Debug)]
#[command(version, name = "wharf-passwd")]
struct Args {
    /// Create the file, or overwrite it if it exists.
    #[arg(short = 'c', conflicts_with = "delete")]
    create: bool,
    /// Remove the user.
    #[arg(short = 'D', conflicts_with_all = ["batch", "create"])]
    delete: bool,
    /// Take the password from the command line (visible to other users of this machine).
    #[arg(short = 'b')]
    batch: bool,
    /// Hash: pbkdf2 (Mosquitto's $7$, readable by Mosquitto too), argon2id or bcrypt.
    #[arg(short = 'H', default_value = "pbkdf2")]
    hash: String,
    /// PBKDF2 iterations.
    #[arg(short = 'I', default_value_t = DEFAULT_PBKDF2_ITERATIONS)]
    iterations: u32,
    /// bcrypt cost.
    #[arg(long, default_value_t = 10)]
    bcrypt_cost: u32,
    file: PathBuf,
    user: String,
    /// With -b only.
    password: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wharf-passwd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    if args.user.is_empty() || args.user.contains(':') {
        return Err("a user name must be non-empty and without ':'".into());
    }
    // The file's readers take such a line for a comment, or cut it: the user could not log in.
    if args.user.trim_start().starts_with('#') || args.user.chars().any(char::is_control) {
        return Err("a user name must not start with '#' or hold control characters".into());
    }
    if args.password.is_some() != args.batch {
        return Err("a password on the command line goes with -b (and -b needs one)".into());
    }
    let existing = if args.create {
        String::new()
    } else {
        std::fs::read_to_string(&args.file)
            .map_err(|e| format!("{}: {e} (-c creates it)", args.file.display()))?
    };
    if !existing.trim().is_empty() {
        // Refuse to edit a file the broker would refuse.
        PasswordFile::parse(&existing).map_err(|e| format!("{}: {e}", args.file.display()))?;
    }
    if args.delete {
        let text = password::remove_user(&existing, &args.user)
            .ok_or_else(|| format!("user {} is not in {}", args.user, args.file.display()))?;
        return write(&args.file, &text);
    }
    let secret = match args.password {
        Some(p) => p,
        None => read_password()?,
    };
    if secret.is_empty() {
        return Err("empty password".into());
    }
    let hash = match args.hash.as_str() {
        "pbkdf2" | "sha512-pbkdf2" => {
            let iterations =
                NonZeroU32::new(args.iterations).ok_or("iterations must be at least 1")?;
            Hash::new_pbkdf2(secret.as_bytes(), iterations)?
        }
        "argon2id" => Hash::new_argon2id(secret.as_bytes())?,
        "bcrypt" => Hash::new_bcrypt(secret.as_bytes(), args.bcrypt_cost)?,
        other => return Err(format!("unknown hash {other:?} (pbkdf2, argon2id, bcrypt)")),
    };
    write(
        &args.file,
        &password::set_user(&existing, &args.user, &hash),
    )
}

/// Twice without echo on a terminal; one line otherwise.
fn read_password() -> Result<String, String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        return Ok(line.trim_end_matches(['\n', '\r']).to_owned());
    }
    let ask = |prompt: &str| -> Result<String, String> {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
        let _ = std::process::Command::new("stty").arg("-echo").status();
        let mut line = String::new();
        let read = stdin.lock().read_line(&mut line);
        let _ = std::process::Command::new("stty").arg("echo").status();
        eprintln!();
        read.map_err(|e| e.to_string())?;
        Ok(line.trim_end_matches(['\n', '\r']).to_owned())
    };
    let first = ask("Password: ")?;
    if ask("Reenter password: ")? != first {
        return Err("passwords do not match".into());
    }
    Ok(first)
}

/// Replaces the file whole (a temporary file renamed over it), readable by its owner only.
fn write(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("wharf-passwd.tmp");
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", path.display())
    })
}
