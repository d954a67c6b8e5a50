//! Replays the committed decoder seed corpora (`fuzz/corpus/decode_*`) through
//! the same checks the fuzz targets make (the tunnel corpus: `sim/tests/`), so every seed stays a regression test even
//! where cargo-fuzz is not installed.

use std::path::Path;

use bytes::Bytes;
use nowconnect_core::Limits;
use nowconnect_core::codec::{v1, v2};

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn decode_v2_seeds_round_trip() {
    let limits = Limits::default();
    let mut decoded = 0;
    for (name, data) in corpus("decode_v2") {
        if let Ok(frame) = v2::decode(&Bytes::from(data), &limits) {
            let again = v2::encode(&frame, &limits).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(v2::decode(&again, &limits).unwrap(), frame, "{name}");
            decoded += 1;
        }
    }
    assert!(
        decoded > 0,
        "no v2 seed decodes: the corpus no longer matches the codec"
    );
}

#[test]
fn decode_v1_seeds_round_trip() {
    let limits = Limits::default();
    let mut decoded = 0;
    for (name, data) in corpus("decode_v1") {
        let Ok(text) = std::str::from_utf8(&data) else {
            continue;
        };
        if let Ok(frame) = v1::decode(text, &limits) {
            let again = v1::encode(&frame, &limits).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(v1::decode(&again, &limits).unwrap(), frame, "{name}");
            decoded += 1;
        }
    }
    assert!(
        decoded > 0,
        "no v1 seed decodes: the corpus no longer matches the codec"
    );
}
