//! The user-facing documents cannot drift from the code: every configuration
//! key is in the README's table, and every error code is explained in the
//! protocol reference.

use chorus::config::Config;
use chorus::protocol::ErrorCode;

fn read(path: &str) -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/").to_owned() + path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_readme_documents_every_configuration_key() {
    let readme = read("README.md");
    for (key, env, default) in Config::documented_keys() {
        let leaf = key.rsplit('.').next().unwrap();
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{leaf}` |")) && l.contains(&format!("`{env}`")))
            .unwrap_or_else(|| panic!("README has no table row for {key} ({env})"));
        assert!(
            row.contains(&format!("`{default}`")),
            "README row for {key} does not show its default {default}: {row}"
        );
    }
}

#[test]
fn the_protocol_reference_explains_every_error_code() {
    let doc = read("docs/protocol.md");
    for code in ErrorCode::ALL {
        assert!(
            doc.contains(&format!("| `{}` |", code.as_str())),
            "docs/protocol.md has no row for {code}"
        );
    }
}

/// Every kind of Redis key the code names (the table in
/// `src/cluster/keys.rs`) is in the operators' table in docs/scaling.md.
#[test]
fn the_scaling_guide_lists_every_redis_key() {
    let code = read("src/cluster/keys.rs");
    let guide = read("docs/scaling.md");
    let kinds: Vec<&str> = code
        .lines()
        .filter_map(|l| l.trim().strip_prefix("format!(\"chorus:v1:"))
        .filter_map(|rest| rest.split(':').next())
        .collect();
    assert_eq!(kinds.len(), 5, "{kinds:?}");
    for kind in kinds {
        assert!(
            guide.contains(&format!("`chorus:v1:{kind}:")),
            "docs/scaling.md does not list chorus:v1:{kind}:"
        );
    }
}
