//! Helpers shared by the CPU integration tests (a module, not a test target).

use snella_model::backend::Backend;
use snella_model::cpu::CpuBackend;
use snella_model::session::Session;

/// Every trainable tensor of the session: `(name, value, gradient, AdamW first moment)`, in
/// parameter order.
pub fn trainable_state(s: &mut Session<CpuBackend>) -> Vec<(String, Vec<f32>, Vec<f32>, Vec<f32>)> {
    let be = CpuBackend;
    s.vit
        .params_mut()
        .into_iter()
        .filter_map(|p| p.train.as_ref().map(|t| (p.name.clone(), be.download(&p.value), be.download(&t.grad), be.download(&t.m))))
        .collect()
}
