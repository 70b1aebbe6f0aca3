"""bench/frontier.py and bench/baselines.py: the comparison is fair (each baseline keeps its
documents apart, every arm reads the same rows in the same order and is scored on the same
validation masks), the smoke preset runs its stages and stores what it needs to resume, and
the summary's pieces against hand-made values."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch

import common
from bench import baselines as B
from bench import frontier as F
from data.shards import write_shard
from model import CLS_ID, PAD_ID, SEP_ID

pytest.importorskip("transformers", reason="the baselines come from transformers (requirements.txt)")


def test_crossing_interpolates_the_first_time_a_curve_reaches_the_target():
    curve = [{"tokens": 0, "wall_s": 0, "val_loss": 10.0}, {"tokens": 100, "wall_s": 2, "val_loss": 6.0},
             {"tokens": 200, "wall_s": 4, "val_loss": 4.0}, {"tokens": 300, "wall_s": 6, "val_loss": 5.0}]
    assert F.crossing(curve, 5.0, "tokens") == 150 and F.crossing(curve, 5.0, "wall_s") == 3
    assert F.crossing(curve, 6.0, "tokens") == 100 and F.crossing(curve, 3.9, "tokens") is None


def test_the_sweep_grows_until_its_best_learning_rate_is_bracketed():
    """best_lr on stored losses that fall as the lr grows up to 0.01, then rise: the sweep
    (3e-4, 1e-3, 3e-3) asks for 9e-3, then 2.7e-2, and stops once 9e-3 is bracketed."""
    P = F.PRESETS["cpu"]
    arm = F.ARM_BY_NAME["modernbert"]

    class Store:
        def result(self, name):
            lr = float(name.rsplit("/lr", 1)[1])
            return {"final_val_loss": (np.log10(lr) + 2) ** 2} if lr < 0.05 else None

    best, lrs = F.best_lr(Store(), arm, P, 0)
    assert best == pytest.approx(9e-3) and lrs == pytest.approx([3e-4, 1e-3, 3e-3, 9e-3, 2.7e-2])

    class Missing(Store):
        def result(self, name):
            return None if name.endswith("lr0.003") else super().result(name)

    assert F.best_lr(Missing(), arm, P, 0) == (None, [3e-4, 1e-3, 3e-3])


def test_the_finetuning_sweep_runs_last_and_each_task_reports_its_best_lr():
    """The cpu preset's finetuning lrs: the sweep's jobs come after every job at the protocol's
    lr (whole budgets first), one per reported model, task and extra lr, each carrying its lr;
    best_finetune_lr takes the lr with the best median (the protocol's lr among equals) and
    waits for every lr; the table shows both GLUE-small columns."""
    P = F.PRESETS["cpu"]
    assert P.finetune.lrs and P.finetune.lr not in P.finetune.lrs
    arms = [F.ARM_BY_NAME[a] for a in ("kbert", "modernbert", "bert")]

    class Pretrained:  # every pretraining run finished, ModernBERT's sweep best at 1e-3, no evaluation yet
        def result(self, name):
            if name.startswith("pt/"):
                return {"final_val_loss": 4.0 if name.endswith("lr0.001") else 5.0}
            return None

    cfg = F.FrontierConfig(stages="pretrain,blimp,finetune")
    jobs = F.plan(cfg, P, arms, Pretrained())
    swept = [j for j in jobs if "lr" in j and j["kind"] == "finetune"]
    first = jobs.index(swept[0])
    assert all("lr" in j for j in jobs[first:]) and not any(j["kind"] == "finetune" and "lr" in j for j in jobs[:first])
    reported = {j["pretrained"] for j in jobs if j["kind"] == "finetune"}
    assert len(swept) == len(reported) * len(P.finetune.tasks) * len(P.finetune.lrs)
    assert {j["lr"] for j in swept} == set(P.finetune.lrs) and len({j["name"] for j in jobs}) == len(jobs)
    assert F.ft_name("sst2", "pt/kbert/s1000/seed0") == "ft/sst2/kbert/s1000/seed0"
    assert F.ft_name("sst2", "pt/kbert/s1000/seed0", 2e-3) == "ft/sst2/kbert/s1000/seed0/flr0.002"

    scores = {P.finetune.lr: [65.0, 64.0, 66.0], 6e-4: [70.0, 72.0, 71.0], 2e-3: [71.0, 69.0, 70.0], 6e-3: [50.0, 60.0, 55.0]}

    class Finetuned:
        def __init__(self, missing=()):
            self.missing = missing

        def result(self, name):
            lr = float(name.split("/flr")[1]) if "/flr" in name else P.finetune.lr
            if lr in self.missing:
                return None
            return {"per_seed": {str(i): {"accuracy": a} for i, a in enumerate(scores[lr])}}

    best = F.best_finetune_lr(Finetuned(), P, "sst2", "pt/kbert/s1000/seed0")
    assert best["lr"] == 6e-4 and best["medians"] == {P.finetune.lr: 65.0, 6e-4: 71.0, 2e-3: 70.0, 6e-3: 55.0}
    assert best["per_seed"]["1"] == {"accuracy": 72.0}
    assert F.best_finetune_lr(Finetuned(missing=(2e-3,)), P, "sst2", "pt/kbert/s1000/seed0") is None
    scores[6e-4] = scores[2e-3] = scores[6e-3] = scores[P.finetune.lr]
    assert F.best_finetune_lr(Finetuned(), P, "sst2", "pt/kbert/s1000/seed0")["lr"] == P.finetune.lr

    # summarize: each task at its best lr once its sweep is in; GLUE-small at the protocol's lr kept beside it
    class Record:
        def result(self, name):
            if name.startswith("pt/"):
                return {"params": 1, "tokens": 4096000, "flops": 1.0, "wall_s": 1.0, "cpu_s": 1.0, "final_val_loss": 4.0,
                        "curve": [], "data_digest": "d", "val_digest": "v", "log": "l"}
            if name.startswith("ft/"):
                task, lr = name.split("/")[1], float(name.split("/flr")[1]) if "/flr" in name else P.finetune.lr
                value = 10.0 if lr == P.finetune.lr else 20.0 if lr == 2e-3 else 15.0
                return {"per_seed": {s: {m: value + int(s) for m in F.GLUE_HEADLINE[task]} for s in "012"}}
            return None

    e = F.summarize(Record(), P, arms[:1], {"unigram_loss": 6.0})[0]
    assert e["glue_small"] == {"per_seed": {"0": 10.0, "1": 11.0, "2": 12.0}, "median": 11.0, "min": 10.0, "max": 12.0}
    assert e["glue_small_best"]["median"] == 21.0 and {b["lr"] for b in e["tasks_best"].values()} == {2e-3}

    entry = {"arm": "kbert", "budget_steps": 1000, "seed": 0, "lr": None, "tokens": 4096000, "flops": 5.9e13,
             "wall_s": 475.0, "final_val_loss": 4.4, "past_unigram": True,
             "tasks": {"sst2": {"0": {"accuracy": 64.0}, "1": {"accuracy": 66.0}}},
             "glue_small": {"median": 40.0, "min": 39.0, "max": 41.0}, "blimp": 0.54,
             "tasks_best": {"sst2": {"lr": 2e-3, "per_seed": {}, "medians": {2e-4: 65.0, 2e-3: 77.8}}},
             "glue_small_best": {"median": 45.0, "min": 44.5, "max": 46.0}}
    row = F.table([entry]).splitlines()[2]
    assert "| 40.0 [39.0, 41.0] | 45.0 [44.5, 46.0] | 54.0 | 65.0 -> 77.8 (0.002, top) |" in row, row
    entry["tasks_best"]["sst2"]["medians"][6e-4] = 70.0  # a best lr below the sweep's highest is bracketed
    entry["tasks_best"]["sst2"]["medians"][2e-3] = 69.0
    entry["tasks_best"]["sst2"]["lr"] = 6e-4
    row = F.table([entry]).splitlines()[2]
    assert "| 65.0 -> 70.0 (0.0006) |" in row, row

    # README's short table: budgets in order, then arms in the order given, then seeds; the best baseline named as such,
    # a KBERT arm's overrides in its lr column
    base = entry | {"arm": "modernbert", "recipe": "modernbert", "lr": 1e-3, "final_val_loss": 5.3, "tasks_best": {},
                    "glue_small_best": None, "blimp": None, "best_baseline": {"arm": "modernbert"}}
    other = base | {"arm": "bert", "recipe": "bert", "lr": 3e-4, "final_val_loss": 6.9, "past_unigram": False}
    entry |= {"recipe": "kbert", "best_baseline": {"arm": "modernbert"}, "token_ratio": 0.44, "wall_ratio": 0.26}
    rows = F.short_table([
        base | {"budget_steps": 2000, "tokens": 8192000}, entry | {"budget_steps": 2000, "tokens": 8192000},
        entry | {"seed": 1}, entry | {"arm": "kbert-wd"}, other, base, entry],
        [F.ARM_BY_NAME[a] for a in ("kbert", "kbert-wd", "modernbert", "bert")], 2e-4).splitlines()
    assert "GLUE-small, finetuning lr 0.0002" in rows[0] and "sst2 (0.0002 -> best, its lr)" in rows[0]
    assert [r.split(" | ")[:3] for r in rows[2:]] == [
        ["| kbert", "4.1M", "0"], ["| kbert", "4.1M", "1"], ["| kbert-wd", "4.1M", "0"], ["| modernbert", "4.1M", "0"],
        ["| bert", "4.1M", "0"], ["| kbert", "8.2M", "0"], ["| modernbert", "8.2M", "0"]]
    assert rows[2].endswith(
        "| defaults | 4.400 | 0.44 / 0.26 | 40.0 [39.0, 41.0] | 45.0 [44.5, 46.0] | 54.0 | 65.0 -> 70.0 (0.0006) | - |"), rows[2]
    assert "| kbert-wd | 4.1M | 0 | weight_decay 0.05 | 4.400 |" in rows[4]
    assert rows[5].endswith("| 0.001 | 5.300 | (the baseline) | 40.0 [39.0, 41.0] | not run | not run | 65.0 | - |"), rows[5]
    assert "| 0.0003 | 6.900 (not past the bar) | - |" in rows[6]
    # a run whose wall time was measured with other threads or on another cpu than its baseline's: no wall ratio
    run, base = {"threads": 2, "cpu": "AMD EPYC"}, {"threads": 1, "cpu": "Intel(R) Xeon(R) Processor"}
    apart = entry | run | {"wall_ratio": None, "wall_apart": F.wall_apart(run, base)}
    assert F.ratio_cell(apart) == "0.44 / - (threads 2 against 1, cpu AMD EPYC against Intel(R) Xeon(R) Processor)"
    assert F.wall_apart(run | {"threads": 1}, base) == "cpu AMD EPYC against Intel(R) Xeon(R) Processor"
    assert F.wall_apart({"threads": 1}, base) is None  # no cpu stored (the record's older runs): compared


def test_core_hours_count_each_run_times_its_threads():
    """A run on two threads holds two cores: its wall time counts twice; runs stored without threads used one."""
    runs = {"pt/kbert/s4/seed0": {"elapsed_s": 3600.0, "threads": 2}, "blimp/kbert/s4/seed0": {"elapsed_s": 1800.0},
            "ft/rte/kbert/s4/seed0": {"elapsed_s": 360.0, "threads": 1}, "pt/kbert/s0/seed0": {"elapsed_s": 36.0}}

    class Store:
        def load(self, name):
            return {"result": runs[name]} if name in runs else None

    jobs = [{"name": "pt/kbert/s4/seed0", "kind": "pretrain"}, {"name": "pt/kbert/s0/seed0", "kind": "pretrain"},
            {"name": "blimp/kbert/s4/seed0", "kind": "blimp", "pretrained": "pt/kbert/s4/seed0"},
            {"name": "ft/rte/kbert/s4/seed0", "kind": "finetune", "pretrained": "pt/kbert/s4/seed0"},
            {"name": "ft/sst2/kbert/s4/seed0", "kind": "finetune", "pretrained": "pt/kbert/s4/seed0"}]
    assert F.core_hours(Store(), jobs) == {"kbert": {"pretrain": 2.0, "blimp": 0.5, "finetune": 0.1},
                                           "kbert (initialization)": {"pretrain": 0.01, "blimp": 0.0, "finetune": 0.0}}


def test_the_finetuning_sweep_extends_upward_until_a_tasks_best_is_bracketed():
    """Where the sweep's highest lr is a task's best, P.finetune.extend's lrs follow one at a
    time (planned after the whole sweep) until a lower one wins; one planned but not run leaves
    the best as it stands, marked in the table."""
    P = F.PRESETS["cpu"]
    assert P.finetune.extend == (2e-2, 6e-2)
    pt = "pt/kbert/s1000/seed0"
    scores = {P.finetune.lr: 10.0, 6e-4: 20.0, 2e-3: 30.0, 6e-3: 40.0}  # sst2 rises to the top; stsb peaks inside

    class Store:
        def result(self, name):
            if name.startswith("pt/"):
                return {"final_val_loss": 4.0}
            lr = float(name.split("/flr")[1]) if "/flr" in name else P.finetune.lr
            if name.startswith("ft/sst2/") and lr in scores:
                return {"per_seed": {s: {"accuracy": scores[lr] + int(s)} for s in "012"}}
            if name.startswith("ft/") and lr in (P.finetune.lr, *P.finetune.lrs):
                return {"per_seed": {s: {m: 50.0 - 1e3 * abs(lr - 2e-3) for m in F.GLUE_HEADLINE[name.split("/")[1]]}
                                     for s in "012"}}
            return None

    assert list(F.finetune_runs(Store(), P, "stsb", pt)) == [P.finetune.lr, *P.finetune.lrs]
    assert list(F.finetune_runs(Store(), P, "sst2", pt)) == [P.finetune.lr, *P.finetune.lrs, 2e-2]
    jobs = F.plan(F.FrontierConfig(stages="pretrain,blimp,finetune"), P, [F.ARM_BY_NAME["kbert"]], Store())
    extended = [j for j in jobs if j.get("lr") in P.finetune.extend]
    assert [j["name"] for j in extended] == [f"ft/sst2/{b[3:]}/flr0.02" for b in
                                             ("pt/kbert/s1000/seed0", "pt/kbert/s1000/seed1", "pt/kbert/s2000/seed0",
                                              "pt/kbert/s4000/seed0")]
    assert jobs[-len(extended):] == extended  # after every other run
    best = F.best_finetune_lr(Store(), P, "sst2", pt)  # 2e-2 not run yet: the best stands, the bracket open
    assert best["lr"] == 6e-3 and best["open"] == 2e-2 and F.best_finetune_lr(Store(), P, "stsb", pt)["open"] is None
    entry = {"tasks": {"sst2": {"0": {"accuracy": 10.0}}}, "tasks_best": {"sst2": best}}
    assert F.task_cell(entry, "sst2") == "10.0 -> 41.0 (0.006, top, 0.02 not run)"

    scores[2e-2] = 45.0  # better again: 6e-2 follows, and once it is worse the best is bracketed at 2e-2
    assert list(F.finetune_runs(Store(), P, "sst2", pt))[-2:] == [2e-2, 6e-2]
    scores[6e-2] = 44.0
    best = F.best_finetune_lr(Store(), P, "sst2", pt)
    assert best["lr"] == 2e-2 and best["open"] is None and best["medians"][6e-2] == 45.0
    assert F.task_cell({"tasks": {}, "tasks_best": {"sst2": best}}, "sst2") == "- -> 46.0 (0.02)"
    scores[2e-2] = 40.0  # no better than 6e-3 (the first of equals wins): bracketed, nothing more
    assert list(F.finetune_runs(Store(), P, "sst2", pt)) == [P.finetune.lr, *P.finetune.lrs, 2e-2]
    assert F.best_finetune_lr(Store(), P, "sst2", pt)["lr"] == 6e-3


def test_a_lock_counts_while_its_process_lives(tmp_path, monkeypatch):
    """A run's lock holds while the process that wrote it lives; one left by a process that died
    (a stopped worker, a stopped rebuild) neither blocks the runs that need it nor its own run; one
    whose process lives under another user (os.kill's PermissionError) still holds."""
    import subprocess
    import sys

    store = F.Store(str(tmp_path), {}, "refuse")  # makes its runs/ folder
    assert not store.locked("pt/kbert/s1000/seed0") and store.claim("pt/kbert/s1000/seed0")
    assert store.locked("pt/kbert/s1000/seed0")  # this process
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open(store.path("pt/kbert/s1000/seed1", ".lock"), "w") as f:
        f.write(dead.stdout.strip())
    assert not store.locked("pt/kbert/s1000/seed1") and store.claim("pt/kbert/s1000/seed1")
    open(store.path("pt/kbert/s1000/seed3", ".lock"), "w").close()  # claimed, its pid not written yet
    assert store.locked("pt/kbert/s1000/seed3") and not store.claim("pt/kbert/s1000/seed3")
    with open(store.path("pt/kbert/s1000/seed2", ".lock"), "w") as f:
        f.write("1")  # a live process that this user may not signal (os.kill raises PermissionError)
    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(F.os, "kill", kill)
    assert store.locked("pt/kbert/s1000/seed2") and not store.claim("pt/kbert/s1000/seed2")


def test_budgets_restricts_the_plan_to_the_budgets_given():
    """--frontier.budgets plans only those budgets (an ablation judged at the smallest), with the
    smallest budget's extras (the baselines' sweep, the second seeds) still where they belong;
    --frontier.seed_budgets adds the second seeds at a larger budget; a budget outside the preset
    stops with the preset's budgets named."""
    P = F.PRESETS["cpu"]
    arms = [F.ARM_BY_NAME[a] for a in ("kbert-mask30", "kbert", "kbert-wd", "kbert-sep", "modernbert", "bert")]

    class Pretrained:  # every pretraining run finished, each baseline's sweep best at 1e-3, ModernBERT the best
        def result(self, name):
            if name.startswith("pt/"):
                return {"final_val_loss": (3.9 if "modernbert" in name else 4.0) if name.endswith("lr0.001") else 5.0}
            return None

    def steps(jobs):
        return {int(j["name"].split("/s")[1].split("/")[0]) for j in jobs if j["kind"] == "pretrain"}

    every = F.plan(F.FrontierConfig(stages="pretrain,blimp,finetune"), P, arms, Pretrained())
    small = F.plan(F.FrontierConfig(stages="pretrain,blimp,finetune", budgets="1000"), P, arms, Pretrained())
    large = F.plan(F.FrontierConfig(stages="pretrain,blimp,finetune", budgets="2000,4000"), P, arms, Pretrained())
    assert steps(every) == {1000, 2000, 4000} and steps(small) == {1000} and steps(large) == {2000, 4000}
    assert sorted(j["name"] for j in small + large) == sorted(j["name"] for j in every)
    # the second seed: at the smallest budget, for the KBERT arms with second_seed and the best baseline (not kbert-sep
    # nor BERT)
    seed1 = {j["name"] for j in every if j["kind"] == "pretrain" and "/seed1" in j["name"]}
    assert seed1 == {"pt/kbert/s1000/seed1", "pt/kbert-wd/s1000/seed1", "pt/kbert-mask30/s1000/seed1",
                     "pt/modernbert/s1000/seed1/lr0.001"} <= {
        j["name"] for j in small}
    assert {j["lr"] for j in small if j["name"].startswith("pt/modernbert")} == set(P.lrs)
    # --frontier.seed_budgets: the same second seeds at a larger budget too, with their evaluations
    wide = F.plan(F.FrontierConfig(stages="pretrain,blimp,finetune", budgets="2000", seed_budgets="2000"), P, arms,
                  Pretrained())
    assert {j["name"] for j in wide if j["kind"] == "pretrain" and "/seed1" in j["name"]} == {
        "pt/kbert/s2000/seed1", "pt/kbert-wd/s2000/seed1", "pt/kbert-mask30/s2000/seed1",
        "pt/modernbert/s2000/seed1/lr0.001"}
    assert {j["name"] for j in wide if j["kind"] != "pretrain" and "s2000/seed1" in j["name"]} >= {
        "blimp/kbert-wd/s2000/seed1", "ft/rte/modernbert/s2000/seed1/lr0.001", "ft/rte/kbert-wd/s2000/seed1/flr0.006"}
    assert not [j for j in large if "/seed1" in j["name"]]  # without it, none past the smallest budget
    with pytest.raises(SystemExit, match="--frontier.seed_budgets '3000'.*1000,2000,4000"):
        F.budget_list(F.FrontierConfig(seed_budgets="3000"), P, "seed_budgets")
    for bad in ("1500", "x", ","):
        with pytest.raises(SystemExit, match="--frontier.budgets .*1000,2000,4000"):
            F.budget_list(F.FrontierConfig(budgets=bad), P)
    # a baseline whose sweep is unfinished gets nothing at the larger budgets: named, so the user is told why
    class Unswept(Pretrained):
        def result(self, name):
            return None if name.startswith("pt/modernbert/s1000/seed0/") else super().result(name)

    assert not any(j["name"].startswith("pt/modernbert") for j in F.plan(
        F.FrontierConfig(stages="pretrain,blimp,finetune", budgets="2000,4000"), P, arms, Unswept()))
    assert F.waiting_for_sweep(F.FrontierConfig(budgets="2000,4000"), P, arms, Unswept()) == ["modernbert"]
    for budgets, store in (("1000,2000", Unswept()), ("", Unswept()), ("2000,4000", Pretrained())):
        assert F.waiting_for_sweep(F.FrontierConfig(budgets=budgets), P, arms, store) == []


def test_the_floor_scores_each_initial_model_once_before_the_budgets():
    """--frontier.floor plans each distinct initial model (0 steps, the first seed) with BLiMP and
    the whole finetuning sweep, ahead of the budgets' runs: arms that differ only in training or
    data share kbert's (named after it, whichever of them a process is given); no U-net skips is
    another model; a baseline's floor needs no lr."""
    P = F.PRESETS["cpu"]
    arms = [F.ARM_BY_NAME[a] for a in ("kbert-wd", "kbert-sep", "kbert-mask30", "kbert-nounet", "modernbert", "bert")]

    class Pretrained:  # every pretraining run finished, each baseline's sweep best at 1e-3
        def result(self, name):
            return {"final_val_loss": 4.0 if name.endswith("lr0.001") else 5.0} if name.startswith("pt/") else None

    cfg = F.FrontierConfig(stages="pretrain,blimp,finetune", budgets="2000", floor=True)
    jobs = F.plan(cfg, P, arms, Pretrained())
    names = [j["name"] for j in jobs]
    floors = [j for j in jobs if j["kind"] == "pretrain" and j["steps"] == 0]
    assert [j["name"] for j in floors] == ["pt/kbert/s0/seed0", "pt/modernbert/s0/seed0", "pt/bert/s0/seed0",
                                           "pt/kbert-nounet/s0/seed0"]
    assert all("lr" not in j for j in floors)
    assert names.index("pt/kbert-nounet/s0/seed0") < names.index("pt/kbert-wd/s2000/seed0")
    for pt in ("kbert/s0/seed0", "modernbert/s0/seed0"):
        assert {f"blimp/{pt}", f"ft/rte/{pt}", f"ft/cola/{pt}/flr0.006"} <= set(names)
    assert not [j for j in F.plan(dataclasses.replace(cfg, floor=False), P, arms, Pretrained()) if "/s0/" in j["name"]]


def test_a_report_plans_the_second_seeds_it_finds_stored(tmp_path):
    """A report's counts and core-hours follow its plan: a second pretraining seed stored past the
    smallest budget puts that budget among the seeded ones, without --frontier.seed_budgets."""
    P = F.PRESETS["cpu"]
    key = {"config": {"pretrain": {"d": 1}, "eval": {"e": 1}}, "data": "d", "code": {"pretrain": "p", "eval": "v"}}
    store = F.Store(str(tmp_path), key, "refuse")

    def pretrained(arm, steps, seed, lr=None):
        store.save({"name": F.job_name(arm, steps, seed, lr), "kind": "pretrain", "arm": arm, "steps": steps,
                    "seed": seed, "after": []}, {"final_val_loss": 4.0})

    pretrained("kbert-wd", 1000, 1)  # the smallest budget's second seeds are planned anyway
    pretrained("kbert-wd", 2000, 0)
    pretrained("modernbert", 4000, 0, 1e-3)
    assert F.stored_seed_budgets(store, P) == []
    pretrained("modernbert", 4000, 1, 1e-3)
    assert F.stored_seed_budgets(store, P) == [4000]
    pretrained("kbert-wd", 2000, 1)
    assert F.stored_seed_budgets(store, P) == [2000, 4000]


@pytest.mark.parametrize("on_change", ["refuse", "keep", "redo"])
def test_an_evaluation_of_a_model_pretrained_again_is_run_again(tmp_path, on_change):
    """When a pretraining run is made again (--frontier.on_change redo), every evaluation stored
    for its earlier model stops counting, whatever on_change says: a record never pairs one
    model's loss with another model's scores. Evaluations stored before models carried a stamp
    count only if they finished after their model."""
    key = {"config": {"pretrain": {"d": 1}, "eval": {"e": 1}}, "data": "d", "code": {"pretrain": "p", "eval": "v"}}
    store = F.Store(str(tmp_path), key, on_change)
    pt = {"name": "pt/kbert/s1000/seed0", "kind": "pretrain", "arm": "kbert", "steps": 1000, "seed": 0, "after": []}
    ft = {"name": "ft/rte/kbert/s1000/seed0", "kind": "finetune", "task": "rte", "pretrained": pt["name"],
          "after": [pt["name"]]}

    def model():  # the stamp an evaluation takes when it reads its model folder
        return F.Store.stamp(store.load(pt["name"]))

    store.save(pt, {"final_val_loss": 4.0})
    store.save(ft, {"per_seed": {"0": {"accuracy": 50.0}}}, model())
    assert store.status(ft) == "done" and store.result(ft["name"]) is not None
    store.save(pt, {"final_val_loss": 4.1})  # the model, pretrained again
    assert store.status(pt) == "done" and store.status(ft) == "redo" and store.result(ft["name"]) is None
    store.save(ft, {"per_seed": {"0": {"accuracy": 55.0}}}, model())
    assert store.status(ft) == "done" and store.result(ft["name"])["per_seed"]["0"]["accuracy"] == 55.0
    # an evaluation that read its model before the model was made again carries the old stamp
    read = model()
    store.save(pt, {"final_val_loss": 4.2})
    store.save(ft, {"per_seed": {"0": {"accuracy": 60.0}}}, model_stamp=read)
    assert store.status(ft) == "redo"
    store.save(ft, {"per_seed": {"0": {"accuracy": 55.0}}}, model())

    def legacy(finished):  # an evaluation stored without its model's stamp, finished at `finished`
        stored = store.load(ft["name"])
        stored.pop("pretrained_run", None)
        stored["finished"] = finished
        json.dump(stored, open(store.path(ft["name"]), "w"))

    made = store.load(pt["name"])["finished"]
    legacy("2000-01-01T00:00:00")
    assert store.status(ft) == "redo"
    legacy(made)
    assert store.status(ft) == "done"
    stored = store.load(pt["name"])  # a model stored before stamps: its finishing time is its stamp
    del stored["run"]
    json.dump(stored, open(store.path(pt["name"]), "w"))
    store.save(ft, {"per_seed": {"0": {"accuracy": 55.0}}}, model())
    assert store.load(ft["name"])["pretrained_run"] == made and store.status(ft) == "done"


def test_document_masks_keep_documents_apart_and_restart_positions():
    ids = torch.tensor([[CLS_ID, 5, 6, CLS_ID, 7, 8, 9, PAD_ID]])
    mask, pos = B.document_masks(ids)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert mask[0, 0, 1].tolist() == [True, True, True, False, False, False, False, False]
    assert mask[0, 0, 7].tolist() == [False] * 7 + [True]  # [PAD] only sees [PAD]
    local, _ = B.document_masks(ids, local=1)
    assert local[0, 0, 4].tolist() == [False, False, False, True, True, True, False, False]


@pytest.mark.parametrize("recipe", ["modernbert", "bert"])
def test_a_packed_document_gives_the_outputs_it_gives_alone(recipe):
    """Each baseline on a row of three documents (the middle one longer than ModernBERT's
    sliding window): the middle document's hidden states equal those of the document alone,
    and differ once the document masks are dropped (what the comparison must never do)."""
    torch.manual_seed(0)
    model = B.build(recipe, 64, 3, 512).eval()
    g = torch.Generator().manual_seed(1)
    doc = torch.cat([torch.tensor([CLS_ID]), torch.randint(0, 50000, (199,), generator=g)])
    row = torch.cat([torch.tensor([CLS_ID]), torch.randint(0, 50000, (56,), generator=g), doc,
                     torch.tensor([CLS_ID]), torch.randint(0, 50000, (80,), generator=g)])[None]
    with torch.no_grad():
        packed = B.hidden_states(model, recipe, row)[0, 57:257]
        alone = B.hidden_states(model, recipe, doc[None])[0]
        leaky = B.hidden_states(model, recipe, row, doc_masks=False)[0, 57:257]
        # the training loss the frontier uses, on labels inside the middle document only
        labels_row, labels_doc = torch.full_like(row, -100), torch.full_like(doc[None], -100)
        labels_row[0, 60:250:7] = row[0, 60:250:7]
        labels_doc[0, 3:193:7] = doc[3:193:7]
        loss_packed, n = B.mlm_loss_sum(model, recipe, row, labels_row)
        loss_alone, m = B.mlm_loss_sum(model, recipe, doc[None], labels_doc)
        loss_leaky, _ = B.mlm_loss_sum(model, recipe, row, labels_row, doc_masks=False)
    err = (packed - alone).abs().max().item()
    print(f"{recipe}: packed vs alone max abs diff {err:.2e}; without document masks {(leaky - alone).abs().max():.2e}; "
          f"loss {loss_packed.item():.6f} vs {loss_alone.item():.6f}")
    assert err < 1e-4 and n == m and abs(loss_packed.item() - loss_alone.item()) < 5e-5
    assert abs(loss_leaky.item() - loss_alone.item()) > 5e-4
    assert (leaky - alone).abs().max() > 1e-3 > 100 * err  # at init attention moves the outputs little, but clearly


def test_sep_at_end_puts_one_sep_after_every_document():
    """trainer.PackedLoader with sep_at_end: each document's tokens, then [SEP], across row
    boundaries (a [SEP] that lands in the next row opens it behind a [CLS]); the ordinary
    tokens come in the same order as without."""
    import trainer

    rng = np.random.default_rng(0)
    docs = [np.concatenate([[CLS_ID], rng.integers(0, 50000, n)]) for n in (5, 30, 11, 62, 3, 40)]
    tmp = pytest.importorskip("tempfile").mkdtemp()
    path = f"{tmp}/s_000000.bin"
    write_shard(path, np.concatenate(docs))
    plain = trainer.PackedLoader([path], 16, shuffle=False, loop=False)
    sep = trainer.PackedLoader([path], 16, shuffle=False, loop=False, sep_at_end=True)
    rows = {k: [] for k in ("plain", "sep")}
    for name, loader in (("plain", plain), ("sep", sep)):
        while not loader.exhausted:
            rows[name].append(loader.next_sequence())
    flat = {k: np.concatenate(v) for k, v in rows.items()}
    ordinary = {k: v[v < CLS_ID] for k, v in flat.items()}
    assert np.array_equal(ordinary["plain"], ordinary["sep"])
    assert (flat["sep"] == SEP_ID).sum() == len(docs) and (flat["plain"] == SEP_ID).sum() == 0
    # every [SEP] follows its document's last token (or opens a row behind a [CLS])
    stream = [t for t in flat["sep"] if t != PAD_ID]
    ends = [i for i, t in enumerate(stream) if t == SEP_ID]
    for i in ends:
        assert stream[i - 1] < CLS_ID or (stream[i - 1] == CLS_ID and i % 16 == 1)
    shutil.rmtree(tmp)


@pytest.fixture
def smoke(tmp_path):
    """A toy corpus (jsonl documents, built by the corpus stage) and the smoke preset's paths."""
    rng = np.random.default_rng(0)
    words = "the a cat dog runs sleeps over under big small red blue and or it was is".split()
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(160):
            f.write(json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(20, 120))))}) + "\n")
    return ["--frontier.preset", "smoke", "--frontier.corpus", str(tmp_path / "corpus" / "toy"),
            "--frontier.corpus_files", str(tmp_path / "docs.jsonl"), "--frontier.val_permille", "200",
            "--frontier.work_dir", str(tmp_path / "work"), "--frontier.out", str(tmp_path / "record"),
            "--frontier.stages", "corpus,pretrain,report"]


