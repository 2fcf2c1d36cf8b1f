//! End-to-end tests of the `kb-eval` binary: scoring a predictions file on hand-computed
//! cases, error messages, and a run with the fixture model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn kb_eval(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kb-eval"))
        .args(args)
        .output()
        .expect("run kb-eval")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

fn close(v: &Value, x: f64) -> bool {
    (v.as_f64().unwrap_or(f64::NAN) - x).abs() < 1e-9
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const GOLD: &str = "query\tkeyword\n\
q1\ta, b, c, d\n\
q2\t직구, 통관번호, 관세, 방법\n\
q3\te, f\n\
q4\tg\n";

// q1 repeats `a` (counts once); q4 has no prediction; q5 is not in the gold file.
const PRED: &str = "query\tkeyword\n\
q1\ta, x, b, a\n\
q2\t해외직구, 개인통관고유부호, 관세\n\
q3\tf, e\n\
q5\tz\n";

const SYN: &str = "# test\n해외직구\t직구\n개인통관고유부호\t통관번호\n";

#[test]
fn scores_a_predictions_file_without_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let gold = write(dir.path(), "gold.tsv", GOLD);
    let pred = write(dir.path(), "pred.tsv", PRED);
    let syn = write(dir.path(), "syn.tsv", SYN);
    let report = dir.path().join("misses.tsv");
    let out = kb_eval(&[
        "--data",
        &gold,
        "--predictions",
        &pred,
        "--synonyms",
        &syn,
        "--report",
        report.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("1 queries") && err.contains("no prediction") && err.contains("lines 5"),
        "{err}"
    );
    assert!(
        err.contains("1 rows of") && err.contains("not in") && err.contains("(lines 5)"),
        "{err}"
    );
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Without synonyms (worked out by hand):
    // q1 tp 2 of P 3, G 4 -> P 2/3 R 1/2 F1 4/7; q2 tp 1 of 3, 4 -> 1/3, 1/4, 2/7;
    // q3 exact; q4 empty prediction -> 0. Sums: tp 5, predicted 8, gold 11.
    assert_eq!(j["counts"]["rows"], 4);
    assert_eq!(j["counts"]["true_positives"], 5);
    assert_eq!(j["counts"]["predicted"], 8);
    assert_eq!(j["counts"]["gold"], 11);
    assert!(close(&j["micro"]["precision"], 5.0 / 8.0));
    assert!(close(&j["micro"]["recall"], 5.0 / 11.0));
    assert!(close(&j["micro"]["f1"], 10.0 / 19.0));
    assert!(close(&j["macro"]["precision"], 0.5));
    assert!(close(&j["macro"]["recall"], 0.4375));
    assert!(close(&j["macro"]["f1"], 13.0 / 28.0));
    assert!(close(&j["exact_match"], 0.25));
    assert!(close(&j["mean_predicted"], 2.0));
    assert!(close(&j["mean_gold"], 2.75));
    assert_eq!(j["missing_predictions"], 1);
    assert_eq!(j["unmatched_predictions"], 1);
    // With synonyms q2 becomes tp 3 of 3, 4 -> P 1, R 3/4, F1 6/7; sums tp 7, 8, 11.
    let w = &j["with_synonyms"];
    assert_eq!(w["counts"]["true_positives"], 7);
    assert!(close(&w["micro"]["precision"], 7.0 / 8.0));
    assert!(close(&w["micro"]["recall"], 7.0 / 11.0));
    assert!(close(&w["micro"]["f1"], 14.0 / 19.0));
    assert!(close(&w["macro"]["precision"], 2.0 / 3.0));
    assert!(close(&w["macro"]["recall"], 0.5625));
    assert!(close(&w["macro"]["f1"], 17.0 / 28.0));
    assert!(close(&w["exact_match"], 0.25));

    let report = std::fs::read_to_string(&report).unwrap();
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(
        lines,
        [
            "query\tgold\tpredicted\tmissed\textra",
            "q1\ta, b, c, d\ta, x, b\tc, d\tx",
            "q2\t직구, 통관번호, 관세, 방법\t해외직구, 개인통관고유부호, 관세\t방법\t",
            "q4\tg\t\tg\t",
        ]
    );

    // The text summary shows both views.
    let out = kb_eval(&["--data", &gold, "--predictions", &pred, "--synonyms", &syn]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("without synonym mapping") && text.contains("with synonym mapping"),
        "{text}"
    );
    assert!(text.contains("0.6250") && text.contains("0.8750"), "{text}");
}

#[test]
fn errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let gold = write(dir.path(), "gold.tsv", GOLD);
    let pred = write(dir.path(), "pred.tsv", PRED);

    let syn = write(dir.path(), "bad_syn.tsv", "a\tb\nc\tb\n");
    let out = kb_eval(&["--data", &gold, "--predictions", &pred, "--synonyms", &syn]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("bad_syn.tsv: line 2:") && e.contains("`b`"),
        "{e}"
    );

    let bad_gold = write(dir.path(), "bad_gold.tsv", "query\tkeyword\nq1\ta\nq2\t \n");
    let out = kb_eval(&["--data", &bad_gold, "--predictions", &pred]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("bad_gold.tsv: line 3:"), "{e}");

    let bad_pred = write(dir.path(), "bad_pred.tsv", "query\tkeyword\nq1\ta\tb\n");
    let out = kb_eval(&["--data", &gold, "--predictions", &bad_pred]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("bad_pred.tsv: line 2:"), "{e}");

    let out = kb_eval(&["--data", &gold]);
    assert!(!out.status.success());
}

fn fixture_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kb-core/tests/fixtures/tiny-kobart")
}

#[test]
fn runs_the_fixture_model_and_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let gold = write(
        dir.path(),
        "gold.tsv",
        "query\tkeyword\n\
         이사화물 통관예약을 하면 뭐가 좋나요?\t이사화물, 통관, 예약, 장점\n\
         직구로 캠핑용품 사면 관세 내야 하나요?\t직구, 캠핑용품, 구매, 관세, 필요 여부\n\
         인천공항세관은 어디에 있나요?\t인천공항세관, 위치\n",
    );
    let syn = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/synonyms.tsv");
    let report = dir.path().join("r.tsv");
    let out = kb_eval(&[
        "--model",
        fixture_model().to_str().unwrap(),
        "--data",
        &gold,
        "--num-beams",
        "2",
        "--max_length",
        "12",
        "--batch-size",
        "2",
        "--synonyms",
        syn.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    for view in [&j, &j["with_synonyms"]] {
        for avg in ["micro", "macro"] {
            for key in ["precision", "recall", "f1"] {
                let v = view[avg][key].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&v), "{avg}.{key} = {v}");
            }
        }
        assert!(view["exact_match"].is_f64());
        assert_eq!(view["counts"]["rows"], 3);
    }
    assert_eq!(j["source"]["model"]["num_beams"], 2);
    assert_eq!(j["missing_predictions"], 0);
    let report = std::fs::read_to_string(&report).unwrap();
    assert!(report.starts_with("query\tgold\tpredicted\tmissed\textra\n"));
}
