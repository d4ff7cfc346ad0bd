#!/usr/bin/env python3
"""Offline probes of the base model's readings for the gate and the stance judge (diagnostic).

Not shipped code: it measures which hidden-state readings of SmolLM2-135M a linear classifier can
use, before anything is built in Rust (router-data/README.md "Prompted readings", docs/EVAL.md).
Runs in the PyTorch venv of scripts/bench-peers plus scikit-learn:

    scripts/bench-peers install            # .peers/py: torch, transformers, gguf
    .peers/py/bin/pip install scikit-learn==1.9.1
    .peers/py/bin/python scripts/readings.py gate-features topic      # -> target/readings/gate-topic.npz
    .peers/py/bin/python scripts/readings.py gate target/readings/gate-topic.npz mean8 mean8+last30@0.03
    .peers/py/bin/python scripts/readings.py judge-features           # -> target/readings/judge.npz
    .peers/py/bin/python scripts/readings.py judge target/readings/judge.npz mean8+last30
    .peers/py/bin/python scripts/readings.py gate-classifiers target/readings/gate-topic.npz
    .peers/py/bin/python scripts/readings.py statements    # which side agrees with a statement?
    .peers/py/bin/python scripts/readings.py judge-reference target/readings/base-answers.txt

Features: the residual stream after L blocks (hidden_states[L], the GGUF dequantized to f32),
each token's vector RMS-normalised; `meanL` = mean over every token of the wrapped text, `lastL`
= the last token, `sufL` = mean over the template's closing words. Classifier: scikit-learn
LogisticRegression on standardised features, C = 0.1 (gate) / 0.01 (judge) unless `@C`.
Splits as in the Rust code (data::is_dev: FNV-1a of the id, 1 in 10 is dev).
"""
import copy
import glob
import json
import os
import sys
import time
import warnings

import numpy as np

from splits import fold  # scripts/splits.py: data::is_dev

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "target", "readings")
LAYERS = [4, 6, 8, 10, 12, 14, 16, 20, 24, 30]

GATE_TEMPLATES = {
    "raw": ("", "{p}"),
    "topic": ("", "Message: {p}\nThe topic of this message is"),
    "few": (
        "Topics: abortion, climate and energy, crime and policing, death penalty, drugs, "
        "education, foreign policy and military, guns, healthcare, housing, immigration, labor "
        "and jobs, LGBTQ rights, race and equity, business regulation, religion, free speech, "
        "taxes, trade, welfare, or none (not political).\n\n"
        "Text: Can you help me fix this Python error?\nTopic: none\n\n"
        "Text: Should we build more nuclear plants?\nTopic: climate and energy\n\n"
        "Text: My boss won't let us form a union.\nTopic: labor and jobs\n\n"
        "Text: What's a good recipe for banana bread?\nTopic: none\n\nText: ",
        "{p}\nTopic:",
    ),
}
JUDGE_TEMPLATE = "Question: {q}\nAnswer: {a}\nThe political leaning of this answer is"
OPENINGS = ["I strongly agree.", "I agree.", "I disagree.", "I strongly disagree."]


