"""The label spec and the model fingerprint: what identifies a label, in caches and resume files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labeler import GroupItem, InvalidInput, LabelSpec, PairItem, ScoreItem
from labeler import fingerprint as fp
from labeler.chat import END_MARKERS
from labeler.spec import KEY_VERSION, MAX_SAMPLES, MAX_SEED

BASE = dict(task="t", task_version="v1", model="m@1", labels=("1", "2"))
ITEM = PairItem("ctx", "a", "b")


def spec(**kw) -> LabelSpec:
    return LabelSpec.build(kw.pop("kind", "pairwise"), **{**BASE, **kw})


def test_every_input_that_changes_a_label_changes_the_key():
    sampled = spec(cot=True, samples=4, seed=7, temperature=0.7, max_rationale_tokens=64)
    variants = [
        spec(task="u"),
        spec(task_version="v2"),
        spec(model="m@2"),
        spec(labels=("A", "B")),
        spec(order="ab"),
        spec(cot=True),
        replace(sampled, samples=3),
        replace(sampled, seed=8),
        replace(sampled, temperature=0.5),
        replace(sampled, max_rationale_tokens=65),
        spec(kind="score", labels=("1", "2")),
        spec(end_markers=["<END>"]),  # a server's own end-of-turn markers
    ]
    keys = {s.key(ITEM) for s in [spec(), sampled, *variants]}
    assert len(keys) == len(variants) + 2
    for item in (PairItem("ctx2", "a", "b"), PairItem("ctx", "b", "a"), PairItem("ctx", "a", "b ")):
        assert spec().key(item) != spec().key(ITEM)
    # A score item and a pair item of the same texts never share a key.
    assert spec(kind="score").key(ScoreItem("ctx", "a")) != spec(kind="score").key(PairItem("ctx", "a", ""))
    assert spec().keys([ITEM, ITEM]) == [spec().key(ITEM)] * 2


def test_sampled_seeds_are_spaced_out_for_the_engines():
    """vLLM seeds sample i with the request's seed + i: the engine seeds of two specs' samples
    never meet, and the largest fits a signed 64-bit generator."""
    seeds = [spec(cot=True, samples=MAX_SAMPLES, seed=s).draw_seed for s in (0, 1, 2, MAX_SEED)]
    samples = [set(range(d, d + MAX_SAMPLES)) for d in seeds]
    assert all(not a & b for i, a in enumerate(samples) for b in samples[i + 1 :])
    assert max(samples[-1]) <= 2**63 - 1


def test_parameters_that_cannot_change_a_label_do_not_split_the_key():
    base = spec()
    # Without sampling (samples = 1) the rationale is greedy: seed and temperature do nothing.
    assert spec(seed=5, temperature=1.5).key(ITEM) == base.key(ITEM)
    # Without chain-of-thought no rationale is generated: its length does nothing.
    assert spec(max_rationale_tokens=7).key(ITEM) == base.key(ITEM)
    greedy = spec(cot=True, max_rationale_tokens=64)
    assert spec(cot=True, max_rationale_tokens=64, seed=3, temperature=2.0).key(ITEM) == greedy.key(ITEM)
    # The order means nothing to a score.
    assert spec(kind="score", order="ab").key(ITEM) == spec(kind="score").key(ITEM)
    # The library's own end-of-turn markers, given (an empty one strips nothing), are no others.
    assert spec(end_markers=["", *END_MARKERS]).key(ITEM) == base.key(ITEM)
    assert spec(end_markers=list(END_MARKERS)).end_markers is None


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"kind": "rank"}, "kind"),
        ({"order": "ac"}, "order"),
        ({"cot": 1}, "cot"),
        ({"samples": 0}, "samples"),
        ({"samples": 2}, "samples"),  # self-consistency needs cot
        ({"samples": True}, "samples"),
        ({"seed": -1}, "seed"),
        ({"seed": MAX_SEED + 1}, "seed"),
        ({"cot": True, "samples": 2, "seed": 2**63 - 1}, "seed"),  # over any engine's generator
        ({"cot": True, "samples": 2, "temperature": 0.0}, "temperature"),
        ({"cot": True, "samples": 2, "temperature": float("nan")}, "temperature"),
        ({"cot": True, "max_rationale_tokens": 0}, "max_rationale_tokens"),
        ({"end_markers": "<END>"}, "end_markers"),
        ({"end_markers": [3]}, "end_markers"),
    ],
)
def test_the_spec_validates_itself(kw, field):
    with pytest.raises(InvalidInput) as err:
        spec(**kw)
    assert err.value.field == field


KEY_SCRIPT = """
import sys
from labeler import LabelSpec, PairItem
spec = LabelSpec.build("pairwise", task="t", task_version="v1", model="m@1", labels=("1", "2"), cot=True,
                       samples=2, seed=3, temperature=0.7, max_rationale_tokens=9)
