//! The example policies under crds/tests are well-formed, and each invalid one says
//! which admission message it expects (checked against a real API server in e2e).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{fs, path::PathBuf};

use crds::UpdatePolicy;

fn fixtures(kind: &str) -> Vec<(PathBuf, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(kind);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| {
            let text = fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn valid_fixtures_deserialize_into_update_policies() {
    let valid = fixtures("valid");
    assert!(valid.len() >= 3);
    for (path, text) in valid {
        let policy: UpdatePolicy =
            serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(policy.metadata.name.is_some(), "{}", path.display());
    }
}

#[test]
fn invalid_fixtures_name_the_message_they_expect() {
    let invalid = fixtures("invalid");
    assert!(invalid.len() >= 15);
    for (path, text) in invalid {
        let first = text.lines().next().unwrap_or_default();
        let expected = first.strip_prefix("# expect: ").unwrap_or_default();
        assert!(
            !expected.trim().is_empty(),
            "{} lacks '# expect: <message>'",
            path.display()
        );
        let _: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    }
}
