"""Every evaluation picture is drawn and written as a PNG from the records its metric makes."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ediff_train.metrics.plots import attention_plot, fid_clip_plot, loss_by_sigma_plot, switch_plot


def test_each_plot_writes_a_png(tmp_path: Path) -> None:
    rows = [{"guidance": g, "fid": 3.0 - g / 4, "acc": 0.6 + g / 20} for g in (1, 2, 4)]
    made = [
        fid_clip_plot(
            [{"label": "E0_0", "rows": rows}], "fid", "acc", "FID", "acc", tmp_path / "a.png"
        )
    ]
    bands = [
        {"node": "E1_0", "sigma_lo": 0.0, "sigma_hi": 0.3},
        {"node": "E1_1", "sigma_lo": 0.3, "sigma_hi": float("inf")},
    ]
    made.append(
        loss_by_sigma_plot(
            [
                {
                    "label": "E1",
                    "sigmas": [0.01, 0.1, 1, 10],
                    "loss": [1.0, 0.5, 0.4, 0.3],
                    "bands": bands,
                }
            ],
            tmp_path / "b.png",
        )
    )
    recs = [
        {
            "sigma": s,
            "t5": 0.2,
            "clip_txt": 0.7,
            "clip_img": 0.05,
            "null": 0.05,
            "expert": "E1_1" if s > 0.3 else "E1_0",
        }
        for s in (80, 5, 0.5, 0.1, 0.01)
    ]
    made.append(attention_plot(recs, "E1", tmp_path / "c.png"))
    made.append(
        switch_plot(
            [{"fraction_with_A": f, "reads_as_A": f, "reads_as_B": 1 - f} for f in (0, 0.5, 1)],
            "E0_0",
            tmp_path / "d.png",
        )
    )
    for path in made:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 300
