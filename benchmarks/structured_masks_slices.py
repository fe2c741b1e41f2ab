"""Issue 15, CPU: llguidance masks with its default token slices against length-banded ones (same masks?, us a mask).

    PYTHONPATH=. python benchmarks/structured_masks_slices.py TOKENIZER_DIR   (bench.structured.train_tokenizer(128256, 48 << 20), saved)
"""
import time, sys, json, random, statistics
import numpy as np, llguidance, llguidance.hf
from transformers import PreTrainedTokenizerFast
sys.path.insert(0, ".")
from batchllm_dask.bench.structured import SCHEMA
from batchllm_dask.engine import constraints

tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[1])
V = 128256; words = (V + 31) // 32
CH = r'[^"\\\x00-\x1F\x7F]'
configs = {
  "default": None,
  "bands": [r'[\x20\x0A\x0D\x09]+'] + [CH + "{1,%d}" % n for n in (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 30)] + [CH + "+"],
  "bands_pow2": [r'[\x20\x0A\x0D\x09]+'] + [CH + "{1,%d}" % n for n in (1, 2, 4, 8, 16, 32)] + [CH + "+"],
  # up to the longest tokens (84 string characters in the trained BPE): the ones longer than the largest band
  # a bounded string's state subsumes are walked token by token, and over 30 characters there are 2,182
  "bands_long": [r'[\x20\x0A\x0D\x09]+'] + [CH + "{1,%d}" % n for n in (2, 4, 6, 8, 10, 12, 16, 20, 24, 30, 40, 48, 64, 96)]
  + [CH + "+"],
}
toks = {}
for name, sl in configs.items():
    t = time.perf_counter()
    toks[name] = llguidance.hf.from_tokenizer(tok, n_vocab=V, eos_token=[tok.eos_token_id], slices=sl)
    print(name, "tokenizer", round(time.perf_counter() - t, 2), "s")
g = constraints.grammar_of("json_schema", json.dumps(SCHEMA, separators=(",", ":")))
tmpls = {n: llguidance.LLMatcher(t, g, log_level=0) for n, t in toks.items()}
rng = random.Random(0)
times = {n: [] for n in toks}
pertype = {n: {} for n in toks}
mism = 0; total = 0
masks = {n: np.zeros(words, dtype=np.int32) for n in toks}
for r in range(24):
    ms = {n: t.deep_copy() for n, t in tmpls.items()}
    for step in range(200):
        m0 = ms["default"]
        if m0.is_stopped(): break
        for n, m in ms.items():
            t0 = time.perf_counter(); m.unsafe_compute_mask_ptr(masks[n].ctypes.data, words * 4); times[n].append(time.perf_counter() - t0)
        ref = masks["default"]
        allowed = np.flatnonzero(np.unpackbits(ref.view(np.uint8), bitorder="little"))
        kind = "1" if len(allowed) == 1 else "few" if len(allowed) <= 64 else "many"
        for n in toks:
            pertype[n].setdefault(kind, []).append(times[n][-1])
            mism += not np.array_equal(masks[n], ref)
        total += 1
        tokid = int(rng.choice(allowed))
        for m in ms.values(): assert m.consume_token(tokid)
print("masks", total, "mismatches", mism)
for n in toks:
    print(n, "mean us", round(1e6 * statistics.mean(times[n]), 1), {k: (len(v), round(1e6 * statistics.median(v), 1), round(1e6*statistics.mean(v),1)) for k, v in pertype[n].items()})
