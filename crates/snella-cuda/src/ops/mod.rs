//! Safe launchers of the kernels in `kernels/`, one module per `.cu` file (op family).

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod elementwise;
pub mod gelu;
pub mod importance;
pub mod layernorm;
pub mod merge;
pub mod merge_batch;
pub mod patch;
pub mod reduce;
pub mod sparsify;
pub mod topk;

/// A read-only device input: a view of an f32 buffer (`buf.slice(..)`).
pub type In<'a> = cudarc::driver::CudaView<'a, f32>;
/// A device output: a mutable view of an f32 buffer (`buf.slice_mut(..)`).
pub type Out<'a> = cudarc::driver::CudaViewMut<'a, f32>;

/// A tensor an op reads that a step may keep in f32 or in bf16 (`qkv`, the attention output, a
/// LayerNorm's normalised input, the MLP pre-activation): f32, or the bf16 copy a bf16 step keeps
/// of it (round to nearest even).
#[derive(Clone, Copy)]
pub enum ActRef<'a, 'b> {
    /// f32 values.
    F32(&'a In<'b>),
    /// bf16 values (`u16` bit patterns).
    Bf16(&'a cudarc::driver::CudaSlice<u16>),
}

impl ActRef<'_, '_> {
    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            ActRef::F32(o) => o.len(),
            ActRef::Bf16(o) => o.len(),
        }
    }
    /// Whether it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The device address (for kernels taking either form through one pointer argument).
    pub fn ptr(&self, gpu: &crate::device::Gpu) -> u64 {
        use cudarc::driver::DevicePtr;
        match self {
            ActRef::F32(o) => o.device_ptr(&gpu.stream).0,
            ActRef::Bf16(o) => o.device_ptr(&gpu.stream).0,
        }
    }
    /// Whether the values are bf16.
    pub fn is_bf16(&self) -> bool {
        matches!(self, ActRef::Bf16(_))
    }
}

/// The output form of [`ActRef`]: an op writing a tensor in f32 or in bf16.
pub enum ActMut<'a, 'b> {
    /// f32 values.
    F32(&'a mut Out<'b>),
    /// bf16 values (`u16` bit patterns, round to nearest even).
    Bf16(&'a mut cudarc::driver::CudaSlice<u16>),
}

impl ActMut<'_, '_> {
    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            ActMut::F32(o) => o.len(),
            ActMut::Bf16(o) => o.len(),
        }
    }
    /// Whether it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The device address.
    pub fn ptr(&mut self, gpu: &crate::device::Gpu) -> u64 {
        use cudarc::driver::DevicePtrMut;
        match self {
            ActMut::F32(o) => o.device_ptr_mut(&gpu.stream).0,
            ActMut::Bf16(o) => o.device_ptr_mut(&gpu.stream).0,
        }
    }
    /// Whether the values are bf16.
    pub fn is_bf16(&self) -> bool {
        matches!(self, ActMut::Bf16(_))
    }
}

/// Threads per block for simple element-wise kernels.
pub const BLOCK: u32 = 256;

/// A 1-D launch over `n` elements.
pub fn grid(n: usize) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig { grid_dim: ((n as u32).div_ceil(BLOCK).max(1), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}
