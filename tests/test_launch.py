"""pflower-sim: the flwr command it builds and the errors it gives before starting anything."""

from __future__ import annotations

from task.run.launch import door, flwr_command, main


def test_command_sizes_the_federation_and_passes_the_overrides():
    assert door("dataset.clients_per_domain=3")[0] == 15
    cmd = flwr_command('strategy=ditto dataset.domains=[plain,inverted]', 4, 1, 0.0)
    assert cmd[:2] == ["flwr", "run"] and "--stream" in cmd
    assert cmd[cmd.index("--run-config") + 1] == 'overrides="strategy=ditto dataset.domains=[plain,inverted]"'
    # flwr 1.41 wants integers for num-supernodes and the CPU count.
    assert cmd[cmd.index("--federation-config") + 1] == (
        "num-supernodes=4 client-resources-num-cpus=1 client-resources-num-gpus=0.0")


def test_bad_override_fails_before_flwr_starts(capsys):
    assert main(["lr=-1"]) == 2
    assert "lr=-1" in capsys.readouterr().err


def test_dry_run_prints_the_command(capsys):
    assert main(["--dry-run", "strategy=fedavg"]) == 0
    assert "num-supernodes=10" in capsys.readouterr().out
