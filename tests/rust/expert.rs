//! Whole experts: half-precision decoded values, the many-stream decoder against one stream at a
//! time, and the expert file (built, parsed, hostile headers).

mod common;

use std::collections::HashMap;

use common::{gaussian_like, reference};
use compeft::expert::{serialize_expert, ExpertFile, Payload, PACK_KEY};
use compeft::pack::{write_pack, Pack};
use compeft::{compress, decode_many, Compressed, Encoding, Error, Tensor, TensorMut};
use half::{bf16, f16};

/// Counts the bytes each thread holds and the most it held, so that a test can show that a
/// parse refused its input without allocating what the input asked for.
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Counting;

    thread_local! {
        static LIVE: Cell<usize> = const { Cell::new(0) };
        static PEAK: Cell<usize> = const { Cell::new(0) };
    }

    fn add(n: usize) {
        let _ = LIVE.try_with(|l| {
            l.set(l.get() + n);
            let _ = PEAK.try_with(|p| p.set(p.get().max(l.get())));
        });
    }

    fn sub(n: usize) {
        let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(n)));
    }

    // SAFETY: every call is passed to the system allocator unchanged; the counters are
    // const-initialised thread locals without destructors, so touching them never allocates.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            add(l.size());
            unsafe { System.alloc(l) }
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            add(l.size());
            unsafe { System.alloc_zeroed(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            sub(l.size());
            unsafe { System.dealloc(p, l) }
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            add(new);
            sub(l.size());
            unsafe { System.realloc(p, l, new) }
        }
    }

    /// The most this thread held above what it held when `f` started.
    pub fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
        let base = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(base));
        let r = f();
        (r, PEAK.with(Cell::get) - base)
    }
}

#[global_allocator]
static ALLOC: counting::Counting = counting::Counting;

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
            f16::from_f32(c.scale() as f32).to_f64(),
            bf16::from_f32(c.scale() as f32).to_f64(),
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
        .map(|c| vec![f32::NAN; c.numel() as usize])
        .collect();
    let mut many64: Vec<Vec<f64>> = streams
        .iter()
        .map(|c| vec![f64::NAN; c.numel() as usize])
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
        let mut one = vec![0f64; c.numel() as usize];
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
        .map(|c| vec![0.0; c.numel() as usize])
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

