//! The Rust and CUDA sides agree on every shared record: the CUDA headers pin
//! sizes and offsets with MK_SIZE / MK_OFFSET (checked by nvcc), and this test
//! checks the same numbers against the Rust structs. It also checks constants,
//! the registry and the committed PTX.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use megakernel::abi;
use megakernel::task::registry;

fn cuda_sources() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for dir in ["kernels", "kernels/include", "kernels/tasks"] {
        for e in fs::read_dir(dir).expect("run from the crate root") {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "cuh" || x == "cu") {
                out.push((p.display().to_string(), fs::read_to_string(&p).unwrap()));
            }
        }
    }
    out
}

/// (struct, field or "" for the size) -> value, from MK_SIZE / MK_OFFSET lines.
fn cuda_layouts() -> BTreeMap<(String, String), usize> {
    let mut m = BTreeMap::new();
    for (_, text) in cuda_sources() {
        for line in text.lines().map(str::trim) {
            let (body, is_size) = if let Some(b) = line.strip_prefix("MK_SIZE(") {
                (b, true)
            } else if let Some(b) = line.strip_prefix("MK_OFFSET(") {
                (b, false)
            } else {
                continue;
            };
            let parts: Vec<&str> = body
                .trim_end_matches(");")
                .split(',')
                .map(str::trim)
                .collect();
            let (name, field, value) = if is_size {
                (parts[0], "", parts[1])
            } else {
                (parts[0], parts[1], parts[2])
            };
            m.insert(
                (name.to_string(), field.to_string()),
                value.parse().unwrap(),
            );
        }
    }
    m
}

#[test]
fn layouts_match_the_cuda_headers() {
    let cuda = cuda_layouts();
    let mut rust = abi::layouts::all();
    rust.extend(registry::layouts());
    let mut checked = 0;
    for (name, size, fields) in rust {
        assert_eq!(
            cuda.get(&(name.to_string(), String::new())),
            Some(&size),
            "size of {name}"
        );
        for (f, off) in fields {
            assert_eq!(
                cuda.get(&(name.to_string(), f.to_string())),
                Some(&off),
                "offset of {name}.{f}"
            );
            checked += 1;
        }
    }
    // Every CUDA assertion belongs to a Rust struct that was checked.
    let rust_names: Vec<String> = abi::layouts::all()
        .into_iter()
        .chain(registry::layouts())
        .map(|l| l.0.to_string())
        .collect();
    for (name, _) in cuda.keys() {
        assert!(
            rust_names.contains(name),
            "{name} is pinned in CUDA but has no Rust layout"
        );
    }
    assert!(checked > 50);
}

#[test]
fn constants_match_the_cuda_header() {
    let text = fs::read_to_string("kernels/include/abi.cuh").unwrap();
    let value = |name: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with("constexpr") && l.contains(&format!(" {name} =")))
            .unwrap_or_else(|| panic!("{name} missing from abi.cuh"));
        let v = line
            .split('=')
            .nth(1)
            .unwrap()
            .trim()
            .trim_end_matches(';')
            .trim_end_matches('u');
        match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).unwrap(),
            None => v.parse().unwrap(),
        }
    };
    let pairs: [(&str, u64); 17] = [
        ("NO_EVENT", u64::from(abi::NO_EVENT)),
        ("TASK_ARG_SLOTS", abi::TASK_ARG_SLOTS as u64),
        ("TASK_WAITS", abi::TASK_WAITS as u64),
        ("COMMAND_PARAMS", abi::COMMAND_PARAMS as u64),
        ("BLOCK_THREADS", u64::from(abi::BLOCK_THREADS)),
        ("CMD_RUN", u64::from(abi::CMD_RUN)),
        ("CMD_SHUTDOWN", u64::from(abi::CMD_SHUTDOWN)),
        ("COMMAND_RING_CAP", u64::from(abi::COMMAND_RING_CAP)),
        ("OUTPUT_RING_CAP", u64::from(abi::OUTPUT_RING_CAP)),
        ("FAULT_HANG", u64::from(abi::fault::HANG)),
        ("FAULT_BAD_OPCODE", u64::from(abi::fault::BAD_OPCODE)),
        ("FAULT_OUT_OF_RANGE", u64::from(abi::fault::OUT_OF_RANGE)),
        ("FAULT_BAD_ARGS", u64::from(abi::fault::BAD_ARGS)),
        ("WAIT_ITERATION", u64::from(abi::wait_site::ITERATION)),
        ("WAIT_OUTPUT_SPACE", u64::from(abi::wait_site::OUTPUT_SPACE)),
        ("WAIT_OUTPUT_ORDER", u64::from(abi::wait_site::OUTPUT_ORDER)),
        (
            "DTYPE_BF16",
            u64::from(megakernel::buffer::DType::Bf16.code()),
        ),
    ];
    for (name, want) in pairs {
        assert_eq!(value(name), want, "{name}");
    }
}

