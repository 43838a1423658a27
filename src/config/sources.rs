//! Where the values come from: the built-in defaults, the TOML file, the
//! `CHORUS_*` environment variables and the command-line flags, overlaid in
//! that order on one TOML table before it becomes a [`Config`]. Each
//! overridden key remembers its [`Origin`], so that a value serde or
//! validation refuses is reported with the file, variable or flag it came
//! from.

use std::collections::HashMap;
use std::fmt;
use std::num::IntErrorKind;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

use super::{Cli, Config, ConfigError};

/// Prefix shared by every environment variable this module reads.
pub const ENV_PREFIX: &str = "CHORUS_";

/// Where a configuration value came from, so errors can point at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The TOML file at this path.
    File(PathBuf),
    /// The environment variable with this name.
    Env(String),
    /// The command-line flag with this name.
    Cli(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "config file {}", path.display()),
            Self::Env(var) => write!(f, "environment variable {var}"),
            Self::Cli(flag) => write!(f, "command-line flag {flag}"),
        }
    }
}

/// TOML type of a leaf key, which decides how an environment value parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Integer,
    Float,
    Boolean,
    String,
    /// Every array in the schema is a list of strings.
    StringList,
    Datetime,
}

impl Kind {
    fn of(value: &Value) -> Option<Self> {
        match value {
            Value::Integer(_) => Some(Self::Integer),
            Value::Float(_) => Some(Self::Float),
            Value::Boolean(_) => Some(Self::Boolean),
            Value::String(_) => Some(Self::String),
            Value::Array(_) => Some(Self::StringList),
            Value::Datetime(_) => Some(Self::Datetime),
            Value::Table(_) => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Integer => "integer",
            Self::Float => "float",
            Self::Boolean => "boolean (true, false, 1 or 0)",
            Self::String => "string",
            Self::StringList => "array of strings",
            Self::Datetime => "datetime",
        }
    }

    /// Whether a value from the file fits this kind; checked here rather than
    /// left to serde so the error can name the key.
    fn accepts(self, value: &Value) -> bool {
        match (self, value) {
            (Self::StringList, Value::Array(items)) => items.iter().all(Value::is_str),
            (Self::StringList, _) => false,
            _ => Kind::of(value) == Some(self),
        }
    }
}

/// One settable key of the schema, found by walking the serialised defaults.
#[derive(Debug, Clone)]
struct Leaf {
    segments: Vec<String>,
    key: String,
    env: String,
    kind: Kind,
    default: Value,
}

/// The defaults as a TOML table: the base layer, and the source of truth
/// for which keys exist and what type each has.
fn defaults_table() -> Result<Table, ConfigError> {
    Table::try_from(Config::default()).map_err(|err| ConfigError::Internal {
        message: err.to_string(),
    })
}

fn leaves(table: &Table) -> Vec<Leaf> {
    fn walk(table: &Table, prefix: &mut Vec<String>, out: &mut Vec<Leaf>) {
        for (name, value) in table {
            prefix.push(name.clone());
            match value {
                Value::Table(inner) => walk(inner, prefix, out),
                leaf => {
                    if let Some(kind) = Kind::of(leaf) {
                        out.push(Leaf {
                            key: prefix.join("."),
                            env: format!("{ENV_PREFIX}{}", prefix.join("_").to_uppercase()),
                            segments: prefix.clone(),
                            kind,
                            default: leaf.clone(),
                        });
                    }
                }
            }
            prefix.pop();
        }
    }
    let mut out = Vec::new();
    walk(table, &mut Vec::new(), &mut out);
    out
}

fn get_leaf<'a>(table: &'a Table, segments: &[String]) -> Option<&'a Value> {
    let (last, parents) = segments.split_last()?;
    let mut current = table;
    for name in parents {
        current = current.get(name)?.as_table()?;
    }
    current.get(last)
}

fn set_leaf(table: &mut Table, segments: &[String], value: Value) -> bool {
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut current = table;
    for name in parents {
        match current.get_mut(name).and_then(Value::as_table_mut) {
            Some(inner) => current = inner,
            None => return false,
        }
    }
    match current.get_mut(last) {
        Some(slot) => {
            *slot = value;
            true
        }
        None => false,
    }
}

