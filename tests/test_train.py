"""End-to-end tests of `python -m train` on small generated image-folder datasets (real image files).

Run from the repository root: `python -m pytest tests/test_train.py`. Every training run uses 32x32 images, one
thread per process and (except the paper-preset test) a narrow BinaryDNet53, so the whole file takes a couple of
minutes on a shared 2-core CPU.
"""
import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from train import data as D
from train.cli import main
from train.losses import DistillationLoss, WeightedLargeMarginLoss, class_weights_from, image_complexity_score
from train.metrics import classification_metrics, fairness_metrics
from train.stats import confusion_chi2_test, mcnemar_test, paired_t_test
from train.synthetic import make_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = json.dumps({"stem_channels": 8, "widths": [16, 32, 64], "fusion_channels": 16, "feature_dim": 64})
COMMON = ["--image-size", "32", "--batch-size", "16", "--threads", "1", "--no-progress", "--latency-runs", "3",
          "--model-kwargs", TINY]
CLASSES = ["Mpox", "Chickenpox", "Measles", "Healthy"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread_and_restore():
    """Training sets deterministic algorithms process-wide; put back what other test files expect."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)


def run(*argv):
    assert main([str(a) for a in argv]) == 0


def load(path):
    with open(path) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def split_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    run("make-synthetic", root, "--layout", "split", "--per-class", 12, "--size", 32, "--corrupt", 1,
        "--classes", ",".join(CLASSES))
    return str(root)


@pytest.fixture(scope="module")
def msld_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("msld")
    make_synthetic(str(root), "msld", CLASSES, per_class=10, size=32, folds=2, seed=1, ext=".jpg")
    return str(root)


@pytest.fixture(scope="module")
def trained(split_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    run("fit", split_data, "--out", out, "--name", "fit", "--epochs", 2,
        "--subgroups", os.path.join(split_data, "subgroups.csv"), *COMMON)
    return os.path.join(out, "fit")


# ------------------------------------------------------------------------------------------ data

def test_layouts_case_insensitive_and_splits(tmp_path, msld_data):
    s = D.load_splits(msld_data, fold=2)
    assert s.layout == "msld" and s.classes == sorted(CLASSES, key=str.lower)
    assert len(s.train) and len(s.val) and len(s.test)
    assert all("Fold2" in x.path for x in s.train + s.val + s.test)
    # the same tree with every folder name in another case
    lower = tmp_path / "lower"
    shutil.copytree(msld_data, lower)
    for dirpath, dirnames, _ in os.walk(lower, topdown=False):
        for d in dirnames:
            os.rename(os.path.join(dirpath, d), os.path.join(dirpath, d.upper() if d == "Original Images"
                                                             else d.lower()))
    s2 = D.load_splits(str(lower), fold=2)
    assert s2.layout == "msld" and [c.lower() for c in s2.classes] == [c.lower() for c in s.classes]
    assert (len(s2.train), len(s2.val), len(s2.test)) == (len(s.train), len(s.val), len(s.test))
    # training-only extra images (MSLD's augmented tree of the same fold): train grows, val/test do not
    aug = tmp_path / "aug"
    make_synthetic(str(aug), "msld", CLASSES, per_class=5, size=16, folds=2, seed=7)
    os.rename(aug / "Original Images", aug / "Augmented Images")
    for k in (1, 2):
        os.rename(aug / "Augmented Images" / f"Fold{k}", aug / "Augmented Images" / f"fold{k}_AUG")
    for dirpath, _, files in os.walk(aug / "Augmented Images"):   # names unrelated to the originals' names
        for f in files:
            os.rename(os.path.join(dirpath, f), os.path.join(dirpath, "other_" + f))
    e = D.load_splits(msld_data, fold=2, extra_train=str(aug))
    assert len(e.train) == len(s.train) + 4 * 4 and [x.path for x in e.test] == [x.path for x in s.test]
    assert all("fold2_AUG" in x.path for x in e.train[len(s.train):])
    # binary task: Mpox against the rest, positive = label 1
    b = D.load_splits(msld_data, task="binary")
    assert b.classes == ["Non-Mpox", "Mpox"]
    assert sum(x.label for x in b.test) == sum(1 for x in b.test if "/Mpox/" in x.path)
    # "Training/Testing" names, given validation kept as is
    tt = tmp_path / "tt"
    make_synthetic(str(tt), "split", CLASSES[:2], per_class=6, size=16)
    os.rename(tt / "train", tt / "Training")
    os.rename(tt / "test", tt / "Testing")
    s3 = D.load_splits(str(tt), val_mode="given")
    assert s3.layout == "split" and len(s3.val) == 2 * 2 and len(s3.test) == 2 * 2
    # single folder: stratified split by the seed, reproducible, disjoint
    single = tmp_path / "single"
    make_synthetic(str(single), "single", CLASSES, per_class=10, size=16)
    a1, a2 = D.load_splits(str(single), split_seed=3), D.load_splits(str(single), split_seed=3)
    assert [x.path for x in a1.test] == [x.path for x in a2.test]
    paths = [x.path for x in a1.train + a1.val + a1.test]
    assert len(paths) == len(set(paths)) == 40
    assert a1.counts("test") == {c: 2 for c in a1.classes}


def test_clear_errors(tmp_path, split_data):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    with pytest.raises(D.DataError, match="(?s)could not recognise the dataset layout.*Found:.*notes"):
        D.load_splits(str(tmp_path))
    typo = tmp_path / "typo"
    make_synthetic(str(typo), "split", CLASSES[:2], per_class=4, size=8)
    os.rename(typo / "train", typo / "trian")                       # val/ and test/ but no train/
    with pytest.raises(D.DataError, match=r"(?s)no train/ \(or training/\) folder.*found test, val.*trian/"):
        D.load_splits(str(typo))
    shutil.rmtree(typo / "val")
    shutil.rmtree(typo / "test")                                    # folders of class folders are not classes
    with pytest.raises(D.DataError, match="(?s)could not recognise.*trian/"):
        D.load_splits(str(typo))
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_splits(str(tmp_path / "missing"))
    bad = tmp_path / "empty_class"
    shutil.copytree(split_data, bad)
    (bad / "train" / "Cowpox").mkdir()
    with pytest.raises(D.DataError, match=r"(?s)empty class folder\(s\) \[.cowpox.\].*images per class"):
        D.load_splits(str(bad))
    with pytest.raises(D.DataError, match="no Mpox/Monkeypox class"):
        D.find_positive_class(["cat", "dog"])
    # the CLI turns them into a message and exit code 2, not a traceback
    assert main(["fit", str(tmp_path), "--threads", "1"]) == 2


def test_corrupt_image_is_skipped_not_fatal(split_data):
    samples = D.load_splits(split_data).train
    good, bad = D.verify_images(samples)
    assert len(bad) == 1 and bad[0][0].endswith("corrupt_0.png") and len(good) == len(samples) - 1
    # at load time too (if a file goes bad after the check): None, dropped by the collate function
    tf = D.build_transform(32, "minmax", train=False)
    ds = D.ImageListDataset([s for s in samples if "corrupt" in s.path] + good[:2], tf)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        x, y, idx, skipped = D.collate_skip([ds[i] for i in range(3)])
    assert skipped == 1 and x.shape == (2, 3, 32, 32) and idx.tolist() == [1, 2]
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0      # min-max normalisation (paper eq. 1)


def test_gaussian_oversampling():
    samples = [D.Sample(f"a{i}", 0) for i in range(10)] + [D.Sample(f"b{i}", 1) for i in range(3)]
    out = D.oversample_gaussian(samples, 2, 0, seed=0)
    assert sum(s.label == 1 for s in out) == 10 and sum(s.noisy for s in out) == 7
    assert all(s.label == 1 for s in out if s.noisy)


# ------------------------------------------------------------------------------------------ losses / metrics / stats

def test_losses_match_their_equations():
    torch.manual_seed(0)
    logits, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1])
    ics = torch.tensor([0.7, 1.0, 1.2, 0.9, 1.1])
    manual = torch.stack([sum(max(0.0, 10 - logits[n, y[n]] + logits[n, i]) for i in range(4) if i != y[n]) / 4
                          for n in range(5)])
    got = WeightedLargeMarginLoss(10, 1, inputs="logits")(logits, y, ics)
    assert torch.allclose(got, (manual * ics).mean())
    probs = logits.softmax(1)
    got_p = WeightedLargeMarginLoss(10, 1, inputs="probs")(logits, y)
    assert torch.allclose(got_p, ((10 * 3 + 1) / 4 - probs[torch.arange(5), y]).mean(), atol=1e-6)
    feats = torch.tensor([[1.0, 1.0], [3.0, 3.0], [0.1, 0.1], [2.0, 2.0]])
    assert torch.allclose(image_complexity_score(feats, 0.7, 1.2, "batch_mean"),
                          torch.tensor([0.7, 1.2, 0.7, 1.2]))
    assert torch.allclose(image_complexity_score(feats, 0.7, 1.2, "none"), torch.tensor([1.2, 1.2, 0.7, 1.2]))
    t, a = 3.0, 0.3
    teacher = torch.randn(5, 4)
    base = WeightedLargeMarginLoss(10, 1, inputs="logits")
    kd = DistillationLoss(base, a, t)(logits, y, teacher)
    kl = (teacher / t).softmax(1) * ((teacher / t).log_softmax(1) - (logits / t).log_softmax(1))
    assert torch.allclose(kd, (1 - a) * base(logits, y) + a * t * t * kl.sum(1).mean(), atol=1e-6)
    assert class_weights_from("balanced", [10, 30]).tolist() == pytest.approx([2.0, 2.0 / 3.0])
    assert class_weights_from("15,1", [10, 30]).tolist() == [15.0, 1.0]


def test_metrics_and_fairness():
    y = [0, 0, 1, 1, 1, 0]
    p = np.array([[.9, .1], [.4, .6], [.2, .8], [.3, .7], [.6, .4], [.8, .2]])
    m = classification_metrics(y, p, ["Non-Mpox", "Mpox"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision_positive"] == pytest.approx(2 / 3) and m["recall_positive"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[2, 1], [1, 2]]
    assert m["roc_auc"] == pytest.approx(8 / 9)
    assert set(m["per_class"]) == {"Non-Mpox", "Mpox"}
    f = fairness_metrics(y, p.argmax(1), ["g1", "g1", "g1", "g2", "g2", "g2"][:5] + [None], positive_index=1)
    assert f["n_without_group"] == 1 and f["reference_group"] == "g2"       # the smaller group
    assert f["groups"]["g2"]["spd"] == 0.0
    assert f["groups"]["g1"]["spd"] == pytest.approx(2 / 3 - 1 / 2)
    assert 0.0 <= f["fairness_score"] <= 1.0


def test_statistics():
    a, b = [0.95, 0.93, 0.94, 0.92, 0.96], [0.91, 0.90, 0.93, 0.89, 0.93]
    t = paired_t_test(a, b)
    d = np.subtract(a, b)
    assert t["df"] == 4 and t["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(5)))
    y = np.zeros(30, dtype=int)
    pa = np.r_[np.zeros(20), np.ones(10)].astype(int)              # A wrong on 10
    pb = np.r_[np.ones(4), np.zeros(26)].astype(int)               # B wrong on 4 (other images)
    mc = mcnemar_test(y, pa, pb)
    assert (mc["a_right_b_wrong"], mc["a_wrong_b_right"]) == (4, 10)
    assert mc["chi2"] == pytest.approx((abs(4 - 10) - 1) ** 2 / 14)
    # paper Table 4: chi2 = 7.03 with p = 0.07 is the df-3 test of two 2x2 confusion matrices
    from scipy import stats
    assert stats.chi2.sf(7.03, 3) == pytest.approx(0.071, abs=1e-3)
    c = confusion_chi2_test([[50, 5], [7, 38]], [[45, 10], [15, 30]])
    assert c["df"] == 3 and 0 < c["p_value"] < 1


# ------------------------------------------------------------------------------------------ end to end

def assert_accuracy_is_the_confusion_diagonal(m):
    cm = np.array(m["confusion_matrix"])
    assert cm.sum() == m["n"] and m["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())


def test_fit_writes_everything(trained, split_data):
    for f in ("config.json", "best.pt", "last.pt", "log.csv", "metrics.json", "predictions.csv",
              "confusion_matrix.png", "roc.png", "pr.png", "training_curves.png"):
        assert os.path.getsize(os.path.join(trained, f)) > 0, f
    assert os.listdir(os.path.join(trained, "tensorboard"))
    cfg = load(os.path.join(trained, "config.json"))
    assert cfg["preset"] == "default" and cfg["loss"] == "ce" and cfg["scheduler"] == "cosine"
    assert cfg["binary_weight_decay"] == 0.0 and cfg["bn_recalibrate"] and cfg["cache"]
    m = load(os.path.join(trained, "metrics.json"))
    assert m["split"] == "test" and m["n"] == 4 * 2
    for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc", "pr_auc", "per_class",
              "confusion_matrix"):
        assert m[k] is not None, k
    assert_accuracy_is_the_confusion_diagonal(m)
    assert m["data"]["skipped_images"] == 1 and m["data"]["unreadable_files"][0].endswith("corrupt_0.png")
    assert set(m["subgroups"]["groups"]) <= {"light", "medium", "dark"} and "mean_abs_spd" in m["subgroups"]
    lat = m["latency"]
    assert lat["model"]["median_ms"] > 0 and lat["frozen_binary"]["median_ms"] > 0
    assert lat["float_twin"]["median_ms"] > 0
    with open(os.path.join(trained, "log.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_evaluate_and_predict_frozen(trained, split_data, tmp_path, capsys):
    ck = os.path.join(trained, "best.pt")
    run("evaluate", "--checkpoint", ck, "--split", "test", "--eval-out", tmp_path / "ev", "--threads", "1",
        "--no-progress", "--latency-runs", "2")
    run("evaluate", "--checkpoint", ck, "--split", "test", "--frozen", "--eval-out", tmp_path / "evf",
        "--threads", "1", "--no-progress", "--latency-runs", "2")
    a, b = load(tmp_path / "ev" / "metrics.json"), load(tmp_path / "evf" / "metrics.json")
    assert a["accuracy"] == load(os.path.join(trained, "metrics.json"))["accuracy"]
    assert b["frozen"] and b["frozen_vs_unfrozen_agreement"] >= 0.75
    assert b["latency"]["frozen_binary"]["median_ms"] > 0
    capsys.readouterr()
    out_csv = tmp_path / "pred.csv"
    run("predict", os.path.join(split_data, "test"), os.path.join(split_data, "train", "Mpox", "corrupt_0.png"),
        "--checkpoint", ck, "--frozen", "--csv", out_csv, "--threads", "1", "--no-progress")
    with open(out_csv) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and all(r["pred"] in CLASSES for r in rows)
    assert all(abs(sum(float(r[f"prob_{c}"]) for c in CLASSES) - 1) < 1e-3 for r in rows)
    assert "corrupt" not in capsys.readouterr().out


def test_resume_matches_uninterrupted(split_data, tmp_path):
    # a schedule that does not depend on the total number of epochs, so that `--epochs 1` is an interruption
    args = ["--out", tmp_path, "--no-latency", "--seed", "5", "--scheduler", "step", "--lr-step", 1, "--lr-gamma", 0.5,
            "--warmup-epochs", 0,
            *COMMON]
    run("fit", split_data, "--name", "full", "--epochs", 2, *args)
    run("fit", split_data, "--name", "cut", "--epochs", 1, *args)
    run("fit", split_data, "--name", "cut", "--epochs", 2, "--resume", "auto", *args)
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert cut["epoch"] == full["epoch"] == 2 and len(cut["history"]) == 2
    for k, v in full["model"].items():
        assert torch.equal(v, cut["model"][k]), k


def test_cv_and_compare_on_msld_layout(msld_data, tmp_path, capsys):
    common = ["--out", tmp_path, "--epochs", 1, "--folds", 2, "--no-latency", *COMMON]
    run("cv", msld_data, "--name", "a", *common)
    run("cv", msld_data, "--name", "b", "--model", "binary_dnet53_float", "--loss", "ce", *common)
    s = load(tmp_path / "a" / "cv_summary.json")
    assert s["k"] == 2 and [f["fold"] for f in s["folds"]] == [1, 2] and "MSLD" in s["scheme"]
    assert set(s["mean"]) >= {"accuracy", "f1_macro", "roc_auc"}
    accuracies = np.array([f["accuracy"] for f in s["folds"]])
    assert s["mean"]["accuracy"] == pytest.approx(accuracies.mean())
    assert s["std"]["accuracy"] == pytest.approx(accuracies.std(ddof=1))
    capsys.readouterr()
    run("compare", tmp_path / "a", tmp_path / "b", "--names", "binary", "float", "--json", tmp_path / "cmp.json")
    r = load(tmp_path / "cmp.json")
    assert r["paired_t_test"]["df"] == 1 and r["paired_images"] == 2 * 4 * 2
    assert 0 <= r["mcnemar"]["p_value"] <= 1 and 0 <= r["chi_square_confusion"]["p_value"] <= 1
    assert "paired t-test" in capsys.readouterr().out
    # the paper's pairing: t-test from the cv folds, McNemar / chi-square from two final models' test predictions
    fa, fb = (os.path.join(tmp_path, x, "fold1", "predictions.csv") for x in ("a", "b"))
    run("compare", tmp_path / "a", tmp_path / "b", "--predictions", fa, fb, "--json", tmp_path / "cmp2.json")
    r2 = load(tmp_path / "cmp2.json")
    assert r2["paired_images"] == 4 * 2 and r2["paired_t_test"] == r["paired_t_test"]


def test_binary_task_kd_oversampling_two_step(msld_data, tmp_path):
    common = ["--out", tmp_path, "--task", "binary", "--fold", 2, "--no-latency", *COMMON]
    run("fit", msld_data, "--name", "teacher", "--model", "binary_dnet53_float", "--epochs", 1, "--loss", "ce",
        *common)
    run("fit", msld_data, "--name", "student", "--preset", "bnn", "--two-step-epochs", 1, "--epochs", 1,
        "--teacher", tmp_path / "teacher" / "best.pt", "--kd-alpha", 0.5, "--oversample", "gaussian",
        "--class-weights", "balanced", *common)
    m = load(tmp_path / "student" / "metrics.json")
    assert m["classes"] == ["Non-Mpox", "Mpox"] and m["positive_class"] == "Mpox"
    assert m["data"]["train_counts"][0] == m["data"]["train_counts"][1]      # small class topped up
    assert "recall_positive" in m and "specificity" in m
    cfg = load(tmp_path / "student" / "config.json")
    assert cfg["binary_weight_decay"] == 0.0 and cfg["loss"] == "ce"
    with open(tmp_path / "student" / "log.csv") as fh:
        assert [r["phase"] for r in csv.DictReader(fh)] == ["float", "final"]
    groups = torch.load(tmp_path / "student" / "last.pt", weights_only=False)["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) > 5  # binary weights
    assert groups[0]["weight_decay"] == 1e-4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_cpu(split_data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "train", "fit", split_data,
           "--out", str(tmp_path), "--name", "ddp", "--epochs", 2, "--no-latency", "--device", "cpu", *COMMON]
    p = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(tmp_path / "ddp" / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    m = load(tmp_path / "ddp" / "metrics.json")
    assert m["n"] == 4 * 2  # every test image scored once, not once per process
    assert_accuracy_is_the_confusion_diagonal(m)
    assert p.stdout.count("[train] epoch 1/2") == 1          # only rank 0 reports


def test_paper_preset_learns(tmp_path):
    """binary_dnet53 at its paper size with the paper's preset, at 32x32 and for a few epochs, on a learnable
    4-class synthetic task: clearly above the 25% chance level."""
    data = tmp_path / "learn"
    make_synthetic(str(data), "split", CLASSES, per_class=40, size=32, seed=0)
    run("fit", data, "--preset", "paper", "--out", tmp_path, "--name", "paper", "--image-size", 32, "--epochs", 6,
        "--batch-size", 16, "--threads", 1, "--no-progress", "--no-latency")
    m = load(tmp_path / "paper" / "metrics.json")
    cfg = load(tmp_path / "paper" / "config.json")
    assert cfg["model"] == "binary_dnet53" and cfg["model_kwargs"] == {} and cfg["preset"] == "paper"
    assert cfg["lr"] == 0.003 and cfg["loss"] == "wlm" and cfg["lr_gamma"] == 0.01 and cfg["normalize"] == "minmax"
    # Chance is 0.25 (32 test images: 13 or more right by chance has probability 4%). Twelve training seeds gave
    # 0.44-0.81 here, and a float-rounding change in any op moves a seed within that range.
    assert m["accuracy"] >= 0.4, m["accuracy"]


# ------------------------------------------------------------------------------------------ issue 16: small real data

HYMENOPTERA = os.path.join(os.path.dirname(ROOT), "shared", "data", "hymenoptera")


def test_small_split_gets_enough_steps_and_schedule(tmp_path):
    """A split of 90 training images: the adaptive batch gives 9 steps of 10 images (the old rule, batch 64 with
    drop_last, gave one step of 64), every image is seen every epoch, and the schedule is in optimizer steps."""
    from train.config import Config
    from train.engine import DistInfo, _build_optimizer, _make_loader, train_batch_size
    cfg = Config()
    assert [train_batch_size(n, cfg) for n in (90, 184, 300, 5000)] == [10, 23, 30, 32]
    assert train_batch_size(90, Config(batch_size=64)) == 64
    data = tmp_path / "d"
    make_synthetic(str(data), "split", CLASSES[:2], per_class=64, size=16)      # train/: 45 + 45 images
    samples = D.load_splits(str(data), val_mode="given").train
    assert len(samples) == 90
    for c, steps in ((Config(image_size=16, workers=0), 9), (Config(image_size=16, workers=0, batch_size=64), 2)):
        loader = _make_loader(samples, c, DistInfo(), True, 0)
        seen = [i for _, _, idx, _ in loader for i in idx.tolist()]
        assert len(loader) == steps and sorted(seen) == list(range(90))
    model = torch.nn.Linear(2, 2)
    opt, sched = _build_optimizer(Config(warmup_epochs=1, lr=1.0), model, epochs=3, steps_per_epoch=9)
    lrs = []
    for _ in range(27):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:9] == pytest.approx([(t + 1) / 9 for t in range(9)])          # warm-up over the first epoch
    assert lrs[9] == pytest.approx(1.0) and lrs[-1] < 0.02 and lrs == sorted(lrs[:10]) + lrs[10:]
    # paper preset: StepLR every 7 epochs with gamma 0.01, per optimizer step
    opt, sched = _build_optimizer(Config(scheduler="step", lr_step=7, lr_gamma=0.01, warmup_epochs=0, lr=1.0),
                                  model, epochs=15, steps_per_epoch=2)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[13] == 1.0 and lrs[14] == pytest.approx(0.01) and lrs[28] == pytest.approx(1e-4)


def test_fit_on_90_images_steps_and_majority_report(tmp_path, capsys):
    data = tmp_path / "d"
    make_synthetic(str(data), "split", CLASSES[:2], per_class=64, size=16)
    run("fit", data, "--val-mode", "given", "--out", tmp_path, "--name", "r", "--epochs", 1, "--no-latency",
        "--image-size", 16, "--threads", 1, "--no-progress", "--model-kwargs", TINY)
    out = capsys.readouterr().out
    assert "90 training images, batch 10 per process: 9 optimizer steps per epoch" in out
    with open(tmp_path / "r" / "log.csv") as fh:
        row = next(csv.DictReader(fh))
    assert row["train_images"] == "90" and float(row["images_per_s"]) > 0
    assert float(row["val_majority_rate"]) == pytest.approx(0.5)
    m = load(tmp_path / "r" / "metrics.json")
    assert m["majority_rate"] == pytest.approx(0.5) and "beats_majority" in m
    assert "majority_rate=0.5000" in out
    ck = torch.load(tmp_path / "r" / "best.pt", weights_only=False)
    assert len(ck["splits"]["train"]) == 90 and len(ck["splits"]["test"]) == 2 * 13


def test_selected_epoch_and_runs_in_one_process_repeat(tmp_path):
    """best.pt is the last epoch by default and the first epoch of the highest validation score with
    --select-epoch best (the paper preset's choice); the epoch choice changes nothing else, and a second run in the
    same process, whose images are decoded already, draws the same initial weights and batches as the first."""
    from train.config import PRESETS, Config, config_from_dict
    assert Config().select_epoch == "last" and PRESETS["paper"]["select_epoch"] == "best"
    with pytest.raises(ValueError, match="two_step_epochs must be positive, got -1"):
        config_from_dict({"two_step_epochs": -1})
    data = tmp_path / "d"
    make_synthetic(str(data), "split", CLASSES[:2], per_class=24, size=16)
    common = ["--val-mode", "given", "--out", tmp_path, "--epochs", 3, "--two-step-epochs", 1, "--no-latency",
              "--image-size", 16, "--threads", 1, "--no-progress", "--model-kwargs", TINY]
    run("fit", data, "--name", "last", *common)
    run("fit", data, "--name", "best", "--select-epoch", "best", *common)
    logs = {}
    for name in ("last", "best"):
        with open(tmp_path / name / "log.csv") as fh:
            logs[name] = [(r["phase"], r["train_loss"], r["val_loss"], float(r["val_select"]))
                          for r in csv.DictReader(fh)]
    assert [row[0] for row in logs["last"]] == ["float", "final", "final", "final"]
    assert logs["last"] == logs["best"]
    scores = [row[3] for row in logs["last"]]
    best = 1 + scores.index(max(scores[1:]), 1)          # the float twin's epoch is never the result
    for name, epoch in (("last", 4), ("best", best)):
        assert torch.load(tmp_path / name / "best.pt", weights_only=False)["epoch"] == epoch
        assert load(tmp_path / name / "metrics.json")["best_epoch"] == epoch


def test_majority_warning_and_cv_interval():
    from scipy import stats
    from train.crossval import summarize_folds
    from train.metrics import majority_warning
    m = classification_metrics([0, 0, 0, 1], np.array([[.9, .1]] * 4), ["a", "b"])
    assert m["majority_rate"] == 0.75 and not m["beats_majority"]
    assert "does not beat the majority-class rate 0.7500" in majority_warning(m, "test")
    folds = [{"fold": i + 1, "accuracy": a, "majority_rate": 0.6} for i, a in enumerate([0.7, 0.8, 0.75, 0.6])]
    s = summarize_folds(folds)
    a = np.array([0.7, 0.8, 0.75, 0.6])
    half = stats.t.ppf(0.975, 3) * a.std(ddof=1) / 2
    assert s["mean"]["accuracy"] == pytest.approx(a.mean()) and s["std"]["accuracy"] == pytest.approx(a.std(ddof=1))
    assert s["ci95"]["accuracy"] == pytest.approx([a.mean() - half, a.mean() + half])
    assert s["folds_not_beating_majority"] == [4]


def test_cv_holds_out_every_image_exactly_once(tmp_path):
    """`cv` on a single <class>/ folder: k folds of ALL images (the old code first set 20% aside for a test split
    that no fold used); each fold's checkpoint knows the images it was tested on."""
    data = tmp_path / "single"
    make_synthetic(str(data), "single", CLASSES[:2], per_class=9, size=16)
    pool = D.load_pool(str(data))[0]
    assert len(pool) == 18
    folds = D.stratified_kfold(pool, 3, seed=0)
    held = [s.path for _, h in folds for s in h]
    assert sorted(held) == sorted(s.path for s in pool)                       # each image held out once
    for tr, h in folds:
        assert not {s.path for s in tr} & {s.path for s in h} and len(tr) + len(h) == 18
        assert sorted(s.label for s in h) == [0, 0, 0, 1, 1, 1]               # stratified
    run("cv", data, "--folds", 3, "--epochs", 1, "--out", tmp_path, "--name", "cv", "--no-latency",
        "--image-size", 16, "--threads", 1, "--no-progress", "--model-kwargs", TINY)
    with open(tmp_path / "cv" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["path"] for r in rows) == sorted(s.path for s in pool)
    assert sorted(r["path"] for r in rows if r["fold"] == "2") == sorted(s.path for s in folds[1][1])
    s = load(tmp_path / "cv" / "cv_summary.json")
    assert set(s["ci95"]) >= {"accuracy", "majority_rate"} and s["k"] == 3
    for f in (1, 2, 3):   # the fold's inner validation images come from its training part, never its held-out part
        ck = torch.load(tmp_path / "cv" / f"fold{f}" / "best.pt", weights_only=False)
        held_f = {p for p, _ in ck["splits"]["test"]}
        assert held_f == {x.path for x in folds[f - 1][1]}
        assert not held_f & {p for p, _ in ck["splits"]["val"] + ck["splits"]["train"]}
    ev = tmp_path / "ev"
    run("evaluate", "--checkpoint", tmp_path / "cv" / "fold2" / "best.pt", "--eval-out", ev, "--threads", 1,
        "--no-progress", "--no-latency")
    assert load(ev / "metrics.json")["n"] == 6
    assert load(ev / "metrics.json")["accuracy"] == load(tmp_path / "cv" / "fold2" / "metrics.json")["accuracy"]


def test_augmented_copies_of_held_out_originals_never_train(tmp_path, msld_data):
    """MSLD v2.0 names an original DiseaseCode_Patient_Image and its augmented copies after it. The 75:25 resplit
    moves some training originals into validation: their copies must leave the training split. (The old code kept
    every copy: this test fails on it.)"""
    assert D.original_key("MKP_17_01_aug3.jpg") == D.original_key("MKP_17_01.jpg") == "mkp_17_1"
    assert D.original_key("HFMD_5_10.png") != D.original_key("HFMD_5_1.png")
    assert D.original_key("mkp_17_1-rot.jpg") == "mkp_17_1"
    root = tmp_path / "msld"
    shutil.copytree(msld_data, root)
    codes = {"mpox": "MKP", "chickenpox": "CHP", "measles": "MSL", "healthy": "HEALTHY"}
    aug = root / "Augmented Images" / "FOLDS_AUG" / "fold1_AUG" / "Train"
    patient = 0
    for split in ("Train", "Validation"):
        for cdir in sorted((root / "Original Images" / "Fold1" / split).iterdir()):
            for f in sorted(cdir.iterdir()):       # rename the originals the MSLD way, write two copies of each
                patient += 1
                name = f"{codes[cdir.name.lower()]}_{patient:02d}_01"
                f.rename(cdir / f"{name}.jpg")
                (aug / cdir.name).mkdir(parents=True, exist_ok=True)
                for j in (1, 2):
                    shutil.copy(cdir / f"{name}.jpg", aug / cdir.name / f"{name}_aug{j}.jpg")
    s = D.load_splits(str(root), fold=1, extra_train=str(root / "Augmented Images"))
    n_orig = len(s.train) - sum("Augmented" in x.path for x in s.train)
    held = {D.original_key(x.path) for x in s.val + s.test}
    extra = [x for x in s.train if "Augmented" in x.path]
    assert len(s.val) > 0 and extra
    assert not {D.original_key(x.path) for x in extra} & held
    assert len(extra) == 2 * n_orig                       # the copies of the training originals all stay
    assert any("augmented copies of validation/test originals left out" in n for n in s.notes)


@pytest.mark.skipif(not os.path.isdir(HYMENOPTERA), reason="../shared/data/hymenoptera is not present")
def test_hymenoptera_pool_and_folds():
    """The real-photo development set: all 398 images (with the GIF placeholder and the .jpeg) are pooled for cv,
    each held out exactly once over 5 folds; --val-mode test scores val/ and selects on a split of train/."""
    pool = D.load_pool(HYMENOPTERA)[0]
    assert len(pool) == 398 and any(p.path.endswith(".gif") for p in pool)
    held = [s.path for _, h in D.stratified_kfold(pool, 5, 0) for s in h]
    assert len(held) == len(set(held)) == 398
    s = D.load_splits(HYMENOPTERA, val_mode="test")
    assert len(s.test) == 153 and len(s.train) + len(s.val) == 245
    assert all(os.sep + "val" + os.sep in x.path for x in s.test)