#[test]
fn registry_is_consistent_with_the_kernels() {
    let all = registry::all();
    let mut ops: Vec<u16> = all.iter().map(|x| x.0).collect();
    ops.sort();
    ops.dedup();
    assert_eq!(ops.len(), all.len(), "duplicate opcodes");
    assert!(!ops.contains(&0), "opcode 0 is reserved");
    for (op, name) in all {
        let path = format!("kernels/tasks/{name}.cuh");
        let text =
            fs::read_to_string(&path).unwrap_or_else(|_| panic!("{path} missing for opcode {op}"));
        assert!(
            text.contains(&format!("void task_{name}(const Ctx&")),
            "{path} lacks task_{name}"
        );
        assert!(
            Path::new(&format!("src/task/{name}.rs")).exists(),
            "src/task/{name}.rs missing"
        );
        assert_eq!(registry::kind_name(op), Some(name));
    }
}

#[test]
fn committed_ptx_is_loadable_by_driver_580() {
    for (file, target) in [
        ("ptx/megakernel.compute_80.ptx", "sm_80"),
        ("ptx/megakernel.sm_90a.ptx", "sm_90a"),
    ] {
        let text = fs::read_to_string(file).unwrap();
        assert!(text.contains(&format!(".target {target}")), "{file} target");
        // PTX ISA 9.0 is what CUDA 13.0 drivers accept; 9.1+ is rejected.
        assert!(text.contains(".version 9.0"), "{file} must be PTX ISA 9.0");
        assert!(
            text.contains(".entry mk_resident("),
            "{file} lacks the resident kernel"
        );
        assert!(!text.contains(".file"), "{file} records source paths");
    }
    assert_eq!(
        megakernel::cuda::ptx::PTX_SM_90A,
        fs::read_to_string("ptx/megakernel.sm_90a.ptx").unwrap()
    );
}

#[test]
fn committed_cubin_is_the_embedded_hopper_machine_code() {
    let cubin = fs::read("ptx/megakernel.sm_90a.cubin").unwrap();
    assert_eq!(&cubin[..4], b"\x7fELF", "not an ELF file");
    // e_machine (offset 18, little-endian) is EM_CUDA = 190.
    assert_eq!(
        u16::from_le_bytes([cubin[18], cubin[19]]),
        190,
        "not CUDA machine code"
    );
    for name in ["mk_resident", "mk_resident_trace", "mk_probe_copy"] {
        assert!(
            cubin.windows(name.len()).any(|w| w == name.as_bytes()),
            "the cubin lacks {name}"
        );
    }
    assert_eq!(megakernel::cuda::ptx::CUBIN_SM_90A, &cubin[..]);
    assert_eq!(megakernel::cuda::ptx::select(9, 0).cubin, Some(&cubin[..]));
    assert_eq!(megakernel::cuda::ptx::select(8, 0).cubin, None);
}
