#!/usr/bin/env python3
"""Noun-extraction baseline with the Kiwi morphological analyser (kiwipiepy, from PyPI; it
ships its model, so nothing else is downloaded).

For each query of --data, the keywords are the nouns Kiwi finds, in order of appearance and
without repeats, written in the data's own format (`query<TAB>keyword`, keywords joined by
", "), to be scored with

    kb-eval --data data/test.tsv --predictions PRED.tsv --json

Modes (--mode):
  nouns      every NNG (general noun), NNP (proper noun), SL (foreign word) and SH (hanja)
             token is one keyword, as Kiwi cuts it.
  compounds  (default) the labelling rules of data/README.md keep a compound written as one
             word whole (`수입신고필증`, `면세점`) and a number with its unit whole (`800달러`),
             while words separated by a space are separate keywords. So runs of adjacent
             noun-like tokens (NNG, NNP, SL, SH, numbers SN with a following bound noun or unit,
             and a noun suffix XSN such as `-생`, `-화`) with no space between them become one
             keyword, spelled as written in the query;
             a bound noun (NNB) on its own (`것`, `수`, `때`) is dropped, as rule 2 asks. Then,
             following rule 3, neighbouring keywords that together spell a term of
             configs/synonyms.tsv (`여행자 휴대품 신고`, `면세 한도`) are merged into that term.

Neither mode can produce what the rules add beyond nouns: nouns from verbs (`사다` -> `구매`),
negations (`미신고`) or the closing intent noun (`방법`, `가능 여부`), so recall is bounded.

Usage:
    /work/pyenv/bin/pip install kiwipiepy
    python scripts/baseline_kiwi.py --data data/test.tsv --out PRED.tsv [--mode nouns]
"""

import argparse
import sys
from pathlib import Path

NOUN_TAGS = {"NNG", "NNP", "SL", "SH"}


def read_queries(path):
    """Queries of a TSV with a `query` column (errors name the file and line)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = f.read().split("\n")
    header = lines[0].rstrip("\r").split("\t")
    if "query" not in header:
        sys.exit(f"{path}: line 1: the header has no `query` column: {header}")
    col = header.index("query")
    queries = []
    for i, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            sys.exit(f"{path}: line {i}: expected {len(header)} fields, found {len(fields)}")
        queries.append(fields[col].strip())
    return queries


def read_synonym_terms(path):
    """Every canonical and variant of a synonyms file that contains a space."""
    terms = set()
    if path is None or not Path(path).exists():
        return terms
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        for field in line.split("\t"):
            field = field.strip()
            if " " in field:
                terms.add(field)
    return terms


def dedup(keywords):
    out = []
    for k in keywords:
        k = k.strip()
        if k and k not in out:
            out.append(k)
    return out


def nouns(kiwi, query):
    return dedup(t.form for t in kiwi.tokenize(query) if t.tag in NOUN_TAGS)


def compounds(kiwi, query, terms):
    tokens = kiwi.tokenize(query)
    runs = []  # [start, end, has_content_noun]
    prev_end = None
    prev_tag = None
    for t in tokens:
        tag = t.tag
        start, end = t.start, t.start + t.len
        adjacent = bool(runs) and prev_end == start
        is_noun = tag in NOUN_TAGS
        is_number = tag in ("SN", "NR")
        # A bound noun or a unit joins a number or a noun written together with it.
        is_unit = tag == "NNB" and adjacent and prev_tag in ("SN", "NR", "NNG", "NNP", "SL")
        # A noun suffix written with its noun belongs to it (`유학생`, `온난화`).
        is_suffix = tag == "XSN" and adjacent and runs[-1][1] == start
        if is_noun or is_number or is_unit or is_suffix:
            if adjacent and runs[-1][1] == start:
                runs[-1][1] = end
                runs[-1][2] = runs[-1][2] or is_noun or is_unit
            else:
                runs.append([start, end, is_noun])
        prev_end, prev_tag = end, tag
    keywords = [query[s:e] for s, e, content in runs if content]
    # Rule 3: listed multi-word terms stay whole.
    merged = []
    i = 0
    while i < len(keywords):
        for n in (4, 3, 2):
            joined = " ".join(keywords[i : i + n])
            if i + n <= len(keywords) and joined in terms:
                merged.append(joined)
                i += n
                break
        else:
            merged.append(keywords[i])
            i += 1
    return dedup(merged)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="TSV with a `query` column")
    ap.add_argument("--out", required=True, help="predictions TSV to write")
    ap.add_argument("--mode", choices=["nouns", "compounds"], default="compounds")
    ap.add_argument(
        "--synonyms",
        default=str(Path(__file__).resolve().parent.parent / "configs" / "synonyms.tsv"),
        help="synonyms file whose multi-word terms stay whole (compounds mode)",
    )
    args = ap.parse_args()
    try:
        from kiwipiepy import Kiwi
    except ImportError:
        sys.exit("kiwipiepy is not installed: pip install kiwipiepy")
    kiwi = Kiwi()
    queries = read_queries(args.data)
    terms = read_synonym_terms(args.synonyms) if args.mode == "compounds" else set()
    with open(args.out, "w", encoding="utf-8", newline="") as f:
        f.write("query\tkeyword\n")
        for q in queries:
            kws = nouns(kiwi, q) if args.mode == "nouns" else compounds(kiwi, q, terms)
            clean = [" ".join(k.replace(",", " ").split()) for k in kws]
            f.write(f"{q}\t{', '.join(k for k in clean if k)}\n")
    print(f"wrote {len(queries)} rows to {args.out} ({args.mode})", file=sys.stderr)


if __name__ == "__main__":
    main()
