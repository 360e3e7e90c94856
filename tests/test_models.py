"""Model resolution: embedded default, GGUF files, local directories; never a download."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from labeler.engines import load_engine
from labeler.errors import InvalidInput, ModelLoadError
from labeler.models import converted_dir, embedded_gguf, resolve_model


def test_embedded_model_is_converted_once_to_safetensors(model_dir):
    gguf = embedded_gguf()
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 50_000_000
    assert model_dir == converted_dir(gguf)
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    # Any spelling of the default, and the GGUF path itself, reuse the conversion.
    for spec in (None, "embedded", "smollm2", str(gguf)):
        assert resolve_model(spec) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_local_directory_is_used_as_it_is(model_dir):
    assert resolve_model(str(model_dir)) == model_dir


@pytest.mark.parametrize("spec", ["HuggingFaceTB/SmolLM2-135M-Instruct", "/no/such/path", "model.bin"])
def test_anything_else_is_a_clear_error_not_a_download(spec):
    with pytest.raises(ModelLoadError, match="never downloaded"):
        resolve_model(spec)


@pytest.mark.parametrize(
    ("name", "options", "field", "named"),
    [
        ("transformers", {"max_model_len": 4096}, "engine_args", "'max_model_len'"),  # a vLLM argument left over
        ("transformers", {"dtype": "auto"}, "dtype", "'auto'"),
        ("transformers", {"dtype": "int8"}, "dtype", "'int8'"),
        ("transformers", {"device": "cuda:99"}, "device", "'cuda:99'"),  # one torch cannot reach
        ("vllm-remote", {"urls": "http://127.0.0.1:9", "gpu_memory_utilization": 0.5}, "engine_args", "'gpu_"),
    ],
)
def test_an_option_the_engine_cannot_take_is_refused_by_name(model_dir, name, options, field, named):
    with pytest.raises(InvalidInput) as err:
        load_engine(name, str(model_dir), **options)
    assert err.value.field == field and named in str(err.value)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="without config.json"):
        resolve_model(str(tmp_path))


def test_a_gguf_replaced_in_place_gets_its_own_conversion(tmp_path, monkeypatch):
    """Named by content, not by name and size: a same-size fine-tune swapped in is converted
    anew (it never runs as the old weights under the old model id), and the same file at
    another path names the same conversion (the same model id on every machine)."""
    monkeypatch.setenv("LABELER_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "judge.Q4.gguf"
    gguf.write_bytes(b"\x01" * 4096)
    first = converted_dir(gguf)
    assert first.name.startswith("judge.Q4-") and converted_dir(gguf) == first
    tuned = tmp_path / "tuned.gguf"
    tuned.write_bytes(b"\x02" * 4096)
    os.replace(tuned, gguf)  # swapped in, as a copy over the old file lands
    assert converted_dir(gguf) != first
    elsewhere = tmp_path / "other" / "judge.Q4.gguf"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"\x01" * 4096)
    assert converted_dir(elsewhere) == first
    # Hashed once however its path is spelled.
    from labeler.fingerprint import _read_index

    assert converted_dir(tmp_path / "other" / ".." / "other" / "judge.Q4.gguf") == first
    assert [k for k in _read_index() if k.endswith("judge.Q4.gguf")] == [str(gguf.resolve()), str(elsewhere.resolve())]
    # Through a link to a blob named by its hash (the Hugging Face cache's layout): the same.
    blob = tmp_path / "blobs" / "5f0e3c1a"
    blob.parent.mkdir()
    blob.write_bytes(b"\x01" * 4096)
    linked = tmp_path / "snapshots" / "judge.Q4.gguf"
    linked.parent.mkdir()
    linked.symlink_to(blob)
    assert converted_dir(linked) == first


def test_a_model_path_that_cannot_be_read_is_one_line_naming_it(monkeypatch):
    """A folder on the way the labeler's user may not search: said, not a traceback (as root
    nothing is refused, so the refusal is the file system's answer, faked)."""

    def refused(self: Path, *args, **kwargs) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_dir", refused)
    with pytest.raises(ModelLoadError, match=r"cannot read /models/private/judge: Permission denied \(the model"):
        resolve_model("/models/private/judge")


def test_a_gguf_is_known_by_its_suffix_in_any_case(tmp_path, monkeypatch):
    import labeler.models as models

    gguf = tmp_path / "Judge.Q4.GGUF"
    gguf.write_bytes(b"\x01" * 64)
    monkeypatch.setattr(models, "convert_gguf", lambda path: ("converted", path))
    assert resolve_model(str(gguf)) == ("converted", gguf)


