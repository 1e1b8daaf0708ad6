//! The byte format: golden files pin it, and damaged bytes give errors, never panics.

mod common;

use std::path::PathBuf;

use common::gaussian_like;
use compeft::{compress, Compressed, Encoding, Error, Tensor, TensorMut};
use half::{bf16, f16};
use proptest::prelude::*;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden")
}

/// The inputs behind the golden files. Python's tests rebuild the same inputs independently.
fn golden_cases() -> Vec<(&'static str, Compressed)> {
    let g = gaussian_like(64 * 48, 7);
    let f32v: Vec<f32> = g.iter().map(|&x| x as f32).collect();
    let big: Vec<f32> = gaussian_like(50_000, 11)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let h: Vec<u16> = (0..37)
        .map(|i| f16::from_f64(((i * 13 % 37) as f64 - 18.0) / 8.0).to_bits())
        .collect();
    let b: Vec<u16> = (0..40)
        .map(|i| bf16::from_f64(((i % 5) as f64 - 2.0) * 0.5).to_bits())
        .collect();
    let d: Vec<f64> = (0..10).map(|i| (i as f64 - 4.5) * 1e-3).collect();
    // Two rows in three untouched, as in a fine-tune's word embeddings: coded by rows.
    let rows: Vec<f32> = gaussian_like(40 * 64, 5)
        .iter()
        .enumerate()
        .map(|(i, &x)| if (i / 64) % 3 == 0 { x as f32 } else { 0.0 })
        .collect();
    // Two blocks, the first row empty: the block index's first pair counts from row 3's start.
    let rows2: Vec<f32> = gaussian_like(300 * 128, 9)
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let r = i / 128;
            if r % 3 == 0 && r > 0 {
                x as f32
            } else {
                0.0
            }
        })
        .collect();
    vec![
        (
            "f32_300x128_k0.2_rows",
            compress(Tensor::F32(&rows2), &[300, 128], 0.2, 1.0, Encoding::Golomb).unwrap(),
        ),
        (
            "f32_40x64_k0.1_rows",
            compress(Tensor::F32(&rows), &[40, 64], 0.1, 1.0, Encoding::Golomb).unwrap(),
        ),
        (
            "f32_64x48_k0.1_golomb",
            compress(Tensor::F32(&f32v), &[64, 48], 0.1, 1.0, Encoding::Golomb).unwrap(),
        ),
        (
            "f32_64x48_k0.1_bitmask",
            compress(Tensor::F32(&f32v), &[64, 48], 0.1, 1.0, Encoding::Bitmask).unwrap(),
        ),
        (
            "f32_50000_k0.2_golomb",
            compress(Tensor::F32(&big), &[50_000], 0.2, 2.5, Encoding::Golomb).unwrap(),
        ),
        (
            "f16_37_k0.3_golomb",
            compress(Tensor::F16(&h), &[37], 0.3, 1.0, Encoding::Golomb).unwrap(),
        ),
        (
            "bf16_4x10_k0.5_golomb",
            compress(Tensor::BF16(&b), &[4, 10], 0.5, 1.0, Encoding::Golomb).unwrap(),
        ),
        (
            "f64_2x5_k1_bitmask",
            compress(Tensor::F64(&d), &[2, 5], 1.0, 1.0, Encoding::Bitmask).unwrap(),
        ),
        (
            "f32_0x3_golomb",
            compress(Tensor::F32(&[]), &[0, 3], 0.1, 1.0, Encoding::Golomb).unwrap(),
        ),
    ]
}

#[test]
fn golden_files_pin_the_format() {
    let bless = std::env::var_os("COMPEFT_BLESS").is_some();
    for (name, c) in golden_cases() {
        let path = golden_dir().join(format!("{name}.cpft"));
        let bytes = c.to_bytes();
        if bless {
            std::fs::write(&path, &bytes).unwrap();
            continue;
        }
        let want = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (COMPEFT_BLESS=1 writes it)", path.display()));
        // A change of layout needs a new format version; a deliberate change of what the encoder
        // picks (the scale's last bits, b) is blessed with COMPEFT_BLESS=1 and said in the commit.
        assert!(
            bytes == want,
            "{name}: encoder output differs from the golden file (layout change: new version; deliberate encoder change: COMPEFT_BLESS=1)"
        );
        assert_eq!(Compressed::from_bytes(&want).unwrap(), c);
        let code = if name.ends_with("_rows") {
            2
        } else if name.ends_with("_bitmask") {
            1
        } else {
            0
        };
        assert_eq!(want[5], code, "{name}: encoding byte");
    }
}

