//! `swiglu`: `out = silu(gate) * up`, the gated activation of Qwen3's MLPs.

use bytemuck::{Pod, Zeroable};

use super::{bad, want_float, Memory, TaskFault, TaskKind, TaskSpec};
use crate::abi::layouts::{layout, Layout};
use crate::buffer::{BufSlice, DType};
use crate::error::ProgramError;

/// Arguments of [`Swiglu`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct SwigluArgs {
    /// Output address (may equal `gate` or `up`).
    pub out: u64,
    /// Gate projection address.
    pub gate: u64,
    /// Up projection address.
    pub up: u64,
    /// Elements.
    pub n: u32,
    /// [`DType`] code of `gate`.
    pub gate_dtype: u32,
    /// [`DType`] code of `up`.
    pub up_dtype: u32,
    /// [`DType`] code of `out`.
    pub out_dtype: u32,
}

/// `silu(g) * u` elementwise.
pub struct Swiglu;

impl Swiglu {
    /// `out[i] = silu(gate[i]) * up[i]` for `i < out.len()`.
    pub fn task(out: &BufSlice, gate: &BufSlice, up: &BufSlice) -> Result<TaskSpec, ProgramError> {
        for (n, s) in [("out", out), ("gate", gate), ("up", up)] {
            want_float::<Swiglu>(n, s)?;
        }
        if gate.len() != out.len() || up.len() != out.len() || out.is_empty() {
            return Err(bad::<Swiglu>(
                "out, gate and up must have one non-zero length",
            ));
        }
        let n = u32::try_from(out.len()).map_err(|_| bad::<Swiglu>("more than 2^32 elements"))?;
        let args = SwigluArgs {
            out: out.addr(),
            gate: gate.addr(),
            up: up.addr(),
            n,
            gate_dtype: gate.dtype().code(),
            up_dtype: up.dtype().code(),
            out_dtype: out.dtype().code(),
        };
        Ok(TaskSpec::new::<Swiglu>(args, &[out, gate, up]))
    }
}

/// `x * sigmoid(x)`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl TaskKind for Swiglu {
    type Args = SwigluArgs;
    const NAME: &'static str = "swiglu";
    fn cpu(a: &SwigluArgs, mem: &dyn Memory) -> Result<(), TaskFault> {
        let dt = |c| DType::from_code(c).ok_or(TaskFault::BadArgs("swiglu dtype"));
        let n = a.n as usize;
        let g = mem.read_f32(a.gate, dt(a.gate_dtype)?, n)?;
        let u = mem.read_f32(a.up, dt(a.up_dtype)?, n)?;
        let o: Vec<f32> = g.iter().zip(&u).map(|(g, u)| silu(*g) * u).collect();
        mem.write_f32(a.out, dt(a.out_dtype)?, &o)
    }
    fn layout() -> Layout {
        layout!(SwigluArgs {
            out,
            gate,
            up,
            n,
            gate_dtype,
            up_dtype,
            out_dtype
        })
    }
}
