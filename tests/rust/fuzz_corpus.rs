//! Replays the committed fuzz corpora (rust/fuzz/corpus/<target>/, minimised by cargo fuzz cmin,
//! crash reproducers included) through the same checks the fuzz targets run, on stable Rust.

#[path = "../../rust/fuzz/fuzz_targets/checks.rs"]
mod checks;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(r.is_ok(), "{target}: {} fails its check", path.display());
        n += 1;
    }
    assert!(n > 0, "{target}: empty corpus in {}", dir.display());
}

#[test]
fn stream_corpus() {
    replay("stream", checks::stream);
}

#[test]
fn convert_corpus() {
    replay("convert", checks::convert);
}

#[test]
fn popcount_corpus() {
    replay("popcount", checks::popcount);
}

#[test]
fn expert_corpus() {
    replay("expert", checks::expert);
}