fn join_key(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Keys holding a list of tables (`[[…]]`): file-only settings with no
/// default entries and no environment variable.
const TABLE_LISTS: &[&str] = &["llm.providers"];

/// Overlays `file` on `base`, refusing keys and types the defaults lack.
fn merge_file(
    base: &mut Table,
    file: Table,
    prefix: &str,
    path: &Path,
    origins: &mut HashMap<String, Origin>,
) -> Result<(), ConfigError> {
    for (name, value) in file {
        let key = join_key(prefix, &name);
        if TABLE_LISTS.contains(&key.as_str()) && value.is_array() {
            // Absent from the defaults (an empty list); serde checks its entries.
            base.insert(name, value);
            origins.insert(key, Origin::File(path.to_owned()));
            continue;
        }
        let Some(slot) = base.get_mut(&name) else {
            return Err(ConfigError::UnknownKey {
                key,
                path: path.to_owned(),
            });
        };
        match (slot, value) {
            (Value::Table(inner), Value::Table(value)) => {
                merge_file(inner, value, &key, path, origins)?;
            }
            (Value::Table(_), value) => {
                return Err(ConfigError::WrongType {
                    key,
                    origin: Origin::File(path.to_owned()),
                    expected: "table".to_owned(),
                    found: value.type_str().to_owned(),
                });
            }
            (slot, value) => {
                if let Some(kind) = Kind::of(slot) {
                    if !kind.accepts(&value) {
                        let found = match &value {
                            Value::Array(_) => "array with non-string items",
                            other => other.type_str(),
                        };
                        return Err(ConfigError::WrongType {
                            key,
                            origin: Origin::File(path.to_owned()),
                            expected: kind.name().to_owned(),
                            found: found.to_owned(),
                        });
                    }
                }
                *slot = value;
                origins.insert(key, Origin::File(path.to_owned()));
            }
        }
    }
    Ok(())
}

/// Parses the text of an environment variable or flag as `leaf`'s type.
fn parse_text(leaf: &Leaf, raw: &str, origin: &Origin) -> Result<Value, ConfigError> {
    let wrong_type = || ConfigError::WrongType {
        key: leaf.key.clone(),
        origin: origin.clone(),
        expected: leaf.kind.name().to_owned(),
        found: format!("{raw:?}"),
    };
    match leaf.kind {
        Kind::Integer => match raw.trim().parse::<i64>() {
            Ok(number) => Ok(Value::Integer(number)),
            Err(err)
                if matches!(
                    err.kind(),
                    IntErrorKind::PosOverflow | IntErrorKind::NegOverflow
                ) =>
            {
                Err(ConfigError::InvalidValue {
                    key: leaf.key.clone(),
                    origin: Some(origin.clone()),
                    reason: format!("{raw} is out of range"),
                })
            }
            Err(_) => Err(wrong_type()),
        },
        Kind::Float => raw
            .trim()
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| wrong_type()),
        Kind::Boolean => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(Value::Boolean(true)),
            "false" | "0" => Ok(Value::Boolean(false)),
            _ => Err(wrong_type()),
        },
        Kind::String => Ok(Value::String(raw.to_owned())),
        // Items are trimmed and empty ones dropped: "a, b," means [a, b], and
        // an empty variable clears the list rather than yielding [""].
        Kind::StringList => Ok(Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| Value::String(item.to_owned()))
                .collect(),
        )),
        Kind::Datetime => raw
            .trim()
            .parse::<toml::value::Datetime>()
            .map(Value::Datetime)
            .map_err(|_| wrong_type()),
    }
}

/// Finds which overridden key makes deserialisation fail, by applying each
/// one alone to the defaults; serde's own error does not carry the key path.
fn blame(
    defaults: &Table,
    merged: &Table,
    leaves: &[Leaf],
    origins: &HashMap<String, Origin>,
    whole: toml::de::Error,
) -> ConfigError {
    for leaf in leaves {
        let (Some(origin), Some(value)) =
            (origins.get(&leaf.key), get_leaf(merged, &leaf.segments))
        else {
            continue;
        };
        let mut probe = defaults.clone();
        if !set_leaf(&mut probe, &leaf.segments, value.clone()) {
            continue;
        }
        if let Err(err) = probe.try_into::<Config>() {
            return ConfigError::InvalidValue {
                key: leaf.key.clone(),
                origin: Some(origin.clone()),
                reason: err.message().to_owned(),
            };
        }
    }
    ConfigError::Internal {
        message: whole.message().to_owned(),
    }
}

/// 1-based `line L, column C` of a byte offset, for syntax errors.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(offset) = span.map(|span| span.start.min(text.len())) else {
        return "unknown position".to_owned();
    };
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(1, |tail| tail.chars().count() + 1);
    format!("line {line}, column {column}")
}

fn read_file(path: &Path) -> Result<Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::FileUnreadable {
        path: path.to_owned(),
        source,
    })?;
    text.parse::<Table>().map_err(|err| ConfigError::Syntax {
        path: path.to_owned(),
        location: location(&text, err.span()),
        // Parser messages may span lines; keep the error a single log line.
        message: err.message().trim().replace('\n', "; "),
    })
}

