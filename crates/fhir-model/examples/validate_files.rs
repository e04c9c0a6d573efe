//! Validates every resource of the given JSON / NDJSON files and prints the issues found.
//!
//! `cargo run --release -p fhir-model --example validate_files -- FILE...`

use std::time::Instant;

fn main() {
    let model = fhir_model::r4();
    let (mut resources, mut invalid) = (0usize, 0usize);
    let start = Instant::now();
    for path in std::env::args().skip(1) {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{path}: {e}");
                continue;
            }
        };
        let docs: Vec<serde_json::Value> = if path.ends_with(".ndjson") {
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        } else {
            serde_json::from_str(&text).into_iter().collect()
        };
        for doc in docs {
            resources += 1;
            if let Err(issues) = model.validate(&doc) {
                invalid += 1;
                for i in issues.iter().take(5) {
                    println!("{path}: {i}");
                }
            }
        }
    }
    println!(
        "{resources} documents, {invalid} invalid, {:?}",
        start.elapsed()
    );
}
