"""Command line entry points: bad input gives one line on stderr and a non-zero exit, never a traceback.

Every CLI (train.py, eval.py, chat, privacy.run, the split server and client, level_selection, the
llava_tfds and shapes data builders) runs as a real subprocess with a missing file or a bad value; the helper
(qtl_jax/cli.py) is also tested directly for its exit codes and the traceback opt-in.
"""

import argparse
import os
import subprocess
import sys

import pytest

from qtl_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = "{missing}"  # replaced by a path under the test's tmp_path that does not exist
WORKDIR = "{workdir}"  # replaced by another one (the CLIs create their workdir)


def run_cli(*args, traceback=False, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop(cli.TRACEBACK_ENV, None)
    if traceback:
        env[cli.TRACEBACK_ENV] = "1"
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return out.returncode, [line for line in out.stderr.splitlines() if line.strip()]


CASES = {
    "train.py missing previous stage": (
        ["train.py", "--config=configs/stage1.py:tiny", f"--workdir={WORKDIR}",
         f"--config.init.from_workdir={MISSING}"],
        1, "train.py: FileNotFoundError: init.from_workdir='{missing}' does not exist (starting from a previous "
           "stage's workdir): set --config.init.from_workdir=/path/to/local/dir (qtl_jax never downloads weights)."),
    "train.py missing config file": (
        ["train.py", "--config=configs/nope.py", f"--workdir={WORKDIR}"],
        2, "train.py: usage error: Configuration is not available because of an earlier failure to load: "
           "Failed loading config file config_config Attempted [Relative path]: configs/nope.py [Errno 2] No such "
           "file or directory: 'configs/nope.py' (--helpfull lists the flags)"),
    "train.py bad value": (
        ["train.py", "--config=configs/stage1.py:tiny", f"--workdir={WORKDIR}", "--config.total_steps=many"],
        2, "train.py: usage error: flag --config.total_steps=many: invalid literal for int() with base 10: 'many' "
           "(--helpfull lists the flags)"),
    "train.py unknown field": (
        ["train.py", "--config=configs/stage1.py:tiny", f"--workdir={WORKDIR}", "--config.data.kindd=shapes"],
        2, "train.py: usage error: no such config field 'kindd' Did you mean \"kind\" instead of \"kindd\"?; check "
           "the --config.* overrides (--helpfull lists the flags)"),
    "train.py unknown preset": (
        ["train.py", "--config=configs/stage1.py:huge", f"--workdir={WORKDIR}"],
        2, "train.py: usage error: flag --config=configs/stage1.py:huge: Error whilst parsing config file: "
           "ValueError: unknown config variant 'huge'; use no variant (the paper's setting) or one of: demo, tiny, "
           "paper_random. (--helpfull lists the flags)"),
    "train.py stray argument": (
        ["train.py", "--config=configs/stage1.py:tiny", f"--workdir={WORKDIR}", "oops"],
        2, "train.py: usage error: unexpected arguments: ['oops'] (--help lists the flags)"),
    "eval.py missing checkpoint": (
        ["eval.py", "--config=configs/eval.py:tiny", f"--workdir={WORKDIR}", f"--config.checkpoint={MISSING}"],
        1, "eval.py: FileNotFoundError: --config.checkpoint='{missing}' is not a local directory"),
    "eval.py bad value": (
        ["eval.py", "--config=configs/eval.py:tiny", f"--workdir={WORKDIR}", "--config.batch_size=x"],
        2, "eval.py: usage error: flag --config.batch_size=x: invalid literal for int() with base 10: 'x' "
           "(--helpfull lists the flags)"),
    "chat missing checkpoint": (
        ["-m", "qtl_jax.chat", f"--checkpoint={MISSING}", "--prompt=hi"],
        1, "python -m qtl_jax.chat: FileNotFoundError: {missing} is not a local directory"),
    "chat bad value": (
        ["-m", "qtl_jax.chat", f"--checkpoint={MISSING}", "--prompt=hi", "--max_new_tokens=x"],
        2, "python -m qtl_jax.chat: usage error: argument --max_new_tokens: invalid int value: 'x' (--help lists "
           "the flags)"),
    "privacy missing checkpoint": (
        ["-m", "qtl_jax.privacy.run", f"--workdir={WORKDIR}", f"--checkpoint={MISSING}"],
        1, "python -m qtl_jax.privacy.run: FileNotFoundError: --checkpoint='{missing}' has no config.json"),
    "privacy bad value": (
        ["-m", "qtl_jax.privacy.run", f"--workdir={WORKDIR}", "--steps=x"],
        2, "python -m qtl_jax.privacy.run: usage error: argument --steps: invalid int value: 'x' (--help lists the "
           "flags)"),
    "split server missing token file": (
        ["-m", "qtl_jax.split.server", "--config=configs/stage1.py:tiny", f"--workdir={WORKDIR}",
         f"--token_file={MISSING}"],
        1, "python -m qtl_jax.split.server: FileNotFoundError: --token_file='{missing}' does not exist."),
    "split server bad value": (
        ["-m", "qtl_jax.split.server", "--config=configs/stage1.py:tiny", f"--workdir={WORKDIR}",
         "--rewind=sometimes"],
        2, "python -m qtl_jax.split.server: usage error: flag --rewind=sometimes: value should be one of"),
    "split client missing certificate": (
        ["-m", "qtl_jax.split.client", "--config=configs/stage1.py:tiny", f"--workdir={WORKDIR}", "--tls=mutual",
         f"--ca_cert={MISSING}"],
        1, "python -m qtl_jax.split.client: FileNotFoundError: --ca_cert='{missing}' does not exist."),
    "split client bad value": (
        ["-m", "qtl_jax.split.client", "--config=configs/stage1.py:tiny", f"--workdir={WORKDIR}", "--retries=x"],
        2, "python -m qtl_jax.split.client: usage error: flag --retries=x: invalid literal for int() with base 10: "
           "'x' (--helpfull lists the flags)"),
    "level_selection missing features": (
        ["-m", "qtl_jax.level_selection", f"--features={MISSING}", f"--out={WORKDIR}"],
        2, "error: {missing}: cannot read as .npz ([Errno 2] No such file or directory: '{missing}')."),
    "level_selection bad value": (
        ["-m", "qtl_jax.level_selection", "--synthetic=bogus", f"--out={WORKDIR}"],
        2, "python -m qtl_jax.level_selection: usage error: argument --synthetic: invalid choice: 'bogus'"),
    "llava_tfds missing json": (
        ["-m", "qtl_jax.data.llava_tfds", f"--json={MISSING}", f"--data_dir={WORKDIR}", "--name=a"],
        2, "error: LLaVA JSON file '{missing}' does not exist; check the split's json paths."),
    "llava_tfds bad value": (
        ["-m", "qtl_jax.data.llava_tfds", f"--json={MISSING}", f"--data_dir={WORKDIR}", "--name=a", "--kind=x"],
        2, "python -m qtl_jax.data.llava_tfds: usage error: argument --kind: invalid choice: 'x'"),
    "shapes bad value": (
        ["-m", "qtl_jax.data.shapes", f"--out={WORKDIR}", "--image_size=10", "--no_benchmarks"],
        2, "error: image_size=10 is too small to draw 3x3 cells of shapes; use >= 24."),
    "shapes bad int": (
        ["-m", "qtl_jax.data.shapes", f"--out={WORKDIR}", "--seed=x"],
        2, "python -m qtl_jax.data.shapes: usage error: argument --seed: invalid int value: 'x' (--help lists the "
           "flags)"),
}


def fill(case, tmp_path):
    args, code, start = case
    paths = {MISSING: str(tmp_path / "missing"), WORKDIR: str(tmp_path / "workdir")}

    def sub(text):
        for k, v in paths.items():
            text = text.replace(k, v)
        return text

    return [sub(a) for a in args], code, sub(start)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_bad_input_prints_one_line(case, tmp_path):
    args, code, start = fill(CASES[case], tmp_path)
    returncode, err = run_cli(*args)
    assert returncode == code and len(err) == 1, (returncode, err)
    assert err[0].startswith(start), err[0]


@pytest.mark.parametrize("how", ["environment", "verbosity"])
def test_traceback_is_shown_on_request(tmp_path, how):
    args, code, start = fill(CASES["train.py missing previous stage"], tmp_path)
    if how == "verbosity":
        args.append("--verbosity=1")
    returncode, err = run_cli(*args, traceback=how == "environment")
    assert returncode == code
    # (--verbosity=1 also brings back absl's INFO log lines around them.)
    ours = [i for i, line in enumerate(err) if line.startswith(start)]
    assert len(ours) == 1 and "Traceback (most recent call last):" in err[: ours[0]]
    assert any("qtl_jax/train/loop.py" in line for line in err) and not os.path.exists(tmp_path / "missing")


def test_traceback_on_request_for_a_cli_that_reports_its_own_errors(tmp_path):
    args, code, start = fill(CASES["shapes bad value"], tmp_path)
    returncode, err = run_cli(*args, traceback=True)
    assert returncode == code and err[-1].startswith(start)
    assert "Traceback (most recent call last):" in err and "qtl_jax/data/shapes/scene.py" in "\n".join(err)


# ---------------------------------------------------------------------------------------------------
# The helper itself


def raising(error):
    def main():
        raise error

    return main


@pytest.fixture
def no_traceback(monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)


@pytest.mark.parametrize("error, code, line", [
    (FileNotFoundError(2, "No such file or directory", "/x/y"), cli.EXIT_ERROR,
     "prog: FileNotFoundError: [Errno 2] No such file or directory: '/x/y'"),
    (ValueError("bad\nvalue:   two lines"), cli.EXIT_ERROR, "prog: ValueError: bad value: two lines"),
    (FloatingPointError("loss is nan"), cli.EXIT_ERROR, "prog: FloatingPointError: loss is nan"),
    (KeyboardInterrupt(), cli.EXIT_INTERRUPTED, "prog: interrupted"),
    (cli.UsageError("--x: not a number"), cli.EXIT_USAGE, "prog: usage error: --x: not a number (--help lists the "
                                                          "flags)"),
])
def test_run_maps_user_errors_to_one_line_and_an_exit_code(no_traceback, capsys, error, code, line):
    with pytest.raises(SystemExit) as e:
        cli.run(raising(error), prog="prog")
    assert e.value.code == code
    assert capsys.readouterr().err.splitlines() == [line]


def test_own_error_classes_are_user_errors(no_traceback, capsys):
    from qtl_jax.train.checkpoint import CorruptCheckpointError

    with pytest.raises(SystemExit) as e:
        cli.run(raising(CorruptCheckpointError(6, "/w/checkpoints/6/x", "array 'a' does not match its checksum")),
                prog="prog")
    assert e.value.code == cli.EXIT_ERROR
    assert capsys.readouterr().err == ("prog: CorruptCheckpointError: checkpoint step 6 is corrupt: array 'a' does "
                                       "not match its checksum (/w/checkpoints/6/x)\n")


def test_bugs_keep_their_traceback(no_traceback):
    with pytest.raises(ZeroDivisionError):
        cli.run(lambda: 1 / 0, prog="prog")
    with pytest.raises(TypeError):
        cli.run(raising(TypeError("a bug")), prog="prog")


def test_run_exits_zero_whatever_main_returns(capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: {"a": 1}, prog="prog")
    assert e.value.code == 0 and capsys.readouterr().err == ""


def test_run_exits_with_the_status_main_returns(capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: 2, prog="prog")
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: True, prog="prog")  # not a status
    assert e.value.code == 0


