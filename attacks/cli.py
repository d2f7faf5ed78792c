"""``gfmfr-secure attack`` (one recorded run) and ``gfmfr-secure attack-table`` (configs x seeds)."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfmfr_secure.errors import ConfigError, GfmfrError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "attack",
        help="run the attacks on a run's recorded adversary views",
        description=(
            "Read RUN_DIR/views/round{R}-{server,outsider}.pt (record.views_rounds when training),\n"
            "run interaction, attribute and group inference against what each adversary received,\n"
            "and write RUN_DIR/attacks/round{R}.json, summary.md and a log-scale ROC plot.\n"
            "Attribute inference (gender, age >= 30, age bracket) is chained onto the server's\n"
            "reconstruction of each client's interactions and run on the uploaded rows, by nested\n"
            "cross-validation, each figure beside its ceiling on the true interactions. Group\n"
            "membership the view already carries is reported as known (a match rate), not as an AUC."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run folder written by 'train' with record.views_rounds set")
    p.add_argument("--round", type=int, default=0, help="recorded round to attack (default 0)")
    p.add_argument("--data", help="data folder or interactions .csv file (else $GFMFR_DATA, else the run's data.path)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' own randomness")
    p.add_argument("--imia-clients", type=int, default=100, help="clients attacked with IMIA (slow); 0 = skip")
    p.add_argument(
        "--attribute-folds", type=int, default=5, metavar="K",
        help="outer folds of the nested-CV attribute inference (default 5; about a minute per view on ML-100K); 0 = skip",
    )
    p.add_argument(
        "--difference-rounds", type=int, nargs="+", metavar="R",
        help="instead of the single-round attacks: difference the released sums of these recorded rounds to isolate single "
        "clients' updates and interactions; writes attacks/differencing.json and .md",
    )
    p.add_argument("--truth-run", metavar="RUN_DIR", help="with --difference-rounds: a plain run of the same config and seed whose uploads score the estimated updates")
    p.add_argument("--max-targets", type=int, default=256, help="with --difference-rounds: clients attacked (default 256)")
    p.set_defaults(handler=_cmd_attack)

    t = subparsers.add_parser(
        "attack-table",
        help="train configs over seeds, attack each run, write the attack x configuration x adversary table",
        description=(
            "For each config and seed: train with the round's views recorded, run every attack,\n"
            "and write OUT/attacks.md and OUT/attacks.json with mean and std over seeds of AUC and\n"
            "TPR at 1% and 0.1% FPR (accuracy against the baseline for the classification attacks)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("configs", nargs="+", help="YAML configs, one column group each")
    t.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    t.add_argument(
        "--round", type=int, nargs="+", default=[0], metavar="R",
        help="rounds whose views are recorded and attacked, each below train.rounds (default 0; e.g. --round 0 9 --set train.rounds=10)",
    )
    t.add_argument("--data", help="data folder or interactions .csv file (else $GFMFR_DATA, else each config's data.path)")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override applied to every config")
    t.add_argument("--imia-clients", type=int, default=100)
    t.add_argument("--attribute-folds", type=int, default=5, metavar="K", help="outer folds of the attribute inference; 0 = skip")
    t.add_argument("--reuse", action="store_true", help="attack runs already in OUT/runs (with their views) instead of retraining, and take their attack figures from "
                   "attacks/round{R}.json where it is newer than the views (delete it to attack again with other settings)")
    t.add_argument(
        "--membership-shadows", type=int, default=0, metavar="N",
        help="also run the outsider's user-level membership inference (LiRA, N shadow trainings per config and seed); 0 = skip",
    )
    t.set_defaults(handler=_cmd_table)

    a = subparsers.add_parser(
        "audit",
        help="empirical DP audit with canary updates: lower bound on epsilon vs the accountant",
        description=(
            "For each config and seed, train once with canary clients (each in with probability 1/2 for\n"
            "the whole run, uploading its fixed random direction scaled to the clip in every round it\n"
            "takes part in), score each on its own group block of the released sums, and compute the\n"
            "one-run lower bound on epsilon (Steinke, Nasr and Jagielski 2023). Fails (exit status 1)\n"
            "if the bound exceeds the accountant's epsilon; warns when too few canaries make that\n"
            "impossible. Writes OUT/audit.md and .json."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a.add_argument("configs", nargs="+")
    a.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    a.add_argument("--canaries", type=int, default=1000, help="canary clients (default 1000; about 1000 all-correct guesses bound epsilon near 5)")
    a.add_argument("--canary-scale", type=float, default=1.0, help="canary norm in units of the clip C (at most 1 under DP; default 1)")
    a.add_argument("--data")
    a.add_argument("--out", required=True)
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a.set_defaults(handler=_cmd_audit)

    m = subparsers.add_parser(
        "membership",
        help="user-level membership inference by an outsider (LiRA with shadow runs)",
        description="Train a target run on a random half of the users and N shadow runs, then run LiRA on the released outputs.",
    )
    m.add_argument("configs", nargs="+")
    m.add_argument("--shadows", type=int, default=8)
    m.add_argument("--seeds", nargs="+", type=int, default=[0])
    m.add_argument("--data")
    m.add_argument("--out", required=True)
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    m.add_argument(
        "--leave-one-out", action="store_true",
        help="train N + 1 runs per seed (each user in half of them) and attack each in turn with the other N as shadows (online "
        "LiRA, per-user Gaussians); AUC and TPR at 1%% / 0.1%% FPR pooled over runs and seeds with 95%% bootstrap intervals, "
        "a TPR only with >= 100 / FPR non-members; writes OUT/membership-lira.{json,md} (e.g. --shadows 16 --seeds 0 1 "
        "--set train.rounds=10 --set train.selection=last --set train.patience=0)",
    )
    m.add_argument("--statistics", nargs="+", default=["fold_in", "item_norm"], choices=["fold_in", "item_norm", "teacher"],
                   help="with --leave-one-out: per-user statistics of the released model (default fold_in item_norm)")
    m.add_argument("--boot", type=int, default=500, help="with --leave-one-out: bootstrap resamples (default 500)")
    m.set_defaults(handler=_cmd_membership)


def _load(path: str, overrides: list[str], data_dir: str | None) -> tuple[Any, Any, Any]:
    from gfmfr_secure.config import load_config, resolve_data_path
    from gfmfr_secure.simulation.runner import prepare_data

    cfg = resolve_data_path(load_config(path, overrides), data_dir)
    data, split = prepare_data(cfg)
    return cfg, data, split


def _cmd_audit(args: argparse.Namespace) -> int:
    import warnings

    from attacks.canary_audit import AuditPowerWarning, gradient_canary_audit
    from gfmfr_secure.config import with_overrides

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in args.configs:
        cfg, data, split = _load(path, args.overrides, args.data)
        for seed in args.seeds:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", AuditPowerWarning)
                res = gradient_canary_audit(with_overrides(cfg, [f"seed={seed}"]), data, split, n_canaries=args.canaries, seed=seed, scale=args.canary_scale)
            notes = [str(w.message) for w in caught if issubclass(w.category, AuditPowerWarning)]
            for note in notes:
                print(f"warning: {Path(path).stem} seed {seed}: {note}", file=sys.stderr)
            rows.append({"config": Path(path).stem, "seed": seed, **{k: v for k, v in res.items() if k not in ("scores", "included")}, "warnings": notes})
    (out / "audit.json").write_text(json.dumps(rows, indent=2, default=float), encoding="utf-8")
    command = "gfmfr-secure " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    lines = [
        f"Produced by: `{command}`",
        "",
        "One-run audit (Steinke, Nasr and Jagielski 2023): 95% lower bound on epsilon from the canaries' in / out guesses;",
        "'attainable' is the largest bound these canaries could give (a claim above it cannot fail).",
        "",
        "| config | seed | claimed epsilon | source | lower bound | attainable | correct / guesses | canaries in / out | mean score in / out | passed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['seed']} | {_fmt(r['eps_claimed'])} | {r['claimed_source']} | {_fmt(r['eps_lower'])} | {_fmt(r['attainable'])}"
            f"{'' if r['can_fail'] else ' (cannot fail)'} | {r['v']} / {r['r']} | {r['n_in']} / {r['n_out']} | "
            f"{_fmt(r['mean_in'])} / {_fmt(r['mean_out'])} | {r['passed']} |"
        )
    (out / "audit.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0 if all(r["passed"] for r in rows) else 1


def _cmd_membership(args: argparse.Namespace) -> int:
    from attacks.experiments import user_membership_experiment
    from attacks.membership import min_negatives
    from gfmfr_secure.config import with_overrides

    if args.leave_one_out:
        from attacks.multiround import lira_rounds_command

        return lira_rounds_command(args, _load)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in args.configs:
        cfg, data, split = _load(path, args.overrides, args.data)
        for seed in args.seeds:
            res = user_membership_experiment(with_overrides(cfg, [f"seed={seed}"]), data, split, n_shadows=args.shadows, seed=seed)
            row = {"config": Path(path).stem, "seed": seed}
            for key in ("lira", "lira_offline", "raw_statistic"):
                row.update({f"{key}_{k}": float(v) for k, v in res[key].items() if k in ("auc", "tpr_at_fpr_0.01", "tpr_at_fpr_0.001")})
                for t in (0.01, 0.001):  # a TPR at FPR t read off fewer than 100 / t non-members is not a measurement
                    if res[key]["n_neg"] < min_negatives(t):
                        row[f"{key}_tpr_at_fpr_{t:g}"] = f"not estimable ({int(res[key]['n_neg'])} non-members)"
            row["epsilon"] = (res.get("target_privacy") or {}).get("epsilon")
            rows.append(row)
    (out / "membership.json").write_text(json.dumps(rows, indent=2, default=float), encoding="utf-8")
    lines = ["| config | seed | epsilon | LiRA AUC | TPR@1%FPR | TPR@0.1%FPR | offline AUC | raw-statistic AUC |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['seed']} | {_fmt(r['epsilon'])} | {_fmt(r.get('lira_auc'))} | {_fmt(r.get('lira_tpr_at_fpr_0.01'))} | "
            f"{_fmt(r.get('lira_tpr_at_fpr_0.001'))} | {_fmt(r.get('lira_offline_auc'))} | {_fmt(r.get('raw_statistic_auc'))} |"
        )
    (out / "membership.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


def _jsonable(v: Any) -> Any:
    """``v`` with numpy arrays and scalars turned into lists and floats (for ``json.dumps``)."""
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def _pm(m: Any, key: str) -> str:
    """``mean ± std`` of ``key`` (its std under ``key_std``), or the value alone."""
    if m.get(key) is None:
        return "-"
    std = m.get(f"{key}_std")
    return f"{_fmt(m[key])} ± {_fmt(std)}" if std is not None else _fmt(m[key])


def _ceiling_note(details: Any) -> str:
    """`` (= ceiling)`` when a view's matrix is the true one, `` (k entries differ)`` when it is close to it."""
    if details.get("same_features_as_ceiling"):
        return " (= ceiling)"
    k = details.get("entries_differing_from_ceiling")
    return f" ({k} entries differ)" if k is not None and k <= 100 else ""


