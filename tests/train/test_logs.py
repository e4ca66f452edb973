"""mtlxray.train.logs: the start-up line and the progress lines a person reads."""

import logging

from mtlxray.train.logs import Progress, run_info_line


def test_progress_lines_without_a_terminal_show_elapsed_time_and_eta(caplog):
    times = iter([100.0, 130.0, 1300.0])  # start, then two log steps
    progress = Progress(total=110, initial=10, desc="phase1", enabled=True, clock=lambda: next(times))
    assert progress.bar is None  # pytest's stderr is not a terminal
    with caplog.at_level(logging.INFO, logger="mtlxray.train.logs"):
        progress.report({"step": 40, "loss": 0.5, "img_per_s": 8.0})  # 30 steps in 30 s: 70 left
        progress.report({"step": 100, "loss": 0.25, "img_per_s": 8.0})  # 90 steps in 1200 s: 10 left
    first, second = caplog.messages
    assert first.endswith("step 40/110 (36%), loss 0.5000, 8.0 img/s, elapsed 0:00:30, ETA 0:01:10")
    assert second.endswith("elapsed 0:20:00, ETA 0:02:13")


def test_the_start_up_line_names_device_precision_world_backend_attention_and_compile():
    info = {"device": "cpu (AVX512, 2 threads)", "precision": "bf16", "precision_source": "run.precision=auto",
            "world_size": 1, "backend": "ddp/single process", "attention": "explicit", "compile": False}
    assert run_info_line(info) == ("device cpu (AVX512, 2 threads), precision bf16 (run.precision=auto), world size 1, "
                                   "backend ddp/single process, attention explicit, compile off")


def test_tensorboard_gets_train_and_val_prefixes_no_counters_and_the_config_as_text(tmp_path):
    from types import SimpleNamespace

    from accelerate.tracking import TensorBoardTracker
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mtlxray.train.logs import MetricsLog

    tracker = TensorBoardTracker("run", tmp_path)  # what accelerate's init_trackers("tensorboard") makes
    tracker.start()
    acc = SimpleNamespace(is_main_process=True, trackers=[tracker])  # the accelerator's side of MetricsLog
    log = MetricsLog(tmp_path / "metrics.jsonl", acc)
    log.write_text({"config": "model:\n  name: mtl_swin_unet"})
    log.write({"type": "train", "step": 5, "epoch": 1, "world_size": 2, "loss": 0.5, "loss/lung": 0.25,
               "lr": 1e-3, "time": 1.0})
    log.write({"type": "eval", "step": 5, "epoch": 1, "val/lung_dice": 0.75})
    tracker.finish()
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"tensors": 0}).Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/loss/lung", "train/lr", "val/lung_dice"]
    assert events.Scalars("val/lung_dice")[0].step == 5
    (text,) = [t for t in events.Tags()["tensors"] if t.startswith("config")]
    assert "    model:\n      name: mtl_swin_unet" in events.Tensors(text)[0].tensor_proto.string_val[0].decode()


def test_each_validation_shows_image_true_and_predicted_masks_in_tensorboard(tiny_cfg, tmp_path):
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mtlxray.train.main import run_training

    cfg = tiny_cfg("phase.init_from=null", "schedule.max_steps=2", "run.eval_every=1", "run.tensorboard=true",
                   phase2=True)
    assert run_training(cfg, resume="none") == 0
    events = EventAccumulator(str(tmp_path / "t" / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert events.Tags()["images"] == ["val/overlays"]
    shown = events.Images("val/overlays")
    assert [e.step for e in shown] == [1, 2]  # one panel per evaluation
    rgb = np.asarray(Image.open(io.BytesIO(shown[-1].encoded_image_string)).convert("RGB")).astype(int)
    assert rgb.shape == (4 * 64, 3 * 64, 3)  # four validation images, each image | true | predicted
    image, true, _ = np.split(rgb, 3, axis=1)
    assert (image == image[..., :1]).all()  # the X-ray itself, grey
    assert (true != image).any(-1).mean() > 0.05  # the true masks drawn on it
