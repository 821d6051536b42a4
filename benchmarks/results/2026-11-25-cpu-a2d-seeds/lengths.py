"""BLEU's parts (brevity penalty, hypothesis/reference length ratio, n-gram precisions) for every
scored run, recomputed with sacrebleu from the saved hypotheses (no model needed).
usage (in the scratch folder): python lengths.py OUT_JSON"""
import json
import sys
from pathlib import Path

import sacrebleu

refs = Path("data/test.tgt").read_text(encoding="utf-8").splitlines()[:300]
out = {}
for hyp_file in sorted(Path("runs").glob("*/test300_hyps.txt")):
    hyps = hyp_file.read_text(encoding="utf-8").splitlines()
    assert len(hyps) == len(refs), hyp_file
    b = sacrebleu.metrics.BLEU().corpus_score(hyps, [refs])
    out[hyp_file.parent.name] = {"bleu": round(b.score, 2), "bp": round(b.bp, 4),
                                 "len_ratio": round(b.sys_len / b.ref_len, 4), "sys_len": b.sys_len,
                                 "ref_len": b.ref_len, "precisions": [round(p, 2) for p in b.precisions],
                                 "empty_hyps": sum(1 for h in hyps if not h.strip()),
                                 # runaway outputs: more than 2x the reference's words + 3 (repetition loops)
                                 "runaway_hyps": sum(1 for h, r in zip(hyps, refs)
                                                     if len(h.split()) > 2 * len(r.split()) + 3)}
Path(sys.argv[1] if len(sys.argv) > 1 else "lengths.json").write_text(json.dumps(out, indent=1) + "\n")
print("| run | BLEU | BP | hyp/ref length | 1-4-gram precisions | runaway hyps |")
print("|---|---:|---:|---:|---|---:|")
for k, v in out.items():
    print(f"| {k} | {v['bleu']:.2f} | {v['bp']:.3f} | {v['len_ratio']:.3f} | "
          f"{' / '.join(f'{p:.1f}' for p in v['precisions'])} | {v['runaway_hyps']} |")
