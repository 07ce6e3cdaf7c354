//! A dense Qwen3 model as a decode-step task program.
//!
//! One program iteration is one decode step for one token: embedding lookup,
//! every layer (RMSNorm, fused q/k/v projection, per-head norm + RoPE + KV
//! append, split-sequence attention, output projection added into the
//! residual, RMSNorm, gate and up projections, SwiGLU, down projection added
//! into the residual), the final norm, the LM head, a greedy argmax across all
//! workers, and the step's bookkeeping (the chosen token becomes the next input
//! and is emitted to the host). `n` tokens are one command of `n` iterations.
//! Activations are bf16 like the reference implementation's; matrix products
//! accumulate in f32.

use crate::buffer::{BufSlice, Buffer, DType};
use crate::error::{Error, LoadError, Result};
use crate::exec::{Executor, ExecutorExt, LoadedProgram};
use crate::program::{ops, EventId, ProgramBuilder};
use crate::task::advance::Advance;
use crate::task::embed::Embed;
use crate::task::emit::Emit;
use crate::task::gemv_bf16::GemvShape;
use crate::task::rmsnorm::RmsNorm;
use crate::task::rope_kv::{HeadShape, RopeKv};
use crate::task::swiglu::Swiglu;

use super::config::ModelConfig;
use super::safetensors::Checkpoint;

struct Layer {
    in_norm: Buffer,
    qkv: Buffer,
    qk_norms: Buffer,
    o: Buffer,
    post_norm: Buffer,
    gate: Buffer,
    up: Buffer,
    down: Buffer,
    cache: Buffer,
}

/// A loaded dense model with its KV cache and decode program, on one executor.
pub struct Decoder {
    config: ModelConfig,
    max_seq: usize,
    pos: usize,
    ids: Buffer,
    pos_buf: Buffer,
    logits: Buffer,
    program: LoadedProgram,
}

fn upload(ex: &dyn Executor, ck: &Checkpoint, names: &[String], rows: usize) -> Result<Buffer> {
    let mut data = Vec::new();
    for n in names {
        data.extend(ck.read_f32(n)?);
    }
    let buf = ex.alloc(DType::Bf16, data.len())?;
    ex.write_f32(&buf, &data)?;
    debug_assert_eq!(data.len() % rows.max(1), 0);
    Ok(buf)
}

/// Events of one stage feed the next.
struct Chain<'a> {
    b: &'a mut ProgramBuilder,
    prev: Option<EventId>,
}

impl Chain<'_> {
    /// Makes `group` wait on the previous stage and become the previous stage.
    fn stage(&mut self, group: ops::Group, name: &str) {
        if let Some(p) = self.prev {
            group.wait(self.b, p);
        }
        let ev = self.b.event(name);
        group.signal(self.b, ev);
        self.prev = Some(ev);
    }
}

