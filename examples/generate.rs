//! Generates tokens with a Qwen3 model decoding inside the resident kernel (or,
//! without a GPU, on the CPU executor).
//!
//! With no arguments it writes (once, into a cache folder) a small built-in
//! random-weight Qwen3-MoE checkpoint, feeds a fixed prompt and generates greedily,
//! printing the tokens, time to first token and tokens per second.

use std::path::PathBuf;
use std::time::Instant;

use megakernel::dflash::{DflashOptions, DflashSession, DraftConfig, DraftModel};
use megakernel::model::checkpoint::{write_quantized, write_random, WriteOptions};
use megakernel::model::{Checkpoint, Model, ModelConfig, Tokenizer};
use megakernel::prelude::*;
use megakernel::quant::Fp4Format;
use megakernel::task::sample::Sampling;

const HELP: &str = "usage: generate [--model DIR | --preset NAME] [--prompt TEXT | --prompt-ids 1,2,3] [--tokens N] [--context N] [--temperature T [--top-k K] [--top-p P] [--seed S]] [--experts F] [--draft DIR|random [--block N]] [--ranks N] [--cpu] [--dump FILE]

Greedy generation with a Qwen3 or Qwen3-MoE model (Hugging Face layout:
config.json and safetensors) decoding inside the resident GPU kernel; on the
CPU executor when there is no GPU (or with --cpu).

  --model DIR        a checkpoint folder (model_type qwen3 or qwen3_moe)
  --preset NAME      a random-weight preset written once into the cache folder:
                     tiny-moe (default), tiny, qwen3-0.6b, qwen3-8b, qwen3-30b-a3b
  --prompt TEXT      a text prompt, tokenized with the model folder's tokenizer.json
  --prompt-ids LIST  prompt token ids, comma-separated (default 17,300,42,5,256,99,3,128)
  --tokens N         tokens to generate (default 32)
  --context N        context length to allocate (default 256)
  --temperature T    sample with this temperature instead of greedy decoding
                     (the first token, chosen by the prompt, stays greedy)
  --top-k K          sample among the K most likely tokens (default 0: up to 1024)
  --top-p P          sample within the smallest set of tokens of probability P (default 1)
  --seed S           seed of the draws (default 0)
  --experts F        routed experts as bf16 (default), mxfp4 or nvfp4: quantized
                     on load; attention, router, norms, embeddings stay bf16
  --save-quantized D write the checkpoint with its experts quantized to the
                     --experts format into folder D (it then loads without
                     quantizing again), before generating
  --draft DIR        decode with DFlash speculative decoding (greedy, identical
                     output) drafted by the DFlash draft checkpoint in DIR
                     (config.json with block_size and dflash_config, and its
                     safetensors); `random` draws a random draft shaped for the
                     model (it accepts about one token per block); prints the
                     acceptance statistics
  --block N          DFlash block size (default: the draft's block_size)
  --ranks N          split the model over N ranks (tensor parallel, all-reduces
                     inside the kernels): GPUs 0..N-1, or N ranks sharing GPU 0
                     when there are fewer GPUs, or N CPU ranks
  --cpu              use the CPU executor even if a GPU is present
  --dump FILE        also write the model folder, prompt, tokens and the logits
                     after the prompt as JSON (scripts/compare_hf.py reads it)
  --help             this text

With a tokenizer.json in the model folder the generated text is printed too.";

struct Args {
    model: Option<PathBuf>,
    preset: String,
    prompt: Vec<u32>,
    text: Option<String>,
    tokens: usize,
    context: usize,
    cpu: bool,
    dump: Option<PathBuf>,
    save_quantized: Option<PathBuf>,
    sampling: Option<Sampling>,
    experts: Option<Fp4Format>,
    draft: Option<String>,
    block: Option<usize>,
    ranks: usize,
}

fn parse() -> std::result::Result<Args, String> {
    let mut a = Args {
        model: None,
        preset: "tiny-moe".into(),
        prompt: vec![17, 300, 42, 5, 256, 99, 3, 128],
        text: None,
        tokens: 32,
        context: 256,
        cpu: false,
        dump: None,
        save_quantized: None,
        sampling: None,
        experts: None,
        draft: None,
        block: None,
        ranks: 1,
    };
    let mut sampling = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        let number = |s: String, name: &str| {
            s.parse::<usize>()
                .map_err(|_| format!("{name}: not a number: {s}"))
        };
        match flag.as_str() {
            "--model" => a.model = Some(PathBuf::from(value("--model")?)),
            "--preset" => a.preset = value("--preset")?,
            "--prompt" => a.text = Some(value("--prompt")?),
            "--prompt-ids" => {
                a.prompt = value("--prompt-ids")?
                    .split(',')
                    .map(|t| {
                        t.trim()
                            .parse::<u32>()
                            .map_err(|_| format!("--prompt-ids: bad id '{t}'"))
                    })
                    .collect::<std::result::Result<_, _>>()?
            }
            "--tokens" => a.tokens = number(value("--tokens")?, "--tokens")?,
            "--temperature" | "--top-p" => {
                let v = value(&flag)?;
                let f = v
                    .parse::<f32>()
                    .map_err(|_| format!("{flag}: not a number: {v}"))?;
                if flag == "--temperature" {
                    sampling.temperature = f;
                } else {
                    sampling.top_p = f;
                }
            }
            "--experts" => {
                let v = value("--experts")?;
                a.experts = match v.as_str() {
                    "bf16" => None,
                    f => Some(
                        Fp4Format::parse(f)
                            .ok_or(format!("--experts: bf16, mxfp4 or nvfp4, not '{f}'"))?,
                    ),
                };
            }
            "--top-k" => sampling.top_k = number(value("--top-k")?, "--top-k")? as u32,
            "--seed" => sampling.seed = number(value("--seed")?, "--seed")? as u64,
            "--context" => a.context = number(value("--context")?, "--context")?,
            "--cpu" => a.cpu = true,
            "--ranks" => a.ranks = number(value("--ranks")?, "--ranks")?.max(1),
            "--draft" => a.draft = Some(value("--draft")?),
            "--block" => a.block = Some(number(value("--block")?, "--block")?),
            "--dump" => a.dump = Some(PathBuf::from(value("--dump")?)),
            "--save-quantized" => {
                a.save_quantized = Some(PathBuf::from(value("--save-quantized")?))
            }
            "--help" | "-h" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other}\n\n{HELP}")),
        }
    }
    if sampling.temperature > 0.0 {
        sampling.validate().map_err(|e| e.to_string())?;
        a.sampling = Some(sampling);
    } else if sampling
        != (Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        })
    {
        return Err("--top-k, --top-p and --seed need --temperature".into());
    }
    if a.draft.is_some() && a.sampling.is_some() {
        return Err("--draft decodes greedily; drop --temperature".into());
    }
    if a.block.is_some() && a.draft.is_none() {
        return Err("--block needs --draft".into());
    }
    Ok(a)
}

