//! [`ConfigError`]: everything that can stop the configuration from
//! loading, each variant naming the key and where its value came from so
//! that the one log line at startup is enough to fix the mistake.

use std::path::PathBuf;

use super::Origin;

/// Everything that can go wrong while building a [`Config`](super::Config).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", .path.display())]
    FileUnreadable {
        /// File that was asked for.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("syntax error in config file {} at {location}: {message}", .path.display())]
    Syntax {
        /// Offending file.
        path: PathBuf,
        /// `line L, column C` (1-based), or `unknown position`.
        location: String,
        /// Parser's description of the problem.
        message: String,
    },
    /// The config file contains a key this version does not know.
    #[error("unknown key \"{key}\" in config file {}", .path.display())]
    UnknownKey {
        /// Dotted key path, e.g. `workers.cache_worker`.
        key: String,
        /// Offending file.
        path: PathBuf,
    },
    /// A value has the wrong TOML type, or an environment value does not
    /// parse as the key's type.
    #[error("wrong type for \"{key}\" (from {origin}): expected {expected}, found {found}")]
    WrongType {
        /// Dotted key path.
        key: String,
        /// Where the value came from.
        origin: Origin,
        /// Type the key requires.
        expected: String,
        /// Type (file) or raw text (environment) that was given.
        found: String,
    },
    /// A value has the right type but is not acceptable.
    #[error("invalid value for \"{key}\"{}: {reason}", origin_suffix(.origin))]
    InvalidValue {
        /// Dotted key path.
        key: String,
        /// Where the value came from; `None` when
        /// [`Config::validate`](super::Config::validate) is
        /// called on a value that was not produced by loading.
        origin: Option<Origin>,
        /// What is wrong with it.
        reason: String,
    },
    /// A command-line flag this program does not know.
    #[error("unknown flag {flag} (see --help)")]
    UnknownFlag {
        /// The flag as given.
        flag: String,
    },
    /// A command-line flag that needs a value was given none.
    #[error("flag {flag} needs a value")]
    MissingValue {
        /// The flag as given.
        flag: String,
    },
    /// A command-line flag that takes no value was given one.
    #[error("flag {flag} takes no value")]
    UnexpectedValue {
        /// The flag as given.
        flag: String,
    },
    /// A positional command-line argument; none are accepted.
    #[error("unexpected argument \"{arg}\" (see --help)")]
    UnexpectedArgument {
        /// The argument as given.
        arg: String,
    },
    /// Converting between [`Config`](super::Config) and TOML failed in a way
    /// no single key
    /// explains; indicates a bug in this module rather than bad input.
    #[error("internal configuration error: {message}")]
    Internal {
        /// Serde's description of the problem.
        message: String,
    },
}

/// Renders an optional origin as a parenthesised suffix for error texts.
fn origin_suffix(origin: &Option<Origin>) -> String {
    origin
        .as_ref()
        .map_or_else(String::new, |origin| format!(" (from {origin})"))
}
