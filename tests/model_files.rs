//! Configs, safetensors files and random checkpoints: round trips and a typed
//! error for every malformed input.

use std::path::Path;

use megakernel::error::LoadError;
use megakernel::model::checkpoint::{tensor_values, write_random, WriteOptions};
use megakernel::model::safetensors::{self, write, TensorData};
use megakernel::model::{Checkpoint, ModelConfig, SafeTensors, TensorDtype};

fn cfg_err(text: &str) -> String {
    match ModelConfig::from_json(text) {
        Err(LoadError::Config(m)) => m,
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn presets_round_trip_through_config_json() {
    for name in ModelConfig::PRESETS {
        let c = ModelConfig::preset(name).unwrap();
        assert_eq!(ModelConfig::from_json(&c.to_json()).unwrap(), c, "{name}");
    }
    // Published sizes: Qwen3-30B-A3B has about 30.5 B parameters, Qwen3-0.6B about 0.6 B (tied).
    let p30 = ModelConfig::preset("qwen3-30b-a3b").unwrap().num_params() as f64;
    assert!((30.0e9..31.0e9).contains(&p30), "{p30}");
    // Qwen3-235B-A22B: about 235 B; the trillion-parameter shape: about 1.03 T.
    let p235 = ModelConfig::preset("qwen3-235b-a22b").unwrap().num_params() as f64;
    assert!((230.0e9..240.0e9).contains(&p235), "{p235}");
    let p1t = ModelConfig::preset("moe-1t").unwrap().num_params() as f64;
    assert!((1.0e12..1.06e12).contains(&p1t), "{p1t}");
    // Bytes of a batch-1 decode step at 1024 positions with MXFP4 experts:
    // about 22.5 GB and 30.5 GB (the sizes the several-GPU targets assume).
    let step = |n: &str| {
        ModelConfig::preset(n)
            .unwrap()
            .decode_bytes_with(1024, Some(megakernel::quant::Fp4Format::Mxfp4)) as f64
    };
    assert!((22.0e9..23.0e9).contains(&step("qwen3-235b-a22b")));
    assert!((30.0e9..31.0e9).contains(&step("moe-1t")));
    let p06 = ModelConfig::preset("qwen3-0.6b").unwrap().num_params() as f64;
    assert!((0.55e9..0.65e9).contains(&p06), "{p06}");
}

#[test]
fn moe_layer_rule() {
    let mut c = ModelConfig::preset("tiny-moe").unwrap();
    let m = c.moe.as_mut().unwrap();
    m.decoder_sparse_step = 2;
    m.mlp_only_layers = vec![3];
    c.num_layers = 6;
    let moe: Vec<bool> = (0..6).map(|l| c.is_moe_layer(l)).collect();
    assert_eq!(moe, [false, true, false, false, false, true]);
    assert!(c
        .tensors()
        .iter()
        .any(|(n, _)| n == "model.layers.1.mlp.experts.7.down_proj.weight"));
    assert!(c
        .tensors()
        .iter()
        .any(|(n, _)| n == "model.layers.3.mlp.gate_proj.weight"));
}

#[test]
fn bad_configs_are_typed_errors() {
    let good = ModelConfig::preset("tiny-moe").unwrap().to_json();
    let edit = |k: &str, v: serde_json::Value| {
        let mut j: serde_json::Value = serde_json::from_str(&good).unwrap();
        j[k] = v;
        j.to_string()
    };
    assert!(cfg_err("{not json").contains("not valid JSON"));
    assert!(cfg_err(&edit("model_type", "llama".into())).contains("unsupported model_type 'llama'"));
    assert!(cfg_err(&edit("hidden_size", (-3).into())).contains("hidden_size"));
    assert!(cfg_err(&edit("num_key_value_heads", 3.into())).contains("multiple"));
    assert!(cfg_err(&edit("num_experts_per_tok", 99.into())).contains("exceeds"));
    assert!(
        cfg_err(&edit("rope_scaling", serde_json::json!({"type": "yarn"})))
            .contains("rope_scaling")
    );
    assert!(cfg_err(&edit("hidden_act", "gelu".into())).contains("hidden_act"));
    assert!(cfg_err(&edit(
        "rope_parameters",
        serde_json::json!({"rope_type": "yarn", "rope_theta": 1e6})
    ))
    .contains("rope_type 'yarn'"));
}

/// transformers 5 spells some keys differently; both spellings load alike.
#[test]
fn transformers5_config_spellings_load() {
    let preset = ModelConfig::preset("tiny-moe").unwrap();
    let good = preset.to_json();
    let mut j: serde_json::Value = serde_json::from_str(&good).unwrap();
    let o = j.as_object_mut().unwrap();
    let experts = o.remove("num_experts").unwrap();
    o.insert("num_local_experts".into(), experts);
    o.remove("rope_theta");
    o.insert(
        "rope_parameters".into(),
        serde_json::json!({"rope_type": "default", "rope_theta": 12345.0}),
    );
    o.insert(
        "rope_scaling".into(),
        serde_json::json!({"rope_type": "default"}),
    );
    let c = ModelConfig::from_json(&j.to_string()).unwrap();
    assert_eq!(c.rope_theta, 12345.0);
    assert_eq!(
        c.moe.as_ref().unwrap().num_experts,
        preset.moe.as_ref().unwrap().num_experts
    );
    let mut j: serde_json::Value = serde_json::from_str(&good).unwrap();
    j.as_object_mut().unwrap().remove("vocab_size");
    assert!(cfg_err(&j.to_string()).contains("missing 'vocab_size'"));
}

fn sample_file(dir: &Path) -> (std::path::PathBuf, Vec<f32>) {
    let vals: Vec<f32> = (0..24).map(|i| i as f32 * 0.25 - 3.0).collect();
    let bf: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let path = dir.join("t.safetensors");
    write(
        &path,
        &[
            ("a".into(), TensorDtype::Bf16, vec![4, 6], bf),
            ("b".into(), TensorDtype::F32, vec![24], f32b),
        ],
    )
    .unwrap();
    (path, vals)
}

#[test]
fn safetensors_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (path, vals) = sample_file(dir.path());
    let f = SafeTensors::open(&path).unwrap();
    assert_eq!(f.tensors()["a"].shape, vec![4, 6]);
    assert_eq!(f.read_f32("a").unwrap(), vals);
    assert_eq!(f.read_f32("b").unwrap(), vals);
    assert!(matches!(f.read_f32("c"), Err(LoadError::MissingTensor(_))));
}

#[test]
fn malformed_safetensors_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = sample_file(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let with_header = |h: &str| {
        let mut h = h.to_string();
        while h.len() % 8 != 0 {
            h.push(' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&bytes[8 + n..]);
        out
    };
    let check = |b: &[u8]| safetensors::parse("x", b);
    assert!(matches!(
        check(&bytes[..5]),
        Err(LoadError::Truncated { .. })
    ));
    assert!(matches!(
        check(&bytes[..8 + n - 3]),
        Err(LoadError::Truncated { .. })
    ));
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(check(&huge), Err(LoadError::BadHeader { .. })));
    assert!(matches!(
        check(&with_header("{\"a\": ")),
        Err(LoadError::BadHeader { .. })
    ));
    assert!(matches!(
        check(&with_header("[1, 2]")),
        Err(LoadError::BadHeader { .. })
    ));
    let t = |find: &str, repl: &str| check(&with_header(&header.replacen(find, repl, 1)));
    // Data past the end of the file, and a file cut inside the data.
    assert!(matches!(
        t("\"data_offsets\":[48,144]", "\"data_offsets\":[48,1440]"),
        Err(LoadError::BadTensor { .. })
    ));
    assert!(matches!(
        check(&bytes[..bytes.len() - 10]),
        Err(LoadError::BadTensor { .. })
    ));
    assert!(matches!(
        t("[4,6]", "[4,7]"),
        Err(LoadError::BadTensor { .. })
    ));
    assert!(matches!(
        t("\"BF16\"", "\"Q9\""),
        Err(LoadError::BadTensor { .. })
    ));
    assert!(matches!(
        t("\"shape\":[4,6]", "\"shape\":\"4x6\""),
        Err(LoadError::BadTensor { .. })
    ));
    // A dtype the format knows but the loader does not convert.
    let i16 = t("\"BF16\"", "\"I16\"").unwrap();
    assert_eq!(i16["a"].dtype, "I16");
}

#[test]
fn random_checkpoints_load_and_validate() {
    for (preset, shard) in [
        ("tiny", None),
        ("tiny-moe", None),
        ("tiny-moe", Some(40_000)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = ModelConfig::preset(preset).unwrap();
        let opts = WriteOptions {
            shard_bytes: shard,
            ..WriteOptions::default()
        };
        write_random(dir.path(), &config, &opts).unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        ck.validate().unwrap();
        assert_eq!(ck.config, config);
        if shard.is_some() {
            assert!(ck.num_files() > 1, "{preset} should be sharded");
        }
        // Values are the generator's, rounded to bf16, and look like their distribution.
        let name = "model.layers.1.self_attn.q_proj.weight";
        let shape = ck.info(name).unwrap().shape.clone();
        let want: Vec<f32> = tensor_values(&config, opts.seed, name, &shape)
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        let got = ck.read_f32(name).unwrap();
        assert_eq!(got, want);
        let var = got.iter().map(|v| v * v).sum::<f32>() / got.len() as f32;
        assert!(
            (var * config.hidden_size as f32 - 1.0).abs() < 0.15,
            "variance {var}"
        );
        let norm = ck.read_f32("model.norm.weight").unwrap();
        assert!((norm.iter().sum::<f32>() / norm.len() as f32 - 1.0).abs() < 0.05);
    }
}

#[test]
fn checkpoint_content_errors_are_typed() {
    let config = ModelConfig::preset("tiny").unwrap();
    let write_with = |edit: &dyn Fn(&mut Vec<TensorData>)| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), config.to_json()).unwrap();
        let mut ts: Vec<_> = config
            .tensors()
            .into_iter()
            .map(|(n, s)| {
                let bytes = vec![0x3f; s.iter().product::<usize>() * 2];
                (n, TensorDtype::Bf16, s, bytes)
            })
            .collect();
        edit(&mut ts);
        write(&dir.path().join("model.safetensors"), &ts).unwrap();
        let r = Checkpoint::open(dir.path()).and_then(|c| c.validate());
        (dir, r)
    };
    assert_eq!(write_with(&|_| {}).1, Ok(()));
    let (_d, r) = write_with(&|ts| {
        ts.remove(3);
    });
    assert!(matches!(r, Err(LoadError::MissingTensor(_))));
    let (_d, r) = write_with(&|ts| {
        ts.push((
            "model.rotary_emb.inv_freq".into(),
            TensorDtype::Bf16,
            vec![2],
            vec![0; 4],
        ))
    });
    assert_eq!(
        r,
        Err(LoadError::UnexpectedTensor(
            "model.rotary_emb.inv_freq".into()
        ))
    );
    let (_d, r) = write_with(&|ts| {
        ts[2].2 = vec![ts[2].2.iter().product::<usize>()];
    });
    assert!(matches!(r, Err(LoadError::Shape { .. })));
    let (_d, r) = write_with(&|ts| {
        // Same bytes read as 32-bit floats: half the elements, a shape mismatch in the header.
        ts[1].1 = TensorDtype::F32;
    });
    assert!(matches!(r, Err(LoadError::BadTensor { .. })));
    // Missing files and a missing config.
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        Checkpoint::open(empty.path()),
        Err(LoadError::Io { .. })
    ));
    std::fs::write(empty.path().join("config.json"), config.to_json()).unwrap();
    assert!(matches!(
        Checkpoint::open(empty.path()),
        Err(LoadError::Io { .. })
    ));
}