/// The streams under the names "0", "1", ... and a raw 2 x 3 float32 tensor "head".
fn with_head<'a>(streams: &'a [Compressed], raw: &'a [u8]) -> Vec<(String, Payload<'a>)> {
    let mut items: Vec<(String, Payload<'a>)> = streams
        .iter()
        .enumerate()
        .map(|(i, c)| (i.to_string(), Payload::Stream(c)))
        .collect();
    items.push((
        "head".into(),
        Payload::Raw {
            dtype: safetensors::Dtype::F32,
            shape: vec![2, 3],
            data: raw,
        },
    ));
    items
}

#[test]
fn expert_file_round_trip() {
    let streams = expert_streams();
    let raw: Vec<u8> = (0u8..24).collect();
    let items = with_head(&streams, &raw);
    let md = HashMap::from([("format".to_string(), "compeft".to_string())]);
    let bytes = serialize_expert(&items, md.clone()).unwrap();
    let f = ExpertFile::from_vec(bytes.clone()).unwrap();
    assert_eq!(f.metadata(), &md);
    assert_eq!(f.tensor_bytes("head").unwrap(), &raw[..]);
    let keys: Vec<String> = (0..streams.len()).map(|i| i.to_string()).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    assert_eq!(f.streams(&refs).unwrap(), streams);
    // A raw tensor is not a stream, a packed stream not a raw tensor.
    assert!(matches!(f.stream("head"), Err(Error::Malformed(_))));
    assert!(f.tensor_bytes("3").is_err());
    // The bytes are a safetensors file any reader opens: the streams are one U8 tensor.
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(names, ["head", PACK_KEY]);
    let pack = st.tensor(PACK_KEY).unwrap();
    assert_eq!(pack.dtype(), safetensors::Dtype::U8);
    let p = Pack::parse(pack.data()).unwrap();
    let pkeys: Vec<&str> = p.entries().iter().map(|e| e.key.as_str()).collect();
    assert_eq!(pkeys, refs);
    for (i, c) in streams.iter().enumerate() {
        assert_eq!(&p.stream(pack.data(), i).unwrap(), c);
        // Header and payload are the stream's own bytes less magic, version and checksum.
        let whole = c.to_bytes();
        assert_eq!(p.stream_nbytes(i), whole.len() - 9);
        assert_eq!(f.entries()[&i.to_string()].nbytes, whole.len() - 9);
    }
    // Files written before the pack (version 2: one U8 tensor per stream) still read.
    let old: Vec<(String, Vec<u8>)> = streams
        .iter()
        .enumerate()
        .map(|(i, c)| (i.to_string(), c.to_bytes()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = old
        .iter()
        .map(|(k, b)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![b.len()], b);
            (k.clone(), v.unwrap())
        })
        .collect();
    let v2 = safetensors::tensor::serialize(views, None).unwrap();
    let f2 = ExpertFile::from_vec(v2).unwrap();
    assert_eq!(f2.streams(&refs).unwrap(), streams);
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

/// One expert serialised many times (each time with a new metadata map, whose iteration order
/// is random) gives one byte string, with its header's keys sorted; it still reads back.
#[test]
fn an_expert_serialises_to_the_same_bytes_every_time() {
    let streams = expert_streams();
    let raw: Vec<u8> = (0u8..24).collect();
    let items = with_head(&streams, &raw);
    let md = || {
        HashMap::from([
            ("format".to_string(), "compeft".to_string()),
            ("compeft".to_string(), "{}".to_string()),
            ("b".to_string(), "2".to_string()),
            ("a".to_string(), "1".to_string()),
        ])
    };
    let first = serialize_expert(&items, md()).unwrap();
    for _ in 0..20 {
        assert_eq!(serialize_expert(&items, md()).unwrap(), first);
    }
    let n = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&first[8..8 + n]).unwrap();
    let at = |k: &str| header.find(&format!("\"{k}\"")).unwrap();
    assert!(at("a") < at("b") && at("b") < at("compeft") && at("compeft") < at("format"));
    let f = ExpertFile::from_vec(first.clone()).unwrap();
    assert_eq!(f.metadata(), &md());
    assert!(safetensors::SafeTensors::deserialize(&first).is_ok());
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
    // A flipped byte in the pack is caught by its checksum when the file is opened.
    let mut b = bytes.clone();
    let last = b.len() - 10;
    b[last] ^= 0x40;
    assert!(matches!(
        ExpertFile::from_vec(b),
        Err(Error::ChecksumMismatch { .. })
    ));
}

/// A pack with a valid checksum over whatever `body` holds.
fn sealed(body: &[u8]) -> Vec<u8> {
    let mut b = body.to_vec();
    b.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    b
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A pack built by hand from an index (inflated) and the payload bytes, with a valid checksum.
fn hand_pack(count: u64, index: &[u8], payloads: &[u8]) -> Vec<u8> {
    let z = miniz_oxide::deflate::compress_to_vec(index, 6);
    let mut b = b"CPFK\x01".to_vec();
    put_varint(&mut b, count);
    put_varint(&mut b, z.len() as u64);
    b.extend_from_slice(&z);
    b.extend_from_slice(payloads);
    sealed(&b)
}

#[test]
fn hostile_stream_packs_are_errors_not_panics() {
    let streams = expert_streams();
    let items: Vec<(String, &Compressed)> = streams
        .iter()
        .enumerate()
        .map(|(i, c)| (i.to_string(), c))
        .collect();
    let refs: Vec<(&str, &Compressed)> = items.iter().map(|(k, c)| (k.as_str(), *c)).collect();
    let good = write_pack(&refs).unwrap();
    assert!(Pack::parse(&good).is_ok());
    // Every truncation (the checksum, or a length check, refuses it).
    for cut in 0..good.len() {
        assert!(Pack::parse(&good[..cut]).is_err(), "cut {cut}");
    }
    // Same bytes under a valid checksum but a lying count, version or trailing bytes.
    let body = &good[..good.len() - 4];
    let mut b = body.to_vec();
    b[4] = 2;
    assert!(Pack::parse(&sealed(&b))
        .unwrap_err()
        .to_string()
        .contains("version 2"));
    let mut b = body.to_vec();
    b.push(0);
    assert!(Pack::parse(&sealed(&b))
        .unwrap_err()
        .to_string()
        .contains("unexpected bytes"));
    // One stream: key "0", the head of streams[0], its payload length.
    let c = &streams[0];
    let mut head = Vec::new();
    c.write_head(&mut head);
    let mut payload = Vec::new();
    c.write_payload(&mut payload);
    let entry = |plen: u64, extra_head: &[u8]| {
        let mut ix = vec![1u8, b'0'];
        put_varint(&mut ix, (head.len() + extra_head.len()) as u64);
        ix.extend_from_slice(&head);
        ix.extend_from_slice(extra_head);
        put_varint(&mut ix, plen);
        ix
    };
    let ok = hand_pack(1, &entry(payload.len() as u64, &[]), &payload);
    let p = Pack::parse(&ok).unwrap();
    assert_eq!(&p.stream(&ok, 0).unwrap(), c);
    // More streams announced than the index holds; a count no index can hold.
    assert!(Pack::parse(&hand_pack(2, &entry(payload.len() as u64, &[]), &payload)).is_err());
    assert!(Pack::parse(&hand_pack(
        u64::MAX,
        &entry(payload.len() as u64, &[]),
        &payload
    ))
    .is_err());
    // A payload length past the end, or short of it.
    let e = Pack::parse(&hand_pack(
        1,
        &entry(payload.len() as u64 + 1, &[]),
        &payload,
    ))
    .unwrap_err();
    assert!(matches!(e, Error::Truncated { .. }), "{e}");
    assert!(Pack::parse(&hand_pack(
        1,
        &entry(payload.len() as u64 - 1, &[]),
        &payload
    ))
    .is_err());
    // A header with a byte too many parses as a pack but not as a stream.
    let extra = hand_pack(1, &entry(payload.len() as u64, &[0]), &payload);
    let p = Pack::parse(&extra).unwrap();
    assert!(p
        .stream(&extra, 0)
        .unwrap_err()
        .to_string()
        .contains("after the stream header"));
    // An index that is not deflate data.
    let mut b = b"CPFK\x01\x01\x04".to_vec();
    b.extend_from_slice(&[0xff; 4]);
    assert!(Pack::parse(&sealed(&b))
        .unwrap_err()
        .to_string()
        .contains("inflate"));
    // A deflate bomb: 64 MiB of zeros in 64 kB of index. Deflate's own bound (1032x) let it
    // inflate whole before the index was found wrong; the index bound refuses it after 2 MB.
    let bomb = miniz_oxide::deflate::compress_to_vec(&vec![0u8; 64 << 20], 9);
    let mut b = b"CPFK\x01\x01".to_vec();
    put_varint(&mut b, bomb.len() as u64);
    b.extend_from_slice(&bomb);
    let b = sealed(&b);
    let limit = compeft::pack::index_limit(bomb.len(), 0);
    assert!(limit < 4 << 20, "{limit}");
    let (r, peak) = counting::peak_during(|| Pack::parse(&b));
    let e = r.unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("inflates past {limit} bytes")),
        "{e}"
    );
    // The output grows by doubling, and a reallocation briefly holds both buffers.
    assert!(peak < 4 * limit, "parse held {peak} bytes");
    // A count no index of these bytes can hold is refused before inflating.
    let mut b = b"CPFK\x01".to_vec();
    put_varint(&mut b, 1 << 40);
    put_varint(&mut b, bomb.len() as u64);
    b.extend_from_slice(&bomb);
    let (r, peak) = counting::peak_during(|| Pack::parse(&sealed(&b)));
    assert!(r.unwrap_err().to_string().contains("more than its"));
    assert!(peak < 1 << 20, "parse held {peak} bytes");
    // The writer refuses what readers would: thousands of empty streams under long keys.
    let empty = compress(Tensor::F32(&[]), &[0; 8], 0.1, 1.0, Encoding::Golomb).unwrap();
    let keys: Vec<String> = (0..5000).map(|i| format!("{:0>200}", i)).collect();
    let many: Vec<(&str, &Compressed)> = keys.iter().map(|k| (k.as_str(), &empty)).collect();
    let e = write_pack(&many).unwrap_err();
    assert!(e.to_string().contains("a reader accepts"), "{e}");
    // Real experts are far below the bound: thousands of empty 8-dimensional streams under
    // decimal keys (the worst case measured) write and read back.
    let empty8 = compress(
        Tensor::F32(&[]),
        &[0, 3, 3, 3, 3, 3, 3, 3],
        0.1,
        1.0,
        Encoding::Golomb,
    )
    .unwrap();
    let keys: Vec<String> = (0..5000).map(|i| i.to_string()).collect();
    let many: Vec<(&str, &Compressed)> = keys.iter().map(|k| (k.as_str(), &empty8)).collect();
    let p = write_pack(&many).unwrap();
    assert_eq!(Pack::parse(&p).unwrap().entries().len(), 5000);
    // A pack key that is also a raw tensor's key.
    let raw = [0u8; 4];
    let items = [
        ("0".to_string(), Payload::Stream(c)),
        (
            "x".to_string(),
            Payload::Raw {
                dtype: safetensors::Dtype::F32,
                shape: vec![1],
                data: &raw,
            },
        ),
    ];
    let bytes = serialize_expert(&items, HashMap::new()).unwrap();
    assert!(ExpertFile::from_vec(bytes).is_ok());
    let clash = [
        ("0".to_string(), Payload::Stream(c)),
        (
            "0".to_string(),
            Payload::Raw {
                dtype: safetensors::Dtype::F32,
                shape: vec![1],
                data: &raw,
            },
        ),
    ];
    let Err(e) = ExpertFile::from_vec(serialize_expert(&clash, HashMap::new()).unwrap()) else {
        panic!("a key both packed and raw was accepted");
    };
    assert!(e.to_string().contains("both in the stream pack"), "{e}");
    let reserved = [(
        PACK_KEY.to_string(),
        Payload::Raw {
            dtype: safetensors::Dtype::F32,
            shape: vec![1],
            data: &raw,
        },
    )];
    assert!(serialize_expert(&reserved, HashMap::new()).is_err());
}

