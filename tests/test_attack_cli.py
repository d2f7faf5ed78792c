"""The attack commands end to end on ML-100K-mm at a small scale (1-2 rounds, d = 8)."""

from __future__ import annotations

import json

from gfmfr_secure.cli import main

FAST = ["train.rounds=1", "model.latent_dim=8", "fusion.embedding_dim=16", "fusion.server_epochs=1", "train.local_epochs=1"]


def _sets(*extra: str) -> list[str]:
    out: list[str] = []
    for item in FAST + list(extra):
        out += ["--set", item]
    return out


def test_train_with_views_then_attack(ml100k_dir, tmp_path, capsys) -> None:
    assert main(["train", "--config", "configs/gfmfr.yaml", "--data", str(ml100k_dir), "--out", str(tmp_path), "--name", "r",
                 "--quiet", *_sets("record.views_rounds=[0]")]) == 0
    run = tmp_path / "r"
    assert (run / "views" / "round0-server.pt").is_file()
    # attribute inference (nested CV, about a minute per view here) is covered on synthetic data
    assert main(["attack", "--run", str(run), "--round", "0", "--imia-clients", "5", "--attribute-folds", "0"]) == 0
    results = {(r["name"], r["observer"]): r for r in json.loads((run / "attacks" / "round0.json").read_text())}
    assert results[("interaction-magnitude", "server")]["metrics"]["auc"] > 0.8  # plain uploads leak
    assert ("group-membership-from-teacher", "outsider") in results
    assert results[("group-membership-known", "server")]["metrics"]["relabelled_match_rate"] == 1.0  # spectral: the server's own clustering
    assert (run / "attacks" / "roc-round0.png").stat().st_size > 0
    assert "interaction-magnitude" in capsys.readouterr().out


def test_audit_command_passes_under_dp(ml100k_dir, tmp_path, capsys) -> None:
    status = main(["audit", "configs/privacy/eps-1.yaml", "--seeds", "0", "--canaries", "20", "--data", str(ml100k_dir),
                   "--out", str(tmp_path), *_sets()])
    assert status == 0
    rows = json.loads((tmp_path / "audit.json").read_text())
    assert rows[0]["passed"] and rows[0]["eps_lower"] <= rows[0]["eps_claimed"]
    assert "lower bound" in capsys.readouterr().out


def test_attack_table_with_outsider_membership(ml100k_dir, tmp_path, capsys) -> None:
    status = main(["attack-table", "configs/attacks/masking-nodp.yaml", "--seeds", "0", "--data", str(ml100k_dir), "--out", str(tmp_path),
                   "--imia-clients", "0", "--membership-shadows", "2", *_sets("aggregation.neighbours=8")])
    assert status == 0
    table = (tmp_path / "attacks.md").read_text()
    assert "user-membership-lira | masking-nodp | outsider" in table
    assert "interaction-magnitude | masking-nodp | server" in table


def test_attack_errors_exit_2_without_views(tmp_path, capsys) -> None:
    assert main(["attack", "--run", str(tmp_path / "nothing")]) == 2
    assert "error: " in capsys.readouterr().err
    assert main(["attack", "--run", str(tmp_path / "nothing"), "--attribute-folds", "1"]) == 2
    assert "error: --attribute-folds must be 0 (skip) or >= 2" in capsys.readouterr().err
    run = tmp_path / "r"
    (run / "views").mkdir(parents=True)
    (run / "config.yaml").write_text("method: gfmfr\n")
    assert main(["attack", "--run", str(run), "--round", "0"]) == 2
    assert "recorded rounds: none" in capsys.readouterr().err
    (run / "views" / "round1-server.pt").write_bytes(b"")
    (run / "views" / "round1-outsider.pt").write_bytes(b"")
    assert main(["attack", "--run", str(run), "--round", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "round 3" in err and "round1" in err and "Traceback" not in err


def test_attack_table_attacks_several_rounds_of_the_same_runs(ml100k_dir, tmp_path, capsys) -> None:
    args = ["attack-table", "configs/attacks/plain-paper.yaml", "--seeds", "0", "--data", str(ml100k_dir), "--out", str(tmp_path),
            "--imia-clients", "0", "--attribute-folds", "0", "--round", "0", "1"]
    fast = [x for item in FAST[1:] for x in ("--set", item)]  # FAST without train.rounds
    assert main([*args, *fast]) == 2  # round 1 of a one-round config: refused before training
    err = capsys.readouterr().err
    assert err.startswith("error: --round 1 is not below train.rounds = 1") and "--set train.rounds=2" in err
    assert not (tmp_path / "runs").exists()
    assert main([*args, *fast, "--set", "train.rounds=2"]) == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "plain-paper-seed0" / "views").glob("round*-server.pt")) == [
        "round0-server.pt", "round1-server.pt"]
    table = (tmp_path / "attacks.md").read_text()
    assert "| interaction-reconstruction | plain-paper | server | 0 |" in table
    assert "| interaction-reconstruction | plain-paper | server | 1 |" in table
    cells = json.loads((tmp_path / "attacks.json").read_text())["cells"]
    assert "interaction-magnitude|plain-paper|server|round1" in cells
    # --reuse attacks the recorded runs again without training
    (tmp_path / "attacks.md").unlink()
    assert main([*args, *fast, "--set", "train.rounds=2", "--reuse"]) == 0
    assert (tmp_path / "attacks.md").read_text() == table


def test_a_round_that_released_nothing_is_named_not_attacked(ml100k_dir, tmp_path, capsys) -> None:
    """Under DP the noised counts can fall below the group floor: that round's server saw no upload."""
    args = ["attack-table", "configs/attacks/masking-nodp.yaml", "--seeds", "0", "--data", str(ml100k_dir), "--out", str(tmp_path),
            "--imia-clients", "0", "--attribute-folds", "0", *_sets("train.client_fraction=0.005", "grouping.min_group_size=20", "aggregation.neighbours=8")]
    assert main(args) == 0
    table = (tmp_path / "attacks.md").read_text()
    assert "masking-nodp, seed 0, round 0: nothing released (cohort below grouping.min_group_size)" in table
    assert json.loads((tmp_path / "attacks.json").read_text())["nothing_released"]
    capsys.readouterr()
    assert main(["attack", "--run", str(tmp_path / "runs" / "masking-nodp-seed0"), "--round", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "round 0 released nothing" in err
