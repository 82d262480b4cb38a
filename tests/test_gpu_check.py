"""benchmarks/gpu_check.py: its FLOP count against a hand count, and the JSON of a CPU smoke run
(the schema the one short GPU call fills)."""

import json

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.benchmark_scripts import load_benchmark

gpu_check = load_benchmark("gpu_check")


def test_flops_of_a_step_count_forward_and_backward_by_hand():
    b, a, h, c = 8, 12, 20, 6  # batch, input, hidden, output
    heads, n, d = 2, 10, 4  # attention: heads, tokens, head width
    torch.manual_seed(0)
    first, second = nn.Linear(a, h), nn.Linear(h, c)
    q, k, v = (torch.randn(b, heads, n, d, requires_grad=True) for _ in range(3))
    x = torch.randn(b, a)  # data: no gradient, so the first layer's input gradient is skipped

    def step():
        with sdpa_kernel([SDPBackend.MATH]):  # counted on any device (as --smoke runs it)
            attention = F.scaled_dot_product_attention(q, k, v).sum()
        (second(torch.relu(first(x))).sum() + attention).backward()

    # Linear: forward 2·B·in·out; backward 2·B·in·out for the weight, 2·B·in·out for the input
    # (not for the first layer). Attention: forward Q·Kᵀ and P·V, 2·(2·B·H·N²·d); backward four
    # such products (dV, dP, dQ, dK).
    linear = (2 + 2) * b * a * h + (2 + 2 + 2) * b * h * c
    attention = 2 * 2 * b * heads * n * n * d + 4 * 2 * b * heads * n * n * d
    assert gpu_check.count_flops(step) == linear + attention


def test_peak_of_a_card_is_its_dense_bf16_figure():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.4
    assert gpu_check.peak_tflops("cpu") is None


def test_busy_time_counts_overlapping_kernels_once():
    assert gpu_check.busy_time([(0, 4), (2, 6), (8, 9), (8.5, 8.7)]) == 7


def test_a_smoke_run_writes_every_field_for_both_presets(tmp_path):
    out = tmp_path / "gpu_check.json"
    configs = "imagenet1k_vitb16:eager,imagenet100_vits16:eager"
    args = ["--smoke", "--out", str(out), "--configs", configs, "--steps", "2", "--series", "3"]
    assert gpu_check.main([*args, "--peak-tflops", "2.0", "--run-dir", str(tmp_path)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["smoke"] and report["batch"] == 8
    assert list(report["configs"]) == ["imagenet100_vits16:eager", "imagenet1k_vitb16:eager"]
    for result in report["configs"].values():
        assert len(result["series_ms"]) == 3 and result["cold_ms"] == result["series_ms"][0]
        assert result["warm_median_ms"] > 0 and result["images_per_s"] > 0
        flops, rate = result["flops_per_step"], result["images_per_s"]
        assert isinstance(flops, int) and flops > 0
        assert abs(result["mfu"] - flops * rate / 8 / 1e12 / 2.0) < 1e-12
        profiled = result["profiled_step"]
        assert profiled["kernel_launches"] > 100 and profiled["launches_are"] == "aten ops (CPU)"
        assert isinstance(profiled["host_syncs"], int) and profiled["host_syncs"] >= 0
        assert any("scaled_dot_product" in name for name in profiled["attention_ops"])
        assert result["peak_memory_gib"] is None and result["precision"] == "fp32"


def test_a_config_outside_the_presets_and_modes_is_refused():
    try:
        gpu_check.parse_configs("imagenet100_vits16:jit")
    except SystemExit as exc:
        assert "PRESET:MODE" in str(exc) and "eager, compiled" in str(exc)
    else:
        raise AssertionError("an unknown mode was accepted")
    pairs = gpu_check.parse_configs("imagenet1k_vitb16:compiled,imagenet1k_vitb16:eager")
    assert pairs == [("imagenet1k_vitb16", "eager"), ("imagenet1k_vitb16", "compiled")]


def test_configurations_past_the_time_budget_are_reported_as_skipped(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--smoke", "--out", str(out), "--budget-s", "0"]) == 0
    configs = json.loads(out.read_text())["configs"]
    skipped = {"skipped": "past --budget-s 0"}
    assert len(configs) == 4 and all(c == skipped for c in configs.values())
