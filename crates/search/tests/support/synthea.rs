//! Loads the 100-patient Synthea transaction bundles from the repository copy, rewriting
//! `urn:uuid:` references to `Type/id` the way the loader does.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;

use serde_json::Value;

/// The repository copy; `FHIRHOSE_SYNTHEA_DIR` overrides it.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("FHIRHOSE_SYNTHEA_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthea-r4-100"),
    }
}

fn read(path: &std::path::Path) -> Vec<u8> {
    let raw = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .expect("gunzip");
        out
    } else {
        raw
    }
}

fn rewrite(v: &mut Value, map: &HashMap<String, String>) {
    match v {
        Value::Object(o) => {
            for (k, child) in o.iter_mut() {
                if k == "reference" {
                    if let Value::String(s) = child
                        && let Some(r) = map.get(s.as_str())
                    {
                        *s = r.clone();
                    }
                } else {
                    rewrite(child, map);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| rewrite(c, map)),
        _ => {}
    }
}

/// All resources of the data set, references rewritten.
pub fn load() -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir())
        .expect("testdata/synthea-r4-100 is present")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            n.ends_with(".json") || n.ends_with(".json.gz")
        })
        .collect();
    files.sort();
    let mut resources = Vec::new();
    let mut map = HashMap::new();
    // The hospital and practitioner files repeat some Organizations: keep the first copy.
    let mut seen = std::collections::HashSet::new();
    for f in &files {
        let b: Value = serde_json::from_slice(&read(f)).expect("bundle JSON");
        if b["resourceType"] != "Bundle" {
            continue;
        }
        for e in b["entry"].as_array().into_iter().flatten() {
            let r = e["resource"].clone();
            let (Some(t), Some(id)) = (r["resourceType"].as_str(), r["id"].as_str()) else {
                continue;
            };
            if let Some(fu) = e["fullUrl"].as_str() {
                map.insert(fu.to_string(), format!("{t}/{id}"));
            }
            if seen.insert(format!("{t}/{id}")) {
                resources.push(r);
            }
        }
    }
    for r in &mut resources {
        rewrite(r, &map);
    }
    resources
}
