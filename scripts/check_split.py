#!/usr/bin/env python3
"""Check that data/test.tsv and data/wild.tsv are held out from the training rows.

    python3 scripts/check_split.py [--train data/train.tsv data/valid.tsv] [--held data/test.tsv data/wild.tsv]

1. None of the test-only names of data/README.md (countries, customs offices, items, sites,
   test-only customs topics) occurs in a training question (spaces ignored). A few substrings
   are known false alarms (`주소` contains `호주`); they are listed in KNOWN_FALSE_ALARMS and
   reported separately.
2. For every held-out question, the most similar training question by character-trigram Jaccard
   similarity (spaces ignored): prints how many reach 0.6 and 0.8, the median, and the five
   closest pairs per file. Exits 1 if a test-only name occurs or a held-out row reaches 0.8.
"""

import argparse
import collections
import re
import sys

TEST_ONLY = (
    "베트남 태국 호주 뉴질랜드 필리핀 인도네시아 멕시코 브라질 튀르키예 몽골 체코 스위스 말레이시아 "
    "두바이 아랍에미리트 대구세관 광주세관 제주세관 청주세관 속초세관 여수세관 울산세관 목포세관 "
    "군산세관 마산세관 드론 골프채 보청기 한약재 홍삼 캠핑카 요트 피아노 전동킥보드 낚싯대 금괴 "
    "콘택트렌즈 그래픽카드 타오바오 이베이 라쿠텐 큐텐 아이허브 위조품 짝퉁 상표권 병행수입 문화재 "
    "골동품 총포 석궁 전기충격기 이의신청 심사청구 심판청구 경정청구 과세전적부심사 과세가격 "
    "택스리펀드 사후면세 승무원 선용품 인도장 관세사 원산지표시"
).split()
# (name, the longer word that contains it and is not about the name)
KNOWN_FALSE_ALARMS = [("호주", "주소"), ("도검", "도검역")]


def load(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t")[0] for line in f][1:]


def squash(text):
    return re.sub(r"\s+", "", text)


def trigrams(text):
    t = squash(text)
    return {t[i : i + 3] for i in range(len(t) - 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", nargs="+", default=["data/train.tsv", "data/valid.tsv"])
    ap.add_argument("--held", nargs="+", default=["data/test.tsv", "data/wild.tsv"])
    args = ap.parse_args()
    failed = False

    train = [q for path in args.train for q in load(path)]
    for name in TEST_ONLY:
        hits = [q for q in train if name in squash(q)]
        real = [
            q
            for q in hits
            if not any(n == name and w in squash(q) for n, w in KNOWN_FALSE_ALARMS)
        ]
        if real:
            failed = True
            print(f"test-only name `{name}` in {len(real)} training rows, e.g. {real[0]}")
        elif hits:
            print(f"`{name}`: {len(hits)} known false alarm(s), e.g. {hits[0]}")

    grams = [trigrams(q) for q in train]
    index = collections.defaultdict(list)
    for i, g in enumerate(grams):
        for t in g:
            index[t].append(i)

    def closest(q):
        g = trigrams(q)
        shared = collections.Counter(i for t in g for i in index.get(t, ()))
        best, at = 0.0, None
        for i, n in shared.items():
            j = n / (len(g) + len(grams[i]) - n)
            if j > best:
                best, at = j, i
        return best, at

    for path in args.held:
        rows = load(path)
        sims = [closest(q) for q in rows]
        values = sorted(s for s, _ in sims)
        high = sum(v >= 0.8 for v in values)
        failed |= high > 0
        print(
            f"{path}: {len(rows)} rows; closest training question: >= 0.8: {high}, "
            f">= 0.6: {sum(v >= 0.6 for v in values)}, median {values[len(values) // 2]:.2f}"
        )
        ranked = sorted(zip(sims, rows), key=lambda x: -x[0][0])[:5]
        for (s, i), q in ranked:
            print(f"  {s:.2f}  {q}  ~  {train[i] if i is not None else '-'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
