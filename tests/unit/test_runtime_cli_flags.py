"""Flags of runc's command line that podman and conmon use: `--version`, `--preserve-fds`,
`checkpoint` / `restore`. Each answers as runc does, or refuses naming the flag and the
container, before anything is made (no daemon is needed to see it)."""

from __future__ import annotations

from typer.testing import CliRunner

from hanabi_runtime.cli import VERSION, app

runner = CliRunner(mix_stderr=False)


def test_version_flag_like_runc():
    for flag in ("--version", "-v"):
        done = runner.invoke(app, [flag])
        assert done.exit_code == 0
        assert done.stdout.splitlines() == [f"hanabi-runtime version {VERSION}", "spec: 1.0.2"]
    assert runner.invoke(app, ["version"]).stdout == runner.invoke(app, ["--version"]).stdout


def test_preserve_fds_is_refused_naming_the_container(tmp_path):
    config = tmp_path / "hanabi.toml"
    config.write_text(f'run_dir = "{tmp_path}/run"\n')
    for argv in (["create", "--bundle", str(tmp_path), "--preserve-fds", "1", "c1"],
                 ["exec", "--preserve-fds", "2", "c1", "true"]):
        done = runner.invoke(app, ["--config", str(config), *argv])
        assert done.exit_code == 1, done.stdout
        assert "container c1: --preserve-fds" in done.stderr and "not supported" in done.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was made


def test_checkpoint_and_restore_are_refused_naming_the_container():
    done = runner.invoke(app, ["checkpoint", "--image-path", "/tmp/x", "--leave-running", "c2"])
    assert done.exit_code == 1 and "checkpoint of container c2 is not supported" in done.stderr
    done = runner.invoke(app, ["restore", "--bundle", "/b", "--pid-file", "/p", "--image-path", "/i",
                               "--detach", "c3"])
    assert done.exit_code == 1 and "restore of container c3 is not supported" in done.stderr
