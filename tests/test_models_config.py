from pathlib import Path

import pytest

from ragq.core.errors import ConfigError
from workers.models import DEFAULT_EMBED_NAME, load_model_specs


def test_default_is_the_packaged_minilm() -> None:
    specs = load_model_specs(None)
    assert set(specs) == {"embed"}
    assert specs["embed"].name == DEFAULT_EMBED_NAME and (specs["embed"].path / "config.json").is_file()


def test_full_config(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[embed]\npath = "/m/Qwen3-Embedding-4B"\npooling = "last"\ndim = 1024\nestimate = "7.5GiB"\n'
        '[rerank]\npath = "/m/Qwen3-Reranker-0.6B"\n'
        '[generate]\npath = "/m/Qwen3-4B"\nmax_new_tokens = 64\nstop = ["\\n\\n"]\n'
    )
    specs = load_model_specs(path)
    assert specs["embed"].pooling == "last" and specs["embed"].dim == 1024
    assert specs["embed"].estimate_bytes == int(7.5 * 2**30) and specs["embed"].name == "Qwen3-Embedding-4B"
    assert specs["rerank"].kind == "qwen3"
    assert specs["generate"].stop == ("\n\n",) and specs["generate"].max_new_tokens == 64


@pytest.mark.parametrize(("text", "problem"), [
    ("[embed\npath=1", "not valid TOML"),
    ("[summarise]\npath = '/x'", "unknown role [summarise]"),
    ("[rerank]\nkind = 'qwen3'", "needs `path`"),
    ("[embed]\npath = '/x'\npooling = 'max'", "kind/pooling 'max'"),
    ("[embed]\npath = '/x'\nestimate = 'lots'", "is not a size"),
    ("[generate]\npath = '/x'\ncompile = 'yes'", "compile must be one of auto, on, off, not 'yes'"),
    ("[generate]\npath = '/x'\ndecoder = 'hf'", "decoder must be one of auto, off, not 'hf'"),
    ("[generate]\npath = '/x'\noverlap = 'yes'", "overlap must be one of auto, on, off, not 'yes'"),
    ("[generate]\npath = '/x'\ncapture_at_load = 1", "capture_at_load must be one of on, off, not 1"),
    ("[embed]\npath = '/x'\nfused_norms = 'fast'", "[embed] fused_norms must be one of on, off, not 'fast'"),
    ("[generate]\npath = '/x'\ndecode_slots = 'many'", "decode_slots must be a whole number >= 1, not 'many'"),
    ("[generate]\npath = '/x'\ndecode_slots = 0", "decode_slots must be a whole number >= 1, not 0"),
    ("[generate]\npath = '/x'\nprefill_chunk = 12.5", "prefill_chunk must be a whole number >= 1, not 12.5"),
])
def test_invalid_config_names_file_and_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_model_specs(path)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_invalid_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from ragq.core.settings import load_settings

    monkeypatch.setenv("RAGQ_VRAM_BUDGET", "plenty")
    with pytest.raises(ConfigError, match="RAGQ_VRAM_BUDGET"):
        load_settings()
    monkeypatch.setenv("RAGQ_VRAM_BUDGET", "16GiB")
    monkeypatch.setenv("RAGQ_MODELS", "/nonexistent/models.toml")
    with pytest.raises(ConfigError, match="RAGQ_MODELS"):
        load_settings()
    monkeypatch.delenv("RAGQ_MODELS")
    monkeypatch.setenv("RAGQ_IDLE_RESTORE_S", "-1")
    with pytest.raises(ConfigError, match="RAGQ_IDLE_RESTORE_S"):
        load_settings()


def test_a_worker_with_a_missing_or_broken_model_directory_exits_2_naming_it(tmp_path: Path, tiny_models) -> None:  # type: ignore[no-untyped-def]
    """One clear error at start, before any service or engine starts (not a failure at the first request, nor a
    worker that crashes again and again)."""
    import shutil

    from tests.conftest import ragq_env, run_ragq

    broken_json = tmp_path / "broken-json"
    shutil.copytree(tiny_models["lm"], broken_json)
    (broken_json / "config.json").write_text("{ not json")
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    cases = {
        tmp_path / "missing": "does not exist",
        broken_json: "config.json is not readable JSON",
        no_tokenizer: "has no tokenizer",
    }
    for path, problem in cases.items():
        models = tmp_path / "models.toml"
        models.write_text(f'[embed]\npath = "{tiny_models["embed"]}"\n[generate]\npath = "{path}"\n')
        result = run_ragq(ragq_env(tmp_path / "home", RAGQ_MODELS=str(models)), "worker", "--device", "cpu",
                          timeout=120)
        assert result.returncode == 2, (path, result.stderr[-2000:])
        assert f"[generate] {path.name}: model directory {path}" in result.stderr and problem in result.stderr
        assert not (tmp_path / "home" / "pgdata").exists()   # refused before starting anything