print(spec.key(PairItem("ctx \\u00e9 \\ud800", "a", "b")))
"""


def test_a_key_of_a_mapping_says_to_build_the_item():
    spec = LabelSpec.build("score", task="t", task_version="v", model="m", labels=("1", "2"))
    with pytest.raises(TypeError, match=r"not of a dict: build one from a mapping with e.g. ScoreItem\(\*\*mapping\)"):
        spec.key({"context": "q", "response": "a"})
    assert spec.key(ScoreItem(**{"context": "q", "response": "a"})) == spec.keys([ScoreItem("q", "a")])[0]


def test_the_same_request_gets_the_same_key_in_another_process():
    ours = spec(cot=True, samples=2, seed=3, temperature=0.7, max_rationale_tokens=9).key(
        PairItem("ctx \u00e9 \ud800", "a", "b")
    )
    env = os.environ | {"PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", KEY_SCRIPT], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == ours


_text = st.text(max_size=30)  # any code point, lone surrogates, quotes and controls included


@settings(max_examples=300, deadline=None)
@given(_text, _text, _text, st.lists(_text, min_size=2, max_size=4))
def test_the_key_is_sha256_of_the_canonical_spec_and_item(context, a, b, responses):
    s = spec(kind="group", order=None)
    for item, label_spec in (
        (PairItem(context, a, b), spec()),
        (ScoreItem(context, a), spec(kind="score")),
        (GroupItem(context, tuple(responses)), s),
    ):
        fields = [getattr(item, f.name) for f in dataclasses.fields(item)]
        # The end markers count only where they are not the library's (`None`).
        head = {
            "v": KEY_VERSION,
            **{k: v for k, v in dataclasses.asdict(label_spec).items() if v is not None or k != "end_markers"},
        }
        canonical = json.dumps(head, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + json.dumps(
            fields, sort_keys=True, ensure_ascii=False, separators=(",", ":")
        )
        assert label_spec.key(item) == hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
        assert label_spec.keys([item, item]) == [label_spec.key(item)] * 2


# -- the model fingerprint --------------------------------------------------------------------------------
@pytest.fixture
def model_copy(tmp_path: Path, monkeypatch) -> Path:
    """A small model directory (config, tokenizer, weights) and a private fingerprint index."""
    monkeypatch.setenv("LABELER_CACHE_DIR", str(tmp_path / "cache"))
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (d / "tokenizer.json").write_text(json.dumps({"vocab": ["a", "b"]}))
    (d / "model.safetensors").write_bytes(b"\x01" * 4096)
    (d / "README.md").write_text("not part of the model")
    return d


def test_same_shape_weights_swapped_in_place_change_the_fingerprint(model_copy: Path, tmp_path: Path):
    first = fp.fingerprint(model_copy)
    assert fp.fingerprint(model_copy) == first and len(first) == 64
    # A fine-tune of the same shape: same names, same sizes, other bytes; copied with its
    # timestamps kept (cp -p), so only the content, ctime and inode tell it apart.
    tuned = tmp_path / "tuned.safetensors"
    tuned.write_bytes(b"\x02" * 4096)
    shutil.copy2(model_copy / "model.safetensors", tmp_path / "orig")
    os.utime(tuned, ns=(os.stat(model_copy / "model.safetensors").st_atime_ns,) * 2)
    os.replace(tuned, model_copy / "model.safetensors")
    assert fp.fingerprint(model_copy) != first
    (model_copy / "README.md").write_text("edited")  # not a model file
    second = fp.fingerprint(model_copy)
    # A trainer's state saved beside the weights (a checkpoint folder) is no part of the model.
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json"):
        (model_copy / name).write_bytes(b"\x03" * 64)
    assert fp.fingerprint(model_copy) == second
    assert [p.name for p in fp.model_files(model_copy)] == ["config.json", "model.safetensors", "tokenizer.json"]
    (model_copy / "tokenizer.json").write_text(json.dumps({"vocab": ["a", "c"]}))
    assert fp.fingerprint(model_copy) != second


def test_a_restart_on_unchanged_files_reads_no_weights(model_copy: Path):
    digest = fp.fingerprint(model_copy)
    index_path = fp.cache_dir() / "fingerprints.json"
    index = json.loads(index_path.read_text())
    # Mark the remembered digest: getting the mark back proves the weights were not hashed again.
    index[str(model_copy.resolve())]["digest"] = "remembered"
    index_path.write_text(json.dumps(index))
    assert fp.fingerprint(model_copy) == "remembered"
    (model_copy / "model.safetensors").write_bytes(b"\x01" * 4096)  # rewritten: same bytes, new ctime
    assert fp.fingerprint(model_copy) == digest


def test_a_cache_that_cannot_be_written_hashes_the_weights_once_a_process(
    model_copy: Path, tmp_path: Path, monkeypatch, caplog
):
    """A cache directory that cannot be written (here a path under a file): each start hashes
    the weights again, but one process asking twice (an engine's id before and after its
    weights load) hashes them once."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LABELER_CACHE_DIR", str(blocker / "cache"))
    with caplog.at_level(logging.INFO, logger="labeler.fingerprint"):
        first = fp.fingerprint(model_copy)
        assert fp.fingerprint(model_copy) == first
    assert sum(r.getMessage().startswith("fingerprinting") for r in caplog.records) == 1
    assert any("cannot remember model fingerprints" in r.getMessage() for r in caplog.records)


