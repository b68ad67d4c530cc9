//! Who may use `ray web`: the tokens file and the three roles.
//!
//! The file has one token a line: `ROLE NAME TOKEN`, where ROLE is `viewer`, `operator` or
//! `admin`, NAME names the person or program (shown in the page and the log) and TOKEN is
//! the secret typed at the login (16 to 256 characters out of `A-Z a-z 0-9 - _ . ~ + / =`).
//! Blank lines and lines starting with `#` are ignored. The file must not be readable by
//! group or others (it holds secrets).
use std::collections::HashMap;
use std::path::Path;

/// What a user may do. Each role may do everything the roles before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Sees VMs, consoles (read-only), screenshots.
    Viewer,
    /// Also starts, pauses, resumes, stops and snapshots VMs, types into consoles, cancels
    /// migrations.
    Operator,
    /// Also creates VMs, restores snapshots and migrates VMs (each starts a VMM process).
    Admin,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// A user a token stands for.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct User {
    pub name: String,
    pub role: Role,
}

/// Why a tokens file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read the tokens file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("the tokens file {path} is readable by group or others (mode {mode:o}): make it 0600")]
    TooOpen { path: String, mode: u32 },
    #[error("tokens file line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("the tokens file has no token: add a line `ROLE NAME TOKEN`")]
    Empty,
}

const MIN_TOKEN: usize = 16;
const MAX_TOKEN: usize = 256;

/// The tokens of a tokens file.
#[derive(Debug)]
pub struct Tokens {
    users: HashMap<String, User>,
}

impl Tokens {
    /// Reads and checks the tokens file at `path`.
    pub fn load(path: &Path) -> Result<Tokens, TokenFileError> {
        use std::os::unix::fs::PermissionsExt;
        let read = |e: std::io::Error| TokenFileError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let mode = std::fs::metadata(path).map_err(read)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(TokenFileError::TooOpen {
                path: path.display().to_string(),
                mode: mode & 0o777,
            });
        }
        Tokens::parse(&std::fs::read_to_string(path).map_err(read)?)
    }

    /// Parses a tokens file's text.
    pub fn parse(text: &str) -> Result<Tokens, TokenFileError> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line_no = n + 1;
            let bad = |reason: String| TokenFileError::Line {
                line: line_no,
                reason,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [role, name, token] = fields[..] else {
                return Err(bad(format!(
                    "expected `ROLE NAME TOKEN` (3 fields), found {} field(s)",
                    fields.len()
                )));
            };
            let role = Role::parse(role).ok_or_else(|| {
                bad(format!(
                    "role '{role}' is not one of viewer, operator, admin"
                ))
            })?;
            if !(MIN_TOKEN..=MAX_TOKEN).contains(&token.len()) {
                return Err(bad(format!(
                    "the token of {name} has {} characters: it needs {MIN_TOKEN} to {MAX_TOKEN}",
                    token.len()
                )));
            }
            if let Some(c) = token.chars().find(|c| !token_char(*c)) {
                return Err(bad(format!(
                    "the token of {name} contains '{c}': use A-Z a-z 0-9 - _ . ~ + / ="
                )));
            }
            let user = User {
                name: name.to_string(),
                role,
            };
            if users.insert(token.to_string(), user).is_some() {
                return Err(bad(format!(
                    "the token of {name} is already given to another line: each token stands for one user"
                )));
            }
        }
        if users.is_empty() {
            return Err(TokenFileError::Empty);
        }
        Ok(Tokens { users })
    }

    /// The user `token` stands for. Every stored token is compared in full, so the time
    /// taken does not tell how much of a guess was right.
    pub fn find(&self, token: &str) -> Option<&User> {
        let mut found = None;
        for (known, user) in &self.users {
            if constant_time_eq(known.as_bytes(), token.as_bytes()) {
                found = Some(user);
            }
        }
        found
    }
}

fn token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.~+/=".contains(c)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# who may use ray web\n\nviewer  vera  vvvvvvvvvvvvvvvv1\noperator otto oooooooooooooooo2\nadmin ada aaaaaaaaaaaaaaaa3\n";

    #[test]
    fn tokens_map_to_their_users_and_roles() {
        let t = Tokens::parse(FILE).unwrap();
        assert_eq!(t.find("vvvvvvvvvvvvvvvv1").unwrap().role, Role::Viewer);
        assert_eq!(t.find("oooooooooooooooo2").unwrap().name, "otto");
        assert_eq!(t.find("aaaaaaaaaaaaaaaa3").unwrap().role, Role::Admin);
        assert!(t.find("aaaaaaaaaaaaaaaa").is_none());
        assert!(t.find("").is_none());
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
    }

    #[test]
    fn bad_lines_are_refused_naming_line_and_fault() {
        for (text, msg) in [
            (
                "viewer vera",
                "line 1: expected `ROLE NAME TOKEN` (3 fields), found 2",
            ),
            (
                "root r 0123456789abcdefXX",
                "line 1: role 'root' is not one of",
            ),
            (
                "admin a short",
                "the token of a has 5 characters: it needs 16 to 256",
            ),
            ("admin a 0123456789abcdef;x", "the token of a contains ';'"),
            (
                "admin a 0123456789abcdefgh\nviewer b 0123456789abcdefgh",
                "line 2: the token of b is already given",
            ),
            ("# nothing\n", "has no token"),
        ] {
            let err = Tokens::parse(text).unwrap_err().to_string();
            assert!(err.contains(msg), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_tokens_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("ray-web-tokens-{}", std::process::id()));
        std::fs::write(&path, FILE).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Tokens::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("readable by group or others (mode 644)"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Tokens::load(&path).is_ok());
        std::fs::remove_file(&path).unwrap();
    }
}
