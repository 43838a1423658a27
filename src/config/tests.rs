//! Loading end to end: each source overriding the ones below it, and every
//! kind of mistake reported with its key and where the value came from.
//! These go through [`Config::load`] and [`Config::from_cli_with_env`], so
//! they cover the sources and the validation together.

use std::io::Write;

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn toml_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .prefix("chorus-config-test-")
        .suffix(".toml")
        .tempfile()
        .expect("create temp file");
    file.write_all(text.as_bytes()).expect("write temp file");
    file
}

fn load_text(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let file = toml_file(text);
    Config::load(Some(file.path()), env(vars)).map(|(config, _)| config)
}

/// The documented contract: key names, env names and defaults.
const CONTRACT: &[(&str, &str)] = &[
    ("server.bind", "\"127.0.0.1:8080\""),
    ("server.max_connections", "10000"),
    ("server.ws_max_message_bytes", "65536"),
    ("server.max_message_chars", "16000"),
    ("server.allowed_origins", "[]"),
    ("server.allowed_hosts", "[]"),
    ("server.auth_tokens", "[]"),
    ("server.connection_stack_kib", "128"),
    ("server.outbox_frames", "4096"),
    ("server.outbox_bytes", "4194304"),
    ("server.http_max_body_bytes", "1048576"),
    ("server.send_buffer_bytes", "0"),
    ("server.max_chats_per_minute", "0"),
    ("server.ping_interval_ms", "30000"),
    ("server.pong_timeout_ms", "10000"),
    ("server.listen_backlog", "1024"),
    ("server.static_dir", "\"\""),
    ("workers.cache_workers", "4"),
    ("workers.max_concurrent_leaders", "16"),
    ("workers.max_concurrent_followers", "64"),
    ("workers.max_concurrent_llm_streams", "8"),
    ("workers.intake_queue", "1024"),
    ("workers.prepared_queue", "256"),
    ("workers.follow_queue", "1024"),
    ("workers.prepare_queue", "1024"),
    ("workers.fanout_threads", "0"),
    ("timeouts.queue_ms", "30000"),
    ("timeouts.prepare_ms", "30000"),
    ("timeouts.stream_idle_ms", "60000"),
    ("timeouts.request_ms", "300000"),
    ("timeouts.drain_ms", "10000"),
    ("timeouts.replay_window_ms", "60000"),
    ("timeouts.orphan_grace_ms", "5000"),
    ("timeouts.janitor_interval_ms", "50"),
    ("cache.backend", "\"memory\""),
    ("cache.redis_url", "\"redis://127.0.0.1:6379/\""),
    ("cache.ttl_s", "3600"),
    ("cache.complete_orphans", "false"),
    ("cache.max_entries", "10000"),
    ("cache.redis_timeout_ms", "250"),
    ("cache.redis_pool_size", "8"),
    ("history.sqlite_path", "\"data/chat.db\""),
    ("history.max_context_tokens", "2048"),
    ("history.read_pool_size", "8"),
    ("history.max_answer_bytes", "1048576"),
    ("llm.provider", "\"simulated\""),
    ("llm.base_url", "\"http://127.0.0.1:11434/v1\""),
    ("llm.model", "\"default\""),
    ("llm.api_key_env", "\"OPENAI_API_KEY\""),
    ("llm.system_prompt", "\"You are a helpful assistant.\""),
    ("llm.max_tokens", "1024"),
    ("llm.connect_timeout_ms", "5000"),
    ("llm.read_timeout_ms", "60000"),
    ("llm.max_retries", "2"),
    ("llm.retry_base_ms", "250"),
    ("llm.retry_max_ms", "8000"),
    ("llm.allowed_models", "[]"),
    ("llm.simulated.first_token_ms", "200"),
    ("llm.simulated.token_interval_ms", "20"),
    ("llm.simulated.tokens", "64"),
    ("llm.simulated.token_bytes", "0"),
    ("tools.enabled", "true"),
    (
        "tools.builtins",
        "[\"calculator\", \"clock\", \"search_history\"]",
    ),
    ("tools.direct", "[\"clock\"]"),
    ("tools.max_rounds", "4"),
    ("tools.max_calls", "8"),
    ("tools.max_argument_bytes", "16384"),
    ("cluster.enabled", "false"),
    ("cluster.redis_url", "\"redis://127.0.0.1:6379/\""),
    ("cluster.node_id", "\"\""),
    ("cluster.lease_ms", "5000"),
    ("cluster.redis_timeout_ms", "250"),
];