/// Generation with the model split over `args.ranks` ranks.
fn on_ranks(args: Args) -> Result<()> {
    use megakernel::cluster::{Cluster, ClusterDflashSession, ClusterModel, ClusterOptions};
    let n = args.ranks;
    let gpus = if args.cpu {
        0
    } else {
        megakernel::cuda::device_count()
    };
    let cluster = match gpus {
        0 => {
            println!("no GPU; {n} ranks on the CPU executor");
            Cluster::cpu(n, CpuOptions::default())?
        }
        g if g >= n => Cluster::gpus(&(0..n).collect::<Vec<_>>(), &ClusterOptions::default())?,
        g => {
            println!("{g} GPUs for {n} ranks: the ranks share GPU 0");
            Cluster::gpus(&vec![0; n], &ClusterOptions::default())?
        }
    };
    println!("cluster: {}", cluster.describe());
    let dir = match &args.model {
        Some(d) => d.clone(),
        None => preset_dir(&args.preset)?,
    };
    let ck = Checkpoint::open(&dir)?;
    let t = Instant::now();
    let model = ClusterModel::load(&cluster, &ck, args.experts)?;
    println!("loaded in {:.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let (first, rest) = match &args.draft {
        None => {
            let mut s = model.session(&cluster, args.context)?;
            let first = s.prefill(&cluster, &args.prompt)?;
            let ttft = t.elapsed();
            let t = Instant::now();
            let rest = s.generate_with(
                &cluster,
                args.tokens.saturating_sub(1),
                args.sampling.as_ref(),
                |_| {},
            )?;
            ((first, ttft), (rest, t.elapsed()))
        }
        Some(draft) => {
            let c = model.config();
            let drafts = (0..n)
                .map(|r| {
                    let (ex, target) = (cluster.rank(r), model.rank(r));
                    if draft == "random" {
                        let layers = DraftConfig::default_layers(c.num_layers);
                        let dc = DraftConfig::for_target(c, layers, args.block.unwrap_or(16));
                        DraftModel::random(ex, &dc, 1, target)
                    } else {
                        DraftModel::open(ex, std::path::Path::new(draft), target)
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            let opts = DflashOptions {
                block_size: args.block,
                injected: None,
            };
            let mut s = ClusterDflashSession::new(&cluster, &model, &drafts, args.context, &opts)?;
            let first = s.prefill(&cluster, &args.prompt)?;
            let ttft = t.elapsed();
            let t = Instant::now();
            let rest = s.generate(&cluster, args.tokens.saturating_sub(1), None)?;
            let took = t.elapsed();
            let st = s.stats(&cluster)?;
            println!(
                "DFlash: {} iterations, mean acceptance length tau {:.2}",
                st.iterations,
                st.mean_acceptance()
            );
            ((first, ttft), (rest, took))
        }
    };
    let ((first, ttft), (rest, gen)) = (first, rest);
    let tokens: Vec<u32> = std::iter::once(first).chain(rest).collect();
    println!("prompt: {:?}", args.prompt);
    println!("tokens: {tokens:?}");
    let gen = gen.as_secs_f64();
    println!(
        "time to first token {:.2} ms; {} tokens in one command per rank: {:.1} tokens/s",
        ttft.as_secs_f64() * 1e3,
        tokens.len() - 1,
        (tokens.len() - 1) as f64 / gen
    );
    Ok(())
}

/// The preset's checkpoint folder, written on first use.
fn preset_dir(name: &str) -> Result<PathBuf> {
    let config = ModelConfig::preset(name).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "unknown preset '{name}' (known: {})",
            ModelConfig::PRESETS.join(", ")
        ))
    })?;
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join("megakernel").join("checkpoints").join(name);
    let current = Checkpoint::open(&dir).and_then(|c| c.validate().map(|_| c.config));
    if current.as_ref() != Ok(&config) {
        println!(
            "writing the random-weight '{name}' checkpoint to {} (once)",
            dir.display()
        );
        write_random(&dir, &config, &WriteOptions::default())?;
    }
    Ok(dir)
}

