"""The `levante` command line."""

import subprocess
import sys

import pytest
from fixtures import hf_model, save_hf

from levante.cli import build_parser, main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_hf(hf_model("mixtral_8x2", vocab_size=32000), tmp_path_factory.mktemp("cli") / "m", tokenizer=True)


def test_help_is_complete():
    out = subprocess.run([sys.executable, "-m", "levante", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("run", "chat", "info", "quantize"):
        assert cmd in out.stdout
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    run_help = sub.choices["run"].format_help()
    for flag in ("-m", "-p", "-n", "--temp", "--top-k", "--top-p", "--min-p", "--repeat-penalty", "--seed",
                 "-c", "-t", "--stop"):
        assert flag in run_help
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"{name}: option {action.option_strings or action.dest} has no help"


def test_run_streams_completion(model_dir, capsys):
    assert main(["run", "-m", str(model_dir), "-p", "Hello", "-n", "5", "--temp", "0", "-t", "2"]) == 0
    out = capsys.readouterr().out
    from levante import LLM

    want = LLM(str(model_dir))("Hello", max_tokens=5, temperature=0)["choices"][0]["text"]
    assert out == want + "\n"


def test_run_seed_reproducible(model_dir, capsys):
    args = ["run", "-m", str(model_dir), "-p", "Hi", "-n", "6", "--temp", "1.2", "--seed", "3"]
    main(args)
    a = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == a


def test_info(model_dir, capsys):
    assert main(["info", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "mixtral (MoE)" in out and "8 (top-2)" in out and "SentencePieceTokenizer" in out
    assert "hf-safetensors" in out


def test_chat_repl(model_dir, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/reset\nHow are you?\n/exit\n"))
    assert main(["chat", "-m", str(model_dir), "-n", "4", "--temp", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("> ") >= 3


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["run", "-m", str(tmp_path / "missing"), "-p", "x"]) == 1
    err = capsys.readouterr().err
    assert "error: model not found" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert main(["info", str(tmp_path / "empty")]) == 1
    assert "missing config" in capsys.readouterr().err


def test_bench_table(model_dir, capsys):
    assert main(["bench", "-m", str(model_dir), "-p", "16", "-n", "4", "-r", "2", "-t", "2"]) == 0
    out = capsys.readouterr().out
    header, _, row = out.strip().splitlines()
    assert "prefill tok/s" in header and "decode tok/s" in header and "peak RSS" in header
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "F32" and cells[5] == "2"
    assert cells[6].startswith("pp16: ") and "±" in cells[6] and cells[7].startswith("tg4: ")
    assert float(cells[7].split()[1]) > 0
