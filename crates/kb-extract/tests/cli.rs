//! End-to-end tests of the `kb-extract` binary on the fixture model.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../kb-core/tests/fixtures")
        .join(name)
}

fn kb_extract(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kb-extract"))
        .args(args)
        .output()
        .expect("run kb-extract")
}

#[test]
fn jsonl_ids_equal_transformers_beam5_generations() {
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("golden/generation.json")).unwrap())
            .unwrap();
    let case = golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["case"]["name"] == "beam5")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("queries.tsv");
    let mut tsv = String::from("keyword\tquery\n");
    for q in golden["queries"].as_array().unwrap() {
        tsv.push_str(&format!("x\t{}\n", q.as_str().unwrap()));
    }
    std::fs::write(&input, tsv).unwrap();
    let out_path = dir.path().join("out.jsonl");
    let model = fixture("tiny-kobart");
    let out = kb_extract(&[
        "--model",
        model.to_str().unwrap(),
        "--num_beams",
        "5",
        "--max_length",
        "20",
        "--batch_size",
        "2",
        "--input",
        input.to_str().unwrap(),
        "--format",
        "jsonl",
        "--ids",
        "--output",
        out_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(out_path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    for ((line, want), q) in lines
        .iter()
        .zip(case["outputs"].as_array().unwrap())
        .zip(golden["queries"].as_array().unwrap())
    {
        assert_eq!(line["query"], *q, "input order is kept");
        assert_eq!(line["ids"], want["ids"]);
        assert_eq!(line["text"], want["text"]);
        assert!(line["keywords"].is_array());
    }
}

#[test]
fn tsv_output_from_arguments() {
    let model = fixture("tiny-kobart");
    let out = kb_extract(&[
        "--model",
        model.to_str().unwrap(),
        "--num-beams",
        "2",
        "관세 환급",
        "해외직구",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "query\tkeywords\ttext");
    assert_eq!(lines.len(), 3);
    assert!(lines[1].starts_with("관세 환급\t"));
    assert_eq!(lines[1].split('\t').count(), 3);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let model = fixture("tiny-kobart");
    let m = model.to_str().unwrap();
    let out = kb_extract(&["--model", "/no/such/model", "질문"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/no/such/model") && err.contains("not a folder"),
        "{err}"
    );

    let out = kb_extract(&["--model", m]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no queries"));

    let out = kb_extract(&["--model", m, "--input", "/no/such/file.txt"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/file.txt"));

    let out = kb_extract(&["--model", m, "--num_beams", "0", "질문"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("num_beams"));

    let out = kb_extract(&["--model", m, "--dtype", "int8", "질문"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("int8"));
}

#[test]
fn synonyms_map_keywords_to_their_canonical_term() {
    let model = fixture("tiny-kobart");
    let model = model.to_str().unwrap();
    let base = [
        "--model",
        model,
        "--num_beams",
        "2",
        "--max_length",
        "12",
        "--format",
        "jsonl",
        "이사화물 통관예약을 하면 뭐가 좋나요?",
        "인천공항세관은 어디에 있나요?",
    ];
    let parse = |out: &std::process::Output| -> Vec<serde_json::Value> {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let plain = parse(&kb_extract(&base));
    let first = |r: &serde_json::Value| r["keywords"][0].as_str().unwrap().to_string();
    let (k0, k1) = (first(&plain[0]), first(&plain[1]));
    // The random fixture model's first keywords become variants of one canonical term.
    let mut line = format!("정규형\t{k0}");
    if k1.to_lowercase() != k0.to_lowercase() {
        line.push_str(&format!("\t{k1}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let syn = dir.path().join("syn.tsv");
    std::fs::write(&syn, format!("# test\n{line}\n")).unwrap();
    let mut args = base.to_vec();
    args.extend(["--synonyms", syn.to_str().unwrap()]);
    let mapped = parse(&kb_extract(&args));
    for (p, m) in plain.iter().zip(&mapped) {
        if first(p) == k0 || first(p) == k1 {
            assert_eq!(first(m), "정규형");
        }
        assert_eq!(p["text"], m["text"], "text stays the generated text");
        let n = m["keywords"].as_array().unwrap();
        assert_eq!(n.iter().filter(|k| *k == "정규형").count(), 1);
    }

    // A malformed file is refused with its name and line.
    std::fs::write(&syn, "a\tb\nc\n").unwrap();
    let out = kb_extract(&args);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("syn.tsv: line 2:"), "{e}");
}
