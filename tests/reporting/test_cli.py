import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, child_env
from train import main

import lightning_phases
from lightning_phases import PhaseCallback, PhaseEvent
from lightning_phases.reporting.cli import main as report_main
from lightning_phases.reporting.events import EVENT_LOG_NAME

PUBLIC_CALLBACKS = [
    name
    for name in lightning_phases.__all__
    if isinstance(getattr(lightning_phases, name), type)
    and issubclass(getattr(lightning_phases, name), PhaseCallback)
    and getattr(lightning_phases, name) is not PhaseCallback
]
CONFIG = ROOT / "examples" / "config.yaml"


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=child_env(),
    )


def test_every_public_callback_is_in_the_example_config():
    assert PUBLIC_CALLBACKS, "no public callback to check"
    listed = {c["class_path"].rsplit(".", 1)[-1] for c in yaml.safe_load(CONFIG.read_text())["trainer"]["callbacks"]}
    assert set(PUBLIC_CALLBACKS) <= listed


def test_print_config_round_trips(tmp_path):
    first = cli("fit", "--config", str(CONFIG), "--print_config")
    assert first.returncode == 0, first.stderr
    printed = tmp_path / "printed.yaml"
    printed.write_text(first.stdout)
    second = cli("fit", "--config", str(printed), "--print_config")
    assert second.returncode == 0, second.stderr
    assert yaml.safe_load(second.stdout) == yaml.safe_load(first.stdout)
    callbacks = yaml.safe_load(first.stdout)["trainer"]["callbacks"]
    assert {c["class_path"].rsplit(".", 1)[-1] for c in callbacks} >= set(PUBLIC_CALLBACKS)


@pytest.mark.parametrize("name", PUBLIC_CALLBACKS)
def test_help_shows_every_argument_with_its_docstring(name):
    result = cli("fit", "--trainer.callbacks.help", f"lightning_phases.{name}")
    assert result.returncode == 0, result.stderr
    import inspect

    from docstring_parser import parse

    cls = getattr(lightning_phases, name)
    documented = {p.arg_name: p.description for p in parse(cls.__doc__).params}
    text = " ".join(result.stdout.split())
    for parameter in list(inspect.signature(cls.__init__).parameters)[1:]:
        assert f"--trainer.callbacks.{parameter}" in text, f"{parameter} missing from --help"
        first_words = " ".join(documented[parameter].split()[:3])
        assert first_words in text, f"{parameter}: {first_words!r} not in --help"