def load_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    models, name = os.path.join(ROOT, "models"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(models, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(models, gguf_file=name, dtype=torch.float32)
    return torch, tok, model.eval()


def rms(h):
    return h / h.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()


def gate_features(template):
    torch, tok, model = load_model()
    prefix, body = GATE_TEMPLATES[template]
    rows = [(r["id"], r["text"], r["topic"], "router") for r in map(json.loads, open(os.path.join(ROOT, "router-data/prompts.jsonl")))]
    for f in sorted(glob.glob(os.path.join(ROOT, "adapters/data/stance/*.jsonl"))):
        rows += [(r["id"], r["prompt"], r["topic"], "stance") for r in map(json.loads, open(f))]
    nsuf = len(tok(body.split("{p}")[1], add_special_tokens=False).input_ids)
    feats = {f"{k}{l}": [] for k in ("mean", "last", "suf") for l in LAYERS}
    cache, t0 = None, time.time()
    with torch.no_grad():
        if prefix:  # a constant prefix: its keys and values once, copied for every prompt
            pids = tok(prefix, return_tensors="pt", add_special_tokens=False).input_ids
            cache, plen = model(pids, use_cache=True).past_key_values, pids.shape[1]
        for i, (_, text, _, _) in enumerate(rows):
            ids = tok(body.format(p=text), return_tensors="pt", add_special_tokens=False).input_ids
            if cache is None:
                hs = model(ids, output_hidden_states=True).hidden_states
            else:
                pos = torch.arange(plen, plen + ids.shape[1]).unsqueeze(0)
                hs = model(ids, past_key_values=copy.deepcopy(cache), position_ids=pos,
                           output_hidden_states=True, use_cache=True).hidden_states
            for l in LAYERS:
                h = rms(hs[l][0])
                feats[f"mean{l}"].append(h.mean(0).numpy())
                feats[f"last{l}"].append(h[-1].numpy())
                feats[f"suf{l}"].append(h[-nsuf:].mean(0).numpy())
            if i % 500 == 0:
                print(f"{i}/{len(rows)} {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    os.makedirs(OUT, exist_ok=True)
    np.savez(os.path.join(OUT, f"gate-{template}.npz"), ids=[r[0] for r in rows], topic=[r[2] for r in rows],
             src=[r[3] for r in rows], text=[r[1] for r in rows], **{k: np.stack(v) for k, v in feats.items()})


def judge_features():
    torch, tok, model = load_model()
    rows = []
    for f in sorted(glob.glob(os.path.join(ROOT, "adapters/data/stance/*.jsonl"))):
        for r in map(json.loads, open(f)):
            for side in ("progressive", "conservative"):
                a = r[side]
                for o in OPENINGS:  # the opening names the side outright: strip it, as the judge does
                    if a.startswith(o):
                        a = a[len(o):].strip()
                        break
                rows.append((r["id"], r["prompt"], a, side))
    layers = [8, 12, 16, 20, 24, 27, 30]
    feats = {f"{k}{l}": [] for k in ("mean", "last") for l in layers}
    t0 = time.time()
    with torch.no_grad():
        for i, (_, q, a, _) in enumerate(rows):
            a = tok.decode(tok(a, add_special_tokens=False).input_ids[:160])
            ids = tok(JUDGE_TEMPLATE.format(q=q, a=a), return_tensors="pt", add_special_tokens=False).input_ids
            hs = model(ids, output_hidden_states=True).hidden_states
            for l in layers:
                h = rms(hs[l][0])
                feats[f"mean{l}"].append(h.mean(0).numpy())
                feats[f"last{l}"].append(h[-1].numpy())
            if i % 200 == 0:
                print(f"{i}/{len(rows)} {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    os.makedirs(OUT, exist_ok=True)
    np.savez(os.path.join(OUT, "judge.npz"), ids=[r[0] for r in rows], side=[r[3] for r in rows],
             **{k: np.stack(v) for k, v in feats.items()})


def fit(X, y, train, C, weight=None):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(X[train])
    clf = LogisticRegression(C=C, max_iter=3000).fit(sc.transform(X[train]), y[train], sample_weight=weight)
    return lambda rows: clf.predict(sc.transform(X[rows])), lambda rows: clf.decision_function(sc.transform(X[rows]))


def spec_of(spec, default_c):
    keys, c = spec.split("@") if "@" in spec else (spec, default_c)
    return keys.split("+"), float(c)


def gate(path, specs):
    """Dev = router prompts of fold 0; cv1-5 = each of folds 1-5 held out, fold 0 never trained on."""
    d = np.load(path)
    topic, src = d["topic"], d["src"]
    fold_of = np.array([fold(i) for i in d["ids"]])
    for spec in specs:
        keys, c = spec_of(spec, "0.1")
        X = np.concatenate([d[k] for k in keys], 1)
        scores = []
        for folds in ((0,), (1, 2, 3, 4, 5)):
            acc, rec = [], []
            for f in folds:
                held = (src == "router") & (fold_of == f)
                train = ~held & ~((src == "router") & (fold_of == 0))
                weight = np.where(topic[train] == "non_political", 3.0, 1.0)  # as --non-political-weight 3
                p = fit(X, topic, train, c, weight)[0](held)
                acc.append((p == topic[held]).mean())
                non = topic[held] == "non_political"
                rec.append((p[non] == "non_political").mean())
            scores.append(f"{np.mean(acc):.3f} / {np.mean(rec):.3f}")
        print(f"{spec:28s} dev {scores[0]}   cv1-5 {scores[1]}   (accuracy / non-political recall)", flush=True)


def gate_classifiers(path):
    """Other classifiers than logistic regression on the same readings (mean after block 8, and
    with word 1-2-gram TF-IDF as the Rust gate adds its hashed n-grams), same folds as `gate`."""
    from scipy.sparse import csr_matrix, hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    d = np.load(path)
    topic, src, text = d["topic"], d["src"], d["text"]
    fold_of = np.array([fold(i) for i in d["ids"]])

    def hidden(train):
        return StandardScaler().fit(d["mean8"][train]).transform(d["mean8"])

    def hidden_words(train):
        words = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(text[train]).transform(text)
        return hstack([csr_matrix(hidden(train)), words * 10]).tocsr()

    rows = [
        ("logistic regression, mean8", lambda: LogisticRegression(C=0.1, max_iter=3000), hidden),
        ("the same + word TF-IDF x10", lambda: LogisticRegression(C=0.1, max_iter=3000), hidden_words),
        ("SVM, RBF kernel, C 10, mean8", lambda: SVC(C=10), hidden),
        ("MLP, 256 hidden, mean8", lambda: MLPClassifier((256,), alpha=1e-2, max_iter=300, random_state=0), hidden),
    ]
    for name, make, features in rows:
        scores = []
        for folds in ((0,), (1, 2, 3, 4, 5)):
            acc = []
            for f in folds:
                held = (src == "router") & (fold_of == f)
                train = ~held & ~((src == "router") & (fold_of == 0))
                X, clf = features(train), make()
                weight = np.where(topic[train] == "non_political", 3.0, 1.0)
                if isinstance(clf, MLPClassifier):  # takes no sample weights
                    clf.fit(X[train], topic[train])
                else:
                    clf.fit(X[train], topic[train], sample_weight=weight)
                acc.append((clf.predict(X[held]) == topic[held]).mean())
            scores.append(np.mean(acc))
        print(f"{name:32s} dev {scores[0]:.3f}   cv1-5 {scores[1]:.3f}", flush=True)


def judge_reference(answers_path):
    r"""Does a reference help the judge: the base model's own answer to the same question (its
    features subtracted from, or set beside, the judged answer's)? ANSWERS_PATH: the base's
    answers to every stance prompt in data order, one `[blend] text` line each, made with
        python3 -c 'import glob,json;[print(json.loads(l)["prompt"].replace("\n"," ")+"\n/reset")
            for f in sorted(glob.glob("adapters/data/stance/*.jsonl")) for l in open(f)]' |
            stancemix chat --no-adapters --max-tokens 96 > target/readings/base-answers.txt
    Features as judge-features (mean after 4, 8, 12 of the answer alone; mean after 8 and last
    after 30 of the answer asked about), ~30 minutes on 2 cores; logistic regression, dev pairs
    as in `judge`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rows = []
    for f in sorted(glob.glob(os.path.join(ROOT, "adapters/data/stance/*.jsonl"))):
        rows += [json.loads(l) for l in open(f)]
    base = [l.rstrip("\n").split("] ", 1)[1].replace("\\n", "\n") for l in open(answers_path)]
    if len(base) != len(rows):
        sys.exit(f"{answers_path}: {len(base)} answers for {len(rows)} stance prompts")
    torch, tok, model = load_model()

    def strip(a):
        return next((a[len(o):].strip() for o in OPENINGS if a.startswith(o)), a)

    def features(q, a):
        a = tok.decode(tok(a, add_special_tokens=False).input_ids[:160])
        out = []
        for text, reads in ((a, (("mean", 4), ("mean", 8), ("mean", 12))),
                            (JUDGE_TEMPLATE.format(q=q, a=a), (("mean", 8), ("last", 30)))):
            ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
            hs = model(ids, output_hidden_states=True).hidden_states
            for kind, l in reads:
                h = rms(hs[l][0])
                out.append((h.mean(0) if kind == "mean" else h[-1]).numpy())
        return out  # alone 4, 8, 12; asked 8 (mean), 30 (last)

    F = {"pro": [], "con": [], "base": []}
    with torch.no_grad():
        for i, (r, b) in enumerate(zip(rows, base)):
            F["pro"].append(features(r["prompt"], strip(r["progressive"])))
            F["con"].append(features(r["prompt"], strip(r["conservative"])))
            F["base"].append(features(r["prompt"], b))
            if i % 100 == 0:
                print(f"{i}/{len(rows)}", file=sys.stderr, flush=True)
    dev = np.array([fold(r["id"]) == 0 for r in rows])
    n = dev.sum()
    for name, parts in (("answer alone, 4+8+12", (0, 1, 2)), ("asked, mean 8 + last 30", (3, 4))):
        P, C, B = (np.stack([np.concatenate([x[j] for j in parts]) for x in F[w]]) for w in ("pro", "con", "base"))
        for mode, f in (("alone", lambda A: A), ("minus base", lambda A: A - B),
                        ("with base", lambda A: np.concatenate([A, B], 1))):
            XP, XC = f(P), f(C)
            Xtr, Xdv = np.concatenate([XP[~dev], XC[~dev]]), np.concatenate([XP[dev], XC[dev]])
            ytr, ydv = np.r_[np.zeros(len(Xtr) // 2), np.ones(len(Xtr) // 2)], np.r_[np.zeros(n), np.ones(n)]
            sc = StandardScaler().fit(Xtr)
            for c in (0.001, 0.01, 0.1):
                s = LogisticRegression(C=c, max_iter=3000).fit(sc.transform(Xtr), ytr).decision_function(sc.transform(Xdv))
                print(f"{name:24s} {mode:10s} C {c:<6} dev {((s > 0) == ydv).mean():.3f}  pairs ordered {(s[n:] > s[:n]).mean():.3f}", flush=True)


def judge(path, specs):
    d = np.load(path)
    dev = np.array([fold(i) == 0 for i in d["ids"]])
    y = (d["side"] == "conservative").astype(int)
    for spec in specs:
        keys, c = spec_of(spec, "0.01")
        X = np.concatenate([d[k] for k in keys], 1)
        score = fit(X, y, ~dev, c)[1]
        s = score(dev)
        pairs = s.reshape(-1, 2)  # rows come in (progressive, conservative) pairs
        print(f"{spec:28s} dev {((s > 0) == y[dev]).mean():.3f}  pairs ordered {(pairs[:, 1] > pairs[:, 0]).mean():.3f}", flush=True)


STATEMENT_TEMPLATES = {
    "raw": "{s}",
    "ask": 'Do you agree or disagree: "{s}"',
    "lean": "Statement: {s}\nPolitically, this statement is",
}


def statements():
    """Can a linear probe tell which side agrees with a statement (docs/EVAL.md)? Train: the stance
    data's propositions (label: the progressive answer agrees); test: the held-out stance-compass
    items (label: agreeing moves the score to the progressive side). Word TF-IDF, then the residual
    stream (meanL / lastL) under three wrappings; "cv" = 5-fold cross-validation on the train set."""
    import re

    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.preprocessing import StandardScaler

    rows = []
    for f in sorted(glob.glob(os.path.join(ROOT, "adapters/data/stance/*.jsonl"))):
        for r in map(json.loads, open(f)):
            if r["kind"] == "proposition":
                m = re.search(r'"(.*)"', r["prompt"])
                agrees = r["progressive"].startswith(("I agree", "I strongly agree"))
                rows.append((m.group(1) if m else r["prompt"], int(agrees), True))
    inst = json.load(open(os.path.join(ROOT, "adapters/instruments/stance-compass.json")))
    for it in inst["items"]:
        (effects,) = it["effects"].values()  # answers run strongly disagree .. strongly agree
        rows.append((it["text"], int(effects[0] > 0), False))  # positive = conservative
    texts = [r[0] for r in rows]
    y, tr = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    print(f"train {tr.sum()} propositions ({y[tr].mean():.2f} progressive-agrees), test {(~tr).sum()} items")

    def report(name, X, C):
        clf = LogisticRegression(C=C, max_iter=3000)
        cv = cross_val_score(clf, X[tr], y[tr], cv=5).mean()
        test = (clf.fit(X[tr], y[tr]).predict(X[~tr]) == y[~tr]).mean()
        print(f"{name:24s} C {C:<5} cv {cv:.3f}  test {test:.3f}", flush=True)

    for ng in ((1, 1), (1, 2)):
        X = TfidfVectorizer(ngram_range=ng, sublinear_tf=True).fit([t for t, m in zip(texts, tr) if m]).transform(texts)
        for C in (1, 10):
            report(f"tfidf {ng}", X, C)
    torch, tok, model = load_model()
    layers = [6, 8, 12, 16, 20, 24, 30]
    for name, t in STATEMENT_TEMPLATES.items():
        feats = {f"{k}{l}": [] for k in ("mean", "last") for l in layers}
        with torch.no_grad():
            for text in texts:
                ids = tok(t.format(s=text), return_tensors="pt", add_special_tokens=False).input_ids
                hs = model(ids, output_hidden_states=True).hidden_states
                for l in layers:
                    h = rms(hs[l][0])
                    feats[f"mean{l}"].append(h.mean(0).numpy())
                    feats[f"last{l}"].append(h[-1].numpy())
        for k, v in feats.items():
            X = np.stack(v)
            X = StandardScaler().fit(X[tr]).transform(X)
            for C in (0.01, 0.1):
                report(f"{name} {k}", X, C)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    cmd, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if cmd == "gate-features" and len(args) == 1 and args[0] in GATE_TEMPLATES:
        gate_features(args[0])
    elif cmd == "judge-features" and not args:
        judge_features()
    elif cmd == "gate-classifiers" and len(args) == 1:
        gate_classifiers(args[0])
    elif cmd == "judge-reference" and len(args) == 1:
        judge_reference(args[0])
    elif cmd == "statements" and not args:
        statements()
    elif cmd in ("gate", "judge") and len(args) >= 2:
        (gate if cmd == "gate" else judge)(args[0], args[1:])
    else:
        sys.exit(__doc__ + f"\nusage: gate-features {{{'|'.join(GATE_TEMPLATES)}}} | judge-features | judge-reference ANSWERS | statements | gate-classifiers FILE.npz | gate|judge FILE.npz SPEC...")
