import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiramisu.checkpoint import atomic_save, load_checkpoint
from tiramisu.cli import main
from tiramisu.config import load_config
from tiramisu.data import make_synthetic_dataset
from tiramisu.errors import CheckpointError
from tiramisu.models import FCDenseNet, batch_statistics
from tiramisu.training import TrainingDiverged, evaluate_checkpoint, train

TINY = (
    "model.kwargs={growth_rate: 4, down_blocks: [1, 1], bottleneck_layers: 1, "
    "first_conv_channels: 8, dropout: 0.2}"
)


def tiny_overrides(root: Path, epochs: int = 2) -> list[str]:
    return [
        "data.dataset=synthetic",
        f"data.root={root}",
        "data.crop_size=[32, 32]",
        TINY,
        "model.name=fcdensenet56",
        f"train.epochs={epochs}",
        "train.batch_size=4",
        "train.eval_batch_size=4",
        "train.optimizer=adam",
        "train.lr=1e-2",
        "train.patience=null",
        "train.deterministic=true",
    ]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("scenes"), n_train=12, n_val=6, size=(40, 48), seed=3
    )


def metrics_without_timing(path: Path) -> dict:
    m = json.loads(path.read_text())
    return {k: m[k] for k in ("miou", "global_accuracy", "confusion_matrix", "iou")}


def history_without_timing(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rows]


def test_short_run_writes_everything_and_evaluate_reproduces_it(scenes, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(scenes, epochs=3))
    metrics = train(cfg, out, quiet=True)
    for name in (
        "last.pt",
        "best.pt",
        "history.csv",
        "history.jsonl",
        "loss.png",
        "miou.png",
        "accuracy.png",
        "metrics.json",
        "report_val.txt",
        "confusion_matrix_val.png",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    assert len((out / "history.jsonl").read_text().splitlines()) == 3
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 3 and ckpt["stage"] == "train"
    assert {"model", "optimizer", "scheduler", "rng", "config", "history"} <= set(ckpt)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-2 * 0.995**3)
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(out / "best.pt"),
                "--split",
                "val",
                "--json",
                str(tmp_path / "eval.json"),
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    assert "mean IoU" in capsys.readouterr().out
    assert metrics_without_timing(tmp_path / "eval.json") == metrics_without_timing(
        out / "metrics.json"
    )
    assert metrics["miou"] == pytest.approx(
        json.loads((out / "eval.json" if False else tmp_path / "eval.json").read_text())["miou"]
    )
    # A second train into the same folder without --resume must not clobber the run.
    with pytest.raises(Exception, match="--resume"):
        train(cfg, out, quiet=True)