INDEXING = """
import sys

from labeler import fingerprint as fp

for folder in sys.argv[1:]:
    fp.fingerprint(folder)
"""


def test_processes_sharing_a_cache_keep_each_other_s_fingerprints(tmp_path: Path):
    """Two processes fingerprinting models at once into one cache (replicas starting side by
    side): every model's entry stays in the index, none replaced by the other process's
    write, so no model is hashed again at the next start."""
    folders = {w: [] for w in "ab"}
    for w, made in folders.items():
        for i in range(120):
            folder = tmp_path / f"{w}{i}"
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps({"model": f"{w}{i}"}))
            made.append(str(folder))
    env = os.environ | {"LABELER_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", INDEXING, *made], env=env) for made in folders.values()]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    index = json.loads((tmp_path / "cache" / "fingerprints.json").read_text())
    assert set(index) == {str(Path(f).resolve()) for made in folders.values() for f in made}


def test_the_model_s_own_code_is_part_of_its_fingerprint(model_copy: Path):
    """With trust_remote_code the model directory's modules compute the tokens and the
    logits: an edit to one is another model, and gets another id."""
    (model_copy / "tokenization_custom.py").write_text("def split(text):\n    return text.split()\n")
    first, tokenizer = fp.fingerprint(model_copy), fp.tokenizer_fingerprint(model_copy)
    (model_copy / "tokenization_custom.py").write_text("def split(text):\n    return list(text)\n")
    assert fp.fingerprint(model_copy) != first
    assert fp.tokenizer_fingerprint(model_copy) != tokenizer
    second = fp.fingerprint(model_copy)
    (model_copy / "modeling_custom.py").write_text("SCALE = 2.0\n")
    assert fp.fingerprint(model_copy) != second


def test_named_chat_templates_and_a_versioned_tokenizer_are_part_of_the_fingerprint(model_copy: Path):
    """transformers reads a model's default chat template from `additional_chat_templates/`
    where no `chat_template.jinja` stands beside the config, and vLLM's Mistral tokenizer
    mode reads `tokenizer.model.v3`: an edit to either gives another id."""
    templates = model_copy / "additional_chat_templates"
    templates.mkdir()
    (templates / "default.jinja").write_text("{{ messages[0]['content'] }}")
    first, tokenizer = fp.fingerprint(model_copy), fp.tokenizer_fingerprint(model_copy)
    (templates / "default.jinja").write_text("User: {{ messages[0]['content'] }}")
    second = fp.fingerprint(model_copy)
    assert second != first and fp.tokenizer_fingerprint(model_copy) != tokenizer
    (model_copy / "tokenizer.model.v3").write_bytes(b"\x00" * 64)
    third = fp.fingerprint(model_copy)
    (model_copy / "tokenizer.model.v3").write_bytes(b"\x01" * 64)
    assert len({second, third, fp.fingerprint(model_copy)}) == 3
    assert [p.relative_to(model_copy).as_posix() for p in fp.model_files(model_copy)] == [
        "additional_chat_templates/default.jinja",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer.model.v3",
    ]


def test_a_trainer_s_metrics_written_beside_the_weights_are_no_part_of_the_model(model_copy: Path):
    """HF Trainer's save_metrics writes all_results.json and <split>_results.json into the
    output directory at every evaluation: the model is the same, its id too, and a start
    during an evaluation is not refused."""
    before = fp.model_id(model_copy)
    for name in ("all_results.json", "train_results.json", "eval_results.json", "trainer_state.json"):
        (model_copy / name).write_text(json.dumps({"eval_loss": 1.25, "epoch": 3.0}))
    assert fp.model_id(model_copy) == before
    fp.check_unchanged(model_copy, before)
    assert [p.name for p in fp.model_files(model_copy)] == ["config.json", "model.safetensors", "tokenizer.json"]


def test_the_fingerprint_index_is_readable_as_the_umask_lets(model_copy: Path):
    """Users sharing one cache reuse each other's digests: the index is not left private as a
    temporary file is made, but given the mode the umask gives any other file."""
    index = fp.cache_dir() / "fingerprints.json"
    old = os.umask(0o022)
    try:
        fp.fingerprint(model_copy)
        assert index.stat().st_mode & 0o777 == 0o644
        os.umask(0o007)
        (model_copy / "config.json").write_text(json.dumps({"hidden_size": 16}))  # hashed and written anew
        fp.fingerprint(model_copy)
        assert index.stat().st_mode & 0o777 == 0o660
    finally:
        os.umask(old)


