//! napi-rs bindings of snella.
#![deny(clippy::all)]
