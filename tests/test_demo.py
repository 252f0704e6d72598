"""``blindspot demo``: the MRI and CT audits side by side in two processes give what they give one after the other."""

from __future__ import annotations

import torch

from blindspot.cli import main

TINY = ["--phantom-volumes", "1", "--phantom-slices", "1", "--accelerations", "4", "--search", "rs", "--candidates", "2",
        "--criteria", "seed", "--no-figures", "--no-beyond", "--no-transfer", "--lesion-phantoms", "0", "--ct-images",
        "1", "--invariance-images", "0"]


def test_demo_runs_ct_beside_mri_with_the_same_records(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one after the other
        assert main(["demo", "--out", str(tmp_path / "seq"), *TINY]) == 0
        seq = capsys.readouterr().out
        torch.set_num_threads(2)  # side by side, one thread each
        assert main(["demo", "--out", str(tmp_path / "par"), *TINY]) == 0
        par = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    for sub in ("", "ct/"):
        assert (tmp_path / "seq" / sub / "records.jsonl").read_bytes() == \
            (tmp_path / "par" / sub / "records.jsonl").read_bytes()
        assert (tmp_path / "par" / sub / "report.html").is_file()
    # the CT audit's output (from its log) follows the MRI audit's, as one after the other
    for out in (seq, par):
        assert out.index("U-Net") < out.index("CNN-10") and out.count("audit finished") == 2
    assert (tmp_path / "par" / "ct" / "audit.log").read_text().count("audit finished") == 1
