import subprocess
import sys

from mlpmem.cli import main


def test_user_error_is_one_paragraph_without_traceback(tmp_path, capsys):
    rc = main(["corpus", "--source", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def test_boolean_flags_parse_as_booleans(tmp_path):
    from mlpmem.cli import build_parser

    a = build_parser("datastore").parse_args(["datastore", "--corpus", "c", "--out", "o", "--no-lm-logprob"])
    assert a.lm_logprob is False
    a = build_parser("datastore").parse_args(["datastore", "--corpus", "c", "--out", "o", "--lm-logprob"])
    assert a.lm_logprob is True


def test_bad_recipe_reports_every_problem(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("out: x\ncorpus:\n  sorce: a\ntrain:\n  lr: fast\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "corpus.sorce" in err and "train.lr" in err and "Traceback" not in err


def test_help_is_fast_and_lists_verbs():
    out = subprocess.run([sys.executable, "-m", "mlpmem.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for verb in ("corpus", "datastore", "index", "targets", "knnlm", "train", "run"):
        assert verb in out
    # the verb list must not pay for torch
    code = "import sys; from mlpmem.cli import build_parser; build_parser(''); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_verify_flag_on_verbs_that_read_stages():
    from mlpmem.cli import build_parser

    assert build_parser("index").parse_args(["index", "--datastore", "d", "--out", "o", "--verify"]).verify is True
    assert build_parser("train").parse_args(["train", "--datastore", "d", "--targets", "t", "--out", "o"]).verify is False


def test_os_errors_count_as_user_errors_only_on_user_paths(tmp_path):
    import errno

    from mlpmem.cli import os_error

    argv = ["corpus", "--source", str(tmp_path / "in.jsonl"), f"--out={tmp_path / 'o'}"]
    assert "does not exist" in str(os_error(FileNotFoundError(errno.ENOENT, "x", str(tmp_path / "in.jsonl")), argv))
    assert os_error(FileNotFoundError(errno.ENOENT, "x", str(tmp_path / "o" / "sub" / "f")), argv) is not None
    assert os_error(FileNotFoundError(errno.ENOENT, "x", "/usr/share/elsewhere"), argv) is None  # a bug's, not the user's
    assert "disk is full" in str(os_error(OSError(errno.ENOSPC, "full"), argv))
    assert "read-only" in str(os_error(OSError(errno.EROFS, "ro", "/x"), argv))
    assert os_error(OSError(errno.EIO, "io"), argv) is None


def test_finetune_verb_flags_come_from_its_config_and_user_errors_are_one_paragraph(tmp_path, capsys):
    """`mlpmem finetune` only calls mlpmem.finetune.finetune: its flags are FinetuneConfig's (lambda_ as --lambda),
    and bad settings are refused before anything is written."""
    from mlpmem.cli import build_parser

    a = build_parser("finetune").parse_args(
        ["finetune", "--corpus", "c", "--out", "o", "--method", "full", "--lambda", "0.3", "--lora-targets", "q_proj"]
    )
    assert (a.method, a.lambda_, a.lora_targets, a.memory_trainable) == ("full", 0.3, ["q_proj"], False)
    rc = main(["finetune", "--corpus", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--method", "prefix", "--lambda", "0.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "--method: must be one of" in err and "needs a memory" in err  # every problem at once
    assert not (tmp_path / "o").exists()


def test_stage_verbs_and_recipe_sections_come_from_the_stage_registry(monkeypatch):
    """Each stage verb takes its inputs as required flags, --out, and one flag per field of the stage's config;
    the recipe's sections are the registry's; a stage added to the registry is a recipe section and a verb's flags."""
    import dataclasses

    from mlpmem import stages
    from mlpmem.cli import VERBS, build_parser
    from mlpmem.pipeline import _sections

    def options(verb):
        sub = next(a for a in build_parser(verb)._actions if a.__class__.__name__ == "_SubParsersAction")
        return {o: a for a in sub.choices[verb]._actions for o in a.option_strings}

    assert set(_sections()) == {s.name for s in stages.STAGES}
    for verb, st in stages.by_verb().items():
        assert verb in VERBS
        opts = options(verb)
        assert all(opts[f"--{name}"].required for name, _ in st.inputs) and opts["--out"].required
        assert {f"--{f.name.rstrip('_').replace('_', '-')}" for f in dataclasses.fields(st.config_class())} <= set(opts)
        assert "--device" in opts if st.device else True  # (the index has its own --device: FAISS)
    assert {"--tuning", "--queries"} <= set(options("targets")) and {"--valid", "--valid-targets", "--model"} <= set(options("train"))

    @dataclasses.dataclass
    class ToyConfig:
        size: int = 3

    import types
    import sys

    monkeypatch.setitem(sys.modules, "toy_stage", types.SimpleNamespace(ToyConfig=ToyConfig, build=lambda *a, **k: None))
    monkeypatch.setattr(
        stages,
        "STAGES",
        stages.STAGES
        + (stages.Stage("toy", "toy_stage:ToyConfig", "toy_stage:build", "a toy", verb="index", inputs=(("datastore", ""),)),),
    )
    assert _sections()["toy"] is ToyConfig
    assert "--size" in options("index")  # by_verb() now maps index to the toy stage: its flags follow the registry
