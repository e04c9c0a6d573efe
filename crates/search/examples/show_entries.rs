use std::io::BufRead;
use store::Indexer;
fn main() {
    let path = std::env::args().nth(1).unwrap();
    let f = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let l = f.lines().next().unwrap().unwrap();
    let r: serde_json::Value = serde_json::from_str(&l).unwrap();
    for e in search::SearchIndexer.entries(r["resourceType"].as_str().unwrap(), &r) {
        println!("{e:?}");
    }
}
