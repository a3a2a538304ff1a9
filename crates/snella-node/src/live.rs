//! Live native objects: how many models are loaded and how many bytes they hold, kept in global
//! counters that every `NativeModel` updates on load, on calls that change its size, and on
//! dispose or garbage collection (whichever comes first).

use napi_derive::napi;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

static MODELS: AtomicI64 = AtomicI64::new(0);
static BYTES: AtomicI64 = AtomicI64::new(0);

/// One model's share of the global counters; released once (dispose or drop).
pub struct Tracker {
    bytes: AtomicI64,
    live: AtomicBool,
}

impl Tracker {
    /// Counts a new model holding `bytes`.
    pub fn new(bytes: usize) -> Self {
        MODELS.fetch_add(1, Ordering::SeqCst);
        BYTES.fetch_add(bytes as i64, Ordering::SeqCst);
        Tracker { bytes: AtomicI64::new(bytes as i64), live: AtomicBool::new(true) }
    }

    /// The model now holds `bytes` (after attach, prepare, merge, loading...).
    pub fn set(&self, bytes: usize) {
        if self.live.load(Ordering::SeqCst) {
            let old = self.bytes.swap(bytes as i64, Ordering::SeqCst);
            BYTES.fetch_add(bytes as i64 - old, Ordering::SeqCst);
        }
    }

    /// The model was freed. Idempotent.
    pub fn release(&self) {
        if self.live.swap(false, Ordering::SeqCst) {
            MODELS.fetch_sub(1, Ordering::SeqCst);
            BYTES.fetch_sub(self.bytes.swap(0, Ordering::SeqCst), Ordering::SeqCst);
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.release();
    }
}

/// Counts of live native objects.
#[napi(object)]
pub struct LiveObjects {
    /// Models loaded and not yet disposed (or garbage-collected).
    pub models: i64,
    /// Bytes of the tensors those models hold (parameters, gradients, optimizer moments,
    /// allocator statistics), on host or device.
    pub bytes: i64,
}

/// The live native models and the bytes they hold.
#[napi]
pub fn live_objects() -> LiveObjects {
    LiveObjects { models: MODELS.load(Ordering::SeqCst), bytes: BYTES.load(Ordering::SeqCst) }
}
