//! The single source of opcodes: one line per task kind, append-only.
//!
//! `build.rs` reads the `N => module::Kind,` lines of this file to generate the
//! CUDA dispatch table, so a kind's opcode lives here and nowhere else.

use super::{decode_args, Memory, TaskFault, TaskKind};
use crate::abi::{layouts::Layout, TASK_ARG_SLOTS};

/// Implemented (by the registry alone) for every registered kind.
pub trait Registered {
    /// The kind's opcode.
    const OPCODE: u16;
}

macro_rules! registry {
    ($($op:literal => $module:ident :: $kind:ident,)*) => {
        $(impl Registered for super::$module::$kind {
            const OPCODE: u16 = $op;
        })*

        /// Name of the kind with this opcode.
        pub fn kind_name(opcode: u16) -> Option<&'static str> {
            match opcode {
                $($op => Some(<super::$module::$kind as TaskKind>::NAME),)*
                _ => None,
            }
        }

        /// Runs one task's CPU reference op.
        pub fn run_cpu(
            opcode: u16,
            args: &[u64; TASK_ARG_SLOTS],
            mem: &dyn Memory,
        ) -> Result<(), TaskFault> {
            match opcode {
                $($op => <super::$module::$kind as TaskKind>::cpu(&decode_args(args), mem),)*
                _ => Err(TaskFault::BadOpcode(opcode)),
            }
        }

        /// Argument layouts of every kind.
        pub fn layouts() -> Vec<Layout> {
            vec![$(<super::$module::$kind as TaskKind>::layout(),)*]
        }

        /// Every `(opcode, name)` pair.
        pub fn all() -> Vec<(u16, &'static str)> {
            vec![$(($op, <super::$module::$kind as TaskKind>::NAME),)*]
        }
    };
}

registry! {
    1 => nop::Nop,
    2 => fill::Fill,
    3 => copy::Copy,
    4 => axpy::Axpy,
    5 => reduce_sum::ReduceSum,
    6 => gemv_bf16::GemvBf16,
    7 => emit::Emit,
    8 => rmsnorm::RmsNorm,
    9 => swiglu::Swiglu,
    10 => embed::Embed,
    11 => argmax::Argmax,
    12 => rope_kv::RopeKv,
    13 => attention::Attention,
    14 => attention_combine::AttentionCombine,
    15 => advance::Advance,
    16 => moe_route::MoeRoute,
    17 => gemv_expert::GemvExpert,
    18 => moe_combine::MoeCombine,
    19 => fill_random::FillRandom,
    20 => sample::Sample,
    21 => gemv_expert_fp4::GemvExpertFp4,
    22 => dflash_accept::DflashAccept,
    23 => dflash_inject::DflashInject,
    24 => all_reduce::AllReduce,
    25 => fill_random_fp4::FillRandomFp4,
}
