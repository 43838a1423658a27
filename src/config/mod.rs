//! Runtime configuration: defaults, TOML file, environment overrides and
//! command-line flags, merged into one validated [`Config`].
//!
//! Precedence, lowest to highest: built-in defaults, the TOML file given with
//! `--config`, environment variables named `CHORUS_<SECTION>_<KEY>`, and the
//! `--bind` / `--static-dir` flags.
//!
//! Threading: the configuration is loaded exactly once, on the main thread,
//! before any worker or connection thread starts. After that it is never
//! mutated; it is wrapped in an `Arc<Config>` and shared read-only with every
//! thread, so no locking is needed to read it. Nothing in this module keeps
//! global state, and loading never touches the process environment except in
//! [`Config::from_cli`], which only reads it.
//!
//! Where things are: `types` holds the sections and their defaults;
//! `sources` the layering of file, environment and flags and the [`Origin`]
//! of every value; `cli` the parsing of the command line; `validate` the
//! rules the types cannot express; `error` the [`ConfigError`] they all
//! report. The submodules are private: everything is reached through the
//! re-exports below, as `config::X`.

mod cli;
mod error;
mod sources;
#[cfg(test)]
mod tests;
mod types;
mod validate;

pub use cli::{parse_cli, usage, Cli, CliAction, VERSION};
pub use error::ConfigError;
pub use sources::{Origin, ENV_PREFIX};
pub use types::{
    CacheBackend, CacheConfig, ClusterConfig, Config, HistoryConfig, LlmConfig, LlmProvider,
    ProviderConfig, ServerConfig, SimulatedConfig, TimeoutsConfig, ToolsConfig, WorkersConfig,
};
