"""Deployment files are written where no other local user can have planted anything.

deploy/pki.py writes keys through a random, exclusively created temporary file renamed over
the target (a planted ``<name>.tmp`` file or symlink is never written through); deploy/netns.py
keeps its deployment in a directory of this user's only and refuses one it does not own or that
is a symlink; ``deployment.json`` as a dangling symlink counts as a deployment that is up.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from deploy import netns, pki


def test_a_planted_tmp_symlink_is_not_written_through(tmp_path: Path):
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    keys = tmp_path / "pki"
    keys.mkdir()
    (keys / "ca.key.tmp").symlink_to(victim)  # what the old fixed temporary name opened
    pki.make_ca(keys)
    assert victim.read_text() == "untouched"
    assert stat.S_IMODE((keys / "ca.key").stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in (keys / "ca.key").read_bytes()


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path: Path):
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    target = tmp_path / "deployment.json"
    target.symlink_to(victim)
    pki.write_file(target, b"{}")
    assert victim.read_text() == "untouched" and not target.is_symlink() and target.read_bytes() == b"{}"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_private_dir_is_made_0700_and_tightened(tmp_path: Path):
    made = pki.private_dir(tmp_path / "new" / "deployment")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    loose.chmod(0o777)
    assert stat.S_IMODE(pki.private_dir(loose).stat().st_mode) == 0o700


def test_private_dir_refuses_a_symlink_and_a_file(tmp_path: Path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(PermissionError, match="symlink"):
        pki.private_dir(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="not a directory"):
        pki.private_dir(tmp_path / "file")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_private_dir_refuses_a_directory_of_another_user(tmp_path: Path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 4242, 4242)
    with pytest.raises(PermissionError, match="uid 4242"):
        pki.private_dir(theirs)


def test_up_refuses_a_dangling_deployment_json_before_touching_anything(tmp_path: Path):
    root = tmp_path / "lab"
    root.mkdir()
    (root / "deployment.json").symlink_to(tmp_path / "nowhere")
    with pytest.raises(SystemExit, match="a deployment is up"):
        netns.up(root, nodes=1)
    assert not (tmp_path / "nowhere").exists()


def test_up_refuses_a_deployment_directory_that_is_a_symlink(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(netns, "our_namespaces", lambda: [])
    monkeypatch.setattr(netns, "our_links", lambda: [])
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "lab").symlink_to(real)
    with pytest.raises(SystemExit, match="deployment directory refused"):
        netns.up(tmp_path / "lab", nodes=1)
    assert list(real.iterdir()) == []


@pytest.mark.parametrize("db", ["file", "memory"])
def test_the_superlink_keeps_its_state_where_up_was_told(tmp_path: Path, monkeypatch, db: str):
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

    started = {}
    monkeypatch.setattr(netns, "start", lambda dep, host, name, command, log: started.update(cmd=command))
    monkeypatch.setattr(netns, "wait_for", lambda *args: None)
    dep = netns.Deployment(str(tmp_path), 2, tls=False, auth=False, superlink_db=db)
    netns.start_superlink(dep)
    database = started["cmd"][started["cmd"].index("--database") + 1]
    on_disk = str(tmp_path / "superlink" / "superlink.db")
    assert database == (FLWR_IN_MEMORY_DB_NAME if db == "memory" else on_disk)
    dep.save()
    assert netns.Deployment.load(tmp_path).superlink_db == db