def test_bad_stage_in_yaml_is_a_readable_usage_error(tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    import inspect

    with_stages = next(
        n for n in PUBLIC_CALLBACKS if "stages" in inspect.signature(getattr(lightning_phases, n)).parameters
    )
    config["trainer"]["callbacks"] = [
        {"class_path": f"lightning_phases.{with_stages}", "init_args": {"stages": ["trian"]}}
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    result = cli("fit", "--config", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert 'Parser key "stages"' in result.stderr and "trian" in result.stderr
    assert "'sanity_check', 'train', 'validate', 'test', 'predict'" in result.stderr


def test_cli_fit_runs_in_process_and_again_in_the_same_place(tmp_path):
    args = [
        "fit",
        "--config",
        str(CONFIG),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        f"--trainer.callbacks.dirpath={tmp_path}/ckpt",
        "--test_after_fit=false",
    ]
    main(args)
    main(args)  # the saved config of the first run is replaced, not refused
    assert len(list(tmp_path.rglob("phase_report.json"))) == 2


def write_one_event(path):
    path.parent.mkdir(parents=True)
    event = PhaseEvent("LossDropSentinel", "loss_drop", "warning", "train", 7, 0, 0, f"dropped in {path.parent.name}")
    path.write_text(event.to_json() + "\n")


def test_report_refuses_a_directory_with_several_logs_and_lists_them(tmp_path, capsys):
    logs = [tmp_path / "lightning_logs" / f"version_{v}" / EVENT_LOG_NAME for v in range(2)]
    for log in logs:
        write_one_event(log)
    assert report_main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-phases report: 2 event logs under") and "name one of them" in err
    assert all(str(log) in err for log in logs)
    assert report_main(["report", str(logs[1])]) == 0
    assert "dropped in version_1" in capsys.readouterr().out


def test_report_reads_the_one_log_under_a_run_directory(tmp_path, capsys):
    write_one_event(tmp_path / "lightning_logs" / "version_0" / EVENT_LOG_NAME)
    assert report_main(["report", str(tmp_path)]) == 0
    assert "Events (1)" in capsys.readouterr().out
    assert report_main(["report", str(tmp_path / "nothing")]) == 2
    assert "neither a file nor a directory" in capsys.readouterr().err


def events_at(*steps):
    return [PhaseEvent("LossDropSentinel", "loss_drop", "warning", "train", step, 0, 0, f"at {step}") for step in steps]


def test_report_reads_a_log_whose_last_line_is_torn_and_says_so(tmp_path, capsys):
    log = tmp_path / EVENT_LOG_NAME
    first, second, third = events_at(1, 2, 3)
    log.write_text(first.to_json() + "\n" + second.to_json() + "\n" + third.to_json()[:70])
    html = tmp_path / "page.html"
    assert report_main(["report", str(tmp_path), "--html", str(html)]) == 0
    out = capsys.readouterr()
    [note] = out.err.splitlines()  # one line on stderr
    assert note.startswith("lightning-phases report: 1 unreadable line of") and "line 3 (the last line" in note
    assert f"Events (2) from {log}" in out.out and "(1 unreadable line of" in out.out
    assert "at 1" in out.out and "at 2" in out.out and html.exists()


def test_report_skips_and_counts_a_torn_line_in_the_middle(tmp_path, capsys):
    log = tmp_path / EVENT_LOG_NAME
    first, second, third = events_at(1, 2, 3)
    log.write_text(first.to_json() + "\n" + second.to_json()[:50] + "\n" + third.to_json() + "\n")
    assert report_main(["report", str(log)]) == 0
    out = capsys.readouterr()
    assert "line 2:" in out.err and "last line" not in out.err
    assert f"Events (2) from {log}" in out.out and "at 3" in out.out


def test_report_of_a_whole_log_says_nothing_on_stderr(tmp_path, capsys):
    log = tmp_path / EVENT_LOG_NAME
    log.write_text("".join(e.to_json() + "\n" for e in events_at(1, 2, 3)))
    assert report_main(["report", str(log)]) == 0
    out = capsys.readouterr()
    assert out.err == "" and f"Events (3) from {log}" in out.out and "unreadable" not in out.out


def test_the_report_command_imports_neither_torch_nor_lightning() -> None:
    """Printing a run's files must start in a blink: no torch, no Lightning (checked in a fresh interpreter)."""
    code = (
        "import sys, lightning_phases.cli, lightning_phases.reporting.cli;"
        "heavy = sorted(m for m in ('torch', 'lightning', 'wandb') if m in sys.modules); print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"


def test_a_misspelled_stage_in_phases_is_a_usage_error_in_a_plain_lightning_cli(tmp_path):
    config = {
        "trainer": {
            "max_epochs": 1,
            "logger": False,
            "callbacks": [{"class_path": "lightning_phases.Phases", "init_args": {"overrides": {"tset": {}}}}],
        }
    }
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    script = ROOT / "tests" / "scripts" / "plain_cli.py"
    result = subprocess.run(
        [sys.executable, str(script), "fit", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=child_env(),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Unexpected keys: {'tset'}" in result.stderr


@pytest.mark.parametrize(
    ("callback", "init_args", "expected"),
    [
        ("ShiftTracker", {"alpha": 1.5}, "alpha"),
        ("ShiftTracker", {"reference_size": 1}, "reference_size"),
        ("LossDropSentinel", {"check_every_n_steps": 0}, "check_every_n_steps"),
        ("LossDropSentinel", {"min_change": 0.0}, "min_change"),
        ("ParamFreezeAssertion", {"check_every_n_batches": -1}, "check_every_n_batches"),
        ("ParamFreezeAssertion", {"frozen": [{"pattern": "backbone.*", "until_epoch": -1}]}, "until_epoch"),
    ],
)
def test_a_bad_number_in_yaml_is_a_usage_error_in_a_plain_lightning_cli(tmp_path, callback, init_args, expected):
    """The bounds live in the signature's types, so the parser refuses the value before anything is built."""
    config = {
        "trainer": {
            "max_epochs": 1,
            "logger": False,
            "callbacks": [{"class_path": f"lightning_phases.{callback}", "init_args": init_args}],
        }
    }
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "plain_cli.py"), "fit", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=child_env(),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    bad_value = {"until_epoch": -1}.get(expected, next(iter(init_args.values())))
    assert expected in result.stderr and f"Got value: {bad_value}" in result.stderr
    assert not (tmp_path / "lightning_logs").exists()  # nothing was built, nothing trained
