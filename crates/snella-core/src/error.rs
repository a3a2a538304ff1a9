//! The error type shared by every snella crate.

use thiserror::Error;

/// Every failure snella reports. Each variant names the file, tensor or field at fault and what
/// was expected, so the message alone tells the user what to fix.
#[derive(Debug, Error)]
pub enum SnellaError {
    /// A configuration field is out of its allowed range, e.g. `sparsity s0 = 1.2, allowed [0, 1)`.
    #[error("invalid config: {field} = {value}: {expected}")]
    Config {
        /// The field name as the user spells it (`s0`, `rank`, `batch`...).
        field: String,
        /// The value that was given.
        value: String,
        /// The allowed range or form.
        expected: String,
    },
    /// A tensor has the wrong shape or dtype.
    #[error("tensor '{tensor}' in {file}: {message}")]
    Tensor {
        /// The file (or `"<memory>"`) holding the tensor.
        file: String,
        /// The tensor name.
        tensor: String,
        /// What was found and what was expected.
        message: String,
    },
    /// A file could not be read, parsed or written.
    #[error("{file}: {message}")]
    File {
        /// The path.
        file: String,
        /// What went wrong.
        message: String,
    },
    /// Adapter targets that matched no layer; `available` lists the real names.
    #[error("target '{target}' matches no adaptable layer; available: {available}")]
    Target {
        /// The pattern that matched nothing.
        target: String,
        /// The comma-separated names that do exist.
        available: String,
    },
    /// Training stopped because a value became NaN or Inf.
    #[error("non-finite value in '{tensor}' at step {step}")]
    NonFinite {
        /// The first non-finite tensor found.
        tensor: String,
        /// The optimizer step at which it was found.
        step: u64,
    },
    /// The requested device cannot be used; `tried` lists what was looked for.
    #[error("{code}: {message}")]
    Device {
        /// A stable code such as `CUDA_UNAVAILABLE`.
        code: String,
        /// Human-readable detail, including the library and the paths tried.
        message: String,
    },
    /// Training was stopped by an abort signal at a step boundary.
    #[error("aborted at step {step}")]
    Aborted {
        /// The last completed optimizer step.
        step: u64,
    },
}

impl SnellaError {
    /// Builds a [`SnellaError::Config`] error.
    pub fn config(field: &str, value: impl ToString, expected: &str) -> Self {
        SnellaError::Config { field: field.into(), value: value.to_string(), expected: expected.into() }
    }
    /// Builds a [`SnellaError::Tensor`] error.
    pub fn tensor(file: &str, tensor: &str, message: impl Into<String>) -> Self {
        SnellaError::Tensor { file: file.into(), tensor: tensor.into(), message: message.into() }
    }
    /// Builds a [`SnellaError::File`] error.
    pub fn file(file: impl AsRef<std::path::Path>, message: impl Into<String>) -> Self {
        SnellaError::File { file: file.as_ref().display().to_string(), message: message.into() }
    }
}

/// `Result` with [`SnellaError`].
pub type Result<T> = std::result::Result<T, SnellaError>;