def test_smoke_frontier_is_fair_and_resumable(smoke, tmp_path, tok, capsys, monkeypatch):
    report = F.main(smoke)
    P = F.PRESETS["smoke"]
    entries = report["entries"]
    runs = {p.name: json.loads(p.read_text()) for p in (tmp_path / "record" / "runs").glob("pt__*.json")}
    pretrain = [r["result"] for r in runs.values()]
    # every arm, every budget; a second seed at the smallest for KBERT and the best baseline; the baselines'
    # sweeps bracket their best
    best = min((e for e in entries if e["recipe"] != "kbert" and e["budget_steps"] == P.budgets[0]),
               key=lambda e: e["final_val_loss"])["arm"]
    assert {(e["arm"], e["budget_steps"], e["seed"]) for e in entries} == {
        (a.name, b, 0) for a in F.ARMS for b in P.budgets} | {("kbert", P.budgets[0], 1), (best, P.budgets[0], 1)}
    for e in entries:
        if e["recipe"] != "kbert":  # bracketed, or the sweep went as far as it may (3 steps: the largest lr wins)
            lrs = [s["lr"] for s in e["sweep"]]
            assert len(lrs) >= 3 and (min(lrs) < e["lr"] < max(lrs) or e["lr"] > 20 * max(P.lrs)), (e["arm"], lrs)
        assert np.isfinite(e["final_val_loss"]) and e["flops"] > 0 and e["tokens"] == e["budget_steps"] * P.batch_seqs * P.seq_len
        assert e["unigram_loss"] == report["unigram"]["unigram_loss"] > 0
    # the same validation rows and masks for every run; the same token stream in the same order
    assert len({r["val_digest"] for r in pretrain}) == 1
    assert len({r["ordinary_digest"] for r in pretrain}) == 1
    no_sep = [r["result"] for n, r in runs.items() if "kbert-sep" not in n]
    for steps in P.budgets:  # the same rows, [PAD] and all, for every arm without [SEP] at one budget
        same = {r["data_digest"] for r in no_sep if r["curve"][-1]["step"] == steps}
        assert len(same) == 1, steps
    results_table = (tmp_path / "record" / "results.md").read_text().split("Core-hours")[0]
    assert results_table.count("| kbert |") == 2 * (len(P.budgets) + 1)  # the full table and README's short one
    # each pretraining seed's runs are measured against the best baseline of that seed (the second seed too)
    assert all(e["best_baseline"]["arm"] == best for e in entries if e["seed"] == 1)
    # budget by budget: every run of the smallest budget finished before any of the next
    finished = sorted((r["finished"], r["result"]["curve"][-1]["step"]) for r in runs.values())
    assert [s for _, s in finished] == sorted(s for _, s in finished)
    pytest.importorskip("matplotlib", reason="the plot is a benchmark-only dependency")
    assert (tmp_path / "record" / "frontier.png").stat().st_size > 10_000
    # resumable: the same command reruns nothing
    capsys.readouterr()
    F.main(smoke)
    assert "== pt/" not in capsys.readouterr().out
    # a process given a subset of the arms keeps the record's best baseline: no second seed for the other one
    other = next(a.name for a in F.ARMS if a.recipe not in ("kbert", F.ARM_BY_NAME[best].recipe))
    F.main(smoke + ["--frontier.arms", f"kbert,{other}"])
    assert "== pt/" not in capsys.readouterr().out
    # a changed config is refused, or kept / redone when asked; the finetuning protocol keys only the evaluations
    changed = smoke + ["--frontier.glue_dir", str(tmp_path)]
    F.main(changed)
    assert "== pt/" not in capsys.readouterr().out
    monkeypatch.setitem(F.PRESETS, "smoke", dataclasses.replace(P, val_seqs=3))
    with pytest.raises(SystemExit, match="made with another config.*--frontier.on_change keep"):
        F.main(smoke)
    F.main(smoke + ["--frontier.on_change", "keep"])
    assert "== pt/" not in capsys.readouterr().out
    # a run added to an arm whose stored runs trained with other settings is refused before its first step
    monkeypatch.setitem(F.ARM_BY_NAME, "kbert", dataclasses.replace(F.ARM_BY_NAME["kbert"], train=(("weight_decay", 0.2),)))
    added = F.job_name("kbert", P.budgets[1], 1, None)
    F.main(smoke + ["--frontier.on_change", "keep", "--frontier.arms", "kbert", "--frontier.stages", "pretrain",
                    "--frontier.seed_budgets", str(P.budgets[1])])
    out = capsys.readouterr().out
    assert f"!! {added} failed" in out and "trained with train.weight_decay 0.05 (now 0.2)" in out, out[-2000:]
    assert not (tmp_path / "record" / "runs" / (added.replace("/", "__") + ".json")).exists()
    assert not (tmp_path / "record" / "logs" / (added.replace("/", "_") + ".txt")).exists()


