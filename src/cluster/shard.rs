//! Which part of a model each rank holds (tensor parallelism).
//!
//! | weights | split | after it |
//! | --- | --- | --- |
//! | embedding, norms, router | whole on every rank | |
//! | `q_proj` / `k_proj` / `v_proj` | rows of the rank's heads | local attention |
//! | `o_proj` | columns of the rank's heads | all-reduce (sum) |
//! | `gate_proj` / `up_proj` (dense and every expert) | rows of the rank's intermediate slice | local SwiGLU |
//! | `down_proj` (dense and every expert) | columns of that slice | all-reduce (sum) |
//! | LM head | rows of the rank's vocabulary slice | argmax pairs or logits gathered |
//!
//! Experts are split by rows, not by expert: at batch 1 a token's top-k
//! experts land unevenly on ranks that own whole experts (with 128 experts,
//! top 8 and 4 ranks, the busiest rank holds 3.48 of them on average against
//! 2 for an even share, and 2.53 against 1 on 8 ranks: a Monte Carlo estimate
//! over uniformly random routings), while row splits read exactly `1 / ranks` of every
//! chosen expert on every rank. Each rank computes the router itself, on the
//! same bits, so all ranks choose the same experts.
//!
//! Query heads split evenly. With at least as many KV heads as ranks the KV
//! heads split too; with fewer, each rank keeps the one KV head its query
//! heads share (KV heads are then repeated across ranks).

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::quant::Fp4Format;

/// Rank `rank` of `ranks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This rank.
    pub rank: usize,
    /// Ranks in all.
    pub ranks: usize,
}

/// The attention heads of one rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadRange {
    /// First query head.
    pub q0: usize,
    /// Query heads.
    pub heads: usize,
    /// First KV head.
    pub kv0: usize,
    /// KV heads.
    pub kv_heads: usize,
}

impl Shard {
    /// The whole model on one device.
    pub const WHOLE: Shard = Shard { rank: 0, ranks: 1 };

    /// This rank's `[start, end)` of `n` items (`n` divisible by the ranks).
    pub fn range(&self, n: usize) -> (usize, usize) {
        (n * self.rank / self.ranks, n * (self.rank + 1) / self.ranks)
    }

    /// This rank's attention heads.
    pub fn heads(&self, c: &ModelConfig) -> HeadRange {
        let (q0, q1) = self.range(c.num_heads);
        let (kv0, kv1) = if self.ranks <= c.num_kv_heads {
            self.range(c.num_kv_heads)
        } else {
            let k = q0 / (c.num_heads / c.num_kv_heads);
            (k, k + 1)
        };
        HeadRange {
            q0,
            heads: q1 - q0,
            kv0,
            kv_heads: kv1 - kv0,
        }
    }

    /// Checks that `c` splits over `ranks` (with routed experts in `experts`).
    pub fn check(ranks: usize, c: &ModelConfig, experts: Option<Fp4Format>) -> Result<()> {
        let bad = |what: String| {
            Err(Error::InvalidArgument(format!(
                "the model does not split over {ranks} ranks: {what}"
            )))
        };
        if ranks == 0 {
            return bad("no ranks".into());
        }
        if c.num_heads % ranks != 0 {
            return bad(format!("{} query heads", c.num_heads));
        }
        let kv = c.num_kv_heads;
        if (ranks <= kv && kv % ranks != 0) || (ranks > kv && ranks % kv != 0) {
            return bad(format!("{kv} KV heads"));
        }
        if c.vocab_size % ranks != 0 {
            return bad(format!("a vocabulary of {}", c.vocab_size));
        }
        let dense = (0..c.num_layers).any(|l| !c.is_moe_layer(l));
        if dense && c.intermediate_size % ranks != 0 {
            return bad(format!("an intermediate size of {}", c.intermediate_size));
        }
        if let Some(m) = &c.moe {
            let i = m.moe_intermediate_size;
            let block = experts.or(m.fp4).map_or(1, |f| f.block().max(32));
            if i % ranks != 0 || (i / ranks) % block != 0 {
                return bad(format!(
                    "an expert intermediate size of {i} (each rank's share must be a multiple of {block})"
                ));
            }
        }
        Ok(())
    }
}
