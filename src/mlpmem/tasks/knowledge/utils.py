"""Metrics of the mlpmem knowledge tasks (written by `mlpmem tasks build`; the code lives in mlpmem.knowledge_tasks)."""

from mlpmem.knowledge_tasks import define_scores, exact_match


def process_em(doc, results):
    return {"exact_match": exact_match(results[0], doc["answers"])}


def process_define(doc, results):
    return define_scores(results[0], doc["references"], doc["support"])