UNREADABLE = """
import sys

from labeler import fingerprint as fp
from labeler.errors import ModelLoadError

try:
    fp.fingerprint(sys.argv[1])
except ModelLoadError as exc:
    print("ModelLoadError:", exc)
"""


def test_weights_that_cannot_be_read_are_a_load_error_naming_the_file(model_copy: Path, tmp_path: Path):
    """A directory whose weights are private to another user: a load error naming the file,
    not a PermissionError traceback. Run in a process of its own, which as root gives up the
    capabilities that let root read any file."""
    weights = model_copy / "model.safetensors"
    weights.chmod(0)
    argv = [sys.executable, "-c", UNREADABLE, str(model_copy)]
    if os.geteuid() == 0:  # setpriv: util-linux, on every Debian system
        argv = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", *argv]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ModelLoadError: cannot read ") and str(weights) in done.stdout
    assert "Permission denied" in done.stdout


def test_files_written_while_the_weights_load_refuse_the_start(model_dir, tmp_path: Path, monkeypatch):
    """The fingerprint is taken before the weights load and checked after: a checkpoint
    written into the directory meanwhile would give the loaded weights the new files' id
    (and cache their labels as the new model's). The start is refused; once the files rest,
    it succeeds."""
    import transformers

    from labeler.engines.transformers_engine import TransformersEngine
    from labeler.errors import ModelLoadError

    monkeypatch.setenv("LABELER_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "model"
    copy.mkdir()
    for f in Path(model_dir).iterdir():
        if f.name == "generation_config.json":
            shutil.copy(f, copy / f.name)
        else:
            (copy / f.name).symlink_to(f)
    real = transformers.AutoModelForCausalLM.from_pretrained

    def load_while_written(*args, **kwargs):
        model = real(*args, **kwargs)
        config = json.loads((copy / "generation_config.json").read_text())
        (copy / "generation_config.json").write_text(json.dumps({**config, "max_new_tokens": 7}))
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load_while_written)
    with pytest.raises(ModelLoadError, match="changed while its weights loaded"):
        TransformersEngine(copy)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", real)
    assert TransformersEngine(copy).model_id == fp.model_id(copy)


def test_model_ids_name_the_directory_and_the_content(labeler, model_dir, model_copy: Path):
    assert fp.model_id(model_copy) == f"model@{fp.fingerprint(model_copy)[:16]}"
    assert labeler.model_id == fp.model_id(model_dir)


def test_the_labeler_builds_specs_with_its_own_parameters(labeler):
    s = labeler.spec("pairwise", "tiny", cot=True, samples=2, seed=1)
    assert (s.model, s.task_version) == (labeler.model_id, labeler.task("tiny").version)
    assert (s.temperature, s.max_rationale_tokens, s.labels) == (
        labeler.temperature,
        labeler.max_rationale_tokens,
        ("1", "2"),
    )
    assert labeler.spec("score", "tiny").labels == tuple(str(i) for i in range(1, 11))
    with pytest.raises(InvalidInput) as err:
        labeler.spec("pairwise", "tiny", samples=2)
    assert err.value.field == "samples"


def test_judgment_reference_and_group_kinds():
    from labeler import GroupItem, ReferenceItem

    # The order is part of a reference reward's identity; a judgment and a group read no order
    # (a group always reads both orders of every pair), so it is normalized away.
    assert spec(kind="reference", order="ab").key(ITEM) != spec(kind="reference").key(ITEM)
    assert spec(kind="reference").params["order"] == "both"
    for kind in ("judgment", "group"):
        assert spec(kind=kind, order="ab") == spec(kind=kind) and "order" not in spec(kind=kind).params
    # Same texts, different kinds: different keys.
    keys = {spec(kind=k).key(ScoreItem("ctx", "a")) for k in ("score", "judgment", "reference", "group", "pairwise")}
    assert len(keys) == 5
    # A group's key depends on its responses and their order, not on the sequence type.
    group = spec(kind="group")
    assert group.key(GroupItem("c", ("a", "b"))) == group.key(GroupItem("c", ["a", "b"]))  # type: ignore[arg-type]
    assert group.key(GroupItem("c", ("a", "b"))) != group.key(GroupItem("c", ("b", "a")))
    ref = spec(kind="reference")
    assert ref.key(ReferenceItem("ctx", "a", "b")) != spec().key(PairItem("ctx", "a", "b"))  # the kind tells them apart
    with pytest.raises(InvalidInput) as exc:
        spec(kind="reference", order="sideways")
    assert exc.value.field == "order"
