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
