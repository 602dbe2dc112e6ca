//! The OS version from an os-release file (`VERSION_ID`, else `VERSION`).

use std::path::Path;

use crds::protocol::Version;

/// The version an os-release file names, if it names a valid one.
pub fn version(path: &Path) -> Option<Version> {
    let text = std::fs::read_to_string(path).ok()?;
    parse(&text)
}

/// Parses os-release text.
pub fn parse(text: &str) -> Option<Version> {
    let field = |key: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(key)
                .and_then(|rest| rest.strip_prefix('='))
                .map(|v| v.trim().trim_matches('"').trim_matches('\'').to_string())
        })
    };
    field("VERSION_ID")
        .or_else(|| field("VERSION"))
        .and_then(|v| Version::new(v).ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_flatcar_and_debian_files() {
        let flatcar = "NAME=\"Flatcar Container Linux by Kinvolk\"\nID=flatcar\nVERSION=4230.2.1\nVERSION_ID=4230.2.1\n";
        assert_eq!(super::parse(flatcar).unwrap().as_str(), "4230.2.1");
        assert_eq!(
            super::parse("VERSION=\"12 (bookworm)\"\n"),
            None,
            "not a version token"
        );
        assert_eq!(super::parse("VERSION_ID=\"12\"\n").unwrap().as_str(), "12");
    }
}