#[test]
fn documented_keys_match_the_contract_in_order() {
    let keys = Config::documented_keys();
    let got: Vec<(&str, &str)> = keys
        .iter()
        .map(|(key, _, default)| (key.as_str(), default.as_str()))
        .collect();
    assert_eq!(got, CONTRACT);
    for (key, var, _) in &keys {
        assert_eq!(
            *var,
            format!("CHORUS_{}", key.replace('.', "_").to_uppercase())
        );
    }
    let mut vars: Vec<&String> = keys.iter().map(|(_, var, _)| var).collect();
    vars.sort();
    vars.dedup();
    assert_eq!(vars.len(), keys.len(), "environment names must be unique");
}

#[test]
fn file_overrides_defaults() {
    let c = load_text(
        r#"
        [server]
        bind = "0.0.0.0:9000"
        allowed_origins = ["https://a.example", "https://b.example"]

        [workers]
        cache_workers = 2

        [cache]
        backend = "redis"
        complete_orphans = true

        [llm]
        provider = "openai"

        [llm.simulated]
        tokens = 5
        "#,
        &[],
    )
    .expect("load");
    assert_eq!(c.server.bind, "0.0.0.0:9000");
    assert_eq!(
        c.server.allowed_origins,
        ["https://a.example", "https://b.example"]
    );
    assert_eq!(c.workers.cache_workers, 2);
    assert_eq!(c.cache.backend, CacheBackend::Redis);
    assert!(c.cache.complete_orphans);
    assert_eq!(c.llm.provider, LlmProvider::OpenAi);
    assert_eq!(c.llm.simulated.tokens, 5);
    assert_eq!(c.llm.simulated.first_token_ms, 200);
    assert_eq!(c.workers.intake_queue, 1024);
}

#[test]
fn env_overrides_each_kind_and_beats_the_file() {
    let c = load_text(
        "[workers]\ncache_workers = 2\n[server]\nauth_tokens = [\"x\"]\n",
        &[
            ("CHORUS_WORKERS_CACHE_WORKERS", "8"),
            ("CHORUS_CACHE_COMPLETE_ORPHANS", "1"),
            ("CHORUS_CLUSTER_ENABLED", "true"),
            ("CHORUS_LLM_MODEL", "llama3"),
            ("CHORUS_SERVER_ALLOWED_ORIGINS", "a, b,"),
            ("CHORUS_SERVER_AUTH_TOKENS", ""),
            ("CHORUS_SERVER_LISTEN_BACKLOG", "-1"),
            ("CHORUS_LLM_SIMULATED_TOKENS", "10"),
            ("CHORUS_CACHE_BACKEND", "redis"),
            ("PATH", "/usr/bin"),
        ],
    )
    .expect("load");
    assert_eq!(c.workers.cache_workers, 8);
    assert!(c.cache.complete_orphans);
    assert!(c.cluster.enabled);
    assert_eq!(c.llm.model, "llama3");
    assert_eq!(c.server.allowed_origins, ["a", "b"]);
    assert!(c.server.auth_tokens.is_empty());
    assert_eq!(c.server.listen_backlog, -1);
    assert_eq!(c.llm.simulated.tokens, 10);
    assert_eq!(c.cache.backend, CacheBackend::Redis);
}

#[test]
fn unknown_chorus_env_vars_are_reported_not_fatal() {
    let (c, unknown) = Config::load(
        None,
        env(&[
            ("CHORUS_WORKERS_CACHE_WORKER", "8"),
            ("CHORUS_LLM_SIMULATED", "x"),
            ("HOME", "/home/someone"),
        ]),
    )
    .expect("load");
    assert_eq!(c, Config::default());
    assert_eq!(
        unknown,
        ["CHORUS_LLM_SIMULATED", "CHORUS_WORKERS_CACHE_WORKER"]
    );
}

#[test]
fn provider_lists_load_and_their_mistakes_are_named() {
    let c = load_text(
        "[llm]\nprovider = \"openai\"\n\n[[llm.providers]]\nname = \"a\"\nbase_url = \"http://x/v1\"\n\n[[llm.providers]]\nmodel = \"m\"\n",
        &[],
    )
    .expect("load");
    assert_eq!(c.llm.providers.len(), 2);
    assert_eq!(c.llm.providers[0].name, "a");
    assert_eq!(c.llm.providers[1].model, "m");
    assert_eq!(c.llm.providers[1].base_url, "");

    let err = load_text("[[llm.providers]]\nbase_url = \"ftp://x\"\n", &[]).expect_err("bad URL");
    assert!(
        err.to_string().contains("llm.providers[0].base_url"),
        "{err}"
    );
    let err =
        load_text("[[llm.providers]]\nbase_uri = \"http://x\"\n", &[]).expect_err("unknown field");
    assert!(err.to_string().contains("base_uri"), "{err}");
}