def attack_summary_lines(results: list[Any], head: list[str]) -> list[str]:
    """The Markdown of ``summary.md``: attack figures, attribute inference with its ceilings, group membership.

    Results are told apart by ``details['kind']``: ``attribute`` (own table),
    ``known`` and ``statement`` (group and attribute facts stated in words, no AUC),
    anything else (the attack table).
    """
    kind = [r.details.get("kind", "attack") for r in results]
    lines = [*head, "| attack | adversary | AUC | TPR@1%FPR | TPR@0.1%FPR | accuracy | baseline | source |", "|---|---|---|---|---|---|---|---|"]
    for r, k in zip(results, kind):
        if k != "attack":
            continue
        m = r.metrics
        lines.append(
            f"| {r.name} | {r.observer} | {_fmt(m.get('auc'))} | {_fmt(m.get('tpr_at_fpr_0.01'))} | {_fmt(m.get('tpr_at_fpr_0.001'))} | "
            f"{_fmt(m.get('accuracy', m.get('best_accuracy')))} | {_fmt(m.get('baseline_accuracy', m.get('majority_accuracy')))} | {r.details.get('source', '')} |"
        )
    attrs = [r for r, k in zip(results, kind) if k == "attribute"]
    if attrs:
        d0 = attrs[0].details
        lines += [
            "", "## Attribute inference", "",
            f"Estimator: {d0['protocol']}.",
            "AUC: mean ± std over the outer folds.",
            f"Ceiling: the same estimator, on the same folds, on {d0['ceiling_source']}.",
            "Share of ceiling: (AUC - 0.5) / (ceiling AUC - 0.5); '= ceiling' where the view's matrix is the true one,",
            "'k entries differ' where it differs from it in k (client, item) entries only.",
            "Age bracket: two rows, its macro one-vs-rest AUC (mean of the 4 per-bracket AUCs) and its micro one-vs-rest AUC",
            "(every (user, bracket) pair pooled into one ROC).",
            "",
            "| target | AUC | adversary | view | AUC (folds) | ceiling AUC | share of ceiling | accuracy | majority baseline | C per fold | transform per fold |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in attrs:
            m, d = r.metrics, r.details
            auc_kind = "macro OvR" if "macro" in d["auc_definition"] else "micro OvR" if "micro" in d["auc_definition"] else "binary"
            lines.append(
                f"| {d['target']} | {auc_kind} | {r.observer} | {d['view']} | {_pm(m, 'auc')} | {_pm(m, 'ceiling_auc')} | "
                f"{_fmt(m.get('share_of_ceiling_lift'))}{_ceiling_note(d)} | {_pm(m, 'accuracy')} | {_fmt(m.get('baseline_accuracy'))} | "
                f"{' '.join(f'{c:g}' for c in d['chosen_c'])} | {' '.join(d['chosen_transform'])} |"
            )
        lines += ["", "Views: " + "; ".join(sorted({f"`{r.details['view']}`: {r.details['source']}" for r in attrs}))]
    facts = [r for r, k in zip(results, kind) if k in ("known", "statement")]
    if facts:
        lines += ["", "## Stated, not scored", ""]
        for r in facts:
            lines.append(f"- {r.name} ({r.observer}): {r.details['statement']}" + (f" [{r.details['source']}]" if r.details.get("source") else ""))
    return lines


def _write_attack_outputs(out: Path, round_idx: int, results: list[Any], curves: dict[str, Any], run_dir: Path | None = None) -> Path:
    from attacks.metrics import plot_roc

    out.mkdir(parents=True, exist_ok=True)
    records = []
    for r in results:
        rec = r.to_dict()
        rec["details"] = _jsonable({k: v for k, v in rec["details"].items() if k != "roc"})
        records.append(rec)
    (out / f"round{round_idx}.json").write_text(json.dumps(records, indent=2, default=float), encoding="utf-8")
    head = [f"Attacks on run `{run_dir}`, round {round_idx}.", ""] if run_dir is not None else [f"Attacks on round {round_idx}.", ""]
    (out / "summary.md").write_text("\n".join(attack_summary_lines(results, head)) + "\n", encoding="utf-8")
    if curves:
        plot_roc(curves, out / f"roc-round{round_idx}.png", title=f"attacks on round {round_idx}")
    return out / "summary.md"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{float(v):.3f}" if isinstance(v, (int, float)) else str(v)


def attack_run(
    run_dir: Path, round_idx: int, data_dir: str | None, seed: int, imia_clients: int, loaded: tuple[Any, Any] | None = None,
    attribute_folds: int = 5,
) -> list[Any]:
    """Attack one recorded run; ``loaded`` = (data, split) already prepared for its config, else loaded here."""
    from attacks.suite import run_view_attacks
    from gfmfr_secure.config import load_config, resolve_data_path
    from gfmfr_secure.simulation.runner import prepare_data

    cfg = resolve_data_path(load_config(run_dir / "config.yaml"), data_dir)
    data, split = loaded if loaded is not None else prepare_data(cfg)
    grouping = {"use_pca": cfg.grouping.use_pca, "pca_variance": cfg.grouping.pca_variance, "seed": cfg.seed}
    results = run_view_attacks(
        run_dir / "views", round_idx, data, split, seed=seed, imia_clients=imia_clients, num_negatives=cfg.train.num_negatives,
        attribute_folds=attribute_folds, grouping_options=grouping,
    )
    curves = {f"{r.name} ({r.observer})": r.details["roc"] for r in results if "roc" in r.details}
    _write_attack_outputs(run_dir / "attacks", round_idx, results, curves, run_dir)
    return results


@dataclass(frozen=True)
class _StoredResult:
    """An attack's figures as an earlier ``attack-table`` wrote them to ``attacks/round{R}.json`` (``--reuse``)."""

    name: str
    observer: str
    metrics: dict[str, Any]
    details: dict[str, Any]


def _skipped_round(run_dir: Path, round_idx: int) -> str | None:
    """Why round ``round_idx`` of a finished run released nothing (its history's ``skipped``), else None."""
    path = run_dir / "history.json"
    if not path.is_file():
        return None
    for rec in json.loads(path.read_text(encoding="utf-8")):
        if rec.get("round") == round_idx:
            return rec.get("skipped")
    return None


class AttackInputError(GfmfrError):
    """A run folder that cannot be attacked (no config, or no recorded views for the round)."""


def _check_attackable(run_dir: Path, round_idx: int) -> None:
    """Raise :class:`AttackInputError` unless ``run_dir`` holds a config and both views of ``round_idx``."""
    from gfmfr_secure.simulation.views import view_path

    if not (run_dir / "config.yaml").is_file():
        raise AttackInputError(f"{run_dir} is not a run folder (no config.yaml)")
    views = run_dir / "views"
    missing = [o for o in ("server", "outsider") if not view_path(views, round_idx, o).is_file()]
    why = _skipped_round(run_dir, round_idx)
    if missing and why is not None:
        raise AttackInputError(f"{run_dir}: round {round_idx} released nothing ({why}): the server saw no upload to attack; attack another round")
    if missing:
        have = sorted({p.name.split("-")[0] for p in views.glob("round*-*.pt")}) if views.is_dir() else []
        recorded = ", ".join(have) if have else "none (train with record.views_rounds=[...])"
        raise AttackInputError(f"{run_dir}: no recorded {' and '.join(missing)} view of round {round_idx}; recorded rounds: {recorded}")


def _cmd_attack(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    if args.difference_rounds:
        from attacks.multiround import differencing_command

        for r in sorted(set(args.difference_rounds)):
            _check_attackable(run_dir, r)
        return differencing_command(
            run_dir, args.difference_rounds, data_dir=args.data, truth_run=args.truth_run, seed=args.seed, max_targets=args.max_targets,
        )
    if args.attribute_folds == 1 or args.attribute_folds < 0:
        raise ConfigError(f"--attribute-folds must be 0 (skip) or >= 2, got {args.attribute_folds}")
    _check_attackable(run_dir, args.round)
    attack_run(run_dir, args.round, args.data, args.seed, args.imia_clients, attribute_folds=args.attribute_folds)
    print((run_dir / "attacks" / "summary.md").read_text(encoding="utf-8"))
    return 0


#: figures of the attack table: ``ceiling_auc`` for attribute inference, ``relabelled_match_rate`` for a known group
TABLE_METRICS = ("auc", "tpr_at_fpr_0.01", "tpr_at_fpr_0.001", "accuracy", "baseline_accuracy", "ceiling_auc", "relabelled_match_rate", "f1", "exact_recovery")


def _cmd_table(args: argparse.Namespace) -> int:
    from attacks.metrics import aggregate_runs
    from gfmfr_secure.config import load_config, resolve_data_path, with_overrides
    from gfmfr_secure.simulation.record import train_and_record
    from gfmfr_secure.simulation.runner import prepare_data
    from gfmfr_secure.simulation.views import view_path

    if args.attribute_folds == 1 or args.attribute_folds < 0:
        raise ConfigError(f"--attribute-folds must be 0 (skip) or >= 2, got {args.attribute_folds}")
    out = Path(args.out)
    rounds = sorted(set(args.round))
    if rounds[0] < 0:
        raise ConfigError(f"--round must be >= 0, got {rounds[0]}")
    cells: dict[tuple[str, str, str, int], list[dict[str, float]]] = {}
    privacy: dict[str, Any] = {}
    silent: list[str] = []  # (config, seed, round) that released nothing
    notes: dict[str, set[str]] = {}  # why an attack gave no figure -> the cells it concerns
    bases = {path: resolve_data_path(load_config(path, args.overrides), args.data) for path in args.configs}
    for path, base in bases.items():  # every config checked before anything trains
        if rounds[-1] >= base.train.rounds:
            raise ConfigError(
                f"--round {rounds[-1]} is not below train.rounds = {base.train.rounds} of {path}; "
                f"add --set train.rounds={rounds[-1] + 1} or attack an earlier round"
            )
    for path, base in bases.items():
        label = Path(path).stem
        loaded = None
        for seed in args.seeds:
            cfg = with_overrides(base, [f"seed={seed}", f"record.views_rounds=[{', '.join(map(str, rounds))}]"])
            run_dir = out / "runs" / f"{label}-seed{seed}"
            finished = (run_dir / "metrics.json").is_file() and (run_dir / "history.json").is_file()
            if args.reuse and finished and all(any((run_dir / "views").glob(f"round{r}-*")) or _skipped_round(run_dir, r) for r in rounds):
                metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
            else:
                metrics, run_dir = train_and_record(cfg, out / "runs", name=f"{label}-seed{seed}", console=False, progress=False)
            privacy[label] = {k: metrics["privacy"].get(k) for k in ("mechanism", "epsilon", "epsilon_if_covered", "noise_multiplier", "clip")}
            privacy[label]["backend"] = cfg.aggregation.backend
            privacy[label]["grouping"] = cfg.grouping.method
            if loaded is None:  # the dataset does not depend on the seed: load it once per config
                loaded = prepare_data(base)
            for rnd in rounds:
                why = _skipped_round(run_dir, rnd)
                if why is not None:  # the server saw no upload that round: there is nothing to attack
                    silent.append(f"{label}, seed {seed}, round {rnd}: nothing released ({why})")
                    continue
                _check_attackable(run_dir, rnd)
                done = run_dir / "attacks" / f"round{rnd}.json"
                if args.reuse and done.is_file() and done.stat().st_mtime >= view_path(run_dir / "views", rnd, "server").stat().st_mtime:
                    results = [_StoredResult(**{k: rec[k] for k in ("name", "observer", "metrics", "details")}) for rec in json.loads(done.read_text(encoding="utf-8"))]
                else:
                    results = attack_run(run_dir, rnd, args.data, seed, args.imia_clients, loaded, attribute_folds=args.attribute_folds)
                for r in results:
                    m = {k: float(r.metrics[k]) for k in TABLE_METRICS if isinstance(r.metrics.get(k), (int, float))}
                    if "accuracy" not in m and "best_accuracy" in r.metrics:
                        m["accuracy"] = float(r.metrics["best_accuracy"])
                    cells.setdefault((r.name, label, r.observer, rnd), []).append(m)
                    if not m and r.details.get("statement"):
                        notes.setdefault(r.details["statement"], set()).add(f"{r.name} ({r.observer}, {label}, round {rnd})")
            if args.membership_shadows > 0:
                from attacks.experiments import user_membership_experiment

                data, split = loaded
                res = user_membership_experiment(with_overrides(cfg, ["record.views_rounds=[]"]), data, split, n_shadows=args.membership_shadows, seed=seed)
                lira = res["lira"]
                m = {k: float(lira[k]) for k in ("auc", "tpr_at_fpr_0.01", "tpr_at_fpr_0.001") if k in lira}
                m["accuracy"] = float(lira.get("best_accuracy", float("nan")))
                m["baseline_accuracy"] = 0.5
                cells.setdefault(("user-membership-lira", label, "outsider", rounds[-1]), []).append(m)
    summary = {f"{a}|{c}|{o}|round{t}": aggregate_runs(v) for (a, c, o, t), v in cells.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "attacks.json").write_text(json.dumps({"cells": summary, "configs": privacy, "nothing_released": silent}, indent=2, default=float), encoding="utf-8")
    command = "gfmfr-secure " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [f"Produced by: `{command}`", "", "| config | backend | grouping | DP | epsilon |", "|---|---|---|---|---|"]
    for label, p in privacy.items():
        eps = p["epsilon"] if p["epsilon"] is not None else (f"withheld ({p['epsilon_if_covered']:.3g} if covered)" if p.get("epsilon_if_covered") else "-")
        lines.append(f"| {label} | {p['backend']} | {p['grouping']} | {p['mechanism']} | {_fmt(eps) if isinstance(eps, float) else eps} |")
    lines += [
        "", "Attribute rows: AUC of the nested-CV estimator (mean over its folds) and, as ceiling AUC, the same estimator on the",
        "true interactions. group-membership-known: the view carries the group; its figure is the match rate, not an AUC.", "",
        "Reconstruction rows: F1 of each client's recovered interaction set and the fraction of clients recovered exactly.", "",
        "| attack | config | adversary | round | AUC | TPR@1%FPR | TPR@0.1%FPR | accuracy | baseline | ceiling AUC | known: match rate | F1 | exact recovery |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (a, c, o, t), _ in sorted(cells.items()):
        agg = summary[f"{a}|{c}|{o}|round{t}"]
        if not agg:  # no figure: the reason is listed below the table
            continue

        def cell(key: str, agg: dict[str, Any] = agg) -> str:
            if key not in agg:
                return "-"
            n = int(agg[key]["n"])
            of = f" ({n} of {len(args.seeds)} seeds)" if n < len(args.seeds) else ""
            return (f"{agg[key]['mean']:.3f} ± {agg[key]['std']:.3f}" if n > 1 else f"{agg[key]['mean']:.3f}") + of

        lines.append(
            f"| {a} | {c} | {o} | {t} | {cell('auc')} | {cell('tpr_at_fpr_0.01')} | {cell('tpr_at_fpr_0.001')} | {cell('accuracy')} | "
            f"{cell('baseline_accuracy')} | {cell('ceiling_auc')} | {cell('relabelled_match_rate')} | {cell('f1')} | {cell('exact_recovery')} |"
        )
    if notes:
        lines += ["", "Not attacked, and why:", ""]
        lines += [f"- {why}: {', '.join(sorted(where))}" for why, where in sorted(notes.items())]
    if silent:
        lines += ["", "Rounds that released nothing (the group floor stopped them; these cells average the other seeds):", ""]
        lines += [f"- {s}" for s in silent]
    (out / "attacks.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0
