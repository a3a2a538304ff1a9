//! How much native memory a session holds (for leak checks and memory reports).

use crate::backend::Backend;
use crate::session::Session;

impl<B: Backend> Session<B> {
    /// Bytes of the buffers this session owns: every parameter, the gradient and AdamW moments of
    /// trainable ones, the saved `W0` of merged layers, and the allocator's EMAs. (Transient
    /// per-step activations are not counted: they are freed when the step returns.)
    pub fn native_bytes(&mut self) -> usize {
        let be = self.be.clone();
        let mut n = 0;
        for p in self.vit.params_mut() {
            n += be.bytes(&p.value);
            if let Some(t) = &p.train {
                n += be.bytes(&t.grad) + be.bytes(&t.m) + be.bytes(&t.v);
            }
        }
        for l in self.vit.linears() {
            if let Some(o) = &l.original {
                n += be.bytes(o);
            }
        }
        for k in crate::trainer::kernel_adapters(&self.vit) {
            if let Some(e) = &k.ema {
                n += e.iter().map(|b| be.bytes(b)).sum::<usize>();
            }
        }
        if let Some(a) = self.trainer.as_ref().and_then(|t| t.allocator.as_ref()) {
            n += a.state_tensors().iter().map(|(_, t)| t.data.len() * 4).sum::<usize>();
        }
        n
    }
}
