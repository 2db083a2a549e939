"""Config and CLI mistakes stop a run before it trains, with a message that names the key, file or flag."""

from __future__ import annotations

import pytest

from stages import align
from vlpost import cli

TINY = ["--config", "configs/align/tiny.yaml"]
SMALL = ["--train.steps", "1", "--data.synthetic_samples", "8", "--train.batch_size", "2", "--train.report_to", "none"]


def test_unknown_key_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        align.main([*TINY, "--out", str(tmp_path / "a"), "--train.lx", "1"])
    assert "unrecognized arguments: --train.lx" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # refused before the run dir was made


@pytest.mark.parametrize("where", ["cli", "yaml"])
def test_wrong_type_names_key_and_value(tmp_path, where):
    if where == "cli":
        argv = [*TINY, "--out", str(tmp_path / "b"), "--train.steps", "many"]
    else:
        bad = tmp_path / "bad.yaml"
        bad.write_text("train:\n  steps: lots\n")
        argv = ["--config", str(bad), "--out", str(tmp_path / "b")]
    with pytest.raises(Exception, match=r"train\.steps.*(many|lots).*int"):
        align.main(argv)


def test_bad_enum_value_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"model\.projector\.type' = 'mlp9'.*pixel_shuffle"):
        align.main([*TINY, "--out", str(tmp_path / "c"), "--model.projector.type", "mlp9"])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(SystemExit, match=f"config file not found: {tmp_path}/nope.yaml"):
        align.main(["--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "d")])


def test_missing_lm_path_is_named(tmp_path, tokenizer_dirs):
    missing = tmp_path / "no_lm"
    with pytest.raises(FileNotFoundError, match=f"lm.path not found: {missing}"):
        align.main([*TINY, "--out", str(tmp_path / "e"), "--model.lm.path", str(missing),
                    "--model.lm.tokenizer", tokenizer_dirs["chatml"], *SMALL])


def test_missing_tokenizer_dir_is_named(tmp_path):
    missing = tmp_path / "no_tok"
    with pytest.raises(FileNotFoundError, match=f"tokenizer dir not found: {missing}"):
        align.main([*TINY, "--out", str(tmp_path / "f"), "--model.lm.tokenizer", str(missing), *SMALL])


def test_missing_shard_dir_is_named_with_the_fix(tmp_path, tokenizer_dirs):
    missing = tmp_path / "no_shards"
    with pytest.raises(FileNotFoundError, match=f"no index.json in {missing}.*vlpost prepare"):
        align.main([*TINY, "--out", str(tmp_path / "g"), "--data.shards", str(missing),
                    "--model.lm.tokenizer", tokenizer_dirs["chatml"], *SMALL])


def test_another_run_is_never_clobbered(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("precious: true\n")
    with pytest.raises(FileExistsError, match=f"{out} already holds a run; pass --resume .* or --overwrite"):
        align.main([*TINY, "--out", str(out), *SMALL])
    assert (out / "config.yaml").read_text() == "precious: true\n"


def test_resume_on_an_empty_dir_is_refused(tmp_path):
    (tmp_path / "h").mkdir()
    with pytest.raises(FileNotFoundError, match=f"--resume given but {tmp_path / 'h'} holds no run"):
        align.main([*TINY, "--out", str(tmp_path / "h"), "--resume", *SMALL])


def test_cli_unknown_command_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["trian"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err


def test_cli_prepare_refuses_a_non_empty_out(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert cli.main(["prepare", "synthetic", "--num", "4", "--out", str(tmp_path / "out")]) != 0
    assert f"{tmp_path / 'out'} is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]


def test_cli_export_names_a_missing_run_dir(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "norun"), "--to", "merged", "--out", str(tmp_path / "x")]) == 2
    assert f"{tmp_path / 'norun'} is not a vlpost run dir" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
