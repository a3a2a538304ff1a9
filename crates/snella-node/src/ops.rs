//! Free functions: safetensors reading for data and export tools.

use crate::js_err;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::collections::HashMap;

/// One tensor of a safetensors file, converted to f32.
#[napi(object)]
pub struct HostTensorJs {
    /// Shape, outermost first.
    pub shape: Vec<u32>,
    /// Values, row-major.
    pub data: Float32Array,
}

/// Reads every tensor of a safetensors file (F32, F16 or BF16) as f32, with the file's metadata.
///
/// # Errors
/// `[FILE]` naming the file for a missing or malformed file; `[TENSOR]` for an unsupported dtype.
#[napi]
pub fn read_safetensors(path: String) -> napi::Result<(HashMap<String, HostTensorJs>, HashMap<String, String>)> {
    let f = snella_core::st::read(&path).map_err(js_err)?;
    let tensors = f
        .tensors
        .into_iter()
        .map(|(k, t)| (k, HostTensorJs { shape: t.shape.iter().map(|&d| d as u32).collect(), data: Float32Array::new(t.data) }))
        .collect();
    Ok((tensors, f.metadata))
}

/// One tensor to write: shape (outermost first) and f32 row-major values.
#[napi(object)]
pub struct TensorInJs {
    /// Shape, outermost first.
    pub shape: Vec<u32>,
    /// Values, row-major; the length must equal the product of `shape`.
    pub data: Float32Array,
}

/// Writes f32 tensors and string metadata as a safetensors file, atomically (temporary file, fsync,
/// rename); refuses to replace an existing file unless `overwrite`.
///
/// # Errors
/// `[TENSOR]` naming a tensor whose length does not fit its shape; `[FILE]` when the file exists
/// and `overwrite` is false, or on I/O failure.
#[napi]
pub fn write_safetensors(path: String, tensors: HashMap<String, TensorInJs>, metadata: HashMap<String, String>, overwrite: bool) -> napi::Result<()> {
    let mut map = std::collections::BTreeMap::new();
    for (name, t) in tensors {
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        let n: usize = shape.iter().product();
        if n != t.data.len() {
            return Err(js_err(snella_core::SnellaError::tensor(&path, &name, format!("shape {shape:?} holds {n} values, got {}", t.data.len()))));
        }
        map.insert(name, snella_core::st::HostTensor::new(shape, t.data.to_vec()));
    }
    let meta: std::collections::BTreeMap<String, String> = metadata.into_iter().collect();
    snella_core::st::write_atomic(&path, &snella_core::st::serialize(&map, &meta), overwrite).map_err(js_err)
}