def _tiny_llama(vocab_size: int = 64) -> Any:
    """A one-layer Llama of random weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=vocab_size
    )
    return AutoModelForCausalLM.from_config(config)


def _tiny_model(folder: Path, tokenizer_from: Path) -> Path:
    """A one-layer Llama in `folder`, with the session model's tokenizer."""
    import shutil

    _tiny_llama(vocab_size=49152).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return folder


def test_a_weights_file_cut_short_is_a_load_error_naming_the_model(tmp_path, model_dir):
    from labeler.engines.transformers_engine import TransformersEngine

    folder = _tiny_model(tmp_path / "cut", model_dir)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy that did not finish
    with pytest.raises(ModelLoadError, match=f"cannot load a model from {folder}"):
        TransformersEngine(folder)


def test_a_tokenizer_folder_whose_config_does_not_fit_is_a_load_error(tmp_path, model_dir):
    from labeler.models import load_tokenizer

    folder = _tiny_model(tmp_path / "odd", model_dir)
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"num_attention_heads": 2', '"num_attention_heads": 3'))
    with pytest.raises(ModelLoadError, match=f"cannot read the tokenizer of {folder}"):
        load_tokenizer(folder)


@pytest.mark.parametrize("locks", [True, False])
def test_a_conversion_folder_left_without_its_config_is_converted_again(tmp_path, monkeypatch, model_dir, locks):
    """A published conversion always holds config.json; a folder of its name without one (its
    files partly removed) is a leftover, replaced by a new conversion, not an error at each
    start: also on a file system without locks (NFS mounted nolock)."""
    import fcntl

    from transformers import AutoModelForCausalLM

    import labeler.models as models

    if not locks:

        def no_locks(fd, operation):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

        monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setenv("LABELER_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "judge.gguf"
    gguf.write_bytes(b"\x01" * 4096)
    out = converted_dir(gguf)
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"")  # what a clean-up left
    tiny = _tiny_model(tmp_path / "tiny", model_dir)
    monkeypatch.setattr(
        models, "_dequantized", lambda path: (AutoModelForCausalLM.from_pretrained(tiny), models.load_tokenizer(tiny))
    )
    assert models.convert_gguf(gguf) == out and (out / "config.json").is_file()
    assert (out / "model.safetensors").stat().st_size > 0
    assert not list(out.parent.glob(".convert-*"))


def test_a_lock_file_opens_read_only_where_it_cannot_be_written(tmp_path, monkeypatch):
    """One another user left, or on a read-only mount: taken read-only (a local file system
    locks it so); where none exists and none may be made, the reason is the refusal."""
    from labeler.models import open_lock

    real_open = os.open

    def refused(path, flags, *mode):
        if flags & os.O_RDWR:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *mode)

    lock = tmp_path / ".model.lock"
    lock.write_text("")
    monkeypatch.setattr(os, "open", refused)
    with open_lock(lock) as f:
        assert f.fileno() >= 0
    with pytest.raises(OSError, match="Read-only file system") as err:
        open_lock(tmp_path / ".none.lock")
    assert err.value.errno == errno.EROFS


def test_a_cache_that_cannot_be_written_fails_before_the_conversion(tmp_path, monkeypatch):
    """Named, with the setting that moves it, before the ~40 s of dequantizing (as root no
    permission is refused, so the cache lies under a plain file)."""
    import labeler.models as models

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LABELER_CACHE_DIR", str(blocker / "cache"))

    def converted(gguf):
        raise AssertionError("converted into a cache that cannot be written")

    monkeypatch.setattr(models, "_dequantized", converted)
    with pytest.raises(ModelLoadError, match=r"cannot write the converted model in .*LABELER_CACHE_DIR"):
        models.convert_gguf(embedded_gguf())


def test_a_published_conversion_is_readable_as_its_files_are(tmp_path):
    """The temporary directory is private (0700); the conversion renamed into place is
    searchable by whoever may read its files (an image built as root, run as another user)."""
    import tempfile

    from labeler.models import _publish

    for files, directory in ((0o644, 0o755), (0o600, 0o700), (0o640, 0o750)):
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=tmp_path))
        (tmp / "config.json").write_text("{}")
        (tmp / "config.json").chmod(files)
        out = tmp_path / f"model-{files:o}"
        _publish(tmp, out)
        assert not tmp.exists() and (out / "config.json").is_file()
        assert out.stat().st_mode & 0o777 == directory


