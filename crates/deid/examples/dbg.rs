fn main() {
    let d = "crates/deid/tests/corpus/cases/r4-sample-account-r4/";
    let cfg = std::fs::read_to_string(format!("{d}config.json")).unwrap();
    let e = deid::Engine::from_config_text(&cfg).unwrap();
    let o = e
        .anonymize_str(&std::fs::read_to_string(format!("{d}input.json")).unwrap())
        .unwrap();
    for (i, h) in o.rule_hits.iter().enumerate() {
        if *h > 0 {
            println!("{i} {} {h}", e.config().rules[i].path);
        }
    }
}
