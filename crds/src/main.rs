//! `cargo run -p crds`: writes the CRD YAML into `crds/yaml/` and the chart,
//! and the protocol's key lists for the chart's admission policy.

use std::{path::Path, process::ExitCode};

fn main() -> ExitCode {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let files = match crds::crd::rendered() {
        Ok(files) => files,
        Err(e) => {
            eprintln!("error: cannot render the CRDs: {e}");
            return ExitCode::FAILURE;
        }
    };
    for dir in crds::crd::output_dirs(&workspace) {
        for (name, yaml) in &files {
            let path = dir.join(name);
            if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, yaml))
            {
                eprintln!("error: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!("wrote {}", path.display());
        }
    }
    let schema_path = workspace.join(crds::crd::VALUES_SCHEMA);
    let schema = std::fs::read_to_string(&schema_path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
        .and_then(crds::crd::values_schema)
        .and_then(|v| serde_json::to_string_pretty(&v).map_err(|e| e.to_string()));
    match schema {
        Ok(text) => {
            if let Err(e) = std::fs::write(&schema_path, text + "\n") {
                eprintln!("error: cannot write {}: {e}", schema_path.display());
                return ExitCode::FAILURE;
            }
            println!("wrote {}", schema_path.display());
        }
        Err(e) => {
            eprintln!("error: cannot update {}: {e}", schema_path.display());
            return ExitCode::FAILURE;
        }
    }
    let (path, text) = crds::crd::protocol_partial();
    let path = workspace.join(path);
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!("error: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    println!("wrote {}", path.display());
    ExitCode::SUCCESS
}