impl Decoder {
    /// Uploads a validated checkpoint and builds the decode program for a
    /// context of `max_seq` positions.
    pub fn new(ex: &dyn Executor, ck: &Checkpoint, max_seq: usize) -> Result<Decoder> {
        ck.validate()?;
        let c = ck.config.clone();
        if c.moe.is_some() {
            return Err(LoadError::Config(
                "decoding qwen3_moe models is not implemented yet".into(),
            )
            .into());
        }
        if max_seq == 0 || max_seq > c.max_position_embeddings {
            return Err(Error::InvalidArgument(format!(
                "max_seq {max_seq} must be in 1..={}",
                c.max_position_embeddings
            )));
        }
        let (h, hd, inter, vocab) = (c.hidden_size, c.head_dim, c.intermediate_size, c.vocab_size);
        let shape = HeadShape {
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: hd,
        };
        let width = shape.qkv_width();
        let one = |n: &str| vec![n.to_string()];
        let embed = upload(ex, ck, &one("model.embed_tokens.weight"), vocab)?;
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            upload(ex, ck, &one("lm_head.weight"), vocab)?
        };
        let final_norm = upload(ex, ck, &one("model.norm.weight"), 1)?;
        let mut layers = Vec::new();
        for l in 0..c.num_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let cache = ex.alloc(DType::Bf16, 2 * c.num_kv_heads * max_seq * hd)?;
            layers.push(Layer {
                in_norm: upload(ex, ck, &[p("input_layernorm.weight")], 1)?,
                qkv: upload(
                    ex,
                    ck,
                    &[
                        p("self_attn.q_proj.weight"),
                        p("self_attn.k_proj.weight"),
                        p("self_attn.v_proj.weight"),
                    ],
                    width,
                )?,
                qk_norms: upload(
                    ex,
                    ck,
                    &[p("self_attn.q_norm.weight"), p("self_attn.k_norm.weight")],
                    2,
                )?,
                o: upload(ex, ck, &[p("self_attn.o_proj.weight")], h)?,
                post_norm: upload(ex, ck, &[p("post_attention_layernorm.weight")], 1)?,
                gate: upload(ex, ck, &[p("mlp.gate_proj.weight")], inter)?,
                up: upload(ex, ck, &[p("mlp.up_proj.weight")], inter)?,
                down: upload(ex, ck, &[p("mlp.down_proj.weight")], h)?,
                cache,
            });
        }
        let workers = ex.num_workers();
        let buf = |d: DType, n: usize| ex.alloc(d, n);
        let (x, hn) = (buf(DType::Bf16, h)?, buf(DType::Bf16, h)?);
        let (qkv, attn) = (
            buf(DType::Bf16, width)?,
            buf(DType::Bf16, c.num_heads * hd)?,
        );
        let (g, u) = (buf(DType::Bf16, inter)?, buf(DType::Bf16, inter)?);
        let logits = buf(DType::F32, vocab)?;
        let chunks = (workers / c.num_kv_heads).max(1);
        let partial = buf(DType::F32, c.num_heads * chunks * (hd + 2))?;
        let (pos_buf, ids, token) = (
            buf(DType::U32, 1)?,
            buf(DType::U32, 1)?,
            buf(DType::U32, 1)?,
        );
        let pairs = buf(DType::U32, 2 * workers)?;

        let eps = c.rms_norm_eps as f32;
        let mut b = ProgramBuilder::new();
        let mut ch = Chain {
            b: &mut b,
            prev: None,
        };
        let single = |ch: &mut Chain<'_>, spec| ops::Group(vec![ch.b.push(spec).id()]);
        let gemv = |ch: &mut Chain<'_>,
                    w: &Buffer,
                    xin: &BufSlice,
                    y: &BufSlice,
                    rows: usize,
                    cols: usize,
                    acc: bool| {
            ops::gemv(
                ch.b,
                &w.all(),
                xin,
                y,
                GemvShape { rows, cols, m: 1 },
                workers,
                acc,
            )
        };
        let e = single(&mut ch, Embed::task(&x.all(), &embed.all(), &ids.all(), h)?);
        ch.stage(e, "embed");
        for (l, ly) in layers.iter().enumerate() {
            let n = single(
                &mut ch,
                RmsNorm::task(&x.all(), &ly.in_norm.all(), &hn.all(), 1, h, eps)?,
            );
            ch.stage(n, &format!("layer {l} input norm"));
            let q = gemv(&mut ch, &ly.qkv, &hn.all(), &qkv.all(), width, h, false)?;
            ch.stage(q, &format!("layer {l} qkv"));
            let r = RopeKv::task(
                &qkv.all(),
                &ly.qk_norms.all(),
                &ly.cache.all(),
                &pos_buf.all(),
                shape,
                1,
                max_seq,
                eps,
                c.rope_theta as f32,
            )?;
            let r = single(&mut ch, r);
            ch.stage(r, &format!("layer {l} rope"));
            let parts = workers.min(c.num_heads);
            let (slices, combine) = ops::attention(
                ch.b,
                &qkv.all(),
                &ly.cache.all(),
                &pos_buf.all(),
                &partial.all(),
                &attn.all(),
                shape,
                1,
                max_seq,
                chunks,
                parts,
            )?;
            if let Some(p) = ch.prev {
                slices.wait(ch.b, p);
            }
            ch.prev = None;
            ch.stage(combine, &format!("layer {l} attention"));
            let o = gemv(
                &mut ch,
                &ly.o,
                &attn.all(),
                &x.all(),
                h,
                c.num_heads * hd,
                true,
            )?;
            ch.stage(o, &format!("layer {l} o_proj"));
            let n = single(
                &mut ch,
                RmsNorm::task(&x.all(), &ly.post_norm.all(), &hn.all(), 1, h, eps)?,
            );
            ch.stage(n, &format!("layer {l} post norm"));
            let mut gu = gemv(&mut ch, &ly.gate, &hn.all(), &g.all(), inter, h, false)?;
            gu.0.extend(gemv(&mut ch, &ly.up, &hn.all(), &u.all(), inter, h, false)?.0);
            ch.stage(gu, &format!("layer {l} gate+up"));
            let s = single(&mut ch, Swiglu::task(&g.all(), &g.all(), &u.all())?);
            ch.stage(s, &format!("layer {l} swiglu"));
            let d = gemv(&mut ch, &ly.down, &g.all(), &x.all(), h, inter, true)?;
            ch.stage(d, &format!("layer {l} down"));
        }
        let n = single(
            &mut ch,
            RmsNorm::task(&x.all(), &final_norm.all(), &hn.all(), 1, h, eps)?,
        );
        ch.stage(n, "final norm");
        let lm = gemv(&mut ch, &lm_head, &hn.all(), &logits.all(), vocab, h, false)?;
        ch.stage(lm, "lm head");
        let (partials, pick) =
            ops::argmax(ch.b, &logits.all(), &token.all(), &pairs.all(), workers)?;
        if let Some(p) = ch.prev {
            partials.wait(ch.b, p);
        }
        ch.prev = None;
        ch.stage(ops::Group(vec![pick]), "token");
        let last = ch.prev.expect("stages exist");
        b.push(Advance::task(&pos_buf.all(), &ids.all(), &token.all(), 1)?)
            .wait(last);
        b.push(Emit::task(&token.all())?).wait(last);
        let program = ex.load(&b.build()?)?;
        // Layers, weights and work buffers stay alive through the program's references.
        drop(layers);
        Ok(Decoder {
            config: c,
            max_seq,
            pos: 0,
            ids,
            pos_buf,
            logits,
            program,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Positions used so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    fn check(&self, tokens: &[u32], steps: usize) -> Result<()> {
        if let Some(&t) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(Error::InvalidArgument(format!(
                "token id {t} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        if self.pos + steps > self.max_seq {
            return Err(Error::InvalidArgument(format!(
                "context overflow: {} positions used, {steps} more requested, the context holds {}",
                self.pos, self.max_seq
            )));
        }
        Ok(())
    }

    /// Feeds a prompt (one step per token) and returns the model's next token.
    pub fn prefill(&mut self, ex: &dyn Executor, prompt: &[u32]) -> Result<u32> {
        if prompt.is_empty() {
            return Err(Error::InvalidArgument("empty prompt".into()));
        }
        self.check(prompt, prompt.len())?;
        let mut out = Vec::new();
        ex.poll_outputs(&mut out)?;
        for &t in prompt {
            ex.write_u32(&self.ids, &[t])?;
            ex.write_u32(&self.pos_buf, &[self.pos as u32])?;
            ex.run(&self.program, 1, &[])?;
            self.pos += 1;
        }
        out.clear();
        ex.poll_outputs(&mut out)?;
        out.last()
            .map(|&t| t as u32)
            .ok_or_else(|| Error::Stopped("no token came back".into()))
    }

    /// Generates `n` more tokens greedily in one command (the input is the
    /// last token returned) and returns them.
    pub fn generate(&mut self, ex: &dyn Executor, n: usize) -> Result<Vec<u32>> {
        self.check(&[], n)?;
        let mut out = Vec::new();
        ex.poll_outputs(&mut out)?;
        out.clear();
        let t = ex.submit(&self.program, n as u32, &[])?;
        ex.wait(&t, ex.default_timeout())?;
        self.pos += n;
        ex.poll_outputs(&mut out)?;
        Ok(out.into_iter().map(|t| t as u32).collect())
    }

    /// Logits of the last step.
    pub fn logits(&self, ex: &dyn Executor) -> Result<Vec<f32>> {
        ex.read_f32(&self.logits)
    }
}
