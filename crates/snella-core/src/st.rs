//! safetensors I/O: reading f32/f16/bf16 tensors into f32, and atomic writing.
//!
//! Parsing and header validation are done by the `safetensors` crate; this module turns its errors
//! into [`SnellaError`]s naming the file and tensor, and writes files atomically
//! (temporary file, fsync, rename) so that a crash mid-write leaves any previous file intact.

use crate::{Result, SnellaError};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

/// One tensor held in host memory as f32, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// The shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor from a shape and its data.
    ///
    /// # Panics
    /// If `data.len()` differs from the product of `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "HostTensor shape/data mismatch");
        HostTensor { shape, data }
    }
}

/// The tensors and string metadata of a safetensors file.
#[derive(Clone, Debug, Default)]
pub struct TensorFile {
    /// The file the tensors came from (for error messages).
    pub path: String,
    /// Tensors by name, converted to f32.
    pub tensors: HashMap<String, HostTensor>,
    /// The `__metadata__` map of the header (empty when absent).
    pub metadata: HashMap<String, String>,
}

impl TensorFile {
    /// Takes tensor `name` out of the file, checking its shape.
    ///
    /// # Errors
    /// [`SnellaError::Tensor`] naming the file and tensor when it is missing or has another shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| SnellaError::tensor(&self.path, name, "missing from the file"))?;
        if t.shape != shape {
            return Err(SnellaError::tensor(
                &self.path,
                name,
                format!("has shape {:?}, the model config expects {:?}", t.shape, shape),
            ));
        }
        Ok(t)
    }

    /// A metadata value parsed as `T`, or `None` when absent.
    ///
    /// # Errors
    /// [`SnellaError::File`] when present but not parseable.
    pub fn meta<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.trim().parse::<T>().map(Some).map_err(|_| {
                SnellaError::file(&self.path, format!("metadata '{key}' = '{v}' is not a valid value"))
            }),
        }
    }
}

fn view_to_f32(path: &str, name: &str, v: &TensorView<'_>) -> Result<Vec<f32>> {
    let bytes = v.data();
    let out = match v.dtype() {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(SnellaError::tensor(path, name, format!("has dtype {other:?}; expected F32, F16 or BF16")))
        }
    };
    Ok(out)
}

/// Bytes per element of a safetensors dtype name, `None` for an unknown name.
fn dtype_size(d: &str) -> Option<usize> {
    Some(match d {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// Checks the header of safetensors `bytes` before the `safetensors` crate sees them, so that every
/// malformed file gets an error naming the file and, where one is at fault, the tensor: the
/// header length against the file size, UTF-8 and JSON, and per tensor its dtype, shape and
/// `data_offsets` (inside the data section, and as long as shape × dtype size).
fn check_header(path: &str, bytes: &[u8]) -> Result<()> {
    let bad = |m: String| SnellaError::file(path, format!("not a valid safetensors file: {m}"));
    if bytes.len() < 8 {
        return Err(bad(format!("{} bytes; truncated before the 8-byte header length", bytes.len())));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let rest = (bytes.len() - 8) as u64;
    if n > rest {
        return Err(bad(format!("the header length {n} exceeds the {rest} bytes after it (not a safetensors file, or a truncated or corrupt one)")));
    }
    let n = n as usize;
    let text = std::str::from_utf8(&bytes[8..8 + n]).map_err(|e| bad(format!("the header is not UTF-8: {e}")))?;
    let header: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(format!("the header is not valid JSON: {e}")))?;
    let obj = header.as_object().ok_or_else(|| bad("the header is not a JSON object".into()))?;
    let data_len = (bytes.len() - 8 - n) as u64;
    let mut names: Vec<&String> = obj.keys().filter(|k| *k != "__metadata__").collect();
    names.sort();
    for name in names {
        let t = &obj[name];
        let terr = |m: String| SnellaError::tensor(path, name, m);
        let dtype = t.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| terr("has no dtype string in the header".into()))?;
        let size = dtype_size(dtype).ok_or_else(|| terr(format!("has unknown dtype '{dtype}'")))?;
        let shape: Vec<u64> = t
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect::<Option<Vec<_>>>())
            .ok_or_else(|| terr(format!("has shape {} in the header; expected a list of non-negative integers", t.get("shape").unwrap_or(&serde_json::Value::Null))))?;
        let offs: Vec<u64> = t
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect::<Option<Vec<_>>>())
            .filter(|v| v.len() == 2)
            .ok_or_else(|| terr(format!("has data_offsets {} in the header; expected [begin, end]", t.get("data_offsets").unwrap_or(&serde_json::Value::Null))))?;
        let (b, e) = (offs[0], offs[1]);
        if b > e || e > data_len {
            return Err(terr(format!("has data_offsets [{b}, {e}] outside the file's {data_len} data bytes (truncated file, or a header that lies about offsets)")));
        }
        let nbytes = shape.iter().try_fold(size as u64, |acc, &d| acc.checked_mul(d));
        if nbytes != Some(e - b) {
            return Err(terr(format!("has shape {shape:?} of {dtype} ({} bytes) but data_offsets [{b}, {e}] hold {} bytes", nbytes.map_or("too many".to_string(), |v| v.to_string()), e - b)));
        }
    }
    Ok(())
}