#[test]
fn decode_bytes_match_the_design_table() {
    // Bytes per batch-1 step at 1024 positions (weights once, KV once).
    for (preset, gb) in [
        ("qwen3-0.6b", 1.31),
        ("qwen3-8b", 15.3),
        ("qwen3-30b-a3b", 6.18),
    ] {
        let got = ModelConfig::preset(preset).unwrap().decode_bytes(1024) as f64 / 1e9;
        assert!(
            (got / gb - 1.0).abs() < 0.02,
            "{preset}: {got:.3} GB vs {gb} GB"
        );
    }
}

#[test]
fn tokenizer_json_round_trip_and_errors() {
    use megakernel::model::Tokenizer;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    let json = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"hello": 0, "world": 1, "[UNK]": 2}, "unk_token": "[UNK]"}}"#;
    std::fs::write(&path, json).unwrap();
    let t = Tokenizer::from_file(&path).unwrap();
    assert_eq!(t.encode("hello world again").unwrap(), vec![0, 1, 2]);
    assert_eq!(
        t.decode(&[1, 0])
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["world", "hello"]
    );
    std::fs::write(&path, "{\"model\": 3}").unwrap();
    assert!(matches!(
        Tokenizer::from_file(&path),
        Err(LoadError::BadHeader { .. })
    ));
    assert!(matches!(
        Tokenizer::from_file(&dir.path().join("none.json")),
        Err(LoadError::Io { .. })
    ));
}

