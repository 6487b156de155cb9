"""``python -m stepdistill throughput``: the SD1.5-sized network, the memory guard, one timed setting."""

from __future__ import annotations

import pytest

from stepdistill import throughput
from stepdistill.config import ConfigError

SD15_UNET_PARAMETERS = 859_520_964  # Stable Diffusion 1.5's UNet


def test_memory_estimate_counts_weights_gradients_and_adam_moments():
    p = 1000
    assert throughput.memory_estimate("dmd2", "full", p) == 4 * p * (3 + 3 * 2)  # teacher, student, fake score
    assert throughput.memory_estimate("consistency", "full+gc", p) == 4 * p * (2 + 3)
    assert throughput.memory_estimate("sid", "lora", p) == 4 * p  # one frozen UNet; adapters are small


def test_a_sharded_setting_fits_by_its_share_on_a_gpu_and_by_its_total_on_one_machine(monkeypatch):
    monkeypatch.setattr(throughput, "memory_available", lambda device: 100 * 2**30)
    needed = 150 * 2**30
    assert throughput.fits(needed, 2, "cuda")[0]  # 75 GiB on each of two GPUs
    assert not throughput.fits(needed, 1, "cuda")[0]
    fitting, comparison = throughput.fits(needed, 2, "cpu")  # two processes on one machine share its memory
    assert not fitting and "150 GiB" in comparison and "on this machine" in comparison


@pytest.mark.slow
def test_throughput_reports_each_process_peak_memory_of_a_sharded_setting(tmp_path):
    cfg = throughput.ThroughputConfig(recipes=("dmd2",), variants=("full",), precisions=("no",), num_processes=(2,),
                                      unet_width=0.1, latent_size=8, max_train_steps=2, output_dir=str(tmp_path))
    cfg.validate()
    (setting,) = throughput.run(cfg)["settings"]
    assert setting["num_processes"] == 2 and len(setting["peak_memory_bytes_per_process"]) == 2
    assert setting["peak_memory_bytes"] == max(setting["peak_memory_bytes_per_process"])
    assert "| dmd2 | full | fp32 | 2 |" in (tmp_path / "throughput.md").read_text()


@pytest.mark.slow
def test_throughput_times_a_setting_on_an_sd15_sized_unet(tmp_path):
    cfg = throughput.ThroughputConfig(recipes=("consistency",), variants=("lora",), precisions=("no",),
                                      latent_size=8, max_train_steps=2, output_dir=str(tmp_path))
    cfg.validate()
    summary = throughput.run(cfg)
    assert summary["unet_parameters"] == SD15_UNET_PARAMETERS
    (setting,) = summary["settings"]
    assert setting["seconds_per_step"] > 0 and setting["steps_per_second"] == pytest.approx(1 / setting["seconds_per_step"])
    assert setting["peak_memory_bytes"] > 4 * SD15_UNET_PARAMETERS  # the fp32 UNet was resident
    assert "| consistency | lora | fp32 |" in (tmp_path / "throughput.md").read_text()
    assert not (tmp_path / "sd15_sized").exists()  # the 3.4 GB scratch model is removed


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"recipes": ("progressive",)}, "is not timed here"),
        ({"variants": ("lora+gc",)}, "unknown 'lora\\+gc'"),
        ({"precisions": ("fp8",)}, "unknown 'fp8'"),
        ({"latent_size": 12}, "multiple of 8"),
        ({"max_train_steps": 1}, "the first step is not timed"),
        ({"unet_width": 0.33}, "multiple of 32"),
        ({"num_processes": (0,)}, "must all be ≥ 1"),
    ],
)
def test_throughput_refuses_bad_input(changes, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        throughput.ThroughputConfig(output_dir=str(tmp_path / "t"), **changes).validate()
