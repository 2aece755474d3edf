"""GPU leases: found without CUDA, one job per GPU at a time, a reused worker keeps its GPU."""

import multiprocessing
import os
import time

import pytest

from maskrun import devices


@pytest.fixture
def fake_gpus(monkeypatch, tmp_path):
    """Two declared GPUs, no CUDA_VISIBLE_DEVICES, and a private lock dir."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv(devices.FAKE_GPUS_ENV, "2")
    monkeypatch.setattr(devices, "LOCK_DIR", tmp_path / "leases")


def test_visible_gpus_come_from_the_environment_without_cuda(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert devices.visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv(devices.FAKE_GPUS_ENV, "3")
    assert devices.visible_gpus() == ["0", "1", "2"]
    monkeypatch.delenv(devices.FAKE_GPUS_ENV)
    assert devices.visible_gpus() == []  # an empty CUDA_VISIBLE_DEVICES hides every GPU


def test_cpu_and_explicit_devices_take_no_lease(fake_gpus):
    for device in ("cpu", "cuda:1"):
        with devices.gpu_lease(device) as gpu:
            assert gpu is None
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_a_lease_pins_cuda_visible_devices_and_blocks_the_gpu(fake_gpus):
    with devices.gpu_lease("auto") as first:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == first
        del os.environ["CUDA_VISIBLE_DEVICES"]  # as a fresh process would see it
        with devices.gpu_lease("auto") as second:
            assert second != first


def hold_gpu(hold_s: float) -> dict:
    with devices.gpu_lease("auto", poll_s=0.02) as gpu:
        start = time.time()
        time.sleep(hold_s)
        return {"pid": os.getpid(), "gpu": gpu, "visible": os.environ["CUDA_VISIBLE_DEVICES"],
                "start": start, "end": time.time()}


def test_reused_pool_workers_never_share_a_gpu(fake_gpus):
    # Three reused workers compete for two GPUs: the third must wait, never double up.
    with multiprocessing.get_context("fork").Pool(3) as pool:
        leases = pool.map(hold_gpu, [0.15] * 9, chunksize=1)
    assert {lease["gpu"] for lease in leases} == {"0", "1"}
    assert all(lease["visible"] == lease["gpu"] for lease in leases)
    for a in leases:
        for b in leases:
            if a is not b and a["gpu"] == b["gpu"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)
    gpus_per_worker = {}
    for lease in leases:
        gpus_per_worker.setdefault(lease["pid"], set()).add(lease["gpu"])
    assert all(len(gpus) == 1 for gpus in gpus_per_worker.values())  # CUDA reads the pin once per process