#[test]
fn unknown_file_key_is_named() {
    let err = load_text("[workers]\ncache_worker = 3\n", &[]).expect_err("unknown key");
    assert!(matches!(&err, ConfigError::UnknownKey { key, .. } if key == "workers.cache_worker"));
    assert!(err
        .to_string()
        .contains("unknown key \"workers.cache_worker\""));

    let err = load_text("[metrics]\nport = 1\n", &[]).expect_err("unknown section");
    assert!(matches!(&err, ConfigError::UnknownKey { key, .. } if key == "metrics"));

    let err = load_text("[llm.simulated]\nspeed = 1\n", &[]).expect_err("unknown nested");
    assert!(err.to_string().contains("\"llm.simulated.speed\""));
}

#[test]
fn wrong_type_in_file_is_named() {
    let err = load_text("[workers]\ncache_workers = \"8\"\n", &[]).expect_err("wrong type");
    assert!(
        matches!(&err, ConfigError::WrongType { key, expected, found, .. }
            if key == "workers.cache_workers" && expected == "integer" && found == "string")
    );
    assert!(err.to_string().contains("\"workers.cache_workers\""));

    let err = load_text("server = 1\n", &[]).expect_err("section as value");
    assert!(matches!(&err, ConfigError::WrongType { key, .. } if key == "server"));

    let err = load_text("[server]\nauth_tokens = [1]\n", &[]).expect_err("list of ints");
    assert!(matches!(&err, ConfigError::WrongType { key, .. } if key == "server.auth_tokens"));
}

#[test]
fn wrong_type_in_env_names_key_and_variable() {
    let err = Config::load(None, env(&[("CHORUS_WORKERS_CACHE_WORKERS", "many")]))
        .expect_err("not an integer");
    let text = err.to_string();
    assert!(text.contains("\"workers.cache_workers\""), "{text}");
    assert!(text.contains("CHORUS_WORKERS_CACHE_WORKERS"), "{text}");
    assert!(text.contains("\"many\""), "{text}");

    let err =
        Config::load(None, env(&[("CHORUS_CLUSTER_ENABLED", "yes")])).expect_err("not a bool");
    assert!(matches!(&err, ConfigError::WrongType { key, .. } if key == "cluster.enabled"));
}

#[test]
fn invalid_values_are_named_with_their_origin() {
    let err = load_text("[workers]\ncache_workers = 0\n", &[]).expect_err("zero workers");
    assert!(
        matches!(&err, ConfigError::InvalidValue { key, origin: Some(Origin::File(_)), .. }
        if key == "workers.cache_workers")
    );
    assert!(err.to_string().contains("\"workers.cache_workers\""));

    let err = load_text("[server]\nbind = \"nope\"\n", &[]).expect_err("bad bind");
    assert!(matches!(&err, ConfigError::InvalidValue { key, .. } if key == "server.bind"));
    assert!(err.to_string().contains("\"nope\""));

    let err = Config::load(None, env(&[("CHORUS_SERVER_BIND", "nope")])).expect_err("env bind");
    let text = err.to_string();
    assert!(
        text.contains("\"server.bind\"") && text.contains("CHORUS_SERVER_BIND"),
        "{text}"
    );

    // Range and enum errors surface from serde; they must still name the key.
    let err = load_text("[workers]\nintake_queue = -1\n", &[]).expect_err("negative");
    assert!(matches!(&err, ConfigError::InvalidValue { key, .. } if key == "workers.intake_queue"));
    let err = Config::load(None, env(&[("CHORUS_LLM_MAX_TOKENS", "5000000000")]))
        .expect_err("u32 overflow");
    assert!(
        matches!(&err, ConfigError::InvalidValue { key, origin: Some(Origin::Env(var)), .. }
        if key == "llm.max_tokens" && var == "CHORUS_LLM_MAX_TOKENS")
    );
    let err = load_text("[cache]\nbackend = \"mongo\"\n", &[]).expect_err("bad enum");
    assert!(matches!(&err, ConfigError::InvalidValue { key, .. } if key == "cache.backend"));
    assert!(err.to_string().contains("mongo"));
}