def test_a_run_is_refused_when_its_arms_stored_runs_trained_with_other_settings(tmp_path):
    """recipe_change compares trainer.py's config less each run's own seed, steps and names (the
    model's windows clipped to the sequence, as trainer.py clips them) with the arm's stored runs
    that count: not another arm's, not a floor's, not one on_change redo will make again."""
    def header(wd=0.0, **train):
        return {"config": {"train": {"run_id": "a", "seed": 0, "steps": 10, "export_dir": "x", "weight_decay": wd,
                                     "global_window_end": 8192, **train},
                           "data": {"seq_len": 512}, "model": {"global_window": 8192, "local_window": 128}}}

    assert F.recipe(header(run_id="b", seed=1, steps=20, export_dir="y")) == F.recipe(header())
    assert F.recipe(header())["model.global_window"] == 512 and F.recipe(header())["train.global_window_end"] == 8192
    assert F.recipe({"lr": 1e-3, "recipe_settings": {"betas": [0.9, 0.98], "clip": 0.0}}) == {"betas": [0.9, 0.98], "clip": 0.0}
    key = {"config": {"pretrain": {"d": 1}, "eval": {"e": 1}}, "data": "d", "code": {"pretrain": "p", "eval": "v"}}

    def stored(store, arm, steps, wd):
        job = {"name": F.job_name(arm, steps, 0, None), "kind": "pretrain", "arm": arm, "steps": steps, "seed": 0}
        log = tmp_path / "logs" / (job["name"].replace("/", "_") + ".txt")
        log.parent.mkdir(exist_ok=True)
        log.write_text(json.dumps(header(wd)) + "\n")
        store.save(job, {"final_val_loss": 4.0, "log": os.path.relpath(log, tmp_path)})

    new = {"name": "pt/kbert/s2000/seed1", "arm": "kbert", "steps": 2000, "seed": 1}
    store = F.Store(str(tmp_path), key, "keep")
    stored(store, "kbert", 0, 0.05)  # a floor trains nothing: its settings do not count
    stored(store, "kbert-wd", 1000, 0.0)  # another arm
    assert F.recipe_change(store, new, header(0.05)) is None
    stored(store, "kbert", 1000, 0.0)
    why = F.recipe_change(store, new, header(0.05))
    assert "pt/kbert/s1000/seed0" in why and "train.weight_decay 0.0 (now 0.05)" in why
    assert F.recipe_change(store, new, header(0.0)) is None
    assert F.recipe_change(store, {**new, "steps": 0}, header(0.05)) is None  # a floor of its own
    assert "train.new_option '<absent>' (now 1)" in F.recipe_change(store, new, header(0.0, new_option=1))
    other_code = {**key, "code": {"pretrain": "q", "eval": "v"}}  # redo makes the stored run again: it does not count
    assert F.recipe_change(F.Store(str(tmp_path), other_code, "redo"), new, header(0.05)) is None
    assert F.recipe_change(F.Store(str(tmp_path), other_code, "keep"), new, header(0.05)) is not None


