"""The `mlpmem` command. Each verb parses flags into a typed config and calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mlpmem.errors import MlpmemError

log = logging.getLogger("mlpmem")


def _corpus(a):
    from mlpmem.config import from_args
    from mlpmem.corpus import CorpusConfig, build_corpus

    build_corpus(Path(a.out), from_args(CorpusConfig, a), a.overwrite)


def _datastore(a):
    from mlpmem.config import from_args
    from mlpmem.datastore import DatastoreConfig, build_datastore

    build_datastore(Path(a.corpus), Path(a.out), from_args(DatastoreConfig, a), overwrite=a.overwrite)


def _index(a):
    from mlpmem.config import from_args
    from mlpmem.index import IndexConfig, build_index

    build_index(Path(a.datastore), Path(a.out), from_args(IndexConfig, a), a.overwrite)


def _targets(a):
    from mlpmem.config import from_args
    from mlpmem.manifest import read_json
    from mlpmem.targets import TargetsConfig, build_targets

    if a.temperature is None:  # "auto": the T that minimised kNN-LM perplexity on valid
        if not a.tuning:
            raise MlpmemError("--temperature auto needs the tuning result of `mlpmem knnlm`", "pass --tuning OUT/knnlm.json, or a number such as --temperature 2")
        a.temperature = float(read_json(Path(a.tuning))["knn_temperature"])
    build_targets(Path(a.datastore), Path(a.index), Path(a.out), from_args(TargetsConfig, a), a.overwrite,
                  queries_dir=Path(a.queries) if a.queries else None)


def _knnlm(a):
    from mlpmem.config import from_args
    from mlpmem.evaluate import KnnConfig, run_knnlm

    r = run_knnlm(Path(a.corpus), Path(a.datastore), Path(a.index), Path(a.out), from_args(KnnConfig, a), a.split, a.model)
    print(_table(r))


def _train(a):
    from mlpmem.config import from_args
    from mlpmem.models import load_model
    from mlpmem.store import Datastore
    from mlpmem.train import TrainConfig, train_memory

    cfg = from_args(TrainConfig, a)
    lm = None
    layer = cfg.memory_input()[0]
    if cfg.init != "plain" or (layer is not None and layer < 0):
        lm = load_model(a.model or Datastore(Path(a.datastore)).model_id)[0]  # to copy the head from / resolve layers
    train_memory(Path(a.datastore), Path(a.targets), Path(a.out), cfg, valid_datastore_dir=Path(a.valid) if a.valid else None,
                 valid_targets_dir=Path(a.valid_targets) if a.valid_targets else None, init_lm=lm, overwrite=a.overwrite)


def _run(a):
    from mlpmem.pipeline import load_recipe, quick_recipe, run_pipeline

    if a.recipe:
        recipe = load_recipe(a.recipe, out=a.out)
    else:
        if not a.corpus:
            raise MlpmemError("`mlpmem run` needs a RECIPE or --corpus", "e.g. `mlpmem run sotu` or `mlpmem run --corpus data.jsonl --out runs/mine`")
        recipe = quick_recipe(a.corpus, a.model, a.out or "runs/quick")
    report = run_pipeline(recipe, a.overwrite)
    print(_table(report))


def _generate(a):
    from mlpmem.config import from_args
    from mlpmem.generation import GenerateConfig, generate_side_by_side, read_prompts

    rows = generate_side_by_side(a.model, read_prompts(a.prompts, a.prompts_file), from_args(GenerateConfig, a), a.base_model)
    for r in rows:
        print(f"=== {r['prompt']}\n--- base LM:\n{r['base']}\n--- LM + memory (lambda={a.lam}):\n{r['memory']}\n")


def _export(a):
    from mlpmem.hf import export_hf

    export_hf(Path(a.memory), Path(a.out), base_model=a.base_model, lambda_=a.lam, memory_temperature=a.memory_temperature, full_export=a.full)


def _probe(a):
    from mlpmem.probe import build_probe

    build_probe(Path(a.corpus), Path(a.out), a.n_items, a.seed, a.model, context_tokens=a.context_tokens,
                continuation_tokens=a.continuation_tokens, n_distractors=a.distractors, task_name=a.task_name, overwrite=a.overwrite)


def _table(r: dict) -> str:
    """A small text table of perplexities and tokens/s."""
    rows = [("method", "perplexity", "tokens/s")]
    for name, ppl in r["ppl"].items():
        tps = r.get("tokens_per_s", {}).get(name)
        rows.append((name, f"{ppl:.3f}", f"{tps:.0f}" if tps else "-"))
    w = [max(len(x[i]) for x in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(row)) for row in rows)


def _args_corpus(sp):
    from mlpmem.config import add_arguments
    from mlpmem.corpus import CorpusConfig

    sp.add_argument("--out", required=True)
    sp.add_argument("--overwrite", action="store_true")
    add_arguments(sp, CorpusConfig)


def _args_datastore(sp):
    from mlpmem.config import add_arguments
    from mlpmem.datastore import DatastoreConfig

    sp.add_argument("--corpus", required=True, help="folder written by `mlpmem corpus`")
    sp.add_argument("--out", required=True)
    sp.add_argument("--overwrite", action="store_true")
    add_arguments(sp, DatastoreConfig)


def _args_index(sp):
    from mlpmem.config import add_arguments
    from mlpmem.index import IndexConfig

    sp.add_argument("--datastore", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--overwrite", action="store_true")
    add_arguments(sp, IndexConfig)


def _args_targets(sp):
    from mlpmem.config import add_arguments
    from mlpmem.targets import TargetsConfig

    sp.add_argument("--datastore", required=True)
    sp.add_argument("--index", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument("--tuning", help="knnlm.json written by `mlpmem knnlm`, for --temperature auto")
    sp.add_argument("--queries", help="a datastore of another split (e.g. valid) to build targets for, searched in this index")
    add_arguments(sp, TargetsConfig)


def _args_knnlm(sp):
    from mlpmem.config import add_arguments
    from mlpmem.evaluate import KnnConfig

    for name in ("corpus", "datastore", "index", "out"):
        sp.add_argument(f"--{name}", required=True)
    sp.add_argument("--split", default="test")
    sp.add_argument("--model", default=None, help="model to use (default: the datastore's)")
    add_arguments(sp, KnnConfig)


def _args_train(sp):
    from mlpmem.config import add_arguments
    from mlpmem.train import TrainConfig

    sp.add_argument("--datastore", required=True)
    sp.add_argument("--targets", required=True)
    sp.add_argument("--valid", default=None, help="datastore of the valid split (built with --lm-logprob)")
    sp.add_argument("--valid-targets", default=None, help="kNN targets of the valid split (`mlpmem targets --queries`), for valid KL")
    sp.add_argument("--model", default=None, help="the LM (default: the datastore's), for init lm_head/lm_copy")
    sp.add_argument("--out", required=True)
    sp.add_argument("--overwrite", action="store_true")
    add_arguments(sp, TrainConfig)


def _args_run(sp):
    sp.add_argument("recipe", nargs="?", help="a recipe YAML file or a built-in recipe name (e.g. sotu)")
    sp.add_argument("--corpus", help="quick experiment on your own corpus (.jsonl with a text field, .txt, .parquet, folder)")
    sp.add_argument("--model", default="smollm2-135m", help="HF model name or local folder")
    sp.add_argument("--out", default=None)
    sp.add_argument("--overwrite", action="store_true")


def _args_generate(sp):
    from mlpmem.config import add_arguments
    from mlpmem.generation import GenerateConfig

    sp.add_argument("model", help="a trained memory folder (RUN/train/memory) or a folder written by save_pretrained/export")
    sp.add_argument("prompts", nargs="*", help="prompts (or --prompts-file)")
    sp.add_argument("--prompts-file", help="a text file with one prompt per line")
    sp.add_argument("--base-model", default=None, help="base LM (default: the one the memory was trained for)")
    add_arguments(sp, GenerateConfig)


def _args_export(sp):
    sp.add_argument("memory", help="a trained memory folder (RUN/train/memory)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--base-model", default=None, help="base LM reference to record (default: the memory's)")
    sp.add_argument("--lam", type=float, default=0.25, help="default lambda stored in the config")
    sp.add_argument("--memory-temperature", type=float, default=1.0)
    sp.add_argument("--full", action="store_true", help="also store the base model, for a self-contained folder")


def _args_probe(sp):
    sp.add_argument("corpus", help="a corpus folder written by `mlpmem corpus` (its train split)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--n-items", type=int, default=200)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--model", default=None, help="tokenizer to detokenize with (default: the corpus's)")
    sp.add_argument("--context-tokens", type=int, default=32)
    sp.add_argument("--continuation-tokens", type=int, default=8)
    sp.add_argument("--distractors", type=int, default=3)
    sp.add_argument("--task-name", default="mlpmem_probe")
    sp.add_argument("--overwrite", action="store_true")


# verb -> (function, help, flags). Flags are added only for the verb being run, so
# `mlpmem --help` does not import torch and the stage modules.
VERBS = {
    "corpus": (_corpus, "split a corpus by document and tokenize it", _args_corpus),
    "datastore": (_datastore, "extract (hidden state -> next token) pairs from a corpus split", _args_datastore),
    "index": (_index, "build a FAISS index over a datastore's keys", _args_index),
    "targets": (_targets, "kNN target distributions for every datastore row", _args_targets),
    "knnlm": (_knnlm, "perplexity of the LM alone and with kNN-LM (T and lambda tuned on valid)", _args_knnlm),
    "train": (_train, "train an MLP memory on a datastore and its kNN targets", _args_train),
    "run": (_run, "run the whole experiment from a recipe (or a corpus) and print the comparison", _args_run),
    "generate": (_generate, "continue prompts with the base LM and with LM + memory, side by side", _args_generate),
    "export": (_export, "turn a trained memory into a Hugging Face model folder (save_pretrained layout)", _args_export),
    "probe": (_probe, "build the knowledge-probe lm-eval task from a corpus's training text", _args_probe),
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlpmem", description="Retriever-pretrained MLP memory (and kNN-LM) for Hugging Face causal LMs.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="verb", required=True)
    for name, (fn, help_, add) in VERBS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        if verb in (name, None):
            add(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb = next((x for x in argv if x in VERBS), "")
    args = build_parser(verb).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("faiss.loader", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.fn(args)
    except MlpmemError as e:
        print(f"mlpmem: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlpmem: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