/// Parses safetensors bytes; `path` only names the source in errors. Never panics on malformed
/// input.
///
/// # Errors
/// [`SnellaError::File`] naming the file for a malformed file (truncated before or inside the
/// header, bad JSON, gaps or overlaps between tensors, bytes after the last tensor);
/// [`SnellaError::Tensor`] naming the file and tensor for a tensor whose dtype is unknown or not
/// F32/F16/BF16, whose shape does not match its byte length, or whose offsets lie outside the data
/// (a truncated file or a lying header).
pub fn parse(path: &str, bytes: &[u8]) -> Result<TensorFile> {
    check_header(path, bytes)?;
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| SnellaError::file(path, format!("not a valid safetensors file: {e}")))?;
    let metadata: HashMap<String, String> = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| SnellaError::file(path, format!("not a valid safetensors file: {e}")))?;
    let mut views = st.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let mut tensors = HashMap::new();
    for (name, view) in views {
        let data = view_to_f32(path, &name, &view)?;
        tensors.insert(name, HostTensor { shape: view.shape().to_vec(), data });
    }
    Ok(TensorFile { path: path.to_string(), tensors, metadata })
}

/// Reads a safetensors file.
///
/// # Errors
/// [`SnellaError::File`] when the file cannot be read or parsed; see [`parse`].
pub fn read(path: impl AsRef<Path>) -> Result<TensorFile> {
    let p = path.as_ref();
    let bytes = std::fs::read(p).map_err(|e| SnellaError::file(p, format!("cannot read: {e}")))?;
    parse(&p.display().to_string(), &bytes)
}

/// Serialises f32 tensors (sorted by name) with string metadata to safetensors bytes.
pub fn serialize(tensors: &BTreeMap<String, HostTensor>, metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let raw: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.data.iter().flat_map(|v| v.to_le_bytes()).collect(), t.shape.clone()))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = raw
        .iter()
        .map(|(n, b, s)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).expect("consistent view")))
        .collect();
    let meta: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut bytes = safetensors::tensor::serialize(views, &Some(meta)).expect("safetensors serialisation of f32 tensors");
    sort_header(&mut bytes);
    bytes
}

