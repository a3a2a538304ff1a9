//! Single-op bindings for tests and microbenchmarks.
