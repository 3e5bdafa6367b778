"""The panel-width choice from a cuBLAS throughput table (the table here is synthetic; the
measurement itself runs in tests/test_gpu.py)."""

from mx.kernels import gemm_model


def saturating_table(knee):
    return {f"{s},{w}": 50.0 * min(1.0, w / knee) * min(1.0, s / 4096)
            for s in gemm_model.SIDES for w in gemm_model.WIDTHS}


def test_choose_width_takes_the_narrowest_panel_near_the_best():
    for knee in (512, 2048, 8192):
        width, why = gemm_model.choose_width(saturating_table(knee), 16384, 1 << 20)
        assert width == knee and "TFLOP/s" in why


def test_predict_interpolates_and_clamps():
    table = saturating_table(2048)
    assert gemm_model.predict(table, 16384, 2048) == 50.0
    assert abs(gemm_model.predict(table, 16384, 1448) - 50.0 * (0.5 + 0.5 * 0.5)) < 1.0
    assert gemm_model.predict(table, 10**6, 10**6) == 50.0  # beyond the grid: clamped
    width, _ = gemm_model.choose_width(table, 8192, 700)  # never wider than k allows
    assert width <= 1024