#[test]
fn header_layout() {
    let c = compress(
        Tensor::F32(&[0.5, -2.0, 1.0, 0.0]),
        &[2, 2],
        0.5,
        1.0,
        Encoding::Golomb,
    )
    .unwrap();
    let b = c.to_bytes();
    assert_eq!(&b[..4], b"CPFT");
    assert_eq!(b[4], 1, "version");
    assert_eq!(b[5], 0, "golomb");
    assert_eq!(b[6], 3, "float32");
    assert_eq!(b[7], 2, "ndim");
    assert_eq!(&b[8..12], &[2, 2, 4, 2], "shape, numel, nnz as varints");
    assert_eq!(f64::from_le_bytes(b[12..20].try_into().unwrap()), c.scale());
    let crc = u32::from_le_bytes(b[b.len() - 4..].try_into().unwrap());
    assert_eq!(crc, crc32fast::hash(&b[..b.len() - 4]));
}

fn sample() -> Vec<u8> {
    let v: Vec<f32> = gaussian_like(20_000, 4).iter().map(|&x| x as f32).collect();
    compress(Tensor::F32(&v), &[20_000], 0.3, 1.0, Encoding::Golomb)
        .unwrap()
        .to_bytes()
}

#[test]
fn every_truncation_is_an_error() {
    let b = sample();
    for len in 0..b.len() {
        assert!(
            Compressed::from_bytes(&b[..len]).is_err(),
            "prefix of {len} bytes was accepted"
        );
    }
}

#[test]
fn every_single_bit_flip_is_caught() {
    let b = sample();
    for byte in (0..b.len()).step_by(7) {
        for bit in 0..8 {
            let mut m = b.clone();
            m[byte] ^= 1 << bit;
            assert!(
                Compressed::from_bytes(&m).is_err(),
                "flip at {byte}.{bit} was accepted"
            );
        }
    }
}

#[test]
fn specific_errors() {
    let b = sample();
    assert_eq!(
        Compressed::from_bytes(b"hello world, not a stream").unwrap_err(),
        Error::BadMagic
    );
    let mut v = b.clone();
    v[4] = 9;
    assert_eq!(
        Compressed::from_bytes(&v).unwrap_err(),
        Error::UnsupportedVersion(9)
    );
    let mut v = b.clone();
    v[40] ^= 0x10;
    assert!(matches!(
        Compressed::from_bytes(&v).unwrap_err(),
        Error::ChecksumMismatch { .. }
    ));
    let mut v = b.clone();
    v.push(0);
    assert!(Compressed::from_bytes(&v).is_err());
}

