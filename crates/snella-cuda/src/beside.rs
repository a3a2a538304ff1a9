//! Uploads beside the queued work: the next training batch's images copied to the device on a
//! second stream while the current step still runs ([`Gpu::upload_beside`]).
//!
//! [`Gpu::upload`] must wait for the stream before it refills its page-locked staging buffer, and
//! its copy runs on the compute stream, so the GPU idles while the host fills the buffer and while
//! the DMA runs (≈ 1.9 ms per ViT-B/16 batch of 64 at 224 px, bench/PERF.md). Here the host fills a
//! second page-locked buffer while the GPU runs the work queued before the call (the training
//! step calls it once the forward pass is queued), the DMA goes through a copy stream into a device
//! slot kept between calls, and the compute stream waits for that DMA and then takes a
//! device-to-device copy of the slot (≈ 25 µs for that batch on an H200). The work queued before
//! the call therefore hides the fill and the DMA when it lasts longer than they do (a ViT-B/16
//! forward pass at batch 64: ≈ 9 ms against ≈ 2 ms); the work queued after it waits for them.

use crate::device::{cuda_err, Gpu};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};
use snella_core::SnellaError;
use std::sync::Arc;

/// The copy stream, its page-locked buffer and device slot (both grow-only), and the two events
/// that order them against the compute stream.
pub struct Beside {
    copy: Arc<CudaStream>,
    host: Option<PinnedHostSlice<f32>>,
    slot: Option<CudaSlice<f32>>,
    /// Recorded on the copy stream after the last copy into the slot.
    copied: CudaEvent,
    /// Recorded on the compute stream after the last copy out of the slot.
    consumed: CudaEvent,
}

impl Beside {
    /// A copy stream and its events on `gpu`'s context (no buffers yet).
    ///
    /// # Errors
    /// `CUDA_ERROR` when the stream or an event cannot be created.
    pub fn new(gpu: &Gpu) -> Result<Self, SnellaError> {
        let copy = gpu.ctx.new_stream().map_err(|e| cuda_err("copy stream", e))?;
        let copied = gpu.ctx.new_event(None).map_err(|e| cuda_err("copy event", e))?;
        let consumed = gpu.ctx.new_event(None).map_err(|e| cuda_err("copy event", e))?;
        Ok(Beside { copy, host: None, slot: None, copied, consumed })
    }
}

impl Drop for Beside {
    /// Waits for the copy stream, so the page-locked buffer is not freed under a copy.
    fn drop(&mut self) {
        let _ = self.copy.synchronize();
    }
}

impl Gpu {
    /// A new device buffer holding `data`, copied beside the work queued so far: the host fills a
    /// page-locked buffer while the GPU runs that work, the DMA goes on a separate stream, and the
    /// compute stream, after everything queued before this call, waits for the DMA and copies the
    /// result device to device into the returned buffer. The buffer is therefore ready for work
    /// queued after this call, like [`Gpu::upload`]'s, and the GPU only idles when the queued work
    /// ends before the fill and the DMA do (the first call, or one that grows the device slot, also
    /// waits for that work before its DMA).
    ///
    /// Costs one device slot of `data.len()` f32 values kept between calls (grow-only, from the
    /// memory pool) besides the returned buffer.
    ///
    /// # Errors
    /// `CUDA_OOM` for the slot or the buffer; `CUDA_ERROR` when the stream, the page-locked buffer or
    /// a copy fails.
    pub fn upload_beside(&self, data: &[f32]) -> Result<CudaSlice<f32>, SnellaError> {
        let n = data.len();
        if n == 0 {
            return self.zeros(0);
        }
        let mut g = self.beside.lock().expect("beside uploads");
        if g.is_none() {
            *g = Some(Beside::new(self)?);
        }
        let b = g.as_mut().expect("set above");
        // the page-locked buffer's previous copy (a step ago) must be done before it is refilled
        b.copied.synchronize().map_err(|e| cuda_err("upload beside (wait for the previous copy)", e))?;
        if b.slot.as_ref().is_none_or(|s| s.len() < n) {
            // A new slot is valid in the compute stream's order: the copy stream waits for that
            // point once (this upload then does not overlap). The old slot is freed in the compute
            // stream's order too, after any copy out of it queued there.
            // SAFETY: the copy below writes the n values read later.
            b.slot = Some(unsafe { self.uninit::<f32>(n) }?);
            b.copy.join(&self.stream).map_err(|e| cuda_err("upload beside (order the new slot)", e))?;
        }
        let host = self.fill_pinned(&mut b.host, data)?;
        // the slot's previous contents must have been copied out before they are overwritten
        b.copy.wait(&b.consumed).map_err(|e| cuda_err("upload beside (wait for the slot)", e))?;
        {
            let slot = b.slot.as_mut().expect("set above");
            let (dp, _rec) = cudarc::driver::DevicePtrMut::device_ptr_mut(slot, &b.copy);
            // SAFETY: `host` (n values) is not written again before `copied` (recorded next) completes: the
            // next call waits for it first; the slot holds at least n values.
            unsafe { cudarc::driver::result::memcpy_htod_async(dp, &*host, b.copy.cu_stream()) }.map_err(|e| cuda_err("upload beside (copy)", e))?;
        }
        // Past here a DMA out of the page-locked buffer may be in flight: on an error, wait for the
        // copy stream, since `copied` may not cover it for the next call's refill.
        let joined = b.copied.record(&b.copy).and_then(|_| self.stream.wait(&b.copied));
        if let Err(e) = joined {
            let _ = b.copy.synchronize();
            return Err(cuda_err("upload beside (join)", e));
        }
        // SAFETY: the copy below writes all n values.
        let mut out = unsafe { self.uninit::<f32>(n) }?;
        let slot = b.slot.as_ref().expect("set above");
        self.stream.memcpy_dtod(&slot.slice(..n), &mut out.slice_mut(..n)).map_err(|e| cuda_err("upload beside (device copy)", e))?;
        b.consumed.record(&self.stream).map_err(|e| cuda_err("upload beside (record)", e))?;
        Ok(out)
    }
}
