//! napi-rs bindings of snella: `#[napi]` classes and functions only, no math.
//!
//! The hand-written TypeScript façade in `ts/` wraps these; errors carry a `[CODE]` prefix that the
//! façade turns into `SnellaError.code`.
#![deny(clippy::all)]

mod live;
mod model;
mod ops;

use napi::{Error, Status};
use snella_core::SnellaError;

/// Converts a [`SnellaError`] into a JS error whose message starts with `[CODE] `.
pub(crate) fn js_err(e: SnellaError) -> Error {
    let code = match &e {
        SnellaError::Config { .. } => "CONFIG",
        SnellaError::Tensor { .. } => "TENSOR",
        SnellaError::File { .. } => "FILE",
        SnellaError::Target { .. } => "TARGET",
        SnellaError::NonFinite { .. } => "NON_FINITE",
        SnellaError::Device { code, .. } => code.as_str(),
        SnellaError::Aborted { .. } => "ABORTED",
    };
    Error::new(Status::GenericFailure, format!("[{code}] {e}"))
}

/// Converts a JSON-decoding failure of an options object into a `[CONFIG]` error.
pub(crate) fn json_err(what: &str, e: serde_json::Error) -> Error {
    Error::new(Status::InvalidArg, format!("[CONFIG] invalid {what}: {e}"))
}
