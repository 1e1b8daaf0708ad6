//! The checks behind each fuzz target, as plain functions: the fuzz targets call them, and
//! tests/rust/fuzz_corpus.rs replays the committed corpora through them on stable Rust.
#![allow(dead_code)]

use compeft::expert::ExpertFile;
use compeft::{compress, Compressed, Encoding, Tensor, TensorMut};

/// Parse and decode arbitrary bytes as a stream. The first byte picks whether the checksum is
/// rewritten first, so that mutations reach the structural checks behind it.
pub fn stream(data: &[u8]) {
    // Decoded outputs stay small enough for the fuzzer's memory limit.
    let _ = compeft::set_max_numel(1 << 20);
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut b = rest.to_vec();
    if mode & 1 == 1 && b.len() >= 4 {
        let n = b.len() - 4;
        let crc = crc32(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
    }
    let Ok(c) = Compressed::from_bytes(&b) else {
        return;
    };
    // A parsed stream writes back to exactly its bytes: one byte string per content.
    assert_eq!(c.to_bytes(), b, "parse -> to_bytes is not the identity");
    let mut out = vec![0f32; c.numel() as usize];
    if c.decode_into(TensorMut::F32(&mut out)).is_ok() {
        let nz = out.iter().filter(|&&x| x != 0.0).count() as u64;
        assert!(nz <= c.nnz());
        if c.scale() > 0.0 && (c.scale() as f32) > 0.0 {
            assert_eq!(nz, c.nnz(), "decoded nonzeros differ from nnz");
        }
    }
}

fn crc32(b: &[u8]) -> u32 {
    // Bitwise CRC-32 (IEEE): the harness must not trust the code under test for it.
    let mut c = !0u32;
    for &x in b {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Golomb <-> bitmask conversions and decoding on streams made from arbitrary tensors, against
/// a plain dense reference.
pub fn convert(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let k = (data[0] as f64 + 1.0) / 256.0;
    let x: Vec<f32> = data[1..]
        .chunks(2)
        .map(|c| (i16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)]) as f32) / 64.0)
        .collect();
    let n = x.len();
    // Rows of 8 where they fit, so that the encoder may code by rows.
    let shape: Vec<u64> = if n >= 16 && n % 8 == 0 {
        vec![n as u64 / 8, 8]
    } else {
        vec![n as u64]
    };
    let g = compress(Tensor::F32(&x), &shape, k, 1.0, Encoding::Golomb).unwrap();
    let m = compress(Tensor::F32(&x), &shape, k, 1.0, Encoding::Bitmask).unwrap();
    assert_eq!(g.to_bitmask().unwrap(), m);
    assert_eq!(m.to_golomb().unwrap(), g);
    let (mut dg, mut dm) = (vec![0f64; n], vec![0f64; n]);
    g.decode_into(TensorMut::F64(&mut dg)).unwrap();
    m.decode_into(TensorMut::F64(&mut dm)).unwrap();
    assert_eq!(dg, dm);
    // Every kept entry has the sign of its input, and none is kept where the input is zero.
    for (d, v) in dg.iter().zip(&x) {
        if *d != 0.0 {
            assert!(*v != 0.0 && (d.signum() == v.signum() as f64));
        }
    }
    // Both survive their own bytes.
    for c in [&g, &m] {
        assert_eq!(&compeft::Compressed::from_bytes(&c.to_bytes()).unwrap(), c);
    }
}

/// dot, cosine and hamming on pairs of streams, against the dense ternary vectors.
pub fn popcount(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let (ka, kb) = (
        (data[0] as f64 + 1.0) / 256.0,
        (data[1] as f64 + 1.0) / 256.0,
    );
    let enc = |i: u8| {
        if i & 1 == 0 {
            Encoding::Golomb
        } else {
            Encoding::Bitmask
        }
    };
    let x: Vec<f32> = data[2..].iter().map(|&v| v as i8 as f32).collect();
    let n = x.len() / 2;
    let (a, b) = (&x[..n], &x[n..2 * n]);
    let ca = compress(Tensor::F32(a), &[n as u64], ka, 1.0, enc(data[0])).unwrap();
    let cb = compress(Tensor::F32(b), &[n as u64], kb, 1.0, enc(data[1])).unwrap();
    let ternary = |c: &compeft::Compressed| {
        let mut d = vec![0f64; n];
        c.decode_into(TensorMut::F64(&mut d)).unwrap();
        d.iter()
            .map(|v| v.signum() as i64 * (*v != 0.0) as i64)
            .collect::<Vec<i64>>()
    };
    let (ta, tb) = (ternary(&ca), ternary(&cb));
    let dense_dot: i64 = ta.iter().zip(&tb).map(|(p, q)| p * q).sum();
    let dense_ham = ta.iter().zip(&tb).filter(|(p, q)| p != q).count() as u64;
    assert_eq!(compeft::hamming(&ca, &cb).unwrap(), dense_ham);
    let dot = compeft::dot(&ca, &cb).unwrap();
    let want = dense_dot as f64 * ca.scale() * cb.scale();
    assert!(
        (dot - want).abs() <= 1e-9 * want.abs().max(1e-300),
        "dot {dot} want {want}"
    );
    let cos = compeft::cosine(&ca, &cb).unwrap();
    assert!(cos.is_finite() && cos.abs() <= 1.0 + 1e-12);
    if ca.nnz() > 0 && cb.nnz() > 0 {
        let want = dense_dot as f64 / ((ca.nnz() * cb.nnz()) as f64).sqrt();
        assert!((cos - want).abs() <= 1e-12);
    }
}

/// The expert file reader on arbitrary bytes: open, list, fetch every stream and raw tensor.
pub fn expert(data: &[u8]) {
    let _ = compeft::set_max_numel(1 << 20);
    let Ok(f) = ExpertFile::from_vec(data.to_vec()) else {
        return;
    };
    let _ = f.metadata().len();
    let mut keys: Vec<&String> = f.entries().keys().collect();
    keys.sort();
    for k in &keys {
        let _ = f.tensor_bytes(k);
        if let Ok(c) = f.stream(k) {
            let mut out = vec![0f32; c.numel() as usize];
            let _ = c.decode_into(compeft::TensorMut::F32(&mut out));
        }
    }
    let refs: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    let _ = f.streams(&refs);
}