fn main() -> Result<()> {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if args.ranks > 1 {
        if args.dump.is_some() || args.save_quantized.is_some() {
            eprintln!("--dump and --save-quantized run on one device; drop --ranks");
            std::process::exit(2);
        }
        return on_ranks(args);
    }
    let (exec, why): (Box<dyn Executor>, Option<Error>) = if args.cpu {
        (Box::new(CpuExecutor::new(CpuOptions::default())), None)
    } else {
        megakernel::default_executor_with_reason()
    };
    if let Some(e) = why {
        println!("no GPU runtime ({e}); running on the CPU executor");
    }
    let dir = match &args.model {
        Some(d) => d.clone(),
        None => preset_dir(&args.preset)?,
    };
    let ck = Checkpoint::open(&dir)?;
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = if tokenizer_path.exists() {
        Some(Tokenizer::from_file(&tokenizer_path)?)
    } else {
        None
    };
    let mut args = args;
    if let Some(text) = &args.text {
        let t = tokenizer.as_ref().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "--prompt needs {}; use --prompt-ids",
                tokenizer_path.display()
            ))
        })?;
        args.prompt = t.encode(text)?;
    }
    let c = &ck.config;
    println!(
        "model: {} ({} layers, hidden {}, {} heads / {} kv, vocab {}, {} parameters)",
        dir.display(),
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.vocab_size,
        count(c.num_params())
    );
    println!("executor: {}", exec.describe());
    if let Some(out) = &args.save_quantized {
        let format = args.experts.ok_or_else(|| {
            Error::InvalidArgument("--save-quantized needs --experts mxfp4 or nvfp4".into())
        })?;
        write_quantized(out, &ck, format, &WriteOptions::default())?;
        println!("wrote {} ({} experts)", out.display(), format.name());
    }
    let t = Instant::now();
    let model = Model::load_with(exec.as_ref(), &ck, args.experts)?;
    let ex = exec.as_ref();
    let (first, logits, rest, gen) = match &args.draft {
        None => {
            let mut d = model.session(ex, args.context)?;
            println!("loaded in {:.2} s", t.elapsed().as_secs_f64());
            let t = Instant::now();
            let first = d.prefill(ex, &args.prompt)?;
            let ttft = t.elapsed().as_secs_f64();
            let logits = d.logits(ex)?;
            let t = Instant::now();
            let n = args.tokens.saturating_sub(1);
            let rest = d.generate_with(ex, n, args.sampling.as_ref(), |_| {})?;
            (first, logits, rest, (ttft, t.elapsed().as_secs_f64()))
        }
        Some(draft) => {
            let draft = if draft == "random" {
                let layers = DraftConfig::default_layers(c.num_layers);
                let dc = DraftConfig::for_target(c, layers, args.block.unwrap_or(16));
                DraftModel::random(ex, &dc, 1, &model)?
            } else {
                DraftModel::open(ex, std::path::Path::new(draft), &model)?
            };
            let opts = DflashOptions {
                block_size: args.block,
                injected: None,
            };
            let mut d = DflashSession::new(ex, &model, &draft, args.context, &opts)?;
            println!(
                "loaded in {:.2} s; DFlash draft: {} layers, block {}, target layers {:?}",
                t.elapsed().as_secs_f64(),
                draft.config().layers.num_layers,
                d.block_size(),
                draft.config().target_layer_ids
            );
            let t = Instant::now();
            let first = d.prefill(ex, &args.prompt)?;
            let ttft = t.elapsed().as_secs_f64();
            let logits = d.session().logits(ex)?;
            let t = Instant::now();
            let rest = d.generate(ex, args.tokens.saturating_sub(1), None)?;
            let gen = t.elapsed().as_secs_f64();
            let st = d.stats(ex)?;
            let hist: Vec<String> = st
                .histogram
                .iter()
                .enumerate()
                .filter(|(_, &n)| n > 0)
                .map(|(k, n)| format!("{k}: {n}"))
                .collect();
            println!(
                "DFlash: {} iterations, mean acceptance length tau {:.2}; accepted per iteration {{{}}}",
                st.iterations,
                st.mean_acceptance(),
                hist.join(", ")
            );
            (first, logits, rest, (ttft, gen))
        }
    };
    let (ttft, gen) = gen;
    let tokens: Vec<u32> = std::iter::once(first).chain(rest).collect();
    println!("prompt: {:?}", args.prompt);
    println!("tokens: {tokens:?}");
    if let Some(t) = &tokenizer {
        println!("text: {:?}", t.decode(&tokens)?);
    }
    println!(
        "time to first token {:.2} ms ({} prompt tokens, {:.0} prompt tokens/s); {} tokens in one command: {:.1} tokens/s ({:.3} ms/token)",
        ttft * 1e3,
        args.prompt.len(),
        args.prompt.len() as f64 / ttft,
        tokens.len() - 1,
        (tokens.len() - 1) as f64 / gen,
        gen * 1e3 / (tokens.len() - 1).max(1) as f64
    );
    if let Some(path) = &args.dump {
        let json = format!(
            "{{\"model_dir\": {:?}, \"executor\": {:?}, \"prompt\": {:?}, \"tokens\": {:?}, \"logits\": {:?}}}",
            dir.display().to_string(),
            exec.describe(),
            args.prompt,
            tokens,
            logits
        );
        std::fs::write(path, json)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// A parameter count with the largest unit that leaves at least 1 (B, M, K).
fn count(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} K", n as f64 / 1e3),
        n => n.to_string(),
    }
}
