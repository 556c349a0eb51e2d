"""The commands as a user gets them: a wheel built from this checkout, installed outside it, its console scripts run
from an empty folder. Each exits 0 on success (a console script hands its function's return value to sys.exit),
and nothing is written outside the output folders chosen on the command line. A user error is one line and status
2 in every command, once per launch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL_RUN = ["--num_train_epochs", "1", "--max_train_samples", "256", "--max_eval_samples", "64"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder, environment) of the wheel installed into a folder of its own, with the dependencies of the
    environment running the tests."""
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy of what git would clone (plus files not yet committed): a stale build/ folder in the
    # checkout must not leak removed modules into the wheel.
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    source = root / "source"
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(root)], check=True)
    (wheel,) = root.glob("clip_accel-*.whl")
    site = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(site), "HF_DATASETS_CACHE": str(root / "datasets-cache")}
    where = subprocess.run(
        [sys.executable, "-c", "import clip_accel; print(clip_accel.__file__)"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.startswith(str(site)), f"the wheel, not the checkout, must be imported: {where.stdout}"
    return site / "bin", env


def run(installed, command: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    bin_dir, env = installed
    return subprocess.run(
        [str(bin_dir / command), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def demo_run(installed, tmp_path_factory):
    """`clip-accel-train --config demo` (the bundled recipe), shortened, from an empty folder."""
    cwd, out = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("demo") / "out"
    trained = run(installed, "clip-accel-train", "--config", "demo", "--output_dir", str(out), *SMALL_RUN, cwd=cwd)
    return trained, out, cwd


@pytest.mark.slow
def test_train_console_script_exits_0_and_writes_only_its_output_folder(demo_run):
    trained, out, cwd = demo_run
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert "'initial'" not in trained.stderr, "the results dict must not be handed to sys.exit"
    assert {"model.safetensors", "eval_results.json", "README.md", "recall_at_k.png"} <= set(os.listdir(out))
    assert list(cwd.iterdir()) == []


@pytest.mark.slow
def test_the_wheel_ships_the_top_level_card_template_and_renders_the_card_from_it(installed, demo_run):
    _, out, _ = demo_run
    site = installed[0].parent
    assert (site / "clip_accel" / "model_card_template.md").read_bytes() == (
        ROOT / "model_card_template.md"
    ).read_bytes()
    assert not (ROOT / "clip_accel" / "model_card_template.md").exists(), "one template, at the top level"
    assert "Written by clip_accel" in (out / "README.md").read_text()


@pytest.mark.slow
def test_evaluate_console_script_exits_0_and_reproduces_the_run(installed, demo_run, tmp_path):
    _, out, _ = demo_run
    metrics = tmp_path / "metrics.json"
    evaluated = run(
        installed,
        "clip-accel",
        "evaluate",
        "--model_name_or_path",
        str(out),
        "--demo",
        "--max_eval_samples",
        "64",
        "--output_file",
        str(metrics),
        cwd=tmp_path,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    expected = json.loads((out / "eval_results.json").read_text())["test"]
    assert json.loads(metrics.read_text()) == expected


@pytest.mark.slow
def test_smoke_sweep_from_the_wheel_writes_only_under_its_output_dir(installed, tmp_path):
    runs, cwd = tmp_path / "runs", tmp_path / "cwd"
    cwd.mkdir()
    command = ["reproduce", "--smoke", "--output_dir", str(runs), "--", *SMALL_RUN]
    swept = run(installed, "clip-accel", *command, cwd=cwd)
    assert swept.returncode == 0, swept.stderr[-4000:]
    text = (runs / "RESULTS.md").read_text()
    for name in (
        "Zero-shot (starting model)",
        "Freeze first 6 vision layers",
        "Freeze both backbones",
        "Unfreeze all",
        "clip_accel proposal",
    ):
        assert f"| {name}" in text, name
    assert "ZS top-1" in text and "accelerate launch --cpu" in text and "-m clip_accel train" in text
    assert (runs / "results_recall.png").stat().st_size > 10_000
    assert list(cwd.iterdir()) == []
    # A finished sweep is reused, not rerun.
    again = run(installed, "clip-accel-reproduce", *command[1:], cwd=cwd, timeout=120)
    assert again.returncode == 0 and again.stderr.count("already finished") == 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        ([], "the following arguments are required: command"),
        (["fly"], "invalid choice: 'fly'"),
        (["train", "--config", "no-such-recipe"], "neither a YAML file nor a bundled recipe"),
        (["evaluate", "--demo"], "the following arguments are required: --model_name_or_path"),
    ],
)
def test_bad_command_lines_exit_non_zero_with_the_reason(installed, tmp_path, args, message):
    failed = run(installed, "clip-accel", *args, cwd=tmp_path, timeout=120)
    assert failed.returncode != 0 and message in failed.stderr, failed.stderr[-2000:]


def test_evaluate_and_embed_compose_captions_as_the_model_was_trained_unless_told_otherwise(tmp_path, demo_dir):
    import argparse

    from clip_accel.cli import _add_split_arguments, _split_data_config

    parser = argparse.ArgumentParser()
    _add_split_arguments(parser, "evaluate")
    (tmp_path / "training_config.json").write_text(json.dumps({"caption_template": "{product_title}, by {brand}"}))
    trained = ["--model_name_or_path", str(tmp_path), "--data_dir", demo_dir]
    assert _split_data_config(parser.parse_args(trained)).caption_template == "{product_title}, by {brand}"
    given = parser.parse_args([*trained, "--caption_template", "{product_title}"])
    assert _split_data_config(given).caption_template == "{product_title}"
    own_captions = parser.parse_args([*trained, "--caption_template", ""])  # the source's captions
    assert _split_data_config(own_captions).caption_template is None
    hub_id = parser.parse_args(["--model_name_or_path", "openai/clip-vit-base-patch32", "--data_dir", demo_dir])
    assert _split_data_config(hub_id).caption_template is None


NOPE = "/no/such/folder"
USER_ERRORS = [
    (["train", "--config", "demo", "--num_train_epoch", "3"], "train", "did you mean --num_train_epochs?"),
    (["train", "--config", "demo", "--data_dir", NOPE], "train", "is not a folder"),
    (["train", "--demo", "--dataset_name", "json"], "train", "exclude each other"),
    (["evaluate", "--model_name_or_path", NOPE, "--data_dir", NOPE], "evaluate", "is not a folder"),
    (["evaluate", "--model_name_or_path", NOPE, "--data_dir", NOPE, "--demo"], "evaluate", "not allowed with"),
    (["evaluate", "--model_name_or_path", NOPE, "--demo", "--max_eval_sample", "5"], "evaluate", "did you mean"),
    (["push", NOPE, "--hub_model_id", "me/clip"], "push", "is not a folder"),
    (["export", NOPE, "--format", "onnx"], "export", "holds no config.json"),
    (["export", NOPE, "--format", "torchscript"], "export", "invalid choice: 'torchscript'"),
    (["reproduce", "--data_dir", NOPE, "--smoke"], "reproduce", "not allowed with"),
    (["wise-ft", NOPE], "wise-ft", "has no training_config.json"),
    (["embed", "--model_name_or_path", NOPE, "--demo", "--output_file", "x.npy"], "embed", "*.parquet"),
    (["search", "missing.parquet", "--text", "saree"], "search", "does not exist"),
    (["index-shards", NOPE], "index-shards", "is not a folder"),
    (["env", "--verbose"], "env", "unrecognized arguments: --verbose"),
    (["fly"], None, "invalid choice: 'fly'"),
]


@pytest.mark.parametrize("argv, command, message", USER_ERRORS, ids=[" ".join(argv[:2]) for argv, *_ in USER_ERRORS])
def test_a_user_error_is_one_line_and_status_2_in_every_command(argv, command, message, capsys, tmp_path, monkeypatch):
    from clip_accel.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(argv)
    error = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in error, error
    prog = "clip-accel" + (f" {command}" if command else "")
    assert f"\n{prog}: error: " in f"\n{error}" and message in error.splitlines()[-1], error


def test_with_debug_logging_a_user_error_shows_its_traceback_and_a_bug_always_does(capsys, tmp_path, monkeypatch):
    from clip_accel import cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        cli.main(["search", "missing.parquet", "--text", "saree", "--log_level", "debug"])
    error = capsys.readouterr().err
    assert "Traceback" in error and error.splitlines()[-1].startswith("clip-accel search: error: ")

    def broken(path):
        raise KeyError("a bug in clip_accel")

    monkeypatch.setattr(cli, "load_embeddings", broken)
    with pytest.raises(KeyError, match="a bug in clip_accel"):  # not a user error: its traceback stays
        cli.main(["search", "some.parquet", "--text", "saree"])
    cli.setup_logging("info")


@pytest.mark.slow
def test_under_torchrun_a_user_error_is_printed_once(tmp_path):
    command = ["torchrun", "--nproc_per_node", "2", "-m", "clip_accel", "train", "--config", "demo"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    failed = subprocess.run(
        [*command, "--data_dir", NOPE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert failed.returncode != 0
    assert failed.stderr.count("clip-accel train: error: --data_dir '/no/such/folder' is not a folder") == 1
    assert failed.stderr.count("is dropped") == 1  # the recipe's --demo, said once per launch


@pytest.mark.slow
def test_a_user_error_on_another_process_alone_is_printed_once_naming_it(tmp_path):
    # Node 1 cannot read what node 0 can: process 0 waits for it in a collective, so process 1 says it.
    script = tmp_path / "node_error.py"
    script.write_text(
        "import os\n"
        "import torch.distributed as dist\n"
        "from clip_accel.cli import command\n"
        "from clip_accel.config import UserError\n\n"
        "@command('train')\n"
        "def main(argv=None):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise UserError('--data_dir /data/catalogue is not a folder')\n"
        "    dist.init_process_group('gloo')\n"
        "    dist.barrier()\n\n"
        "main()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = ["torchrun", "--nproc_per_node", "2", str(script)]
    failed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0
    line = "clip-accel train: error: (process 1) --data_dir /data/catalogue is not a folder"
    assert failed.stderr.count("is not a folder") == 1 and line in failed.stderr, failed.stderr[-3000:]
