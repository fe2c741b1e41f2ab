"""Issue 15, CPU: xgrammar 0.2.8 against llguidance on the same random walks of SCHEMA (measurement only: xgrammar is no dependency).

    pip install xgrammar==0.2.8; PYTHONPATH=. python benchmarks/structured_masks_xgrammar.py TOKENIZER_DIR
"""
import time, sys, json, random, statistics
import numpy as np, torch, llguidance, llguidance.hf, xgrammar as xgr
from transformers import PreTrainedTokenizerFast
sys.path.insert(0, ".")
from batchllm_dask.bench.structured import SCHEMA
from batchllm_dask.engine import constraints
tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[1])
V = 128256; words = (V + 31) // 32
lt = llguidance.hf.from_tokenizer(tok, n_vocab=V, eos_token=[tok.eos_token_id])
ex = llguidance.LLExecutor()
t = time.perf_counter()
info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V)
comp = xgr.GrammarCompiler(info, max_threads=2)
cg = comp.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "), strict_mode=True)
print("xgrammar tokenizer+compile", round(time.perf_counter() - t, 1), "s")
def walk(schema_ml, n=32):
    s = json.loads(json.dumps(SCHEMA))
    if not schema_ml:
        for p in ("name", "summary"): s["properties"][p].pop("maxLength")
        s["properties"]["tags"]["items"].pop("maxLength")
    c = cg if schema_ml else comp.compile_json_schema(json.dumps(s), any_whitespace=False, separators=(", ", ": "), strict_mode=True)
    g = constraints.grammar_of("json_schema", json.dumps(s, separators=(",", ":")))
    tm = llguidance.LLMatcher(lt, g, log_level=0)
    ms = [tm.deep_copy() for _ in range(n)]
    xs = [xgr.GrammarMatcher(c) for _ in range(n)]
    rng = random.Random(0)
    mask = np.zeros((n, words), dtype=np.int32); xmask = xgr.allocate_token_bitmask(n, V)
    ll, xx, steps, diff = [], [], 0, 0
    while steps < 60:
        live = [i for i, m in enumerate(ms) if not m.is_stopped()]
        if not live: break
        steps += 1
        a = time.perf_counter(); ex.unsafe_compute_mask_ptr([(ms[i], i) for i in live], mask.ctypes.data, words * 4, n); b = time.perf_counter()
        for i in live: xs[i].fill_next_token_bitmask(xmask, i)
        c2 = time.perf_counter()
        ll.append(b - a); xx.append(c2 - b)
        for i in live:
            allowed = np.flatnonzero(np.unpackbits(mask[i].view(np.uint8), bitorder="little"))
            tk = int(rng.choice(allowed))
            assert ms[i].consume_token(tk)
            if not xs[i].accept_token(tk): diff += 1
    print(f"maxLength={schema_ml}: {steps} steps, llguidance (executor, 2 threads) median {1e3*statistics.median(ll):.2f} ms/step mean {1e3*statistics.mean(ll):.2f}; "
          f"xgrammar (1 thread, sequential) median {1e3*statistics.median(xx):.2f} mean {1e3*statistics.mean(xx):.2f}; tokens xgrammar refused {diff}")
walk(True); walk(False)
