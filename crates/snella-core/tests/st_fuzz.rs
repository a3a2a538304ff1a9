//! Robustness of the safetensors reader (`st::parse`): property-based tests that mutate and truncate
//! valid files and build random headers, asserting that parsing never panics, that every error
//! names the file, and that whatever parses is self-consistent; and explicit tests of the common
//! failures (each error names the file and the tensor).
//!
//! The default run does 20,000 + 10,000 + 5,000 cases (a few seconds). The long run,
//! `cargo test -p snella-core --test st_fuzz -- --ignored` (the test profile: optimised, with
//! overflow checks, so that an arithmetic overflow is a panic and fails), does 3,000,000 +
//! 1,500,000 + 500,000 cases; `SNELLA_FUZZ_CASES=<n>` sets the first count (the others scale).

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use safetensors::tensor::{Dtype, TensorView};
use snella_core::st::{self, HostTensor};
use snella_core::SnellaError;
use std::collections::{BTreeMap, HashMap};

const PATH: &str = "/data/fuzz case.safetensors";

/// A valid safetensors file: up to 5 tensors of random dtype (float and not) and shape, random
/// bytes, optional metadata.
fn valid_file() -> impl Strategy<Value = Vec<u8>> {
    let dtype = prop_oneof![Just(Dtype::F32), Just(Dtype::F16), Just(Dtype::BF16), Just(Dtype::I64), Just(Dtype::U8), Just(Dtype::F64)];
    let tensor = ("[a-z][a-z0-9._]{0,10}", dtype, prop::collection::vec(0usize..5, 0..4), any::<u64>());
    let meta = prop::option::of(prop::collection::hash_map("[a-z_]{1,6}", ".{0,8}", 0..3));
    (prop::collection::vec(tensor, 0..5), meta).prop_map(|(ts, meta)| {
        let owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = ts
            .into_iter()
            .map(|(n, d, shape, seed)| {
                let len = shape.iter().product::<usize>() * d.size();
                let mut x = seed;
                let bytes = (0..len)
                    .map(|_| {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        (x >> 56) as u8
                    })
                    .collect();
                (n, d, shape, bytes)
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        let views: Vec<(String, TensorView<'_>)> = owned
            .iter()
            .filter(|(n, ..)| seen.insert(n.clone()))
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("consistent view")))
            .collect();
        safetensors::tensor::serialize(views, &meta).expect("serialize")
    })
}

/// One edit of a file's bytes.
#[derive(Clone, Debug)]
enum Mutation {
    Truncate(usize),
    FlipBit(usize, u8),
    SetByte(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    HeaderLen(u64),
    /// Replaces a run of digits inside the header with another number (offsets, shapes).
    Number(usize, u64),
    /// Replaces a dtype name in the header.
    Dtype(usize, String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let pos = any::<usize>();
    prop_oneof![
        pos.prop_map(Mutation::Truncate),
        (pos, 0u8..8).prop_map(|(p, b)| Mutation::FlipBit(p, b)),
        (pos, any::<u8>()).prop_map(|(p, v)| Mutation::SetByte(p, v)),
        (pos, prop::collection::vec(any::<u8>(), 1..9)).prop_map(|(p, v)| Mutation::Insert(p, v)),
        (pos, 1usize..16).prop_map(|(p, n)| Mutation::Delete(p, n)),
        prop_oneof![any::<u64>(), 0u64..256].prop_map(Mutation::HeaderLen),
        (pos, prop_oneof![any::<u64>(), 0u64..64, Just(u64::MAX), Just(1 << 62)]).prop_map(|(p, v)| Mutation::Number(p, v)),
        (pos, prop_oneof![Just("I64".to_string()), Just("F64".to_string()), Just("BOOL".to_string()), "[A-Z0-9_]{0,6}"]).prop_map(|(p, d)| Mutation::Dtype(p, d)),
    ]
}

fn header_range(b: &[u8]) -> Option<(usize, usize)> {
    let n = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
    (n <= b.len() - 8).then_some((8, 8 + n))
}

fn apply(b: &mut Vec<u8>, m: &Mutation) {
    let len = b.len().max(1);
    match m {
        Mutation::Truncate(p) => b.truncate(p % len),
        Mutation::FlipBit(p, bit) => {
            if !b.is_empty() {
                b[p % len] ^= 1 << bit;
            }
        }
        Mutation::SetByte(p, v) => {
            if !b.is_empty() {
                b[p % len] = *v;
            }
        }
        Mutation::Insert(p, v) => {
            let at = p % (b.len() + 1);
            b.splice(at..at, v.iter().copied());
        }
        Mutation::Delete(p, n) => {
            let at = p % len;
            let end = (at + n).min(b.len());
            if at < end {
                b.drain(at..end);
            }
        }
        Mutation::HeaderLen(v) => {
            if b.len() >= 8 {
                b[..8].copy_from_slice(&v.to_le_bytes());
            }
        }
        Mutation::Number(..) | Mutation::Dtype(..) if header_range(b).is_none() => {}
        Mutation::Number(p, v) => {
            // The header keeps its length field: the edit changes the number's width, so fix it.
            let (s, e) = header_range(b).expect("checked");
            let digits: Vec<usize> = (s..e).filter(|&i| b[i].is_ascii_digit() && (i == s || !b[i - 1].is_ascii_digit())).collect();
            if digits.is_empty() {
                return;
            }
            let at = digits[p % digits.len()];
            let end = (at..e).find(|&i| !b[i].is_ascii_digit()).unwrap_or(e);
            let new = v.to_string().into_bytes();
            let grow = new.len() as i64 - (end - at) as i64;
            b.splice(at..end, new);
            let n = (e - s) as i64 + grow;
            b[..8].copy_from_slice(&(n as u64).to_le_bytes());
        }
        Mutation::Dtype(p, d) => {
            let (s, e) = header_range(b).expect("checked");
            let text = String::from_utf8_lossy(&b[s..e]).to_string();
            let hits: Vec<usize> = text.match_indices("\"dtype\":\"").map(|(i, _)| i + 9).collect();
            if hits.is_empty() || text.len() != e - s {
                return;
            }
            let at = s + hits[p % hits.len()];
            let end = at + b[at..e].iter().position(|&c| c == b'"').unwrap_or(0);
            let grow = d.len() as i64 - (end - at) as i64;
            b.splice(at..end, d.bytes());
            b[..8].copy_from_slice(&(((e - s) as i64 + grow) as u64).to_le_bytes());
        }
    }
}

/// The property: no panic (a panic fails the case), errors name the file, successes are consistent.
fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    match st::parse(PATH, bytes) {
        Ok(f) => {
            for (name, t) in &f.tensors {
                prop_assert_eq!(t.data.len(), t.shape.iter().product::<usize>(), "tensor {}", name);
            }
            prop_assert_eq!(f.path.as_str(), PATH);
        }
        Err(e) => {
            let (file, msg) = match &e {
                SnellaError::File { file, .. } | SnellaError::Tensor { file, .. } => (file.clone(), e.to_string()),
                other => return Err(TestCaseError::fail(format!("unexpected error kind: {other}"))),
            };
            prop_assert_eq!(file.as_str(), PATH);
            prop_assert!(msg.contains(PATH), "{}", msg);
        }
    }
    Ok(())
}

/// Random JSON-ish headers: entries with random dtypes (valid and not), shapes and offsets
/// (including huge and overflowing ones), other JSON types in their place, and random data.
fn random_header_file() -> impl Strategy<Value = Vec<u8>> {
    let num = prop_oneof![0u64..40, any::<u64>(), Just(u64::MAX), Just(u64::MAX / 4), Just(1u64 << 61), Just((1u64 << 61) - 1), Just(u64::MAX - 7)];
    let jnum = num.clone().prop_map(|v| v.to_string());
    let jval = prop_oneof![
        jnum.clone(),
        Just("-1".to_string()),
        Just("1.5".to_string()),
        Just("null".to_string()),
        Just("\"x\"".to_string()),
        Just("{}".to_string()),
        Just("[]".to_string()),
    ];
    let dtype = prop_oneof![
        Just("\"F32\"".to_string()),
        Just("\"F16\"".to_string()),
        Just("\"BF16\"".to_string()),
        Just("\"I64\"".to_string()),
        Just("\"U8\"".to_string()),
        "\"[A-Z0-9]{0,5}\"",
        jval.clone(),
    ];
    let list = |v: BoxedStrategy<String>, n: std::ops::Range<usize>| prop::collection::vec(v, n).prop_map(|v| format!("[{}]", v.join(",")));
    let shape = prop_oneof![list(jnum.clone().boxed(), 0..4), list(jval.clone().boxed(), 0..3), jval.clone()];
    let offsets = prop_oneof![list(jnum.boxed(), 2..3), list(jval.clone().boxed(), 0..4), jval.clone()];
    let entry = ("[a-z.]{0,6}", dtype, shape, offsets, any::<bool>()).prop_map(|(n, d, s, o, dup)| {
        let e = format!("\"{n}\":{{\"dtype\":{d},\"shape\":{s},\"data_offsets\":{o}}}");
        if dup { format!("{e},{e}") } else { e }
    });
    let meta = prop_oneof![
        Just(String::new()),
        Just("\"__metadata__\":{\"a\":\"b\"},".to_string()),
        Just("\"__metadata__\":{\"a\":1},".to_string()),
        Just("\"__metadata__\":[],".to_string()),
    ];
    (meta, prop::collection::vec(entry, 0..4), prop::collection::vec(any::<u8>(), 0..64), any::<bool>(), any::<u8>()).prop_map(
        |(meta, entries, data, pad, junk)| {
            let mut h = format!("{{{meta}{}}}", entries.join(",")).into_bytes();
            if pad {
                h.push(b' ');
            }
            if junk == 0 {
                h.push(0xff); // not UTF-8
            }
            let mut out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend(h);
            out.extend(data);
            out
        },
    )
}

fn cases(default: u32, long: bool, scale: u32) -> u32 {
    if !long {
        return default;
    }
    std::env::var("SNELLA_FUZZ_CASES").ok().and_then(|v| v.parse::<u32>().ok()).map(|n| n / scale).unwrap_or(3_000_000 / scale)
}

fn run<S: Strategy>(n: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let mut runner = TestRunner::new(Config { cases: n, failure_persistence: None, ..Config::default() });
    runner.run(&strategy, test).unwrap();
    println!("{n} cases passed");
}

fn mutated(long: bool) {
    run(cases(20_000, long, 1), (valid_file(), prop::collection::vec(mutation(), 0..4)), |(mut b, ms)| {
        for m in &ms {
            apply(&mut b, m);
        }
        check(&b)
    });
}

fn headers(long: bool) {
    run(cases(10_000, long, 2), random_header_file(), |b| check(&b));
}

fn random_bytes(long: bool) {
    let small = (0u64..300).prop_map(|n| n.to_le_bytes().to_vec());
    let strat = (prop_oneof![small, prop::collection::vec(any::<u8>(), 0..8)], prop::collection::vec(any::<u8>(), 0..300))
        .prop_map(|(mut a, b)| {
            a.extend(b);
            a
        });
    run(cases(5_000, long, 6), strat, |b| check(&b));
}

#[test]
fn fuzz_mutated_valid_files() {
    mutated(false);
}

#[test]
fn fuzz_random_headers() {
    headers(false);
}

#[test]
fn fuzz_random_bytes() {
    random_bytes(false);
}

#[test]
#[ignore = "long run: cargo test -p snella-core --test st_fuzz -- --ignored"]
fn fuzz_mutated_valid_files_long() {
    mutated(true);
}

#[test]
#[ignore = "long run"]
fn fuzz_random_headers_long() {
    headers(true);
}

#[test]
#[ignore = "long run"]
fn fuzz_random_bytes_long() {
    random_bytes(true);
}

// ---- explicit failures: each error names the file and the tensor ----

fn sample() -> Vec<u8> {
    let mut t = BTreeMap::new();
    t.insert("blocks.0.attn.qkv.weight".to_string(), HostTensor::new(vec![3, 4], (0..12).map(|v| v as f32).collect()));
    t.insert("head.bias".to_string(), HostTensor::new(vec![2], vec![0.5, -0.5]));
    st::serialize(&t, &BTreeMap::new())
}

fn header_of(b: &[u8]) -> (usize, String) {
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    (n, String::from_utf8(b[8..8 + n].to_vec()).unwrap())
}

/// Rebuilds a file with header `h` (padded with spaces to a multiple of 8) and data `d`.
fn with_header(h: &str, d: &[u8]) -> Vec<u8> {
    let mut h = h.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(d);
    out
}

fn tensor_err(e: SnellaError) -> (String, String, String) {
    let msg = e.to_string();
    match e {
        SnellaError::Tensor { file, tensor, .. } => (file, tensor, msg),
        other => panic!("expected a tensor error, got {other}"),
    }
}

#[test]
fn truncated_file_names_file_and_tensor() {
    let b = sample();
    let (file, tensor, msg) = tensor_err(st::parse(PATH, &b[..b.len() - 4]).unwrap_err());
    assert_eq!(file, PATH);
    // Tensors are laid out by name: the last one (head.bias) is the one cut.
    assert_eq!(tensor, "head.bias", "{msg}");
    assert!(msg.contains(PATH) && msg.contains("'head.bias'") && msg.contains("truncated"), "{msg}");
    // Cut inside the header: names the file.
    let e = st::parse(PATH, &b[..20]).unwrap_err().to_string();
    assert!(e.contains(PATH) && e.contains("header length"), "{e}");
    let e = st::parse(PATH, &b[..5]).unwrap_err().to_string();
    assert!(e.contains(PATH) && e.contains("truncated"), "{e}");
    // Through st::read, the real path.
    let dir = std::env::temp_dir().join(format!("snella-st-trunc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("cut.safetensors");
    std::fs::write(&p, &b[..b.len() - 1]).unwrap();
    let e = st::read(&p).unwrap_err().to_string();
    assert!(e.contains(&p.display().to_string()) && e.contains("head.bias"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn header_lying_about_offsets_names_file_and_tensor() {
    let b = sample();
    let (n, h) = header_of(&b);
    let data = &b[8 + n..];
    // head.bias claims 8 bytes beyond the data.
    let lie = h.replace("[48,56]", "[48,64]");
    assert_ne!(lie, h, "{h}");
    let (file, tensor, msg) = tensor_err(st::parse(PATH, &with_header(&lie, data)).unwrap_err());
    assert_eq!((file.as_str(), tensor.as_str()), (PATH, "head.bias"), "{msg}");
    assert!(msg.contains("outside"), "{msg}");
    // The qkv weight claims 4 bytes fewer than its shape needs.
    let lie = h.replace("[0,48]", "[0,44]");
    let (_, tensor, msg) = tensor_err(st::parse(PATH, &with_header(&lie, data)).unwrap_err());
    assert_eq!(tensor, "blocks.0.attn.qkv.weight", "{msg}");
    assert!(msg.contains("[3, 4]") && msg.contains("48 bytes") && msg.contains("44 bytes"), "{msg}");
    // A huge shape whose byte count overflows.
    let lie = h.replace("[3,4]", "[4611686018427387904,4]");
    let (_, tensor, msg) = tensor_err(st::parse(PATH, &with_header(&lie, data)).unwrap_err());
    assert_eq!(tensor, "blocks.0.attn.qkv.weight", "{msg}");
    // Offsets whose end plus the header size overflows a usize (the `safetensors` crate's own
    // check adds them unchecked): an error naming the tensor, not a panic.
    let huge = with_header(r#"{"x":{"dtype":"I64","shape":[2305843009213693951],"data_offsets":[0,18446744073709551608]}}"#, &[]);
    let (_, tensor, msg) = tensor_err(st::parse(PATH, &huge).unwrap_err());
    assert_eq!(tensor, "x", "{msg}");
    // Overlapping tensors: a file error from the layout check, naming the file.
    let lie = h.replace("[48,56]", "[40,48]");
    let e = st::parse(PATH, &with_header(&lie, &data[..48])).unwrap_err().to_string();
    assert!(e.contains(PATH), "{e}");
}

#[test]
fn wrong_dtype_names_file_and_tensor() {
    let b = sample();
    let (n, h) = header_of(&b);
    // head.bias as I64: 8 bytes = one I64 element with shape [1].
    let h64 = h.replacen("\"dtype\":\"F32\",\"shape\":[2]", "\"dtype\":\"I64\",\"shape\":[1]", 1);
    assert_ne!(h64, h, "{h}");
    let (file, tensor, msg) = tensor_err(st::parse(PATH, &with_header(&h64, &b[8 + n..])).unwrap_err());
    assert_eq!((file.as_str(), tensor.as_str()), (PATH, "head.bias"));
    assert!(msg.contains("I64") && msg.contains("expected F32, F16 or BF16"), "{msg}");
    let hx = h.replacen("\"F32\"", "\"F33\"", 1);
    let (_, tensor, msg) = tensor_err(st::parse(PATH, &with_header(&hx, &b[8 + n..])).unwrap_err());
    assert_eq!(tensor, "blocks.0.attn.qkv.weight");
    assert!(msg.contains("unknown dtype 'F33'"), "{msg}");
}

#[test]
fn missing_tensor_and_shape_mismatch_name_file_and_tensor() {
    let mut f = st::parse(PATH, &sample()).unwrap();
    let (file, tensor, msg) = tensor_err(f.clone().take("blocks.0.attn.proj.weight", &[4, 4]).unwrap_err());
    assert_eq!((file.as_str(), tensor.as_str()), (PATH, "blocks.0.attn.proj.weight"));
    assert!(msg.contains("missing"), "{msg}");
    let (file, tensor, msg) = tensor_err(f.clone().take("blocks.0.attn.qkv.weight", &[4, 3]).unwrap_err());
    assert_eq!((file.as_str(), tensor.as_str()), (PATH, "blocks.0.attn.qkv.weight"));
    assert!(msg.contains("[3, 4]") && msg.contains("[4, 3]"), "{msg}");
    assert_eq!(f.take("head.bias", &[2]).unwrap().data, vec![0.5, -0.5]);
    let _: HashMap<String, HostTensor> = f.tensors;
}