def test_a_run_that_reads_other_rows_or_masks_changes_its_digests(smoke, tmp_path, monkeypatch, tok):
    """What the fairness assertions above rest on: an arm that read its rows in another order
    or was scored on other masks would record other digests."""
    F.main(smoke + ["--frontier.arms", "kbert", "--frontier.stages", "corpus"])  # the corpus only
    files = F.corpus_files(str(tmp_path / "corpus" / "toy"))
    P = F.PRESETS["smoke"]
    a, b = F.Stream(files[0], P.seq_len), F.Stream(files[0], P.seq_len)
    a.next_batch(2), a.next_batch(2)
    b.loader.next_batch(2)  # b skips two rows: another order
    b.next_batch(2), b.next_batch(2)
    assert a.digest() != b.digest() and a.ordinary_digest() != b.ordinary_digest()
    v1 = F.validation_set(files[1], P, torch.device("cpu"))
    monkeypatch.setattr(F, "VAL_SEED", 7)
    v2 = F.validation_set(files[1], P, torch.device("cpu"))
    assert v1[2] != v2[2]


def test_smoke_evaluations_run_every_arm_through_one_finetuner_protocol(smoke, tmp_path, tok, capsys):
    """BLiMP and finetuning stages at smoke size for KBERT and ModernBERT: the same finetuner.py
    command for a KBERT export and a transformers folder, per-seed metrics stored, GLUE-small
    and BLiMP in the report."""
    rng = np.random.default_rng(1)
    glue = tmp_path / "glue_data"
    words = "the a cat dog runs sleeps big small red blue".split()

    def sentence():
        return " ".join(rng.choice(words, int(rng.integers(3, 9))))

    for task in ("rte", "stsb"):
        (glue / "glue" / task).mkdir(parents=True)
        for split, n in (("train", 24), ("validation", 12)):
            rows = [{"sentence1": sentence(), "sentence2": sentence(), "idx": i,
                     "label": int(i % 2) if task == "rte" else float(i % 5)} for i in range(n)]
            (glue / "glue" / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(tmp_path / "blimp.jsonl", "w") as f:
        for i, (good, bad) in enumerate([("The cat sleeps.", "The cat sleep."), ("Dogs bark.", "Dogs barks."),
                                         ("She has left.", "She have left."), ("They were here.", "They was here.")]):
            f.write(json.dumps({"UID": f"p{i % 2}", "field": "syntax", "linguistics_term": "agreement", "pairID": str(i),
                                "sentence_good": good, "sentence_bad": bad}) + "\n")
    args = smoke + ["--frontier.arms", "kbert,modernbert", "--frontier.glue_dir", str(glue),
                    "--frontier.blimp_file", str(tmp_path / "blimp.jsonl"),
                    "--frontier.stages", "corpus,pretrain,blimp,finetune,report", "--frontier.floor", "true"]
    report = F.main(args)
    P = F.PRESETS["smoke"]
    seeds = P.finetune.seeds.split(",")
    # the floor: each recipe's model as initialized, scored like the pretrained ones and shown as such
    floors = [e for e in report["entries"] if e["budget_steps"] == 0]
    assert [(e["arm"], e["tokens"], e["flops"], e["lr"]) for e in floors] == [("kbert", 0, 0, None), ("modernbert", 0, 0, None)]
    assert all(e["final_val_loss"] > e["unigram_loss"] and "token_ratio" not in e for e in floors)
    md = (tmp_path / "record" / "results.md").read_text()
    assert md.count("initialization (no pretraining)") == 2
    # against the floor: an arm's model as initialized, then each budget's pretraining seeds
    glue = [", ".join(f"{e['glue_small']['median']:.1f}" for e in sorted(report["entries"], key=lambda e: e["seed"])
                      if e["arm"] == "modernbert" and e["budget_steps"] == b) for b in [0, *P.budgets]]
    assert "| modernbert | " + " / ".join(glue) + " | " in md.split("Against the floor")[1]
    for e in report["entries"]:
        assert e["tasks"].keys() == set(P.finetune.tasks), e["arm"]
        assert all(set(per) == set(seeds) for per in e["tasks"].values())
        assert e["glue_small"]["min"] <= e["glue_small"]["median"] <= e["glue_small"]["max"]
        assert 0 <= e["blimp"] <= 1
    runs = sorted(p.name for p in (tmp_path / "record" / "runs").glob("ft__*.json"))
    assert len(runs) == len(report["entries"]) * len(P.finetune.tasks)
    stored = [json.loads(p.read_text())["result"] for p in (tmp_path / "record" / "runs").glob("*.json")]
    assert all(r["threads"] == torch.get_num_threads() and r["cpu"] == common.cpu_name() for r in stored)
    logs = list((tmp_path / "record" / "logs" / "finetune").glob("*.txt"))
    assert len(logs) == len(runs) and all("validation" in p.read_text() for p in logs)
    # a report alone counts every run of the record, evaluations included, and the core-hours of each kind
    # (the floors it finds stored, without --frontier.floor; their hours apart)
    alone = F.main([x if x != "corpus,pretrain,blimp,finetune,report" else "report" for x in args[:-2]])
    assert alone["runs_done"] == alone["runs_planned"] == report["runs_planned"] > len(runs)
    assert [e["budget_steps"] for e in alone["entries"]].count(0) == 2
    assert set(alone["core_hours"]) == {"kbert", "modernbert", "kbert (initialization)", "modernbert (initialization)"}
    assert all(min(h.values()) > 0 for h in alone["core_hours"].values()), alone["core_hours"]
    # a model folder lost with the work folder (not part of the record): its next evaluation fails, saying how to remake it
    runs_dir = tmp_path / "record" / "runs"
    shutil.rmtree(json.loads((runs_dir / "pt__kbert__s6__seed0.json").read_text())["result"]["model"])
    (runs_dir / "ft__rte__kbert__s6__seed0.json").unlink()
    F.main(args)
    failed = (runs_dir / "ft__rte__kbert__s6__seed0.failed").read_text()
    assert "model folder" in failed and "--frontier.arms kbert --frontier.budgets 6" in failed
    assert "--frontier.rebuild true" in failed
    # --frontier.rebuild true pretrains it again (in a scratch folder) and, as it ends exactly as stored, the evaluation runs
    made = runs_dir / "pt__kbert__s6__seed0.json"
    stored = json.loads(made.read_text())
    F.main(args + ["--frontier.rebuild", "true"])
    assert json.loads((runs_dir / "ft__rte__kbert__s6__seed0.json").read_text())["result"]["rebuilt_model_s"] > 0
    assert os.path.isdir(stored["result"]["model"]) and not list((tmp_path / "work" / "rebuild").iterdir())
    assert "val_loss" in (tmp_path / "record" / "logs" / "rebuild" / "pt_kbert_s6_seed0.txt").read_text()
    assert json.loads(made.read_text()) == stored  # its stored run stands, and with it every other evaluation
    # one that does not end as stored (here: a stored run of other code, kept) is refused and leaves no model behind;
    # it is tried once, not once for each of its evaluations
    shutil.rmtree(stored["result"]["model"])
    (runs_dir / "ft__rte__kbert__s6__seed0.json").unlink()
    (runs_dir / "ft__stsb__kbert__s6__seed0.json").unlink()
    capsys.readouterr()
    made.write_text(json.dumps(stored | {"key": stored["key"] | {"code": "other"},
                                         "result": stored["result"] | {"final_val_loss": 9.5}}))
    F.main(args + ["--frontier.rebuild", "true", "--frontier.on_change", "keep"])
    failed = (runs_dir / "ft__rte__kbert__s6__seed0.failed").read_text()
    assert "pretrained again ends at validation loss" in failed and "not at its stored 9.5" in failed
    assert capsys.readouterr().out.count("== rebuilding pt/kbert/s6/seed0") == 1
    assert not os.path.exists(stored["result"]["model"])
    # pretrained anew as the refusal says (its stored run removed, the command rerun; on_change redo would not remake
    # a run stored under today's key): a new model, and every one of its evaluations runs again on it
    assert f"pretrain it anew: remove {made} and rerun with --frontier.arms kbert --frontier.budgets 6" in failed
    made.unlink()
    F.main(args)
    again = json.loads(made.read_text())
    assert again["run"] != stored["run"] and os.path.isdir(again["result"]["model"])
    evaluations = [json.loads(p.read_text()) for p in runs_dir.glob("*__kbert__s6__seed0*.json") if p != made]
    assert len(evaluations) == 1 + len(P.finetune.tasks)
    assert all(e["pretrained_run"] == again["run"] for e in evaluations)
    second = {"name": "pt/kbert/s6/seed1", "arm": "kbert", "steps": 6, "seed": 1}  # a second seed needs its seed budget
    assert F.anew(second, F.Store(str(tmp_path / "record"), {}, "refuse"), P).endswith(
        "pt__kbert__s6__seed1.json and rerun with --frontier.arms kbert --frontier.budgets 6 --frontier.seed_budgets 6")