/// A file is read when it is opened: truncating it or changing its bytes afterwards (another
/// process rewriting it in place) changes nothing the reader returns. A mapped file truncated
/// under the reader killed the process with SIGBUS.
#[test]
#[cfg(unix)]
fn an_open_expert_file_does_not_see_later_changes() {
    let streams = expert_streams();
    let raw: Vec<u8> = (0u8..24).collect();
    let items = with_head(&streams, &raw);
    let bytes = serialize_expert(&items, HashMap::new()).unwrap();
    let dir = std::env::temp_dir().join(format!("compeft-open-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("e.cpft.safetensors");
    let keys: Vec<String> = (0..streams.len()).map(|i| i.to_string()).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    for change in ["truncate", "rewrite"] {
        std::fs::write(&path, &bytes).unwrap();
        let f = ExpertFile::open(&path).unwrap().unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        if change == "truncate" {
            file.set_len(100).unwrap();
        } else {
            // The same length, every byte after the header flipped, in place.
            use std::os::unix::fs::FileExt;
            let n = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let flipped: Vec<u8> = bytes[n..].iter().map(|b| !b).collect();
            file.write_all_at(&flipped, n as u64).unwrap();
        }
        file.sync_all().unwrap();
        assert_eq!(f.bytes(), &bytes[..], "{change}");
        assert_eq!(f.streams(&refs).unwrap(), streams, "{change}");
        assert_eq!(f.tensor_bytes("head").unwrap(), &raw[..], "{change}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
