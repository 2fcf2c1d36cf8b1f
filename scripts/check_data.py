#!/usr/bin/env python3
"""Check question/keyword TSV files against docs/labelling.md (section 9).

    python3 scripts/check_data.py data/train.tsv data/test.tsv data/wild.tsv

Checks each file: the header `query<TAB>keyword`; exactly two fields per line; no empty field
or keyword; 1-7 keywords; no keyword twice in a row; no duplicate query (whitespace-normalised)
within a file or across the files given; every keyword a span of its question (NFC, whitespace
ignored) or a derived term of the guide (an intent term, a noun for a native verb, or a
`미-`/`불-`/`무-` negation of a span or of such a noun). Prints every problem as `FILE: line N: ...` and exits 1
when there is any; with --stats prints counts of rows and of derived keywords.
"""

import argparse
import collections
import re
import sys
import unicodedata

INTENT_TERMS = [
    "장점", "방법", "절차", "결과", "금액", "한도", "세율", "시기", "기한", "기간", "위치",
    "장소", "이유", "서류", "가능 여부", "필요 여부", "여부", "의미", "차이", "대상", "인물",
    "조건", "종류", "연락처", "운영시간", "원리", "과정", "특징", "영향", "용도", "개수", "횟수",
    "높이", "길이", "넓이", "무게", "깊이", "비용",
]
VERB_NOUNS = [
    "구매", "판매", "재판매", "발송", "반입", "반출", "밀반입", "초과", "환급", "반환", "수령",
    "조회", "분실", "합산", "분할납부", "동반", "사용", "변경", "거주", "회피", "지연", "경과",
    "오류", "적발", "부과", "작성", "정정", "연기", "발생", "제작", "건축", "건립", "수립",
    "폐지", "증가", "감소", "폐기", "보관", "선택", "방지", "납부", "반송", "재반입", "재수출",
    "해제", "종료",
]
DERIVED = set(INTENT_TERMS) | set(VERB_NOUNS)
NEGATION_PREFIXES = ("미", "불", "무")


def squash(text):
    """NFC with every whitespace character removed: the span comparison of the guide."""
    return re.sub(r"\s+", "", unicodedata.normalize("NFC", text))


def keyword_kind(keyword, query_squashed):
    """'span', 'derived', 'negation' or None (not allowed)."""
    k = squash(keyword)
    if k and k in query_squashed:
        return "span"
    if keyword in DERIVED:
        return "derived"
    if len(k) > 1 and k[0] in NEGATION_PREFIXES and (k[1:] in query_squashed or k[1:] in VERB_NOUNS):
        return "negation"
    return None


def check(paths, stats):
    problems = []
    seen = {}
    derived_counts = collections.Counter()
    totals = {}
    for path in paths:
        rows = 0
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        if text.startswith("\ufeff"):
            problems.append(f"{path}: line 1: starts with a BOM")
            text = text[1:]
        if "\r" in text:
            problems.append(f"{path}: has CR characters (use LF line endings)")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not lines or lines[0] != "query\tkeyword":
            problems.append(f"{path}: line 1: header must be `query<TAB>keyword`")
        for number, line in enumerate(lines[1:], start=2):
            where = f"{path}: line {number}"
            fields = line.split("\t")
            if len(fields) != 2:
                problems.append(f"{where}: expected 2 fields, found {len(fields)}")
                continue
            query, keywords = fields[0].strip(), fields[1]
            if not query or not keywords.strip():
                problems.append(f"{where}: empty field")
                continue
            if '"' in line:
                problems.append(f"{where}: contains a double quote")
            key = " ".join(query.split())
            if key in seen:
                problems.append(f"{where}: duplicate query (first at {seen[key]}): {query}")
            else:
                seen[key] = where
            items = keywords.split(", ")
            if any(k != k.strip() or not k for k in items):
                problems.append(f"{where}: empty keyword or stray spaces: {keywords!r}")
                continue
            if not 1 <= len(items) <= 7:
                problems.append(f"{where}: {len(items)} keywords (1-7 allowed)")
            if len(set(items)) != len(items):
                problems.append(f"{where}: a keyword appears twice: {keywords}")
            q = squash(query)
            for k in items:
                kind = keyword_kind(k, q)
                if kind is None:
                    problems.append(
                        f"{where}: keyword `{k}` is neither a span of the question nor a derived term"
                    )
                elif kind != "span":
                    derived_counts[k] += 1
            rows += 1
        totals[path] = rows
    for p in problems:
        print(p)
    if stats:
        for path, rows in totals.items():
            print(f"{path}: {rows} rows")
        print("derived keywords:", ", ".join(f"{k} {n}" for k, n in derived_counts.most_common()))
    return 1 if problems else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--stats", action="store_true", help="print row and derived-term counts")
    args = parser.parse_args()
    sys.exit(check(args.files, args.stats))


if __name__ == "__main__":
    main()
