//! End-to-end: NDJSON through the shipped R4 sample config, order kept, no temp files left.

use std::path::PathBuf;

use deid_cli::{AnonymizeArgs, run};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn args(input: PathBuf, output: PathBuf) -> AnonymizeArgs {
    AnonymizeArgs {
        bulk: true,
        threads: Some(2),
        ..AnonymizeArgs::new(input, output, data("r4-configuration-sample.json"))
    }
}

#[test]
fn ndjson_file_and_gz() {
    let dir = std::env::temp_dir().join(format!("deid-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out.ndjson.gz");
    let s = run(&args(data("Patient-1.ndjson"), out.clone())).unwrap();
    assert!(s.resources >= 1);
    assert!(out.exists());
    let leftovers = std::fs::read_dir(&dir).unwrap().filter(|e| {
        e.as_ref()
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp")
    });
    assert_eq!(leftovers.count(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn same_input_and_output_folder_is_refused() {
    let dir = data("");
    assert!(run(&args(dir.clone(), dir)).is_err());
}

/// `--dry-run` writes no data and reports rules, untouched fields, residual PHI and risk
/// (issue 21 items 3 and 4).
#[test]
fn dry_run_reports_instead_of_writing() {
    let synthea = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthea-r4-100");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&synthea)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".json.gz"))
        .collect();
    files.sort();
    let a = AnonymizeArgs {
        input: None,
        input_arg: Some(files[0].clone()),
        output: None,
        dry_run: true,
        report_format: "json".into(),
        k: 2,
        ..AnonymizeArgs::new(
            PathBuf::new(),
            PathBuf::new(),
            data("r4-configuration-sample.json"),
        )
    };
    let s = run(&a).unwrap();
    let r = s.report.expect("report");
    assert!(r.resources > 100, "the Bundle's entries are measured");
    assert!(
        r.rules
            .iter()
            .any(|x| x.path == "Resource.id" && x.nodes >= r.resources)
    );
    assert!(
        r.unmatched_rules
            .iter()
            .any(|i| r.rules[*i].path == "Bundle.entry.fullUrl")
    );
    // The sample configuration keeps Patient.gender and Organization telecoms.
    assert!(
        r.untouched_fields["Patient"]
            .iter()
            .any(|f| f.field == "gender")
    );
    assert!(
        r.residual_phi
            .iter()
            .any(|x| x.resource_type == "Organization" && x.category == "phone")
    );
    assert_eq!(r.risk.patients, 1);
    assert_eq!(r.risk.k, 2);
    assert_eq!(r.risk.patients_below_k, 1);
    // Quasi-identifiers are checked.
    let bad = AnonymizeArgs {
        quasi_identifiers: vec!["shoeSize".into()],
        ..a
    };
    assert!(run(&bad).unwrap_err().to_string().contains("shoeSize"));
}

/// The entries of the first Synthea Bundles as NDJSON lines (`n` lines or fewer).
fn synthea_lines(n: usize) -> Vec<String> {
    use std::io::Read;
    let synthea = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthea-r4-100");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&synthea)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".json.gz"))
        .collect();
    files.sort();
    let mut lines = Vec::new();
    for f in files {
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(std::fs::File::open(f).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        let bundle: serde_json::Value = serde_json::from_str(&text).unwrap();
        for e in bundle["entry"].as_array().unwrap() {
            lines.push(e["resource"].to_string());
            if lines.len() == n {
                return lines;
            }
        }
    }
    lines
}

/// The sample configuration with fixed keys (its empty keys draw random ones per engine).
fn fixed_key_config(dir: &std::path::Path) -> PathBuf {
    let mut c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data("r4-configuration-sample.json")).unwrap(),
    )
    .unwrap();
    c["parameters"]["cryptoHashKey"] = "test-hash-key".into();
    c["parameters"]["encryptKey"] = "0123456789abcdef0123456789abcdef".into();
    c["parameters"]["dateShiftKey"] = "test-shift-key".into();
    let p = dir.join("config.json");
    std::fs::write(&p, c.to_string()).unwrap();
    p
}

/// NDJSON of several batches: the reader, worker and writer threads give the bytes, line order
/// and counts of one thread (issue 24: the threads now overlap reading, anonymizing and writing).
#[test]
fn threads_write_what_one_thread_writes() {
    let dir = std::env::temp_dir().join(format!("deid-cli-threads-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = fixed_key_config(&dir);
    let lines = synthea_lines(5_000);
    assert!(lines.len() > 3_000, "several batches of 1,024 lines");
    let input = dir.join("in.ndjson");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let mut outputs = Vec::new();
    for threads in [1, 2, 3] {
        let out = dir.join(format!("out-{threads}.ndjson"));
        let s = run(&AnonymizeArgs {
            bulk: true,
            threads: Some(threads),
            ..AnonymizeArgs::new(input.clone(), out.clone(), config.clone())
        })
        .unwrap();
        assert_eq!(s.resources, lines.len() as u64);
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text.lines().count(), lines.len());
        outputs.push((text, s.rule_hits));
    }
    // Same order: the n-th output line is the n-th input resource (ids are hashed, types kept).
    let first = &outputs[0].0;
    for (l, input) in first.lines().zip(&lines) {
        let (a, b): (serde_json::Value, serde_json::Value) = (
            serde_json::from_str(l).unwrap(),
            serde_json::from_str(input).unwrap(),
        );
        assert_eq!(a["resourceType"], b["resourceType"]);
    }
    for (text, hits) in &outputs[1..] {
        assert!(text == first, "output differs from one thread's");
        assert_eq!(hits, &outputs[0].1);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A bad line in a late batch fails the run with its line number, whatever the thread count,
/// and leaves neither the output nor a temporary file.
#[test]
fn a_bad_line_in_a_late_batch_fails_with_its_number() {
    let dir = std::env::temp_dir().join(format!("deid-cli-badline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = fixed_key_config(&dir);
    let mut lines = synthea_lines(3_000);
    lines[2_499] = "{\"resourceType\": \"Patient\", ".into();
    lines[2_800] = "not json either".into();
    let input = dir.join("in.ndjson");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    for threads in [1, 2, 4] {
        let out = dir.join("out.ndjson");
        let e = run(&AnonymizeArgs {
            bulk: true,
            threads: Some(threads),
            ..AnonymizeArgs::new(input.clone(), out.clone(), config.clone())
        })
        .unwrap_err();
        assert!(e.to_string().contains(":2500:"), "{threads} threads: {e}");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("out"))
            .collect();
        assert!(left.is_empty(), "{threads} threads left {left:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A gzip member of one line longer than the limit, without a newline.
fn endless_line_gz(path: &std::path::Path) {
    use std::io::Write;
    let f = std::fs::File::create(path).unwrap();
    let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..(deid_cli::MAX_LINE_BYTES >> 20) + 1 {
        gz.write_all(&chunk).unwrap();
    }
    gz.finish().unwrap();
}

/// Security review: a gzip bomb of one line without a newline aborted `anonymize -b` (and its
/// dry run) with a huge allocation; an over-long line is now a bad line with its number.
#[test]
fn an_over_long_line_is_a_bad_line() {
    let dir = Scratch::new("bomb");
    let input = dir.path().join("bomb.ndjson.gz");
    endless_line_gz(&input);
    for threads in [1, 2] {
        let e = run(&AnonymizeArgs {
            threads: Some(threads),
            ..args(input.clone(), dir.path().join("out.ndjson"))
        })
        .unwrap_err();
        assert!(
            e.to_string().contains(":1: ") && e.to_string().contains("longer than"),
            "{threads} threads: {e}"
        );
        assert!(!dir.path().join("out.ndjson").exists());
    }
    let e = run(&AnonymizeArgs {
        output: None,
        dry_run: true,
        ..args(input, PathBuf::new())
    })
    .unwrap_err();
    assert!(e.to_string().contains("longer than"), "dry run: {e}");
}

/// Runs `f` on another thread, failing (not hanging) after a minute: a FIFO input used to
/// block `anonymize` forever.
#[cfg(unix)]
fn within_a_minute<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("finished within a minute")
}

/// Security review: `-r` followed a link to `.` (41 nested copies, or no end with two), and
/// links out of the input folder; a FIFO with an input's name hung the run.
#[cfg(unix)]
#[test]
fn a_recursive_walk_follows_no_link_and_opens_only_regular_files() {
    use std::os::unix::fs::symlink;
    let dir = Scratch::new("links");
    let (input, outside, out) = (
        dir.path().join("in"),
        dir.path().join("outside"),
        dir.path().join("out"),
    );
    std::fs::create_dir_all(input.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let patient = std::fs::read(data("Patient-1.ndjson")).unwrap();
    std::fs::write(input.join("a.ndjson"), &patient).unwrap();
    std::fs::write(input.join("sub/b.ndjson"), &patient).unwrap();
    std::fs::write(outside.join("secret.ndjson"), &patient).unwrap();
    symlink(".", input.join("loop")).unwrap();
    symlink("..", input.join("sub/up")).unwrap();
    symlink(&outside, input.join("ext")).unwrap();
    symlink(outside.join("secret.ndjson"), input.join("link.ndjson")).unwrap();
    let fifo = input.join("fifo.ndjson");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let a = AnonymizeArgs {
        recursive: true,
        ..args(input.clone(), out.clone())
    };
    let s = within_a_minute(move || run(&a)).unwrap();
    assert_eq!(s.files, 2);
    let mut written: Vec<_> = walk(&out);
    written.sort();
    assert_eq!(written, vec!["a.ndjson", "sub/b.ndjson"]);
    let mut skipped: Vec<_> = s
        .skipped
        .iter()
        .map(|k| {
            let rel = k.path.strip_prefix(&input).unwrap();
            format!("{} {}", rel.display(), k.reason)
        })
        .collect();
    skipped.sort();
    assert_eq!(
        skipped,
        vec![
            "ext a symbolic link (not followed)",
            "fifo.ndjson not a regular file",
            "link.ndjson a symbolic link (not followed)",
            "loop a symbolic link (not followed)",
            "sub/up a symbolic link (not followed)",
        ]
    );
    assert!(s.to_string().contains("warning: skipped"));
    // Named as the input by the user (`-i <(zcat …)`), a FIFO is read: they write to it.
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            std::fs::write(&fifo, "{\"resourceType\":\"Patient\",\"id\":\"f\"}\n").unwrap()
        })
    };
    let a = args(fifo, dir.path().join("fifo-out.ndjson"));
    let s = within_a_minute(move || run(&a)).unwrap();
    writer.join().unwrap();
    assert_eq!(s.resources, 1, "{s}");
    // A socket or device named as the input is refused, never opened.
    let a = args("/dev/null".into(), dir.path().join("null-out.ndjson"));
    let e = within_a_minute(move || run(&a)).unwrap_err();
    assert!(
        matches!(e, deid_cli::CliError::NotRegularFile { .. }),
        "{e}"
    );
}

/// Files under `dir`, relative, `/`-separated (no link is followed).
#[cfg(unix)]
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()).into_iter().map(|n| format!("{name}/{n}")));
        } else {
            out.push(name);
        }
    }
    out
}

/// A fresh folder under the system's temporary folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("deid-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
