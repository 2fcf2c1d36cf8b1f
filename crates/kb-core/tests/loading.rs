//! Model loading: the weight formats, KoBART-v1's full shapes in the hub's `.bin` layout, the
//! hub cache, and the errors users see for broken model folders.

mod common;

use std::collections::HashMap;

use common::torch_bin::write_torch_bin;
use common::*;
use kb_core::candle_core::{DType, Device, Tensor};
use kb_core::model::Pass;
use kb_core::weights::expected_tensors;
use kb_core::{BartConfig, KeywordModel, ModelSource};

fn load_err(dir: &std::path::Path) -> String {
    KeywordModel::load_dir(dir, DType::F32, &Device::Cpu)
        .map(|_| ())
        .unwrap_err()
        .to_string()
}

fn rewrite_safetensors(dir: &std::path::Path, edit: impl Fn(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut t = kb_core::candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut t);
    kb_core::candle_core::safetensors::save(&t, &path).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("tiny-kobart", |f| f == "pytorch_model.bin");
    rewrite_safetensors(dir.path(), |t| {
        t.remove("model.decoder.layers.1.fc2.weight");
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("missing tensor(s) model.decoder.layers.1.fc2.weight"),
        "{err}"
    );
    assert!(err.contains("model.safetensors"), "{err}");
}

/// Found by tests/fuzz_parsers.rs: with no `final_logits_bias` in the checkpoint, loading
/// allocated zeros of config.json's `vocab_size` before checking any shape, so a huge
/// `vocab_size` panicked (capacity overflow) or aborted (out of memory).
#[test]
fn a_vocab_size_the_checkpoint_lacks_is_a_shape_error_without_a_bias() {
    for vocab_size in [u64::MAX, 1 << 40] {
        let dir = copy_fixture("tiny-kobart", |f| f == "pytorch_model.bin");
        rewrite_safetensors(dir.path(), |t| {
            t.remove("final_logits_bias");
        });
        let config = dir.path().join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        cfg["vocab_size"] = vocab_size.into();
        std::fs::write(&config, cfg.to_string()).unwrap();
        let err = load_err(dir.path());
        assert!(
            err.contains(&format!(
                "model.shared.weight: expected shape [{vocab_size}, 64], found [694, 64]"
            )),
            "{err}"
        );
    }
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let dir = copy_fixture("tiny-kobart", |f| f == "pytorch_model.bin");
    rewrite_safetensors(dir.path(), |t| {
        t.insert(
            "model.encoder.layers.0.fc1.weight".into(),
            Tensor::zeros((100, 64), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load_err(dir.path());
    assert!(
        err.contains(
            "model.encoder.layers.0.fc1.weight: expected shape [128, 64], found [100, 64]"
        ),
        "{err}"
    );
}

#[test]
fn missing_files_and_bad_configs_are_explained() {
    let dir = copy_fixture("tiny-kobart", |f| f == "tokenizer.json");
    let err = ModelSource::Local(dir.path().into())
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(err.contains("lacks tokenizer.json"), "{err}");

    let dir = copy_fixture("tiny-kobart", |f| {
        f.ends_with(".safetensors") || f.ends_with(".bin")
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("no weights") && err.contains("pytorch_model.bin"),
        "{err}"
    );

    let dir = copy_fixture("tiny-kobart", |_| false);
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"gelu\"", "\"mish\"");
    std::fs::write(&cfg, text).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("activation_function"),
        "{err}"
    );

    std::fs::write(&cfg, "{ not json").unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json"), "{err}");

    let dir = copy_fixture("tiny-kobart", |f| f == "pytorch_model.bin");
    std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("cannot read weights"),
        "{err}"
    );
}

#[test]
fn sharded_safetensors_load() {
    let dir = copy_fixture("tiny-kobart", |f| {
        f.starts_with("model.") || f.ends_with(".bin")
    });
    let all = kb_core::candle_core::safetensors::load(
        fixture("tiny-kobart").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in all.into_iter().enumerate() {
        let shard = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        map.insert(name.clone(), shard.into());
        if i % 2 == 0 {
            a.insert(name, t);
        } else {
            b.insert(name, t);
        }
    }
    kb_core::candle_core::safetensors::save(
        &a,
        dir.path().join("model-00001-of-00002.safetensors"),
    )
    .unwrap();
    kb_core::candle_core::safetensors::save(
        &b,
        dir.path().join("model-00002-of-00002.safetensors"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let sharded = KeywordModel::load_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let single = KeywordModel::load_dir(&fixture("tiny-kobart"), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[5u32, 40, 41, 1]], &Device::Cpu).unwrap();
    let dec = Tensor::new(&[[1u32, 50]], &Device::Cpu).unwrap();
    let x = sharded
        .model
        .forward(&ids, None, &dec, None, Pass::Inference)
        .unwrap();
    let y = single
        .model
        .forward(&ids, None, &dec, None, Pass::Inference)
        .unwrap();
    assert_eq!(max_abs_diff(&x, &y), 0.0);
}

/// Inference reads weights lazily (`LazyWeights`, one tensor when its layer is built) and
/// training eagerly (`load_checked`): both must give every expected tensor the same values, fill
/// the same tensors and report the same unused ones, for each checkpoint layout.
#[test]
fn lazily_read_weights_equal_eagerly_read_ones() {
    use kb_core::candle_nn::var_builder::SimpleBackend;
    use kb_core::weights::{load_checked, LazyWeights, WeightFiles};

    let bare_names = |t: &mut HashMap<String, Tensor>| {
        // A bare BartModel's names, its tied copies present and no shared or bias entry.
        let shared = t.remove("model.shared.weight").unwrap();
        t.remove("final_logits_bias");
        *t = t
            .drain()
            .map(|(n, v)| (n.trim_start_matches("model.").to_string(), v))
            .collect();
        t.insert("encoder.embed_tokens.weight".into(), shared.clone());
        t.insert("decoder.embed_tokens.weight".into(), shared);
        t.insert(
            "unused.extra".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
    };
    type Edit = Box<dyn Fn(&mut HashMap<String, Tensor>)>;
    let layouts: [(&str, Edit); 3] = [
        ("as written by transformers", Box::new(|_| {})),
        ("bare BartModel names", Box::new(bare_names)),
        (
            "f16 with the embedding only as lm_head",
            Box::new(|t| {
                let shared = t.remove("model.shared.weight").unwrap();
                t.insert("lm_head.weight".into(), shared);
                for v in t.values_mut() {
                    *v = v.to_dtype(DType::F16).unwrap();
                }
            }),
        ),
    ];
    let cfg = BartConfig::from_file(&fixture("tiny-kobart").join("config.json")).unwrap();
    for (layout, edit) in layouts {
        let dir = copy_fixture("tiny-kobart", |f| f == "pytorch_model.bin");
        rewrite_safetensors(dir.path(), edit);
        let files = WeightFiles::find(dir.path()).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let (eager, eager_report) = load_checked(&files, &cfg, dtype, &Device::Cpu).unwrap();
            let lazy = LazyWeights::open(&files, &cfg).unwrap();
            assert_eq!(lazy.report().filled, eager_report.filled, "{layout}");
            assert_eq!(
                lazy.report().unexpected,
                eager_report.unexpected,
                "{layout}"
            );
            for (name, shape) in expected_tensors(&cfg) {
                let want = &eager[&name];
                let got = lazy
                    .get(
                        shape.as_slice().into(),
                        &name,
                        Default::default(),
                        dtype,
                        &Device::Cpu,
                    )
                    .unwrap();
                assert_eq!(got.dtype(), dtype, "{layout}: {name}");
                assert_eq!(got.dims(), want.dims(), "{layout}: {name}");
                assert_eq!(max_abs_diff(&got, want), 0.0, "{layout}: {name}");
                // Read twice (its pages were released after the first read): the same values.
                let again = lazy.get_unchecked(&name, dtype, &Device::Cpu).unwrap();
                assert_eq!(max_abs_diff(&again, want), 0.0, "{layout}: {name} again");
            }
        }
    }
}

/// A safetensors file cut short is refused when the folder is opened, naming the file and a
/// tensor, before any layer is built.
#[test]
fn a_truncated_safetensors_file_is_refused_when_opened() {
    let dir = copy_fixture("tiny-kobart", |f| f == "pytorch_model.bin");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors: cannot read weights"),
        "{err}"
    );
}

#[test]
fn tensor_names_match_what_transformers_writes() {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("golden/tensor_names.json")).unwrap(),
    )
    .unwrap();
    let cfg = BartConfig::from_file(&fixture("tiny-kobart").join("config.json")).unwrap();
    let ours: serde_json::Map<String, serde_json::Value> = expected_tensors(&cfg)
        .into_iter()
        .map(|(n, s)| (n, serde_json::json!(s)))
        .collect();
    assert_eq!(serde_json::Value::Object(ours), golden["safetensors"]);
}

/// KoBART-v1's real shapes, with random weights written by the test in the layout of a bare
/// `BartModel` `.bin` (no `model.` prefix, tied copies present, no `final_logits_bias`).
#[test]
fn full_kobart_v1_shapes_from_a_hub_style_bin() {
    let cfg = BartConfig::kobart_v1_shapes();
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = Vec::new();
    for (name, shape) in expected_tensors(&cfg) {
        if name == "final_logits_bias" {
            continue;
        }
        let t = Tensor::randn(0f32, 0.02, shape.as_slice(), &Device::Cpu).unwrap();
        let bare = name.strip_prefix("model.").unwrap().to_string();
        if bare == "shared.weight" {
            tensors.push(("encoder.embed_tokens.weight".to_string(), t.clone()));
            tensors.push(("decoder.embed_tokens.weight".to_string(), t.clone()));
        }
        tensors.push((bare, t));
    }
    write_torch_bin(&dir.path().join("pytorch_model.bin"), &tensors);
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        fixture("tiny-kobart/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();

    let m = KeywordModel::load_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert!(
        m.report
            .filled
            .iter()
            .any(|f| f.starts_with("final_logits_bias")),
        "{:?}",
        m.report
    );
    assert!(m.report.unexpected.is_empty(), "{:?}", m.report.unexpected);
    let ids = Tensor::new(&[[100u32, 200, 300, 400, 1]], &Device::Cpu).unwrap();
    let dec = Tensor::new(&[[1u32, 500, 600]], &Device::Cpu).unwrap();
    let logits = m
        .model
        .forward(&ids, None, &dec, None, Pass::Inference)
        .unwrap();
    assert_eq!(logits.dims(), &[1, 3, 30000]);
    let finite = logits
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite());
    assert!(finite);
}

/// Hub ids resolve through the standard Hugging Face cache layout under HF_HOME, offline.
/// (One test function: it changes process environment variables.)
#[test]
fn hub_ids_resolve_from_the_hf_cache_and_fail_clearly_offline() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--acme--tiny-kobart");
    let snap = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "model.safetensors",
    ] {
        std::fs::copy(fixture("tiny-kobart").join(f), snap.join(f)).unwrap();
    }
    // SAFETY: this is the only test in this binary that touches the environment.
    unsafe {
        std::env::set_var("HF_HOME", home.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let m = KeywordModel::load("acme/tiny-kobart", DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.dir, snap);
    assert_eq!(m.generation.num_beams, 5);

    let err = ModelSource::parse("acme/absent")
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("acme/absent") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    assert!(err.contains("--model"), "{err}");

    // Online but unreachable hub (a closed local port): one clear error, quickly.
    unsafe {
        std::env::remove_var("HF_HUB_OFFLINE");
        std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    }
    let start = std::time::Instant::now();
    let err = ModelSource::parse("acme/absent")
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot get config.json of acme/absent"),
        "{err}"
    );
    assert!(err.contains("--model"), "{err}");
    assert!(start.elapsed().as_secs() < 60);
}

/// The real KoBART tokenizer (present in this project's shared folder, not in a user's clone):
/// ids equal `PreTrainedTokenizerFast`'s.
#[test]
fn real_kobart_tokenizer_matches_transformers_when_available() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/kobart-tokenizer/tokenizer.json");
    if !path.exists() {
        eprintln!("skipping: {} not present", path.display());
        return;
    }
    let cfg = BartConfig::kobart_v1_shapes();
    let tok = kb_core::KoTokenizer::from_file(&path, &cfg).unwrap();
    assert_eq!(tok.vocab_size(), 30000);
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("golden/kobart_tokenizer.json")).unwrap(),
    )
    .unwrap();
    for case in golden.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), ids, "{text}");
        assert_eq!(
            tok.decode(&ids).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{text}"
        );
    }
    let first = golden[0]["ids"].as_array().unwrap();
    assert_eq!(
        first.len(),
        12,
        "이사화물 통관예약을 하면 뭐가 좋나요? is 12 tokens"
    );
}
