"""Compare JSON-schema grammar libraries on the demo tokenizer: validity, compile time, mask cost per token.

    pip install --target /tmp/grammar-libs --no-deps xgrammar apache-tvm-ffi outlines-core   # llguidance is a dependency
    PYTHONPATH=/tmp/grammar-libs .venv/bin/python bench/grammar_libraries.py llguidance 100 [--why]
    PYTHONPATH=/tmp/grammar-libs .venv/bin/python bench/grammar_libraries.py xgrammar 20 --why

Each walk samples random logits under the library's mask (no model: the grammar alone decides what may
come) until the grammar ends, then checks the text against the schema with jsonschema_rs. The mask time
includes unpacking the bitmask into a bool vector. Writes nothing; the demo models are built in a temporary
directory.
"""
import json, sys, time
import torch, jsonschema_rs
from transformers import AutoTokenizer

import tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inference.demo_models import make_demo_models  # noqa: E402
_tmp = tempfile.TemporaryDirectory()
tok = AutoTokenizer.from_pretrained(make_demo_models(Path(_tmp.name), names=["demo-dense"])[0])
V = len(tok)
EOS = tok.convert_tokens_to_ids("<|im_end|>")
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "level", "tags", "owner"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "level": {"type": "integer", "minimum": 1, "maximum": 5},
                         "colour": {"enum": ["red", "green", "blue"]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
                         "owner": {"type": "object", "additionalProperties": False, "required": ["id"],
                                   "properties": {"id": {"type": "integer", "minimum": -3, "maximum": 300},
                                                  "ok": {"type": "boolean"}}}}}
validator = jsonschema_rs.validator_for(SCHEMA)
WALKS, MAXTOK = int(sys.argv[2]) if len(sys.argv) > 2 else 20, 400

def walk(first, allowed_fn, advance, done, seed):
    g = torch.Generator().manual_seed(seed)
    out, mask_s, n = [], 0.0, 0
    for _ in range(MAXTOK):
        t0 = time.perf_counter(); allowed = allowed_fn(); mask_s += time.perf_counter() - t0; n += 1
        logits = torch.randn(V, generator=g)
        logits[~allowed] = float("-inf")
        t = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        if t == EOS: break
        out.append(t); advance(t)
        if done(): break
    return tok.decode(out), mask_s, n

def report(name, compile_s, results):
    valid = 0
    for text, _, _ in results:
        try: valid += validator.is_valid(json.loads(text))
        except Exception: pass
    per_tok = sum(r[1] for r in results) / sum(r[2] for r in results)
    print(f"{name}: compile {compile_s*1000:.1f} ms, valid {valid}/{len(results)}, mask {per_tok*1e6:.0f} us/token; e.g. {results[0][0][:120]!r}")

lib = sys.argv[1]
if lib == "llguidance":
    import llguidance, llguidance.hf, llguidance.torch as lt
    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=V)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    m = llguidance.LLMatcher(lltok, grammar); assert not m.get_error(), m.get_error()
    compile_s = time.perf_counter() - t0
    res = []
    for s in range(WALKS):
        m = llguidance.LLMatcher(lltok, grammar)
        bm = lt.allocate_token_bitmask(1, V)
        def allowed():
            lt.fill_next_token_bitmask(m, bm, 0)
            bits = bm[0].view(torch.int32)
            idx = torch.arange(V)
            return ((bits[idx // 32] >> (idx % 32)) & 1).bool()
        res.append(walk(None, allowed, lambda t: m.consume_token(t), lambda: m.is_stopped(), s))
    report(lib, compile_s, res)
elif lib == "xgrammar":
    import xgrammar as xgr
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V, stop_token_ids=[EOS])
    cg = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), strict_mode=True, any_whitespace=False)
    compile_s = time.perf_counter() - t0
    res = []
    for s in range(WALKS):
        m = xgr.GrammarMatcher(cg)
        bm = xgr.allocate_token_bitmask(1, V)
        def allowed():
            m.fill_next_token_bitmask(bm)
            idx = torch.arange(V)
            return ((bm[0][idx // 32] >> (idx % 32)) & 1).bool()
        res.append(walk(None, allowed, lambda t: m.accept_token(t), lambda: m.is_terminated(), s))
    report(lib, compile_s, res)
elif lib == "outlines":
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    t0 = time.perf_counter()
    regex = build_regex_from_schema(json.dumps(SCHEMA))
    mapping = {}
    for t, i in tok.get_vocab().items():
        if i == EOS or t in ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>"): continue
        mapping.setdefault(t, []).append(i)
    vocab = Vocabulary(EOS, mapping)
    index = Index(regex, vocab)
    compile_s = time.perf_counter() - t0
    res = []
    for s in range(WALKS):
        g = Guide(index)
        def allowed():
            a = torch.zeros(V, dtype=torch.bool); a[list(g.get_tokens())] = True; return a
        res.append(walk(None, allowed, lambda t: g.advance(t), lambda: g.is_finished(), s))
    report(lib, compile_s, res)
if "--why" in sys.argv:
    for text, _, n in res:
        try:
            v = json.loads(text); errs = [e.message for e in validator.iter_errors(v)]
        except Exception as e: errs = [f"json: {e}"]
        if errs: print(n, repr(text[-80:]), errs[:2])