/// Rewrites the checksum so that a mutation reaches the structural checks behind it.
fn refresh_crc(b: &mut [u8]) {
    let n = b.len() - 4;
    let crc = crc32fast::hash(&b[..n]);
    b[n..].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn huge_claimed_sizes_do_not_allocate() {
    // numel claimed as 2^47 with a tiny payload: golomb with nnz=0 is legal, but decoding into a
    // caller buffer of the wrong size is refused, and masks() reports out of memory or succeeds.
    let mut b = b"CPFT\x01\x00\x03\x01".to_vec();
    let put = |v: u64, out: &mut Vec<u8>| {
        let mut v = v;
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    };
    put(1 << 47, &mut b);
    put(1 << 47, &mut b);
    put(5, &mut b); // nnz = 5 but no gap codes follow
    b.extend_from_slice(&1.0f64.to_le_bytes());
    b.extend_from_slice(&[3, 12, 0, 0]);
    b.extend_from_slice(&[0; 4]);
    refresh_crc(&mut b);
    assert!(Compressed::from_bytes(&b).is_err());
}

#[test]
fn a_golomb_stream_without_nonzeros_has_no_gap_bits() {
    // An all-zero tensor: nnz = 0, gap_bits = 0, no index, no payload. The same stream with gap
    // bits (and the bytes they announce) would be a second byte form of it: refused.
    let good = compress(Tensor::F32(&[0.0; 10]), &[10], 0.1, 1.0, Encoding::Golomb)
        .unwrap()
        .to_bytes();
    assert!(Compressed::from_bytes(&good).is_ok());
    // magic 4, version, encoding, dtype, ndim, shape, numel, nnz, scale 8, rice_b, block_log2:
    // gap_bits at 21, index_len at 22, then the (empty) payload.
    assert_eq!(&good[17..23], &[0, 0, 0, 12, 0, 0]);
    for (bits, bytes) in [(1u8, 1usize), (8, 1), (9, 2)] {
        let mut b = good[..23].to_vec();
        b[21] = bits;
        b.extend(std::iter::repeat_n(0u8, bytes));
        b.extend_from_slice(&[0; 4]);
        refresh_crc(&mut b);
        let e = Compressed::from_bytes(&b).unwrap_err();
        assert!(
            matches!(&e, Error::Malformed(m) if m.contains("no nonzeros")),
            "{bits} gap bits: {e}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Mutations that keep a valid checksum must still never panic, in parsing or decoding.
    #[test]
    fn mutated_streams_never_panic(pos in 0usize..400, val in any::<u8>(), cut in 0usize..8) {
        let v: Vec<f32> = gaussian_like(1000, 2).iter().map(|&x| x as f32).collect();
        // Rows 1, 2, 4, 5, 7, 8 untouched: coded by rows.
        let r: Vec<f32> = v.iter().enumerate().map(|(i, &x)| if (i / 100) % 3 == 0 { x } else { 0.0 }).collect();
        for (enc, v) in [(Encoding::Golomb, &v), (Encoding::Bitmask, &v), (Encoding::Golomb, &r)] {
            let mut b = compress(Tensor::F32(v), &[10, 100], 0.2, 1.0, enc).unwrap().to_bytes();
            prop_assert!(v[100] != 0.0 || b[5] == 2);
            let p = pos % (b.len() - 4);
            b[p] = val;
            let n = b.len() - cut.min(b.len() - 24);
            let mut b = b[..n].to_vec();
            refresh_crc(&mut b);
            if let Ok(c) = Compressed::from_bytes(&b) {
                if c.numel() <= 1 << 20 {
                    let mut out = vec![0f32; c.numel() as usize];
                    let _ = c.decode_into(TensorMut::F32(&mut out));
                    let _ = c.to_bitmask();
                    let _ = c.to_golomb();
                }
            }
        }
    }

    #[test]
    fn garbage_never_panics(data in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut d = data.clone();
        if d.len() >= 30 {
            d[..5].copy_from_slice(b"CPFT\x01");
            refresh_crc(&mut d);
        }
        let _ = Compressed::from_bytes(&d);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Mutations of the header and the block index of a stream with many blocks (30,000 kept
    /// entries: 8 blocks): parse, decode and the block-parallel conversion must agree or fail.
    #[test]
    fn mutated_block_index_never_panics(at in 0usize..60, val in any::<u8>(), rows in any::<bool>(), far in 0usize..400) {
        static GOOD: std::sync::OnceLock<[Vec<u8>; 2]> = std::sync::OnceLock::new();
        let good = GOOD.get_or_init(|| {
            let v: Vec<f32> = gaussian_like(150_000, 4).iter().map(|&x| x as f32).collect();
            // Two rows in three untouched, 1,500 rows of 100: coded by rows, 8 blocks.
            let r: Vec<f32> = v.iter().enumerate().map(|(i, &x)| if (i / 100) % 3 == 0 { x } else { 0.0 }).collect();
            let plain = compress(Tensor::F32(&v), &[150_000], 0.2, 1.0, Encoding::Golomb).unwrap().to_bytes();
            let by_rows = compress(Tensor::F32(&r), &[1500, 100], 0.2, 1.0, Encoding::Golomb).unwrap().to_bytes();
            assert_eq!(by_rows[5], 2);
            [plain, by_rows]
        });
        let mut b = good[rows as usize].clone();
        // Bytes 20.. run from the scale through rice_b (or cols and count_b), block_log2,
        // (count_bits,) gap_bits and index_len into the 7 index pairs (which end near byte 73);
        // a stream by rows has its row counts next.
        let p = if rows && far > 200 { 20 + far } else { 20 + at };
        b[p] = val;
        refresh_crc(&mut b);
        if let Ok(c) = Compressed::from_bytes(&b) {
            let mut out = vec![0f32; c.numel() as usize];
            let dense = c.decode_into(TensorMut::F32(&mut out));
            let masks = c.to_bitmask();
            // Both decoders run the same checks: one succeeds exactly when the other does.
            prop_assert_eq!(dense.is_ok(), masks.is_ok());
            if let Ok(m) = masks {
                let mut out2 = vec![0f32; c.numel() as usize];
                m.decode_into(TensorMut::F32(&mut out2)).unwrap();
                prop_assert_eq!(out, out2);
            }
        }
    }
}