#[test]
fn every_stated_minimum_is_enforced() {
    let cases = [
        (
            "CHORUS_SERVER_CONNECTION_STACK_KIB",
            "31",
            "server.connection_stack_kib",
        ),
        ("CHORUS_SERVER_OUTBOX_FRAMES", "15", "server.outbox_frames"),
        (
            "CHORUS_WORKERS_MAX_CONCURRENT_LEADERS",
            "0",
            "workers.max_concurrent_leaders",
        ),
        (
            "CHORUS_WORKERS_MAX_CONCURRENT_FOLLOWERS",
            "0",
            "workers.max_concurrent_followers",
        ),
        (
            "CHORUS_WORKERS_MAX_CONCURRENT_LLM_STREAMS",
            "0",
            "workers.max_concurrent_llm_streams",
        ),
        ("CHORUS_WORKERS_INTAKE_QUEUE", "0", "workers.intake_queue"),
        (
            "CHORUS_WORKERS_PREPARED_QUEUE",
            "0",
            "workers.prepared_queue",
        ),
        ("CHORUS_WORKERS_FOLLOW_QUEUE", "0", "workers.follow_queue"),
        ("CHORUS_WORKERS_PREPARE_QUEUE", "0", "workers.prepare_queue"),
        (
            "CHORUS_TIMEOUTS_JANITOR_INTERVAL_MS",
            "0",
            "timeouts.janitor_interval_ms",
        ),
        ("CHORUS_CACHE_MAX_ENTRIES", "0", "cache.max_entries"),
        ("CHORUS_HISTORY_SQLITE_PATH", "", "history.sqlite_path"),
        (
            "CHORUS_HISTORY_READ_POOL_SIZE",
            "0",
            "history.read_pool_size",
        ),
    ];
    for (var, value, expected) in cases {
        let err = Config::load(None, env(&[(var, value)])).expect_err(var);
        assert!(
            matches!(&err, ConfigError::InvalidValue { key, .. } if key == expected),
            "{var}: {err}"
        );
    }
    let (c, _) = Config::load(
        None,
        env(&[
            ("CHORUS_SERVER_CONNECTION_STACK_KIB", "32"),
            ("CHORUS_SERVER_OUTBOX_FRAMES", "16"),
        ]),
    )
    .expect("minimums themselves are accepted");
    assert_eq!(c.server.connection_stack_kib, 32);
}

#[test]
fn bind_flag_wins_over_env_and_file_and_is_validated() {
    let file = toml_file("[server]\nbind = \"127.0.0.1:1\"\nstatic_dir = \"web\"\n");
    let cli = Cli {
        config: Some(file.path().to_owned()),
        bind: Some("0.0.0.0:3".to_owned()),
        static_dir: None,
    };
    let (c, _) = Config::from_cli_with_env(&cli, env(&[("CHORUS_SERVER_BIND", "127.0.0.1:2")]))
        .expect("load");
    assert_eq!(c.server.bind, "0.0.0.0:3");
    assert_eq!(c.server.static_dir, "web");

    let cli = Cli {
        bind: Some("localhost".to_owned()),
        static_dir: Some("dev/static".to_owned()),
        ..Cli::default()
    };
    let err = Config::from_cli_with_env(&cli, Vec::new()).expect_err("bad flag");
    assert!(
        matches!(&err, ConfigError::InvalidValue { key, origin: Some(Origin::Cli(flag)), .. }
            if key == "server.bind" && flag == "--bind")
    );
    let cli = Cli {
        static_dir: Some("dev/static".to_owned()),
        ..Cli::default()
    };
    let (c, _) =
        Config::from_cli_with_env(&cli, env(&[("CHORUS_SERVER_STATIC_DIR", "x")])).expect("load");
    assert_eq!(c.server.static_dir, "dev/static");
}

#[test]
fn unreadable_and_malformed_files_are_reported() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("missing.toml");
    let err = Config::load(Some(&missing), Vec::new()).expect_err("missing file");
    assert!(matches!(&err, ConfigError::FileUnreadable { .. }));
    assert!(err.to_string().contains("missing.toml"));

    let err = load_text("[server]\nbind = \n", &[]).expect_err("syntax");
    assert!(
        matches!(&err, ConfigError::Syntax { location, .. } if location.starts_with("line 2,")),
        "{err}"
    );
}
