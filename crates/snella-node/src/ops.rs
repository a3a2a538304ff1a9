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
