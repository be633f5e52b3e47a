"""`python -m fusedlora.build`'s bad arguments (issue 34, item 15): each an argparse-style error (exit code 2)
naming the option and what was expected, never a traceback; nothing is compiled."""

import json

import pytest

from fusedlora import aot, build, registry
from fusedlora.testing import run_module


@pytest.fixture
def no_compile(monkeypatch):
    built = []
    monkeypatch.setattr(aot, "build", lambda *a, **k: built.append(a) or {"errors": []})
    return built


def refused(capsys, argv, *words):
    with pytest.raises(SystemExit) as e:
        build.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err and "usage: python -m fusedlora.build" in err, err
    for word in words:
        assert word in err, err
    return err


def test_missing_config_path(tmp_path, capsys, no_compile):
    refused(
        capsys,
        ["--config", str(tmp_path / "nowhere" / "config.json"), "--arch", "90"],
        "--config",
        "no such file",
        str(tmp_path / "nowhere" / "config.json"),
    )
    assert not no_compile


def test_folder_without_config_json(tmp_path, capsys, no_compile):
    refused(capsys, ["--config", str(tmp_path), "--arch", "90"], "--config", "config.json", str(tmp_path))
    assert not no_compile


def test_config_file_that_is_not_json(tmp_path, capsys, no_compile):
    (tmp_path / "config.json").write_text("hidden_size: 64\n")
    refused(capsys, ["--config", str(tmp_path / "config.json"), "--arch", "90"], "--config", "not JSON")
    assert not no_compile


@pytest.mark.parametrize(
    "text,words",
    [
        ('{"hidden_size": 64', ["not JSON"]),
        ("[64]", ["JSON object"]),
        ('{"num_attention_heads": 8}', ["hidden_size"]),
        ('{"hidden_size": "big"}', ["hidden_size"]),
    ],
)
def test_bad_inline_config(capsys, no_compile, text, words):
    refused(capsys, ["--config", text, "--arch", "90"], "--config", *words)
    assert not no_compile


@pytest.mark.parametrize("arch", ["foo", "9x", "", ","])
def test_arch_that_is_not_a_number(capsys, no_compile, arch):
    refused(capsys, ["--config", '{"hidden_size": 64}', "--arch", arch], "--arch", "80, 86, 89, 90")
    assert not no_compile


def _variant(**change):
    spec = registry.get("rms_norm_fwd")
    v = json.loads(
        registry.make_variant(
            spec, 90, {"x": "bf16", "w": "bf16", "y": "bf16"}, {"n_cols": 4096, "gemma_cast": False}
        ).to_string()
    )
    v.update(change)
    return json.dumps(v)


@pytest.mark.parametrize(
    "text,words",
    [
        ("rms_norm_fwd", ["not JSON"]),
        ('{"kernel": "rms_norm_fwd"}', ["arch"]),
        ("[1, 2]", ["JSON object"]),
        (_variant(kernel="no_such_kernel"), ["no_such_kernel", "rms_norm_fwd"]),
        (_variant(arch=100), ["unsupported arch [100]", "80, 86, 89, 90"]),
        (_variant(num_warps=3), ["num_warps"]),
        (_variant(signature=[["X", "*bf16:16"]]), ["signature"]),
        (_variant(signature="X"), ["signature"]),
        (_variant(constexprs=[["BLOCK"]]), ["constexprs"]),
    ],
)
def test_malformed_variant(capsys, no_compile, text, words):
    refused(capsys, ["--variant", text], "--variant", *words)
    assert not no_compile


def test_good_variant_still_builds(tmp_path, no_compile):
    assert build.main(["--variant", _variant(), "--out", str(tmp_path)]) == 0
    assert [v.kernel for v in no_compile[0][0]] == ["rms_norm_fwd"]


def test_build_cli_needs_config_or_variant():
    r = run_module("fusedlora.build")
    assert r.returncode != 0 and "give --config or --variant" in r.stderr


def test_build_cli_refuses_old_arch():
    r = run_module("fusedlora.build", "--config", '{"hidden_size": 64}', "--arch", "75")
    assert r.returncode != 0 and "unsupported arch [75]: fusedlora needs sm_80 or newer" in r.stderr


def test_family_from_config_without_hidden_size():
    from fusedlora.build import family_from_config

    with pytest.raises(ValueError, match="model config has no hidden_size"):
        family_from_config({"vocab_size": 10})