def test_finetune_stage_runs_on_full_frames(scenes, tmp_path):
    cfg = load_config(
        None,
        tiny_overrides(scenes, epochs=1)
        + ["finetune.enabled=true", "finetune.epochs=1", "finetune.batch_size=2"],
    )
    train(cfg, tmp_path / "ft", quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "ft" / "history.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["train", "finetune"]
    assert rows[1]["lr"] == pytest.approx(1e-4)


def test_early_stopping_patience_is_counted_per_stage_and_rechecked_on_resume(scenes, tmp_path):
    # SGD at lr 1e-12 leaves the weights as they are (to float32 precision, but for zero-valued
    # biases moving by ~1e-12), so every evaluation after the first scores the same: no
    # improvement, and each stage runs exactly as many epochs as its patience allows.
    out = tmp_path / "es"
    overrides = tiny_overrides(scenes, epochs=6) + [
        "train.optimizer=sgd",
        "train.lr=1e-12",
        "train.weight_decay=0",
        "train.patience=2",
        "finetune.enabled=true",
        "finetune.epochs=6",
        "finetune.batch_size=2",
        "finetune.lr=1e-12",
        "finetune.patience=2",
    ]
    train(load_config(None, overrides), out, quiet=True)

    def stages() -> list[tuple[str, int]]:
        rows = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
        return [(r["stage"], r["epoch"]) for r in rows]

    # The first stage stops 2 evaluations after its best (epoch 1); fine-tuning gets its own 2.
    assert stages() == [("train", 1), ("train", 2), ("train", 3), ("finetune", 1), ("finetune", 2)]
    ckpt = load_checkpoint(out / "last.pt")
    assert (ckpt["stage"], ckpt["bad_epochs"], ckpt["stopped"]) == ("finetune", 2, True)
    assert ckpt["best"] == {"metric": ckpt["best"]["metric"], "epoch": 1, "stage": "train"}

    # A checkpoint from before the fix carried the first stage's count into fine-tuning; the
    # count is rebuilt from the history, and a larger patience on resume continues the stage.
    ckpt["bad_epochs"] = 99
    atomic_save(ckpt, out / "last.pt")
    assert main(["train", "--out", str(out), "--resume", "--set", "finetune.patience=3"]) == 0
    assert stages()[-2:] == [("finetune", 2), ("finetune", 3)]
    assert load_checkpoint(out / "last.pt")["bad_epochs"] == 3
    # Resuming a stage that early stopping ended (with the same patience) trains nothing more.
    assert main(["train", "--out", str(out), "--resume", "--set", "finetune.patience=3"]) == 0
    assert len(stages()) == 6


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_good_checkpoint(
    scenes, tmp_path, monkeypatch
):
    out = tmp_path / "nan"
    train(load_config(None, tiny_overrides(scenes, epochs=1)), out, quiet=True)
    before = (out / "last.pt").read_bytes()
    real = torch.nn.CrossEntropyLoss.forward
    monkeypatch.setattr(
        torch.nn.CrossEntropyLoss, "forward", lambda self, x, y: real(self, x, y) * float("nan")
    )
    with pytest.raises(TrainingDiverged, match="loss became nan"):
        train(load_config(None), out, resume=True, quiet=True, resume_overrides=["train.epochs=3"])
    assert (out / "last.pt").read_bytes() == before
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tiramisu.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    scenes = make_synthetic_dataset(tmp_path / "data", n_train=24, n_val=4, size=(64, 64))
    sets = []
    for o in tiny_overrides(scenes, epochs=5) + ["data.crop_size=[64, 64]"]:
        sets += ["--set", o]
    full = _cli(["train", "--out", str(tmp_path / "full"), "--quiet", *sets])
    assert full.wait(timeout=300) == 0, full.stdout.read()

    killed = _cli(["train", "--out", str(tmp_path / "killed"), "--quiet", *sets])
    history = tmp_path / "killed" / "history.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if history.exists() and len(history.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert killed.poll() is None, "the run finished before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    epoch_at_kill = load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"]
    assert 2 <= epoch_at_kill < 5

    resumed = _cli(["train", "--out", str(tmp_path / "killed"), "--resume", "--quiet", *sets])
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    assert history_without_timing(tmp_path / "killed" / "history.jsonl") == history_without_timing(
        tmp_path / "full" / "history.jsonl"
    )
    assert metrics_without_timing(tmp_path / "killed" / "metrics.json") == metrics_without_timing(
        tmp_path / "full" / "metrics.json"
    )
    a = load_checkpoint(tmp_path / "killed" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_processes_gloo_metrics_equal_single_process(scenes, tmp_path):
    sets = []
    for o in tiny_overrides(scenes, epochs=2):
        sets += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "tiramisu.cli",
            "train",
            "--out",
            str(tmp_path / "ddp"),
            "--quiet",
            "--device",
            "cpu",
            *sets,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "ddp"
    assert len((out / "history.jsonl").read_text().splitlines()) == 2  # rank 0 only
    ddp = json.loads((out / "metrics.json").read_text())
    single = evaluate_checkpoint(load_checkpoint(out / "best.pt"), "val", device="cpu", quiet=True)
    assert ddp["confusion_matrix"] == single["confusion_matrix"]
    assert sum(map(sum, ddp["confusion_matrix"])) == 6 * 40 * 48  # every val pixel once
    assert ddp["miou"] == pytest.approx(single["miou"])


def test_batch_statistics_mode_is_per_image_train_mode_bn_without_touching_running_stats():
    model = FCDenseNet(
        growth_rate=4,
        down_blocks=(1,),
        bottleneck_layers=1,
        first_conv_channels=8,
        num_classes=3,
        dropout=0.0,
    )
    x = torch.randn(3, 3, 16, 16)
    model.train()
    with torch.no_grad():
        # The paper's setting: BatchNorm in training mode, one image at a time.
        reference = torch.cat([model(x[i : i + 1]) for i in range(3)])
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.eval()
    with torch.no_grad(), batch_statistics(model):
        per_image = model(x)
    torch.testing.assert_close(per_image, reference, rtol=1e-4, atol=1e-5)
    for k, v in model.state_dict().items():
        if "running" in k:
            assert torch.equal(v, running[k])
    with torch.no_grad():
        assert not torch.allclose(model(x), per_image)  # outside the block: running stats again


def test_checkpoint_loading_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"format": "tiramisu-checkpoint", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused: it contains Python objects"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04broken")
    with pytest.raises(CheckpointError, match="trunc.pt"):
        load_checkpoint(tmp_path / "trunc.pt")


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "c.pt"
    atomic_save({"a": torch.ones(1)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["a"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    root = make_synthetic_dataset(tmp_path / "d", n_train=2, n_val=1, size=(32, 32))
    (root / "train" / "masks" / "scene_0001.png").write_bytes(b"garbage")
    code = main(
        [
            "train",
            "--out",
            str(tmp_path / "r"),
            "--quiet",
            "--set",
            "data.dataset=synthetic",
            "--set",
            f"data.root={root}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "scene_0001.png" in err and err.count("\n") == 1
    assert not (tmp_path / "r" / "last.pt").exists()


def test_demo_leaves_a_complete_run_folder(tmp_path):
    from tiramisu.demo import run_demo

    metrics = run_demo(tmp_path / "demo", epochs=1, device="cpu")
    run = tmp_path / "demo" / "run"
    for name in ("best.pt", "loss.png", "miou.png", "metrics.json", "confusion_matrix_val.png"):
        assert (run / name).is_file(), name
    assert len(list((run / "predictions").glob("*_compare.png"))) == 8
    assert 0 <= metrics["miou"] <= 1


def test_amp_and_channels_last_auto_resolve_per_device():
    from tiramisu.hardware import autocast_context, native_bf16, resolve_amp, resolve_channels_last

    cpu = torch.device("cpu")
    native = native_bf16(cpu)  # which CPUs count: test_cpu_bf16_is_native_only_with_...
    assert resolve_amp(cpu, "auto") == ("bf16" if native else "none")
    assert resolve_amp(cpu, "none") == "none" and resolve_amp(cpu, "bf16") == "bf16"
    amp = resolve_amp(cpu, "auto")
    assert resolve_channels_last("auto", amp) is native
    assert resolve_channels_last(False, "bf16") is False  # explicit choices are kept
    assert resolve_channels_last(True, "none") is True
    with autocast_context(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(Exception, match="auto, none, bf16 or fp16"):
        autocast_context(cpu, "fp8")


def test_auto_precision_stays_auto_in_the_run_and_resolves_on_each_machine(
    scenes, tmp_path, monkeypatch, capsys
):
    """A run started where bf16 is native and resumed on an AVX2-only CPU must switch to fp32
    (emulated bf16 was 8.8x slower there); a forced bf16 on such a CPU warns."""
    import yaml

    import tiramisu.hardware as hardware
    import tiramisu.training.trainer as trainer

    def machine(native: bool) -> None:
        for module in (hardware, trainer):
            monkeypatch.setattr(module, "native_bf16", lambda device: native)
        name = "bf16 box" if native else "AVX2 box"
        monkeypatch.setattr(trainer, "describe_machine", lambda device: name)

    out = tmp_path / "run"
    machine(True)
    train(load_config(None, tiny_overrides(scenes, epochs=1)), out)
    assert "amp bf16, channels_last True" in capsys.readouterr().out
    stored = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (stored["amp"], stored["channels_last"]) == ("auto", "auto")
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["config"]["train"]["amp"] == "auto"
    assert ckpt["precision"] == {"device": "cpu", "amp": "bf16", "channels_last": True}

    machine(False)
    train(load_config(None), out, resume=True, resume_overrides=["train.epochs=2"])
    log = capsys.readouterr().out
    assert "amp none, channels_last False" in log and "warning" not in log
    assert load_checkpoint(out / "last.pt")["precision"]["amp"] == "none"

    train(
        load_config(None),
        out,
        resume=True,
        resume_overrides=["train.epochs=3", "train.amp=bf16"],
    )
    log = capsys.readouterr().out
    assert "warning: train.amp=bf16 but cpu has no native bf16" in log
    assert load_checkpoint(out / "last.pt")["precision"]["amp"] == "bf16"
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["amp"] == "bf16"

    train(
        load_config(None),
        out,
        resume=True,
        resume_overrides=["train.epochs=4", "train.amp=none", "train.channels_last=true"],
    )
    log = capsys.readouterr().out
    assert "amp none, channels_last True" in log
    assert "warning: train.channels_last=true in fp32 on the CPU" in log
    assert load_checkpoint(out / "last.pt")["precision"]["channels_last"] is True

    # Every epoch's record says where and how it ran, so a report can account for each one.
    history = load_checkpoint(out / "last.pt")["history"]
    assert [(r["epoch"], r["machine"], r["precision"]) for r in history] == [
        (1, "bf16 box", "bf16 + channels_last"),
        (2, "AVX2 box", "fp32"),
        (3, "AVX2 box", "bf16 + channels_last"),
        (4, "AVX2 box", "fp32 + channels_last"),
    ]
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["machine"] for r in rows] == [r["machine"] for r in history]


def test_machine_segments_account_for_every_epoch_of_a_resumed_run():
    from tiramisu.training.report import format_machine_segments, machine_segments

    def rec(stage, epoch, machine, precision="fp32", img_s=2.0, train_s=100.0, val_s=20.0):
        r = {"stage": stage, "epoch": epoch, "train_images_per_s": img_s, "train_time_s": train_s}
        if val_s is not None:
            r["val_time_s"] = val_s
        if machine is not None:  # records from before epochs kept their machine
            r.update(machine=machine, precision=precision)
        return r

    history = [
        rec("train", 1, None, img_s=1.0),
        rec("train", 2, None, img_s=3.0, train_s=300.0),
        rec("train", 3, "A", img_s=2.0, val_s=None),
        rec("train", 4, "A", img_s=4.0),
        rec("train", 5, "A", precision="bf16 + channels_last"),
        rec("train", 6, "B"),
        rec("finetune", 1, "B", train_s=1000.0, val_s=800.0),
    ]
    segments = machine_segments(history)
    got = [
        (s["stage"], s["first_epoch"], s["last_epoch"], s["epochs"], s["machine"], s["precision"])
        for s in segments
    ]
    assert got == [
        ("train", 1, 2, 2, "not recorded", "not recorded"),
        ("train", 3, 4, 2, "A", "fp32"),
        ("train", 5, 5, 1, "A", "bf16 + channels_last"),
        ("train", 6, 6, 1, "B", "fp32"),
        ("finetune", 1, 1, 1, "B", "fp32"),
    ]
    # Throughput is images over seconds for the stretch, not a mean of the epochs' rates:
    # (100 * 1 + 300 * 3) / 400 = 2.5 img/s; wall time includes validation where there was one.
    assert segments[0]["train_images_per_s"] == pytest.approx(2.5)
    assert segments[0]["wall_seconds"] == pytest.approx(440.0)
    assert segments[1]["train_images_per_s"] == pytest.approx(3.0)
    assert segments[1]["wall_seconds"] == pytest.approx(220.0)  # epoch 3 had no validation
    table = format_machine_segments(segments).splitlines()
    assert len(table) == 2 + 5
    assert table[2] == "| 1-2 | train | not recorded | not recorded | 2.50 | 2-5 | 0.12 |"
    assert table[3] == "| 3-4 | train | A | fp32 | 3.00 | 2 | 0.06 |"
    assert table[6] == "| 1 | finetune | B | fp32 | 2.00 | 30 | 0.50 |"
    # Epoch lengths count whole validated epochs only: one cut short by a time budget, or one
    # without validation, would put a figure in the range that no real epoch takes.
    cut = {**rec("train", 2, "A", train_s=60.0), "partial_epoch": True}
    timed = machine_segments(
        [rec("train", 1, "A", train_s=580.0), cut, rec("train", 3, "A", val_s=None)]
    )
    assert timed[0]["epoch_minutes"] == pytest.approx((10.0, 10.0))
    unvalidated = machine_segments([rec("train", 1, "A", val_s=None)])
    assert unvalidated[0]["epoch_minutes"] is None
    assert (
        format_machine_segments(unvalidated).splitlines()[2]
        == "| 1 | train | A | fp32 | 2.00 | - | 0.03 |"
    )
    # A gap in the epochs (a run restarted from an earlier checkpoint) starts a new stretch.
    gap = machine_segments([rec("train", 1, "A"), rec("train", 3, "A")])
    assert [(s["first_epoch"], s["last_epoch"]) for s in gap] == [(1, 1), (3, 3)]


def test_machine_description_names_what_decides_the_speed(monkeypatch):
    import tiramisu.hardware as hardware

    monkeypatch.setattr(hardware, "cpu_model_name", lambda: "Some CPU 9000")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(hardware, "_cpu_native_bf16", lambda: True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libtcmalloc_minimal.so.4")
    torch_version = torch.__version__.split("+")[0]
    assert hardware.describe_machine(torch.device("cpu")) == (
        f"Some CPU 9000 (AVX512, native bf16), 7 threads, tcmalloc; torch {torch_version}"
    )
    monkeypatch.setattr(hardware, "_cpu_native_bf16", lambda: False)
    monkeypatch.delenv("LD_PRELOAD")
    assert hardware.describe_machine(torch.device("cpu")) == (
        f"Some CPU 9000 (AVX512), 7 threads; torch {torch_version}"
    )
    assert hardware.precision_label("none", False) == "fp32"
    assert hardware.precision_label("fp16", True) == "fp16 + channels_last"


def test_cpu_name_tells_apart_cpus_a_hypervisor_names_alike():
    from tiramisu.hardware import cpu_model_name

    def cpuinfo(name: str, family: int, model: int) -> str:
        block = f"processor\t: {{}}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\n"
        block += f"model\t\t: {model}\nmodel name\t: {name}\nstepping\t: 2\n"
        # A second processor block with other values must not leak into the name.
        return block.format(0) + "\n" + block.format(1).replace(f": {model}\n", ": 99\n")

    assert cpu_model_name(cpuinfo("AMD EPYC", 23, 1)) == "AMD EPYC family 23 model 1"
    assert cpu_model_name(cpuinfo("AMD EPYC", 25, 1)) == "AMD EPYC family 25 model 1"
    # A name that carries its model number stays as the vendor wrote it.
    named = "AMD EPYC 7763 64-Core Processor"
    assert cpu_model_name(cpuinfo(named, 25, 1)) == named


def test_cpu_bf16_is_native_only_with_avx512_bf16_or_amx(monkeypatch):
    """oneDNN calls bf16 "supported" on any AVX512 CPU, where it is emulated (1.6x slower than
    fp32 for a FC-DenseNet56 step on an AVX512 Xeon without AVX512-BF16): auto must pick fp32."""
    import tiramisu.hardware as hardware

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)

    def cpu_has(x86: bool, avx512_bf16: bool, amx: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda: x86)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    cpu_has(x86=True, avx512_bf16=False, amx=False)
    assert hardware.native_bf16(cpu) is False
    assert hardware.resolve_precision(cpu, "auto", "auto") == ("none", False)
    cpu_has(x86=True, avx512_bf16=True, amx=False)
    assert hardware.resolve_precision(cpu, "auto", "auto") == ("bf16", True)
    cpu_has(x86=True, avx512_bf16=False, amx=True)
    assert hardware.native_bf16(cpu) is True
    cpu_has(x86=False, avx512_bf16=False, amx=False)  # e.g. an ARM CPU: oneDNN's answer stands
    assert hardware.native_bf16(cpu) is True
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert hardware.native_bf16(cpu) is False


@pytest.mark.parametrize("through_cli", [False, True])
def test_cli_flushes_subnormals_in_every_worker_thread(through_cli):
    """Subnormals made a trained model's CPU step 7.4x slower; the CLI turns them into zeros
    before PyTorch starts its threads, so a parallel kernel (2^20 elements) sees zeros too."""
    probe = (
        "import torch\n"
        + ("from tiramisu.cli import main\nmain(['list'])\n" if through_cli else "")
        + "torch.set_num_threads(2)\n"
        + "x = torch.full((1 << 20,), 1e-39)\n"
        + "print('nonzero', int((x * 1.0).count_nonzero()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert f"nonzero {0 if through_cli else 1 << 20}" in out


def test_curves_mark_the_running_best_and_the_epoch_best_pt_holds():
    import matplotlib.pyplot as plt

    from tiramisu.plots import best_so_far, mark_best

    nan = float("nan")
    running = best_so_far([nan, 60.0, 64.0, 62.0, nan, 65.0, 63.0])
    assert running[0] != running[0]  # nothing validated yet: NaN
    assert running[1:] == [60.0, 64.0, 64.0, 64.0, 65.0, 65.0]
    assert best_so_far([9.0, 7.0, 8.0, 6.5], lower_is_better=True) == [9.0, 7.0, 7.0, 6.5]

    fig, ax = plt.subplots()
    names = ["epoch 1", "epoch 2", "finetune epoch 1", "finetune epoch 2"]
    mark_best(ax, [1, 2, 3, 4], [50.0, 71.26, 70.0, 71.0], names, lower_is_better=False)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"best so far", "best 71.3 % (epoch 2)"}
    assert list(lines["best 71.3 % (epoch 2)"].get_xdata()) == [2]
    plt.close(fig)
