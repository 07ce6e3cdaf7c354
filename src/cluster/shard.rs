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
//! same bits, so all ranks choose the same experts. FP4 experts' slices are
//! whole 128-column steps where an even slice would not be
//! ([`Shard::expert_range`]): an uneven split on tensor cores beats an even
//! one without them.
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

    /// This rank's `[start, end)` of the routed experts' intermediate size
    /// `i`: [`range`](Self::range), except for FP4 experts whose even share
    /// is not a multiple of 128 columns, which split in units of 128 (as
    /// evenly as the units go) when every rank gets one. An FP4 product runs
    /// on tensor cores in 128-column steps; a down product of another width
    /// (192 columns: `qwen3-30b-a3b` on 4 ranks) takes a blocks-of-rows path
    /// without them, several times slower.
    pub fn expert_range(&self, i: usize, fp4: bool) -> (usize, usize) {
        const STEP: usize = 128;
        let even = (i / self.ranks.max(1)) % STEP == 0 && i % self.ranks.max(1) == 0;
        if !fp4 || even || i % STEP != 0 || i / STEP < self.ranks {
            return self.range(i);
        }
        let (u0, u1) = self.range(i / STEP);
        (u0 * STEP, u1 * STEP)
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

#[cfg(test)]
mod tests {
    use super::Shard;

    #[test]
    fn fp4_expert_shares_are_whole_column_steps_where_they_can_be() {
        let shares = |i: usize, ranks: usize, fp4: bool| -> Vec<(usize, usize)> {
            (0..ranks)
                .map(|rank| Shard { rank, ranks }.expert_range(i, fp4))
                .collect()
        };
        // 768 over 4: 6 steps of 128 as 1, 2, 1, 2 (an even share, 192, is none).
        assert_eq!(
            shares(768, 4, true),
            [(0, 128), (128, 384), (384, 512), (512, 768)]
        );
        // Even shares of whole steps, bf16 experts, and fewer steps than
        // ranks keep the even split.
        assert_eq!(shares(768, 2, true), [(0, 384), (384, 768)]);
        assert_eq!(
            shares(768, 4, false),
            [(0, 192), (192, 384), (384, 576), (576, 768)]
        );
        assert_eq!(shares(768, 8, true)[7], (672, 768));
        assert_eq!(shares(1536, 4, true)[1], (384, 768));
        // Every split covers the whole size once.
        for (i, ranks) in [(768, 4), (640, 4), (2048, 8), (768, 3)] {
            let s = shares(i, ranks, true);
            assert_eq!(s[0].0, 0);
            assert_eq!(s[ranks - 1].1, i);
            assert!(s.windows(2).all(|w| w[0].1 == w[1].0 && w[0].0 < w[0].1));
        }
    }
}
