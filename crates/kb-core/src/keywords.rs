//! Turning generated text into a keyword list.

/// Splits generated text on commas (ASCII `,` and the full-width `，`), trims each piece, drops
/// empty pieces and repeats, and keeps the model's order.
pub fn split_keywords(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for piece in text.split([',', '，']) {
        let kw = piece.trim();
        if !kw.is_empty() && !out.iter().any(|k| k == kw) {
            out.push(kw.to_string());
        }
    }
    out
}

/// Joins keywords the way the original server answered: `"kw1, kw2"`.
pub fn join_keywords(keywords: &[String]) -> String {
    keywords.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_trims_dedups_and_keeps_order() {
        assert_eq!(
            split_keywords(" 이사화물, 통관 ,예약,, 장점, 통관 ，면세 "),
            vec!["이사화물", "통관", "예약", "장점", "면세"]
        );
        assert!(split_keywords(" , ,").is_empty());
        assert_eq!(split_keywords("FTA 원산지증명"), vec!["FTA 원산지증명"]);
    }

    #[test]
    fn joins_like_the_original() {
        let k = vec!["a".to_string(), "b".to_string()];
        assert_eq!(join_keywords(&k), "a, b");
    }
}
