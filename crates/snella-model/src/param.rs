//! Parameters: a named tensor on a backend, frozen or trainable (with gradient and AdamW moments).

use crate::backend::Backend;

/// The training state of a trainable parameter: its gradient and AdamW moments, same shape.
pub struct TrainState<B: Backend> {
    /// `∂L/∂p` of the last backward pass (overwritten each step).
    pub grad: B::Buf,
    /// AdamW first moment.
    pub m: B::Buf,
    /// AdamW second moment.
    pub v: B::Buf,
    /// Whether decoupled weight decay applies (spec §6: tensors with ≥ 2 dims except `cls_token`).
    pub decay: bool,
}

/// A named f32 tensor on backend `B`; `train` is `Some` when it is trained.
pub struct Param<B: Backend> {
    /// The timm-style name, e.g. `blocks.3.mlp.fc1.weight` or `blocks.3.attn.q.snella_A`.
    pub name: String,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// The values.
    pub value: B::Buf,
    /// Gradient and optimizer state when trainable.
    pub train: Option<TrainState<B>>,
}

impl<B: Backend> Param<B> {
    /// A frozen parameter holding `data` (`data.len()` must equal the product of `shape`).
    pub fn frozen(be: &B, name: impl Into<String>, shape: Vec<usize>, data: &[f32]) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Param { name: name.into(), shape, value: be.upload(data), train: None }
    }

    /// A trainable parameter holding `data`; weight decay follows spec §6 (ndim ≥ 2, not cls_token).
    pub fn trainable(be: &B, name: impl Into<String>, shape: Vec<usize>, data: &[f32]) -> Self {
        let mut p = Self::frozen(be, name, shape, data);
        p.set_trainable(be, true);
        p
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Makes the parameter trainable (fresh zero gradient and moments) or frozen.
    pub fn set_trainable(&mut self, be: &B, on: bool) {
        if on {
            let n = self.numel();
            let decay = self.shape.len() >= 2 && !self.name.contains("cls_token");
            self.train = Some(TrainState { grad: be.zeros(n), m: be.zeros(n), v: be.zeros(n), decay });
        } else {
            self.train = None;
        }
    }

    /// The gradient buffer, when trainable.
    pub fn grad_mut(&mut self) -> Option<&mut B::Buf> {
        self.train.as_mut().map(|t| &mut t.grad)
    }

    /// Host copy of the values.
    pub fn to_host(&self, be: &B) -> Vec<f32> {
        be.download(&self.value)
    }
}
