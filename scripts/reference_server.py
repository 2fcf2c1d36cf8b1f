#!/usr/bin/env python3
"""Reference keyword server: what the original inf_server.py did, for benchmarks and parity checks.

Flask + transformers' BartForConditionalGeneration + PreTrainedTokenizerFast, one request at a
time (Flask's development server without threads), on CPU:

    POST /keyword_extract   body {"prompt": "..."} (any Content-Type; the original client sent
                            json.dumps(...) as plain data)  ->  {"prompt": "...", "result": "kw1, kw2"}

Generation is the original's: model.generate(input_ids, eos_token_id=1, max_length=MAX_LENGTH,
num_beams=5) and tokenizer.decode(output[0], skip_special_tokens=True). The original used
max_length=512; benchmarks pass the same --max_length to both servers.

    python scripts/reference_server.py --model MODEL_DIR [--host 127.0.0.1] [--port 8459]
        [--num_beams 5] [--max_length 512] [--threads N] [--threaded]
"""

import argparse
import json
import sys

import torch
from flask import Flask, jsonify, request
from transformers import BartForConditionalGeneration, PreTrainedTokenizerFast


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (config.json, weights, tokenizer.json)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8459)
    ap.add_argument("--num_beams", type=int, default=5)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--threaded", action="store_true", help="serve requests concurrently (Flask threads)")
    args = ap.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.model)
    model = BartForConditionalGeneration.from_pretrained(args.model).eval()

    app = Flask(__name__)

    @app.route("/keyword_extract", methods=["POST"])
    def keyword_extract():
        prompt = json.loads(request.data)["prompt"]
        input_ids = torch.tensor([tokenizer.encode(prompt)])
        output = model.generate(
            input_ids, eos_token_id=1, max_length=args.max_length, num_beams=args.num_beams
        )
        result = tokenizer.decode(output[0], skip_special_tokens=True)
        return jsonify({"prompt": prompt, "result": result})

    @app.route("/health", methods=["GET"])
    def health():
        return jsonify({"status": "ok"})

    print(f"reference server on http://{args.host}:{args.port} (torch threads {torch.get_num_threads()})",
          file=sys.stderr, flush=True)
    app.run(host=args.host, port=args.port, threaded=args.threaded)


if __name__ == "__main__":
    main()
