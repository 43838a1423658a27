//! The command line: `--config`, `--bind`, `--static-dir`, `--help` and
//! `--version`, parsed by hand into what `main` should do. Applying the
//! flags over the file and the environment is the loader's job
//! ([`Config::from_cli`](super::Config::from_cli)).

use std::path::PathBuf;

use super::{ConfigError, ENV_PREFIX};

/// Version of the crate, printed for `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Parsed command line, for [`CliAction::Run`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cli {
    /// `--config FILE`: TOML file to load over the defaults.
    pub config: Option<PathBuf>,
    /// `--bind ADDR`: listen address, overriding file and environment.
    pub bind: Option<String>,
    /// `--static-dir DIR`: static file directory, overriding file and environment.
    pub static_dir: Option<String>,
}

/// What `main` should do after parsing the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliAction {
    /// Start the gateway with these options.
    Run(Cli),
    /// Print this usage text and exit successfully.
    Help(String),
    /// Print `chorus` and [`VERSION`] and exit successfully.
    Version,
}

/// Usage text printed for `--help`.
pub fn usage() -> String {
    format!(
        "chorus {VERSION}: realtime LLM chat gateway

usage: chorus [--config FILE] [--bind ADDR] [--static-dir DIR]

options:
  --config FILE      load settings from this TOML file
  --bind ADDR        listen address (ip:port); overrides file and environment
  --static-dir DIR   serve static files from DIR instead of the embedded ones
  -h, --help         print this help and exit
  -V, --version      print the version and exit

Flags accept both `--flag value` and `--flag=value`. Every setting can also
be given as an environment variable {ENV_PREFIX}<SECTION>_<KEY>, e.g.
{ENV_PREFIX}WORKERS_CACHE_WORKERS=8 or {ENV_PREFIX}LLM_SIMULATED_TOKENS=10; lists are
comma separated. Precedence: defaults < file < environment < flags.
"
    )
}

/// Parses command-line arguments, *excluding* the program name (pass
/// `std::env::args().skip(1)`).
///
/// Arguments are processed in order: `--help` or `--version` returns at once,
/// and a repeated flag keeps its last value.
pub fn parse_cli(args: impl Iterator<Item = String>) -> Result<CliAction, ConfigError> {
    let mut cli = Cli::default();
    let mut args = args;
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value)),
            _ => (arg.clone(), None),
        };
        match flag.as_str() {
            "-h" | "--help" | "-V" | "--version" => {
                if inline.is_some() {
                    return Err(ConfigError::UnexpectedValue { flag });
                }
                return Ok(if flag == "-h" || flag == "--help" {
                    CliAction::Help(usage())
                } else {
                    CliAction::Version
                });
            }
            "--config" | "--bind" | "--static-dir" => {
                let value = match inline {
                    Some(value) => value.to_owned(),
                    None => args
                        .next()
                        .ok_or_else(|| ConfigError::MissingValue { flag: flag.clone() })?,
                };
                match flag.as_str() {
                    "--config" => cli.config = Some(PathBuf::from(value)),
                    "--bind" => cli.bind = Some(value),
                    _ => cli.static_dir = Some(value),
                }
            }
            _ if flag.starts_with('-') => return Err(ConfigError::UnknownFlag { flag: arg }),
            _ => return Err(ConfigError::UnexpectedArgument { arg }),
        }
    }
    Ok(CliAction::Run(cli))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> impl Iterator<Item = String> {
        list.iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn cli_accepts_both_flag_forms() {
        let action = parse_cli(args(&[
            "--config",
            "a.toml",
            "--bind=0.0.0.0:1",
            "--static-dir",
            "web",
        ]))
        .expect("parse");
        assert_eq!(
            action,
            CliAction::Run(Cli {
                config: Some(PathBuf::from("a.toml")),
                bind: Some("0.0.0.0:1".to_owned()),
                static_dir: Some("web".to_owned()),
            })
        );
        let action = parse_cli(args(&[
            "--config=b.toml",
            "--bind",
            "[::1]:2",
            "--static-dir=",
        ]))
        .expect("parse");
        assert_eq!(
            action,
            CliAction::Run(Cli {
                config: Some(PathBuf::from("b.toml")),
                bind: Some("[::1]:2".to_owned()),
                static_dir: Some(String::new()),
            })
        );
        assert_eq!(
            parse_cli(args(&[])).expect("empty"),
            CliAction::Run(Cli::default())
        );
    }

    #[test]
    fn cli_help_version_and_errors() {
        assert!(
            matches!(parse_cli(args(&["-h"])), Ok(CliAction::Help(text)) if text.contains("--config FILE"))
        );
        assert!(matches!(
            parse_cli(args(&["--help"])),
            Ok(CliAction::Help(_))
        ));
        assert_eq!(parse_cli(args(&["-V"])).expect("v"), CliAction::Version);
        assert_eq!(
            parse_cli(args(&["--version"])).expect("v"),
            CliAction::Version
        );

        let err = parse_cli(args(&["--verbose"])).expect_err("unknown flag");
        assert!(matches!(&err, ConfigError::UnknownFlag { flag } if flag == "--verbose"));
        assert!(err.to_string().contains("--verbose"));
        let err = parse_cli(args(&["--port=80"])).expect_err("unknown flag with value");
        assert!(matches!(&err, ConfigError::UnknownFlag { flag } if flag == "--port=80"));
        assert!(matches!(
            parse_cli(args(&["--bind"])),
            Err(ConfigError::MissingValue { flag }) if flag == "--bind"
        ));
        assert!(matches!(
            parse_cli(args(&["--help=yes"])),
            Err(ConfigError::UnexpectedValue { .. })
        ));
        assert!(matches!(
            parse_cli(args(&["serve"])),
            Err(ConfigError::UnexpectedArgument { arg }) if arg == "serve"
        ));
    }
}