#[test]
fn fused_expert_layout_loads_like_per_expert_tensors() {
    let config = ModelConfig::preset("tiny-moe").unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_random(
        a.path(),
        &config,
        &WriteOptions {
            dtype: TensorDtype::F32,
            ..WriteOptions::default()
        },
    )
    .unwrap();
    let per_expert = Checkpoint::open(a.path()).unwrap();
    // The same weights with each MoE layer's experts fused as recent transformers versions hold them.
    let moe = config.moe.as_ref().unwrap();
    let bytes = |v: Vec<f32>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut tensors: Vec<TensorData> = Vec::new();
    for (name, shape) in config.tensors() {
        if !name.contains(".mlp.experts.") {
            tensors.push((
                name.clone(),
                TensorDtype::F32,
                shape,
                bytes(per_expert.read_f32(&name).unwrap()),
            ));
        }
    }
    let (e, i, h) = (
        moe.num_experts,
        moe.moe_intermediate_size,
        config.hidden_size,
    );
    for l in 0..config.num_layers {
        let p = format!("model.layers.{l}.mlp.experts.");
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for x in 0..e {
            gate_up.extend(
                per_expert
                    .read_f32(&format!("{p}{x}.gate_proj.weight"))
                    .unwrap(),
            );
            gate_up.extend(
                per_expert
                    .read_f32(&format!("{p}{x}.up_proj.weight"))
                    .unwrap(),
            );
            down.extend(
                per_expert
                    .read_f32(&format!("{p}{x}.down_proj.weight"))
                    .unwrap(),
            );
        }
        tensors.push((
            format!("{p}gate_up_proj"),
            TensorDtype::F32,
            vec![e, 2 * i, h],
            bytes(gate_up),
        ));
        tensors.push((
            format!("{p}down_proj"),
            TensorDtype::F32,
            vec![e, h, i],
            bytes(down),
        ));
    }
    std::fs::write(b.path().join("config.json"), config.to_json()).unwrap();
    write(&b.path().join("model.safetensors"), &tensors).unwrap();
    let fused = Checkpoint::open(b.path()).unwrap();
    fused.validate().unwrap();
    for (name, shape) in config.tensors() {
        assert_eq!(fused.info(&name).unwrap().shape, shape, "{name}");
        assert_eq!(
            fused.read_f32(&name).unwrap(),
            per_expert.read_f32(&name).unwrap(),
            "{name}"
        );
    }
    // A fused tensor of the wrong rank is a typed error.
    tensors.retain(|t| !t.0.ends_with("layers.0.mlp.experts.down_proj"));
    tensors.push((
        "model.layers.0.mlp.experts.down_proj".into(),
        TensorDtype::F32,
        vec![e * h * i],
        vec![0; 4 * e * h * i],
    ));
    write(&b.path().join("model.safetensors"), &tensors).unwrap();
    assert!(matches!(
        Checkpoint::open(b.path()),
        Err(LoadError::BadTensor { .. })
    ));
}