/// Rewrites the JSON header with every key sorted (the `safetensors` crate writes the metadata map
/// in hash order), so that the same tensors and metadata always give the same bytes. Key order
/// does not change the compact JSON's length; the header keeps its size and padding.
fn sort_header(bytes: &mut [u8]) {
    type Sorted = BTreeMap<String, serde_json::Value>;
    let Some(n) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize) else { return };
    let Some(header) = bytes.get(8..8 + n) else { return };
    let Ok(mut h) = serde_json::from_slice::<Sorted>(header) else { return };
    if let Some(m) = h.get_mut("__metadata__") {
        if let Ok(sorted) = serde_json::from_value::<BTreeMap<String, String>>(m.clone()) {
            *m = serde_json::to_value(sorted).expect("json");
        }
    }
    let Ok(text) = serde_json::to_string(&h) else { return };
    let trimmed = header.iter().rposition(|&c| c != b' ').map_or(0, |i| i + 1);
    if text.len() == trimmed {
        bytes[8..8 + text.len()].copy_from_slice(text.as_bytes());
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder is written, synced and
/// renamed over `path`. Unless `overwrite`, an existing `path` is an error (nothing is lost silently).
///
/// # Errors
/// [`SnellaError::File`] when `path` exists and `overwrite` is false, or on any I/O failure.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8], overwrite: bool) -> Result<()> {
    let p = path.as_ref();
    if !overwrite && p.exists() {
        return Err(SnellaError::file(p, "already exists; pass overwrite to replace it"));
    }
    let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| SnellaError::file(dir, format!("cannot create folder: {e}")))?;
    let fname = p.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = dir.join(format!(".{fname}.tmp-{}", std::process::id()));
    let io = |e: std::io::Error| SnellaError::file(&tmp, format!("cannot write: {e}"));
    {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, p).map_err(|e| SnellaError::file(p, format!("cannot rename temporary file into place: {e}")))?;
    // Make the rename itself durable (best effort: not every platform can open a folder).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors_name_file_and_tensor() {
        let mut t = BTreeMap::new();
        t.insert("a.weight".to_string(), HostTensor::new(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5]));
        let mut m = BTreeMap::new();
        m.insert("k".to_string(), "7".to_string());
        let bytes = serialize(&t, &m);
        let mut f = parse("mem.safetensors", &bytes).unwrap();
        assert_eq!(f.meta::<usize>("k").unwrap(), Some(7));
        let e = f.clone().take("a.weight", &[3, 2]).unwrap_err().to_string();
        assert!(e.contains("mem.safetensors") && e.contains("a.weight") && e.contains("[3, 2]"), "{e}");
        let e = f.clone().take("b", &[1]).unwrap_err().to_string();
        assert!(e.contains("'b'") && e.contains("missing"), "{e}");
        assert_eq!(f.take("a.weight", &[2, 3]).unwrap().data[5], -6.5);
        let e = parse("cut.safetensors", &bytes[..bytes.len() - 3]).unwrap_err().to_string();
        assert!(e.contains("cut.safetensors"), "{e}");
    }

    #[test]
    fn serialisation_is_deterministic() {
        let mut t = BTreeMap::new();
        t.insert("b".to_string(), HostTensor::new(vec![2], vec![1.0, 2.0]));
        t.insert("a".to_string(), HostTensor::new(vec![1], vec![3.0]));
        let m: BTreeMap<String, String> = (0..16).map(|i| (format!("key{i}"), format!("value {i}"))).collect();
        let first = serialize(&t, &m);
        for _ in 0..8 {
            assert_eq!(serialize(&t, &m), first, "same tensors and metadata give the same bytes");
        }
        let f = parse("det.safetensors", &first).unwrap();
        assert_eq!(f.metadata.len(), 16);
        assert_eq!(f.tensors["b"].data, vec![1.0, 2.0]);
    }

    #[test]
    fn atomic_write_refuses_to_overwrite_silently() {
        let dir = std::env::temp_dir().join(format!("snella-st-{}", std::process::id()));
        let p = dir.join("x.bin");
        let _ = std::fs::remove_file(&p);
        write_atomic(&p, b"one", false).unwrap();
        assert!(write_atomic(&p, b"two", false).unwrap_err().to_string().contains("already exists"));
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        write_atomic(&p, b"two", true).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