def test_a_published_conversion_s_weights_are_readable_as_its_config_is(tmp_path):
    """save_pretrained writes the weights 0600 whatever the umask: published as they are, a
    user who may read config.json takes the conversion, then cannot read its weights."""
    import tempfile

    from labeler.models import _publish

    model = _tiny_llama()
    for files in (0o644, 0o640):
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=tmp_path))
        model.save_pretrained(tmp)
        (tmp / "config.json").chmod(files)
        out = tmp_path / f"model-{files:o}"
        _publish(tmp, out)
        modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
        assert "model.safetensors" in modes and len(modes) > 2
        assert all(mode & files & 0o444 == files & 0o444 for mode in modes.values()), modes  # at least as readable


def test_a_conversion_removes_leftovers_of_conversions_killed_long_ago(tmp_path, monkeypatch):
    """A conversion killed mid-way (SIGKILL skips its cleanup) leaves a directory as large as
    the model: the next conversion removes those untouched for a day, not one in progress."""
    import labeler.models as models

    monkeypatch.setenv("LABELER_CACHE_DIR", str(tmp_path / "cache"))
    gguf = embedded_gguf()
    parent = models.converted_dir(gguf).parent
    old, recent = parent / ".convert-killed", parent / ".convert-running"
    for d in (old, recent):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"\0" * 1024)
    day_and_more = old.stat().st_mtime - models.STALE_CONVERSION_S - 60
    os.utime(old, (day_and_more, day_and_more))

    class Stop(Exception):
        pass

    def stop(gguf):
        raise Stop

    monkeypatch.setattr(models, "_dequantized", stop)
    with pytest.raises(Stop):
        models.convert_gguf(gguf)
    assert not old.exists() and (recent / "model.safetensors").is_file()
    left = sorted(p.name for p in parent.iterdir() if p.suffix != ".lock")  # beside the conversions' lock
    assert left == [".convert-running"]  # its own removed too


CONVERT = """
import os, sys, time
from pathlib import Path

import labeler.models as models

log = Path(sys.argv[2])


class Written:
    # Stands in for the dequantized model (the conversion itself is tested above): it records
    # which process wrote a conversion, slowly enough for the others to arrive meanwhile.
    def save_pretrained(self, directory):
        with log.open("a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)
        (Path(directory) / "config.json").write_text("{}")


class Tokenizer:
    def save_pretrained(self, directory):
        pass


models._dequantized = lambda gguf: (Written(), Tokenizer())
print(models.convert_gguf(Path(sys.argv[1])))
"""


def test_concurrent_conversions_of_one_file_take_turns(tmp_path):
    """Processes converting the same GGUF file at once (a deployment's replicas starting on
    one machine): one converts, the others wait for it and load its conversion."""
    import subprocess
    import sys

    gguf, log, script = tmp_path / "tiny.gguf", tmp_path / "converted-by", tmp_path / "convert.py"
    gguf.write_bytes(b"GGUF" + bytes(range(256)))
    script.write_text(CONVERT)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "LABELER_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(root)}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(gguf), str(log)], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert len(set(outs)) == 1 and (Path(outs[0]) / "config.json").is_file()
    assert len(log.read_text().split()) == 1  # one conversion, not one per process


def test_a_chat_template_written_while_the_tokenizer_loads_refuses_the_start(model_dir, tmp_path, monkeypatch):
    """The model id is taken before the tokenizer and the weights load and checked after: a
    file written meanwhile (here a new chat template, as the tokenizer finishes loading the
    old one) would make the id name files the engine did not read, so the start is refused."""
    import labeler.models
    from labeler.engines.transformers_engine import TransformersEngine

    copy = tmp_path / "model"
    copy.mkdir()
    for f in model_dir.iterdir():
        if f.suffix == ".safetensors":
            (copy / f.name).symlink_to(f)
        else:
            (copy / f.name).write_bytes(f.read_bytes())
    loaded = labeler.models.load_tokenizer

    def load_then_edit(directory):
        tokenizer = loaded(directory)
        (copy / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
        return tokenizer

    monkeypatch.setattr(labeler.models, "load_tokenizer", load_then_edit)
    monkeypatch.setenv("LABELER_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match="changed while its weights loaded"):
        TransformersEngine(copy)