def test_print_error_is_one_line_with_the_traceback_on_request(monkeypatch, capsys):
    try:
        raise ValueError("bad\n  value")
    except ValueError as e:
        error = e
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    cli.print_error(error)
    assert capsys.readouterr().err == "error: bad value\n"
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    cli.print_error(error)
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and err.endswith("\nerror: bad value\n")


def test_argparse_errors_become_one_line_and_argparse_is_restored(no_traceback, capsys):
    def main():
        p = argparse.ArgumentParser(prog="prog")
        p.add_argument("--n", type=int, required=True)
        p.parse_args(["--n", "x"])

    original = argparse.ArgumentParser.error
    with pytest.raises(SystemExit) as e:
        cli.run(main, prog="prog")
    assert e.value.code == cli.EXIT_USAGE
    assert capsys.readouterr().err.splitlines() == ["prog: usage error: argument --n: invalid int value: 'x' (--help "
                                                    "lists the flags)"]
    assert argparse.ArgumentParser.error is original


def test_traceback_opt_in(monkeypatch, capsys):
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(SystemExit):
        cli.run(raising(ValueError("bad value")), prog="prog")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Traceback (most recent call last):" and err[-2:] == ["ValueError: bad value",
                                                                            "prog: ValueError: bad value"]
    monkeypatch.setenv(cli.TRACEBACK_ENV, "0")
    assert not cli.traceback_wanted()


def test_one_line_keeps_the_error_of_an_embedded_traceback():
    text = ("flag --config=c.py:x: Error whilst parsing config file:\n\nTraceback (most recent call last):\n"
            '  File "c.py", line 3, in get_config\n    raise ValueError("no")\nValueError: unknown variant\n')
    assert cli.one_line(text) == "flag --config=c.py:x: Error whilst parsing config file: ValueError: unknown variant"
