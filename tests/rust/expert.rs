//! Whole experts: half-precision decoded values, the many-stream decoder against one stream at a
//! time, and the expert file (built, parsed, hostile headers).

mod common;

use std::collections::HashMap;

use common::{gaussian_like, reference};
use compeft::expert::{serialize_expert, ExpertFile, Payload};
use compeft::{compress, decode_many, Compressed, Encoding, Error, Tensor, TensorMut};
use half::{bf16, f16};

/// Decoded half values are sign * scale with the sign bit set for negative entries, compared
/// value by value (not through the sign masks).
#[test]
fn half_decode_writes_signed_values() {
    let g = gaussian_like(20_000, 3);
    for enc in [Encoding::Golomb, Encoding::Bitmask] {
        let c = compress(Tensor::F64(&g), &[20_000], 0.2, 1.0, enc).unwrap();
        let (signs, _) = reference(&g, 0.2);
        let mut h = vec![0u16; g.len()];
        c.decode_into(TensorMut::F16(&mut h)).unwrap();
        let mut b = vec![0u16; g.len()];
        c.decode_into(TensorMut::BF16(&mut b)).unwrap();
        let (s16, sb16) = (
            f16::from_f32(c.scale as f32).to_f64(),
            bf16::from_f32(c.scale as f32).to_f64(),
        );
        for i in 0..g.len() {
            assert_eq!(
                f16::from_bits(h[i]).to_f64(),
                signs[i] as f64 * s16,
                "f16 at {i}"
            );
            assert_eq!(
                bf16::from_bits(b[i]).to_f64(),
                signs[i] as f64 * sb16,
                "bf16 at {i}"
            );
        }
    }
}

fn expert_streams() -> Vec<Compressed> {
    // Sizes from one entry to several blocks, both encodings, one stream that keeps nothing.
    let mut out = Vec::new();
    for (i, &n) in [1usize, 7, 640, 65_536, 300_000, 4096].iter().enumerate() {
        let g = gaussian_like(n, i as u64);
        let enc = if i % 2 == 0 {
            Encoding::Golomb
        } else {
            Encoding::Bitmask
        };
        out.push(compress(Tensor::F64(&g), &[n as u64], 0.1, 1.0, enc).unwrap());
    }
    let zeros = vec![0f32; 5000];
    out.push(compress(Tensor::F32(&zeros), &[5000], 0.1, 1.0, Encoding::Golomb).unwrap());
    out
}

#[test]
fn decode_many_equals_one_stream_at_a_time() {
    let streams = expert_streams();
    let mut many: Vec<Vec<f32>> = streams
        .iter()
        .map(|c| vec![f32::NAN; c.numel as usize])
        .collect();
    let mut many64: Vec<Vec<f64>> = streams
        .iter()
        .map(|c| vec![f64::NAN; c.numel as usize])
        .collect();
    // Mixed output types in one call.
    let mut jobs: Vec<(&Compressed, TensorMut<'_>)> = Vec::new();
    for (i, (c, (o32, o64))) in streams
        .iter()
        .zip(many.iter_mut().zip(many64.iter_mut()))
        .enumerate()
    {
        jobs.push((
            c,
            if i % 2 == 0 {
                TensorMut::F32(o32)
            } else {
                TensorMut::F64(o64)
            },
        ));
    }
    decode_many(jobs).unwrap();
    for (i, c) in streams.iter().enumerate() {
        let mut one = vec![0f64; c.numel as usize];
        c.decode_into(TensorMut::F64(&mut one)).unwrap();
        if i % 2 == 0 {
            let got: Vec<f64> = many[i].iter().map(|&x| x as f64).collect();
            let want: Vec<f64> = one.iter().map(|&x| x as f32 as f64).collect();
            assert_eq!(got, want, "stream {i}");
        } else {
            assert_eq!(many64[i], one, "stream {i}");
        }
    }
}

#[test]
fn decode_many_names_the_stream_with_a_wrong_output() {
    let streams = expert_streams();
    let mut outs: Vec<Vec<f32>> = streams
        .iter()
        .map(|c| vec![0.0; c.numel as usize])
        .collect();
    outs[2].pop();
    let jobs = streams
        .iter()
        .zip(outs.iter_mut())
        .map(|(c, o)| (c, TensorMut::F32(o)))
        .collect();
    let (i, e) = decode_many(jobs).unwrap_err();
    assert_eq!(i, 2);
    assert!(matches!(e, Error::InvalidArgument(_)));
}

#[test]
fn expert_file_round_trip() {
    let streams = expert_streams();
    let raw: Vec<u8> = (0u8..24).collect();
    let mut items: Vec<(String, Payload<'_>)> = streams
        .iter()
        .enumerate()
        .map(|(i, c)| (i.to_string(), Payload::Stream(c)))
        .collect();
    items.push((
        "head".into(),
        Payload::Raw {
            dtype: safetensors::Dtype::F32,
            shape: vec![2, 3],
            data: &raw,
        },
    ));
    let md = HashMap::from([("format".to_string(), "compeft".to_string())]);
    let bytes = serialize_expert(&items, md.clone()).unwrap();
    let f = ExpertFile::from_vec(bytes.clone()).unwrap();
    assert_eq!(f.metadata(), &md);
    assert_eq!(f.tensor_bytes("head").unwrap(), &raw[..]);
    let keys: Vec<String> = (0..streams.len()).map(|i| i.to_string()).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    assert_eq!(f.streams(&refs).unwrap(), streams);
    // A raw tensor is not a stream.
    assert!(matches!(f.stream("head"), Err(Error::Malformed(_))));
    // The bytes are a safetensors file any reader opens.
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("3").unwrap().data(), &streams[3].to_bytes()[..]);
    // Wrong raw sizes are refused before anything is written.
    let bad = [(
        "x".to_string(),
        Payload::Raw {
            dtype: safetensors::Dtype::F32,
            shape: vec![5],
            data: &raw,
        },
    )];
    assert!(matches!(
        serialize_expert(&bad, HashMap::new()),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn hostile_expert_files_are_errors_not_panics() {
    let streams = expert_streams();
    let items: Vec<(String, Payload<'_>)> = streams
        .iter()
        .enumerate()
        .map(|(i, c)| (i.to_string(), Payload::Stream(c)))
        .collect();
    let bytes = serialize_expert(&items, HashMap::new()).unwrap();
    // Every truncation, and a header length that points anywhere.
    for cut in [0, 1, 7, 8, 9, 100, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            ExpertFile::from_vec(bytes[..cut].to_vec()).is_err(),
            "cut {cut}"
        );
    }
    for n in [0u64, 1, 1 << 40, u64::MAX] {
        let mut b = bytes.clone();
        b[..8].copy_from_slice(&n.to_le_bytes());
        assert!(ExpertFile::from_vec(b).is_err());
    }
    // A flipped byte in a stream is caught by that stream's checksum, when it is parsed.
    let mut b = bytes.clone();
    let last = b.len() - 10;
    b[last] ^= 0x40;
    let f = ExpertFile::from_vec(b).unwrap();
    let keys: Vec<String> = (0..streams.len()).map(|i| i.to_string()).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let (i, _) = f.streams(&refs).unwrap_err();
    assert!(i < streams.len());
}