/// A value set on the command line, applied after the environment.
struct FlagOverride<'a> {
    key: &'a str,
    flag: &'a str,
    value: &'a str,
}

impl Config {
    /// Builds the configuration from the defaults, the optional TOML `file`
    /// and the `CHORUS_*` entries of `env`, then validates it.
    ///
    /// Returns the configuration and the sorted names of `CHORUS_*` variables
    /// that match no key, which are ignored so that `main` can warn about them.
    pub fn load<I>(file: Option<&Path>, env: I) -> Result<(Config, Vec<String>), ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        Self::load_layers(file, env, &[])
    }

    /// Like [`Config::load`] for the file and flags in `cli`, with the
    /// environment taken from `env`; `--bind` and `--static-dir` override
    /// both the file and the environment.
    pub fn from_cli_with_env<I>(cli: &Cli, env: I) -> Result<(Config, Vec<String>), ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut flags = Vec::new();
        if let Some(bind) = &cli.bind {
            flags.push(FlagOverride {
                key: "server.bind",
                flag: "--bind",
                value: bind,
            });
        }
        if let Some(dir) = &cli.static_dir {
            flags.push(FlagOverride {
                key: "server.static_dir",
                flag: "--static-dir",
                value: dir,
            });
        }
        Self::load_layers(cli.config.as_deref(), env, &flags)
    }

    /// [`Config::from_cli_with_env`] with the process environment.
    pub fn from_cli(cli: &Cli) -> Result<(Config, Vec<String>), ConfigError> {
        // `std::env::vars` panics on non-UTF-8 entries. Unrelated variables
        // are none of our business, so they are skipped; ours are converted
        // lossily so they still get parsed (and rejected) or reported.
        let env = std::env::vars_os().filter_map(|(name, value)| {
            let name = name.into_string().ok()?;
            if !name.starts_with(ENV_PREFIX) {
                return None;
            }
            let value = value
                .into_string()
                .unwrap_or_else(|raw| raw.to_string_lossy().into_owned());
            Some((name, value))
        });
        Self::from_cli_with_env(cli, env)
    }

    fn load_layers<I>(
        file: Option<&Path>,
        env: I,
        flags: &[FlagOverride<'_>],
    ) -> Result<(Config, Vec<String>), ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let defaults = defaults_table()?;
        let leaves = leaves(&defaults);
        let mut merged = defaults.clone();
        let mut origins = HashMap::new();

        if let Some(path) = file {
            merge_file(&mut merged, read_file(path)?, "", path, &mut origins)?;
        }

        let by_env: HashMap<&str, &Leaf> = leaves
            .iter()
            .map(|leaf| (leaf.env.as_str(), leaf))
            .collect();
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        // Sorted so that errors and the unknown list do not depend on the
        // platform's environment order.
        env.sort();
        let mut unknown_env = Vec::new();
        for (name, raw) in env {
            let Some(leaf) = by_env.get(name.as_str()) else {
                unknown_env.push(name);
                continue;
            };
            let origin = Origin::Env(name);
            let value = parse_text(leaf, &raw, &origin)?;
            set_leaf(&mut merged, &leaf.segments, value);
            origins.insert(leaf.key.clone(), origin);
        }

        for flag in flags {
            let Some(leaf) = leaves.iter().find(|leaf| leaf.key == flag.key) else {
                return Err(ConfigError::Internal {
                    message: format!("flag {} targets unknown key {}", flag.flag, flag.key),
                });
            };
            let origin = Origin::Cli(flag.flag.to_owned());
            let value = parse_text(leaf, flag.value, &origin)?;
            set_leaf(&mut merged, &leaf.segments, value);
            origins.insert(leaf.key.clone(), origin);
        }

        let config: Config = match merged.clone().try_into() {
            Ok(config) => config,
            Err(err) => return Err(blame(&defaults, &merged, &leaves, &origins, err)),
        };
        config.validate().map_err(|err| match err {
            ConfigError::InvalidValue {
                key,
                origin: None,
                reason,
            } => ConfigError::InvalidValue {
                origin: origins.get(&key).cloned(),
                key,
                reason,
            },
            other => other,
        })?;
        Ok((config, unknown_env))
    }

    /// Every settable key as `(dotted key, environment variable, default as
    /// TOML)`, in file order, e.g. `("workers.cache_workers",
    /// "CHORUS_WORKERS_CACHE_WORKERS", "4")`.
    pub fn documented_keys() -> Vec<(String, String, String)> {
        // The defaults always serialise (a unit test pins this), so an empty
        // list here would only mean a bug, which that test would catch.
        let defaults = defaults_table().unwrap_or_default();
        leaves(&defaults)
            .into_iter()
            .map(|leaf| (leaf.key, leaf.env, leaf.default.to_string()))
            .collect()
    }
}
